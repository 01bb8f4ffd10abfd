"""Following and controlling jobs.

Log lines come from a moto server over HTTP (CloudWatch Logs works there). Job states
that moto cannot produce (a job is Completed as soon as it is created, and
StopTrainingJob is not implemented) are scripted with botocore's Stubber on a real
boto3 SageMaker client.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import boto3
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from botocore.stub import Stubber

from launcher.cli import Printer, main
from launcher.errors import Interrupted
from launcher.job import Job
from launcher.logs import LOG_GROUP
from launcher.render import follow_job
from launcher.sagemaker_job import SageMakerBackend

NAME = "medical-mixtral-20261129-101500"


def sm_job() -> Job:
    return Job.attach(NAME, region="us-east-1")


def follow(job: Job, as_json: bool = False, **kwargs) -> int:
    return follow_job(job, Printer("json" if as_json else "text"), kwargs.pop("follow", True), **kwargs)


def describe_response(status: str, secondary: str, **extra) -> dict:
    now = datetime.now(timezone.utc)
    return {
        "TrainingJobName": NAME,
        "TrainingJobArn": f"arn:aws:sagemaker:us-east-1:123456789012:training-job/{NAME}",
        "ModelArtifacts": {"S3ModelArtifacts": f"s3://my-bucket/qlora/jobs/{NAME}/output/model/"},
        "TrainingJobStatus": status,
        "SecondaryStatus": secondary,
        "AlgorithmSpecification": {"TrainingInputMode": "File", "TrainingImage": "image"},
        "ResourceConfig": {"InstanceType": "ml.p4d.24xlarge", "InstanceCount": 1, "VolumeSizeInGB": 200},
        "StoppingCondition": {"MaxRuntimeInSeconds": 86400},
        "OutputDataConfig": {"S3OutputPath": "s3://my-bucket/qlora/jobs"},
        "CreationTime": now - timedelta(hours=1, minutes=5),
        "TrainingStartTime": now - timedelta(hours=1),
        **extra,
    }


@pytest.fixture
def stubbed(aws, monkeypatch):
    """A real SageMaker client whose answers the test scripts."""
    client = boto3.client("sagemaker")
    stub = Stubber(client)
    monkeypatch.setattr(SageMakerBackend, "_sm", lambda self: client)
    stub.activate()
    yield stub
    stub.deactivate()


def expect_describe(stub: Stubber, *responses: dict) -> None:
    for r in responses:
        stub.add_response("describe_training_job", r, {"TrainingJobName": NAME})


class LogWriter:
    def __init__(self):
        self.logs = boto3.client("logs")
        self.sent: list[str] = []

    def put(self, stream: str, *messages: str) -> None:
        full = f"{NAME}/{stream}"
        try:
            self.logs.create_log_group(logGroupName=LOG_GROUP)
        except self.logs.exceptions.ResourceAlreadyExistsException:
            pass
        try:
            self.logs.create_log_stream(logGroupName=LOG_GROUP, logStreamName=full)
        except self.logs.exceptions.ResourceAlreadyExistsException:
            pass
        now = int(time.time() * 1000)
        self.logs.put_log_events(logGroupName=LOG_GROUP, logStreamName=full,
                                 logEvents=[{"timestamp": now + i, "message": m} for i, m in enumerate(messages)])
        self.sent += messages


def train(step: int, loss: float) -> str:
    return (f"[train] step={step}/40 epoch={step / 40:.2f} loss={loss:.4f} lr=1.00e-04 grad_norm=0.50 "
            f"tokens_per_sec=2400 eta=0:0{9 - step // 5}:00")


def json_lines(text: str) -> list[dict]:
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def test_follow_prints_every_line_of_every_stream_once(stubbed, capsys):
    writer = LogWriter()
    expect_describe(stubbed, describe_response("InProgress", "Starting"),
                    describe_response("InProgress", "Training"), describe_response("InProgress", "Training"),
                    describe_response("Completed", "Completed", TrainingEndTime=datetime.now(timezone.utc),
                                      BillableTimeInSeconds=3600, TrainingTimeInSeconds=3600))
    script = iter([
        lambda: writer.put("algo-1-1700000000", "Downloading the model", train(5, 1.9), train(10, 1.7)),
        lambda: (writer.put("algo-1-1700000000", train(15, 1.5), train(20, 1.4)),
                 # the second instance's stream appears late
                 writer.put("algo-2-1700000000", "[rank1] NCCL ready", "worker 2 up")),
        lambda: writer.put("algo-1-1700000000", train(40, 1.1), "[eval] step=40/40 eval_loss=1.2000",
                           "[done] steps=40 train_loss=1.1000 runtime_s=3500 adapter=/opt/ml/model"),
    ])
    code = follow(sm_job(), as_json=True, poll_s=0, describe_every_s=0, live=False,
                  sleep=lambda s: next(script)())
    assert code == 0
    objs = json_lines(capsys.readouterr().out)
    printed = [o["message"] for o in objs if "message" in o]
    assert sorted(printed) == sorted(writer.sent)  # all of them, each once
    assert len(printed) == len(set(printed)) == 10
    assert {o["stream"] for o in objs if "stream" in o} == {f"{NAME}/algo-1-1700000000", f"{NAME}/algo-2-1700000000"}
    summary = objs[-1]["summary"]
    assert (summary["status"], summary["step"], summary["total_steps"]) == ("Completed", 40, 40)
    assert summary["cost"]["usd"] == pytest.approx(37.69, abs=0.01)  # 1 h of ml.p4d.24xlarge on demand
    assert summary["adapter"] == f"s3://my-bucket/qlora/jobs/{NAME}/output/model/"
    events = [o["event"] for o in objs if "event" in o]
    # numbers as numbers (loss like eval_loss), step=10/40 as step and total_steps; eta stays h:mm:ss
    assert events[1] == {"kind": "train", "step": 10, "total_steps": 40, "epoch": 0.25, "loss": 1.7, "lr": 1e-4,
                         "grad_norm": 0.5, "tokens_per_sec": 2400, "eta": "0:07:00"}
    stubbed.assert_no_pending_responses()


def test_follow_survives_throttling_and_dropped_connections(stubbed, monkeypatch, capsys):
    writer = LogWriter()
    writer.put("algo-1-1", *[f"line {i}" for i in range(5)])
    expect_describe(stubbed, describe_response("InProgress", "Training"),
                    describe_response("Completed", "Completed", BillableTimeInSeconds=60))
    job = sm_job()
    source = job.log_source()
    real = source.client.get_log_events
    calls = {"n": 0}

    def flaky(**kwargs):
        calls["n"] += 1
        if calls["n"] in (1, 3):
            raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"}}, "GetLogEvents")
        if calls["n"] == 5:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1")
        return real(**kwargs)

    monkeypatch.setattr(source.client, "get_log_events", flaky)
    monkeypatch.setattr(job, "log_source", lambda: source)
    waits = []

    def sleep(s):
        waits.append(s)
        if len(waits) == 3:  # after the retries of the first poll, more lines arrive
            writer.put("algo-1-1", *[f"line {i}" for i in range(5, 8)])

    assert follow(job, as_json=False, poll_s=0, describe_every_s=0, live=False, sleep=sleep) == 0
    captured = capsys.readouterr()
    printed = [x for x in captured.out.splitlines() if x.startswith("line ")]
    assert printed == [f"line {i}" for i in range(8)]
    assert "ThrottlingException; retrying in 1s" in captured.err and "retrying in 2s" in captured.err


def test_a_failed_job_prints_its_reason_and_exits_1(stubbed, capsys):
    LogWriter().put("algo-1-1", train(5, 2.0), "[error] reason=data/train.jsonl: row 7: missing column 'answer'")
    expect_describe(stubbed, describe_response(
        "Failed", "Failed", FailureReason="AlgorithmError: data/train.jsonl: row 7: missing column 'answer'",
        TrainingEndTime=datetime.now(timezone.utc), BillableTimeInSeconds=420))
    assert main(["logs", NAME, "--follow", "--region", "us-east-1"]) == 1
    out = capsys.readouterr().out
    assert "Failed" in out and "reason: AlgorithmError: data/train.jsonl: row 7" in out
    assert "billable: 420 s x 1" in out


def test_a_stopped_spot_job_exits_1_and_reports_the_saving(stubbed, capsys):
    expect_describe(stubbed, describe_response("Stopped", "Stopped", EnableManagedSpotTraining=True,
                                               BillableTimeInSeconds=1200, TrainingTimeInSeconds=3000))
    assert main(["logs", NAME, "--follow", "--region", "us-east-1"]) == 1
    out = capsys.readouterr().out
    assert "Stopped" in out and "spot saving: 60.0%" in out


def test_ctrl_c_detaches_with_130_and_says_how_to_reattach_and_stop(stubbed, capsys):
    expect_describe(stubbed, describe_response("InProgress", "Training"))

    def interrupt(_):
        raise KeyboardInterrupt

    with pytest.raises(Interrupted) as info:
        follow(sm_job(), poll_s=0, live=False, sleep=interrupt)
    assert info.value.exit_code == 130
    text = str(info.value)
    assert f"sm-qlora logs {NAME} --follow" in text and f"sm-qlora stop {NAME}" in text


def test_status_json_for_ci(stubbed, capsys):
    LogWriter().put("algo-1-1", train(5, 1.9), train(10, 1.75), "[eval] step=10/40 eval_loss=1.8000")
    expect_describe(stubbed, *[describe_response("InProgress", "Training")] * 2)
    assert main(["status", NAME, "--output", "json", "--region", "us-east-1"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["status"], s["secondary_status"], s["step"], s["total_steps"], s["loss"]) == (
        "InProgress", "Training", 10, 40, 1.75)  # a number, like eval_loss
    assert s["eval_loss"] == 1.8
    assert 3590 < s["elapsed_s"] < 3700
    assert s["cost"]["usd"] == pytest.approx(37.69, rel=0.02)


def test_stop_a_running_job_and_an_ended_one(stubbed, capsys):
    expect_describe(stubbed, describe_response("InProgress", "Training"))
    stubbed.add_response("stop_training_job", {}, {"TrainingJobName": NAME})
    expect_describe(stubbed, describe_response("Stopping", "Stopping"))
    assert main(["stop", NAME, "--region", "us-east-1"]) == 0
    assert "stopping" in capsys.readouterr().out
    expect_describe(stubbed, *[describe_response("Completed", "Completed")] * 2)  # stop(), then the status shown
    assert main(["stop", NAME, "--region", "us-east-1"]) == 0
    assert "already ended (Completed)" in capsys.readouterr().out
    stubbed.assert_no_pending_responses()  # and no StopTrainingJob for the ended one


def test_launch_wait_then_download_the_adapter(aws, job_dict, tmp_path, capsys):
    cfg = tmp_path / "job.json"
    cfg.write_text(json.dumps(job_dict))
    assert main(["launch", str(cfg), "--wait"]) == 0  # moto: Completed at once
    out = capsys.readouterr().out
    name = out.split("submitted ")[1].split()[0]
    assert f"adapter: s3://my-bucket/qlora/jobs/{name}/output/model/" in out
    s3 = boto3.client("s3")
    for f in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        s3.put_object(Bucket="my-bucket", Key=f"qlora/jobs/{name}/output/model/{f}", Body=f.encode())
    assert main(["download", name, str(tmp_path / "adapter")]) == 0
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert (tmp_path / "adapter" / "README.md").read_text() == "README.md"


def test_plot_writes_a_png_of_the_loss_curves(aws, job_dict, tmp_path, capsys):
    from launcher.job import launch_job

    job = launch_job(job_dict)
    writer = LogWriter()
    writer.logs.create_log_group(logGroupName=LOG_GROUP)
    now = int(time.time() * 1000)
    stream = f"{job.name}/algo-1-1"
    writer.logs.create_log_stream(logGroupName=LOG_GROUP, logStreamName=stream)
    writer.logs.put_log_events(logGroupName=LOG_GROUP, logStreamName=stream, logEvents=[
        {"timestamp": now + i, "message": m} for i, m in enumerate(
            [train(5, 2.0), train(10, 1.6), "[eval] step=10/40 eval_loss=1.7000", train(15, 1.4)])])
    png = tmp_path / "loss.png"
    assert main(["plot", job.name, "--out", str(png)]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(str(png)).shape[:2] == (450, 800)


def test_list_shows_sagemaker_and_local_jobs(aws, job_dict, tmp_path, monkeypatch, capsys):
    from launcher.job import launch_job

    monkeypatch.setenv("SM_QLORA_RUNS_DIR", str(tmp_path / "runs"))
    local = tmp_path / "runs" / "tiny-20261129-000000"
    local.mkdir(parents=True)
    (local / "job.json").write_text(json.dumps({"status": "Completed", "started": time.time() - 60}))
    job = launch_job(job_dict)
    assert main(["list", "--output", "json"]) == 0
    rows = {r["job_name"]: r for r in json.loads(capsys.readouterr().out)["jobs"]}
    assert rows[job.name]["where"] == "sagemaker" and rows["tiny-20261129-000000"]["where"] == "local"


def test_the_same_verbs_read_a_local_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SM_QLORA_RUNS_DIR", str(tmp_path))
    root = tmp_path / "tiny-20261129-000000"
    (root / "output").mkdir(parents=True)
    (root / "model").mkdir()
    (root / "model" / "adapter_config.json").write_text("{}")
    (root / "job.json").write_text(json.dumps({"status": "Completed", "started": time.time() - 90,
                                               "ended": time.time()}))
    (root / "output" / "job.log").write_text("\n".join([train(5, 2.0), train(40, 1.2),
                                                        "[done] steps=40 train_loss=1.2000 runtime_s=80 adapter=x"]) + "\n")
    assert main(["status", root.name, "--output", "json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["local"], s["status"], s["step"], s["loss"]) == (True, "Completed", 40, 1.2)
    assert main(["logs", root.name]) == 0
    assert "[done] steps=40" in capsys.readouterr().out
    assert main(["plot", root.name]) == 0
    assert (root / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["download", root.name, str(tmp_path / "dl")]) == 0
    assert (tmp_path / "dl" / "adapter_config.json").is_file()
    assert main(["stop", root.name]) == 0
    assert "already ended" in capsys.readouterr().out


def test_a_pipe_gets_state_changes_on_stderr_and_a_terminal_gets_a_live_bar(stubbed, capsys):
    writer = LogWriter()
    expect_describe(stubbed, describe_response("InProgress", "Starting"), describe_response("InProgress", "Downloading"),
                    describe_response("Completed", "Completed", BillableTimeInSeconds=60))
    script = iter([lambda: None, lambda: writer.put("algo-1-1", train(5, 1.9))])
    assert follow(sm_job(), poll_s=0, describe_every_s=0, live=False,
                  sleep=lambda s: next(script)()) == 0
    captured = capsys.readouterr()
    assert f"[sm-qlora] {NAME}: InProgress (Starting)" in captured.err
    assert f"[sm-qlora] {NAME}: InProgress (Downloading)" in captured.err
    assert captured.out.splitlines()[0] == train(5, 1.9)  # stdout: the log lines, then the outcome

    expect_describe(stubbed, describe_response("InProgress", "Training"),
                    describe_response("Completed", "Completed", BillableTimeInSeconds=60))
    assert follow(sm_job(), poll_s=0, describe_every_s=0, live=True,
                  sleep=lambda s: None) == 0
    out = capsys.readouterr().out
    assert "5/40 loss 1.9000 2400 tok/s eta 0:08:00" in out and "cost so far $" in out
