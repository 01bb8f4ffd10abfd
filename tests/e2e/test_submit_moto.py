"""Launch through the real SageMaker SDK and boto3, over HTTP, to a moto server on a
loopback port; read the job back with boto3 and check the request a user relies on."""

from __future__ import annotations

import json
import re

import boto3
import pytest

from entrypoint.hyperparams import Hyperparameters, unflatten
from entrypoint.progress import METRIC_DEFINITIONS
from launcher.cli import main
from launcher.config import load_config
from launcher.errors import AWSError
from launcher.job import launch_job

SPEC_LINES = {
    "train:loss": ("[train] step=120/3000 epoch=0.04 loss=1.2345 lr=1.98e-04 grad_norm=0.53 "
                   "tokens_per_sec=5120 eta=2:31:04", "1.2345"),
    "train:learning_rate": ("[train] step=120/3000 epoch=0.04 loss=1.2345 lr=1.98e-04 grad_norm=0.53 "
                            "tokens_per_sec=5120 eta=2:31:04", "1.98e-04"),
    "train:tokens_per_sec": ("[train] step=120/3000 epoch=0.04 loss=1.2345 lr=1.98e-04 grad_norm=0.53 "
                             "tokens_per_sec=5120 eta=2:31:04", "5120"),
    "eval:loss": ("[eval] step=200/3000 eval_loss=1.1034", "1.1034"),
}


def describe(name: str) -> dict:
    return boto3.client("sagemaker").describe_training_job(TrainingJobName=name)


def test_launch_creates_the_job_sagemaker_will_run(aws, job_dict):
    job = launch_job(job_dict)
    d = describe(job.name)
    assert re.fullmatch(r"medical-mixtral-\d{8}-\d{6}", job.name)
    assert d["TrainingJobStatus"] in ("InProgress", "Completed")
    image = d["AlgorithmSpecification"]["TrainingImage"]
    assert "huggingface-pytorch-training:2.8.0-transformers4.56.2-gpu-py312" in image
    assert d["ResourceConfig"] == {"InstanceType": "ml.p4d.24xlarge", "InstanceCount": 1, "VolumeSizeInGB": 200}
    assert d["StoppingCondition"]["MaxRuntimeInSeconds"] == 24 * 3600
    assert d["OutputDataConfig"]["S3OutputPath"] == "s3://my-bucket/qlora/jobs"
    assert d["CheckpointConfig"]["S3Uri"] == f"s3://my-bucket/qlora/checkpoints/{job.name}"
    assert d["EnableManagedSpotTraining"] is False
    # The job validates the same hyperparameters the launcher did.
    hp = Hyperparameters.model_validate(unflatten(d["HyperParameters"]))
    assert hp.lora.r == 16 and hp.training.max_seq_length == 2048
    assert hp.data.train.startswith("s3://my-bucket/qlora/uploads/")
    assert d["HyperParameters"]["sagemaker_program"] == '"sm_qlora_entry.py"'
    # p4d.24xlarge has 8 GPUs: torchrun data parallelism through the torch_distributed key.
    assert d["HyperParameters"]["sagemaker_torch_distributed_enabled"] == "true"
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in d["InputDataConfig"]}
    assert channels["train"] == hp.data.train
    assert job.adapter_uri == f"s3://my-bucket/qlora/jobs/{job.name}/output/model/"
    assert job.console_url.endswith(f"#/jobs/{job.name}")
    assert job.arn == d["TrainingJobArn"] and job.as_dict()["arn"] == job.arn
    assert job.log_stream_prefix == f"{job.name}/"


def test_tags_tie_the_job_to_its_config(aws, job_dict):
    job = launch_job(job_dict)
    arn = describe(job.name)["TrainingJobArn"]
    tags = {t["Key"]: t["Value"] for t in boto3.client("sagemaker").list_tags(ResourceArn=arn)["Tags"]}
    assert tags["sm-qlora:config-sha256"] == load_config(job_dict).digest()
    assert tags["sm-qlora:launcher-version"] == "0.1.0"


def test_metric_definitions_read_the_spec_progress_lines(aws, job_dict):
    # moto answers DescribeTrainingJob with metric definitions of its own, so read the
    # request itself (the dry run builds exactly what launch sends).
    request = launch_job(job_dict, dry_run=True).request
    sent = {m["Name"]: m["Regex"] for m in request["AlgorithmSpecification"]["MetricDefinitions"]}
    assert sent == {m["Name"]: m["Regex"] for m in METRIC_DEFINITIONS}
    for name, (line, value) in SPEC_LINES.items():
        assert re.search(sent[name], line).group(1) == value


