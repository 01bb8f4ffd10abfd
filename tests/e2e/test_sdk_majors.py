"""Both SageMaker SDK majors send the same CreateTrainingJob request, field for field, and
every job verb works under the one installed.

The SDK major is a property of the venv, so the comparison runs the dry run in this venv's
python and in the other major's (.venv holds v2, .venv-sdk3 holds 3.x: `make test-sdk3`).
Only the job name's time suffix may differ. The dry run sends nothing; AWS_ENDPOINT_URL points
at a closed port, so a stray call fails the launch instead of reaching anything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from launcher.cli import main
from tests.conftest import ROOT
from tests.e2e.container.service_model import checked_requests, violations  # noqa: F401 (a fixture)

VENVS = (ROOT / ".venv", ROOT / ".venv-sdk3")
# Each case moves fields the adapters set differently: the strategy (torchrun keys), spot and
# MaxWait, an own image, a validation channel, the user's tags, the token secret, a budget,
# a resume (another checkpoint URI, one more tag).
CASES = {
    "ddp-on-demand": [],
    "single-gpu-spot-own-image": [
        "--set", "compute.instance_type=ml.g6e.2xlarge", "--set", "compute.spot=true",
        "--set", "compute.max_wait_hours=30",
        "--set", "compute.image_uri=123456789012.dkr.ecr.us-east-1.amazonaws.com/my-hf-training:1",
        "--set", "data.validation=s3://my-bucket/data/val.jsonl", "--set", "aws.tags={team: nlp, cost-center: '42'}"],
    "model-parallel-budget-resume": [
        "--set", "compute.instance_type=ml.g5.12xlarge", "--set", "compute.max_cost_usd=40",
        "--set", "aws.hf_token_secret=arn:aws:secretsmanager:us-east-1:123456789012:secret:hf-AbCdEf",
        "--resume", "medical-mixtral-20261201-080000"],
}


def sdk_major(python: Path | str) -> int | None:
    """The sagemaker major `python` imports; None where it has none (a venv being built)."""
    proc = subprocess.run([str(python), "-c", "from importlib.metadata import version; print(version('sagemaker'))"],
                          capture_output=True, text=True)
    return int(proc.stdout.split(".")[0]) if proc.returncode == 0 else None


def other_major_python() -> Path:
    mine = sdk_major(sys.executable)
    for venv in VENVS:
        python = venv / "bin" / "python"
        if python.is_file() and sdk_major(python) not in (mine, None):
            return python
    pytest.skip(f"no venv here holds the other SDK major than {mine}: `make test-sdk3` builds .venv-sdk3")


def dry_run_request(python: Path | str, extra: list[str]) -> dict:
    """`sm-qlora launch --dry-run --output json` in `python`'s venv, on this checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {
        "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_EC2_METADATA_DISABLED": "true", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    args = ["launch", "examples/job.yaml", "--dry-run", "--output", "json",
            "--set", "data.train=s3://my-bucket/data/train.jsonl", *extra]
    proc = subprocess.run([str(python), "-m", "launcher", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{python}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    result = json.loads(proc.stdout)
    request = json.loads(json.dumps(result["request"]).replace(result["job_name"], "JOB"))
    assert request["TrainingJobName"] == "JOB" and not violations(request)
    return request


@pytest.mark.parametrize("case", CASES)
def test_both_sdk_majors_send_the_same_request(case):
    other = other_major_python()
    mine, theirs = dry_run_request(sys.executable, CASES[case]), dry_run_request(other, CASES[case])
    differ = {k: (mine.get(k), theirs.get(k)) for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k)}
    assert not differ, f"SDK {sdk_major(sys.executable)} and {sdk_major(other)} differ:\n{json.dumps(differ, indent=1)}"
    # the container sees the toolkit's hyperparameters either way: every value JSON-encoded
    assert mine["HyperParameters"]["sagemaker_program"] == '"sm_qlora_entry.py"'
    assert mine["AlgorithmSpecification"]["ContainerEntrypoint"][:2] == ["bash", "-c"]


def test_every_job_verb_works_under_the_installed_sdk(aws, job_dict, tmp_path, capsys, checked_requests):  # noqa: F811
    """launch, status, list, logs, stop, download and merge against moto (which reports a job
    Completed at once), whichever SDK major this venv holds."""
    cfg = tmp_path / "job.json"
    cfg.write_text(json.dumps(job_dict))

    def run(*argv: str) -> tuple[int, dict]:
        code = main([*argv, "--output", "json"])
        return code, json.loads(capsys.readouterr().out or "{}")

    code, launched = run("launch", str(cfg))
    name = launched["job_name"]
    assert code == 0 and [r["TrainingJobName"] for r in checked_requests] == [name]
    assert checked_requests[0]["AlgorithmSpecification"]["ContainerEntrypoint"][0] == "bash"
    code, status = run("status", name)
    assert (code, status["status"]) == (0, "Completed")
    assert name in [j["job_name"] for j in run("list")[1]["jobs"]]
    assert main(["logs", name]) == 0
    capsys.readouterr()
    code, stopped = run("stop", name)
    assert (code, stopped["stop_requested"]) == (0, False)
    boto3.client("s3").put_object(Bucket="my-bucket", Key=f"qlora/jobs/{name}/output/model/adapter_config.json",
                                  Body=b'{"r": 16}')
    code, downloaded = run("download", name, str(tmp_path / "adapter"))
    assert code == 0 and (tmp_path / "adapter" / "adapter_config.json").read_bytes() == b'{"r": 16}'
    code, merged = run("merge", name, "--instance-type", "ml.p4d.24xlarge")
    merge = boto3.client("sagemaker").describe_training_job(TrainingJobName=merged["merge_job"])
    assert code == 0 and merge["HyperParameters"]["sagemaker_program"] == '"sm_qlora_merge.py"'


def test_an_own_training_image_is_the_image_the_job_runs(aws, job_dict):
    """compute.image_uri under either SDK (v2's Estimator used to fail on it with a TypeError:
    it requires py_version even when the image is given)."""
    from launcher.job import launch_job

    image = "123456789012.dkr.ecr.us-east-1.amazonaws.com/my-hf-training:1"
    job = launch_job(job_dict, overrides=[f"compute.image_uri={image}"])
    desc = boto3.client("sagemaker").describe_training_job(TrainingJobName=job.name)
    assert desc["AlgorithmSpecification"]["TrainingImage"] == image
