"""What a user sees when the job verbs meet odd input: S3 keys that climb out of the
download directory, CloudWatch pages that are empty before the end, a closed pipe, no
region, a job that does not exist, a Failed job's status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone

import boto3
import pytest
from botocore.stub import Stubber

from launcher.cli import Printer, main
from launcher.job import Job, launch_job
from launcher.logs import CloudWatchSource
from launcher.render import follow_job
from launcher.sagemaker_job import SageMakerBackend
from tests.conftest import ROOT
from tests.e2e.test_follow import NAME, describe_response, expect_describe, train


def test_download_never_writes_outside_its_destination(aws, job_dict, tmp_path, capsys):
    job = launch_job(job_dict)  # moto: Completed at once
    s3 = boto3.client("s3")
    prefix = f"qlora/jobs/{job.name}/output/model/"
    s3.put_object(Bucket="my-bucket", Key=prefix + "adapter_config.json", Body=b"{}")
    s3.put_object(Bucket="my-bucket", Key=prefix + "../../../../../../evil.txt", Body=b"planted")
    dest = tmp_path / "a" / "b" / "adapter"
    assert main(["download", job.name, str(dest)]) == 1
    err = capsys.readouterr().err
    # (not "no Traceback in err": a SageMaker SDK log handler left on an earlier test's closed
    # stderr prints "--- Logging error ---" tracebacks here when the e2e files run together)
    assert "error: refusing to download s3://my-bucket/" in err and "evil.txt: it would be written outside" in err
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # nothing at all, not even the good file


def test_the_follower_reads_past_empty_pages_to_the_end_of_the_stream(aws, monkeypatch):
    """CloudWatch may answer an empty page with a new token while more events remain."""
    logs = boto3.client("logs")
    stub = Stubber(logs)
    stream = f"{NAME}/algo-1-1"
    stub.add_response("describe_log_streams", {"logStreams": [{"logStreamName": stream}]})
    pages = [(["Downloading the model", train(5, 1.9)], "f/1"), ([], "f/2"), ([], "f/3"),
             ([train(10, 1.5), "[done] steps=40 train_loss=1.1000 runtime_s=3500 adapter=/opt/ml/model"], "f/4"),
             ([], "f/4")]  # the token repeats: the end
    now = int(time.time() * 1000)
    for i, (messages, token) in enumerate(pages):
        events = [{"timestamp": now + 10 * i + j, "message": m, "ingestionTime": now} for j, m in enumerate(messages)]
        stub.add_response("get_log_events", {"events": events, "nextForwardToken": token, "nextBackwardToken": "b"})
    sm = boto3.client("sagemaker")
    sm_stub = Stubber(sm)
    sm_stub.add_response("describe_training_job", describe_response(
        "Completed", "Completed", TrainingEndTime=datetime.now(timezone.utc), BillableTimeInSeconds=60))
    monkeypatch.setattr(SageMakerBackend, "_sm", lambda self: sm)
    job = Job.attach(NAME, region="us-east-1")
    monkeypatch.setattr(job, "log_source", lambda: CloudWatchSource(NAME, logs))
    with stub, sm_stub:
        lines = [x.message for x in job.lines(follow=True, poll_s=0, sleep=lambda s: None) if hasattr(x, "message")]
    assert lines == [m for messages, _ in pages for m in messages]  # every line, once, in order
    assert lines[-1].startswith("[done] steps=40")
    stub.assert_no_pending_responses()


def test_logs_into_head_ends_quietly(tmp_path):
    runs = tmp_path / "runs"
    root = runs / "tiny-20261129-000000"
    (root / "output").mkdir(parents=True)
    (root / "job.json").write_text(json.dumps({"status": "Completed", "started": time.time() - 9, "ended": time.time()}))
    (root / "output" / "job.log").write_text("".join(f"line {i} " + "x" * 60 + "\n" for i in range(20000)))
    env = os.environ | {"PYTHONPATH": str(ROOT), "SM_QLORA_RUNS_DIR": str(runs)}
    # bash's PIPESTATUS: the exit of `sm-qlora logs` itself, not head's
    result = subprocess.run(f"{sys.executable} -m launcher logs {root.name} | head -1; exit ${{PIPESTATUS[0]}}",
                            shell=True, executable="/bin/bash", capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("line 0 ")
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr


def test_no_region_says_how_to_set_one_at_once(tmp_path, monkeypatch, capsys):
    for var in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("SM_QLORA_RUNS_DIR", str(tmp_path / "runs"))
    from launcher.aws import session

    session.cache_clear()
    started = time.monotonic()
    assert main(["logs", "no-such-job"]) == 2
    err = capsys.readouterr().err
    assert "--region" in err and "AWS_REGION" in err
    assert time.monotonic() - started < 5
    session.cache_clear()


def test_a_job_that_does_not_exist_is_named_at_once(aws, capsys):
    started = time.monotonic()
    assert main(["logs", "no-such-job", "--follow"]) == 3
    assert "no training job named no-such-job in us-east-1" in capsys.readouterr().err
    assert time.monotonic() - started < 10  # no 300 s of retries


@pytest.mark.parametrize("status", ["Failed", "Stopped"])
def test_status_of_an_ended_job_exits_1_like_logs(aws, monkeypatch, capsys, status):
    sm = boto3.client("sagemaker")
    stub = Stubber(sm)
    monkeypatch.setattr(SageMakerBackend, "_sm", lambda self: sm)
    with stub:
        expect_describe(stub, describe_response(status, status, FailureReason="AlgorithmError: boom"))
        assert main(["status", NAME, "--region", "us-east-1"]) == 1
        expect_describe(stub, describe_response(status, status))
        assert follow_job(Job.attach(NAME, region="us-east-1"), Printer("text"), follow=False) == 1
    out = capsys.readouterr().out
    assert f"{NAME}: {status}\n" in out and f"{status} ({status})" not in out