def test_spot_jobs_get_max_wait(aws, job_dict):
    job = launch_job(job_dict, overrides=["compute.spot=true", "compute.max_run_hours=10",
                                          "compute.max_wait_hours=20", "compute.instance_type=ml.g6e.xlarge"])
    d = describe(job.name)
    assert d["EnableManagedSpotTraining"] is True
    assert d["StoppingCondition"]["MaxWaitTimeInSeconds"] == 20 * 3600
    # One GPU, one instance: no torchrun.
    assert "sagemaker_torch_distributed_enabled" not in d["HyperParameters"] or \
        d["HyperParameters"]["sagemaker_torch_distributed_enabled"] == "false"


def test_data_is_uploaded_once_by_content(aws, job_dict):
    s3 = boto3.client("s3")
    first = launch_job(job_dict)
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="my-bucket")["Contents"])
    assert [k for k in keys if k.endswith("medical.jsonl")] and [k for k in keys if k.endswith("sourcedir.tar.gz")]
    second = launch_job(job_dict, overrides=["lora.r=8"])
    assert first.extra["uploaded"] and second.extra["uploaded"] == []
    assert sorted(o["Key"] for o in s3.list_objects_v2(Bucket="my-bucket")["Contents"]) == keys


def test_the_code_tarball_holds_the_entrypoint_package(aws, job_dict):
    import io
    import tarfile

    launch_job(job_dict)
    s3 = boto3.client("s3")
    key = next(o["Key"] for o in s3.list_objects_v2(Bucket="my-bucket")["Contents"] if o["Key"].endswith(".tar.gz"))
    body = s3.get_object(Bucket="my-bucket", Key=key)["Body"].read()
    names = tarfile.open(fileobj=io.BytesIO(body)).getnames()
    assert {"sm_qlora_entry.py", "requirements.txt", "entrypoint/train.py", "entrypoint/hyperparams.py"} <= set(names)
    assert not any(n.startswith("launcher") for n in names)


def test_dry_run_prints_the_request_and_sends_nothing(monkeypatch, capsys, job_dict, tmp_path):
    # No server at all: any request would fail.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("HF_TOKEN", "hf_THISisAsecretTOKENvalue123456")
    cfg = tmp_path / "job.json"
    cfg.write_text(json.dumps(job_dict))
    assert main(["launch", str(cfg), "--dry-run", "--output", "json"]) == 0
    out = capsys.readouterr().out
    obj = json.loads(out)  # one JSON object, nothing else on stdout
    req = obj["request"]
    assert req["TrainingJobName"] == obj["job_name"]
    assert req["RoleArn"] == job_dict["aws"]["role"]
    assert req["OutputDataConfig"]["CompressionType"] == "NONE"
    assert req["ProfilerConfig"] == {"DisableProfiler": True}
    assert "DebugHookConfig" not in req
    assert "hf_THISisAsecretTOKENvalue123456" not in out
    assert req["Environment"]["SM_QLORA_HF_TOKEN_SECRET"] == "***redacted***"
    assert not any("token" in k.lower() for k in req["HyperParameters"])


def test_hf_token_env_is_refused_for_sagemaker_jobs(aws, job_dict):
    job_dict["aws"]["hf_token_env"] = "HF_TOKEN"
    assert main_json(job_dict) == 2


def main_json(job_dict) -> int:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job_dict, f)
    return main(["launch", f.name, "--output", "json"])


def test_aws_failures_exit_3(monkeypatch, job_dict, tmp_path):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    from launcher.aws import session

    session.cache_clear()
    with pytest.raises(AWSError, match="no AWS credentials"):
        launch_job(job_dict)
    assert main_json(job_dict) == 3


def test_resume_starts_a_new_job_on_the_old_jobs_checkpoints(aws, job_dict):
    first = launch_job(job_dict)
    again = launch_job(job_dict, resume=first.name)
    assert again.name != first.name
    assert describe(again.name)["CheckpointConfig"]["S3Uri"] == f"s3://my-bucket/qlora/checkpoints/{first.name}"
    arn = describe(again.name)["TrainingJobArn"]
    tags = {t["Key"]: t["Value"] for t in boto3.client("sagemaker").list_tags(ResourceArn=arn)["Tags"]}
    assert tags["sm-qlora:resumed-from"] == first.name


def test_a_local_model_directory_becomes_the_model_channel_once(aws, job_dict, tiny_model):
    job_dict["model"] = {"id": str(tiny_model)}
    first = launch_job(job_dict)
    d = describe(first.name)
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in d["InputDataConfig"]}
    model_uri = channels["model"]
    assert model_uri.startswith("s3://my-bucket/qlora/uploads/") and model_uri.endswith("/tiny-mixtral")
    assert unflatten(d["HyperParameters"])["model"]["id"] == model_uri
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="my-bucket")["Contents"]}
    prefix = model_uri[len("s3://my-bucket/"):]
    assert {f"{prefix}/config.json", f"{prefix}/tokenizer.json", f"{prefix}/.sm-qlora-complete"} <= keys
    assert launch_job(job_dict).extra["uploaded"] == []
