"""Launch through the real SageMaker SDK and boto3, over HTTP, to a moto server on a
loopback port; read the job back with boto3 and check the request a user relies on."""

from __future__ import annotations

import io
import json
import re
import subprocess
import tarfile
from pathlib import Path

import boto3
import pytest

from entrypoint.hyperparams import Hyperparameters, unflatten
from entrypoint.progress import METRIC_DEFINITIONS
from launcher.cli import main
from launcher.config import load_config
from launcher.errors import AWSError, LauncherError
from launcher.job import launch_job
from launcher.submit import ENTRY_SCRIPT, SOURCE_MODULES, Submitted, submit
from tests.conftest import ROOT
from tests.e2e.container.service_model import checked_requests, violations  # noqa: F401 (a fixture)

# Every CreateTrainingJob built here, dry run or not, is held to botocore's service model.
pytestmark = pytest.mark.usefixtures("checked_requests")

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
    # compute.image auto: the newest image measured on a GPU that trains Mixtral (launcher/images.py)
    assert image.endswith("huggingface-pytorch-training:2.9.0-transformers5.3.0-gpu-py312-cu130-ubuntu22.04")
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
    assert first.submitted.uploaded and second.submitted.uploaded == []
    assert sorted(o["Key"] for o in s3.list_objects_v2(Bucket="my-bucket")["Contents"]) == keys


def tarball_in_s3() -> tarfile.TarFile:
    s3 = boto3.client("s3")
    key = next(o["Key"] for o in s3.list_objects_v2(Bucket="my-bucket")["Contents"] if o["Key"].endswith(".tar.gz"))
    return tarfile.open(fileobj=io.BytesIO(s3.get_object(Bucket="my-bucket", Key=key)["Body"].read()))


def tracked_entrypoint_modules() -> set[str]:
    out = subprocess.run(["git", "ls-files", "entrypoint/*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    return {Path(line).stem for line in out.stdout.split()}


def test_the_code_tarball_holds_exactly_the_entrypoint_package(aws, job_dict):
    launch_job(job_dict)
    names = set(tarball_in_s3().getnames())
    modules = {f"entrypoint/{m}.py" for m in tracked_entrypoint_modules()}
    assert names == {"sm_qlora_entry.py", "sm_qlora_merge.py", "requirements.txt"} | modules
    assert tarball_in_s3().extractfile("sm_qlora_merge.py").read() == b"from entrypoint.merge import main\n\nmain()\n"


def test_the_source_manifest_is_the_tracked_package():
    # Named in code, so an installed package (no git checkout) ships the same files.
    tracked = tracked_entrypoint_modules()
    on_disk = {m for m in SOURCE_MODULES if (ROOT / "entrypoint" / f"{m}.py").is_file()}
    assert on_disk == tracked
    assert set(SOURCE_MODULES) - tracked <= {"merge"}  # the merge job's module, from its own branch


@pytest.fixture
def planted(tmp_path):
    """A secret next to the package: an untracked module, then a module swapped for a symlink to it."""
    secret = tmp_path / "secret.txt"
    secret.write_text("AKIAPLANTEDSECRET")
    stray = ROOT / "entrypoint" / "stray_secret.py"
    stray.write_text("KEY = 'AKIAPLANTEDSECRET'\n")
    yield secret
    stray.unlink()


def test_no_stray_file_or_symlink_reaches_s3(aws, job_dict, planted, monkeypatch):
    launch_job(job_dict)
    tar = tarball_in_s3()
    assert b"AKIAPLANTEDSECRET" not in b"".join(tar.extractfile(m).read() for m in tar.getmembers())
    assert "entrypoint/stray_secret.py" not in tar.getnames()
    # A module that is a symlink is refused before anything is uploaded.
    from launcher import submit as submit_mod

    fake_pkg = planted.parent / "pkg"
    (fake_pkg / "entrypoint").mkdir(parents=True)
    (fake_pkg / "launcher").mkdir()
    for m in SOURCE_MODULES:
        if (ROOT / "entrypoint" / f"{m}.py").is_file():
            (fake_pkg / "entrypoint" / f"{m}.py").write_bytes((ROOT / "entrypoint" / f"{m}.py").read_bytes())
    (fake_pkg / "entrypoint" / "data.py").unlink()
    (fake_pkg / "entrypoint" / "data.py").symlink_to(planted)
    monkeypatch.setattr(submit_mod, "__file__", str(fake_pkg / "launcher" / "submit.py"))
    with pytest.raises(LauncherError, match="data.py is a symlink"):
        submit_mod.source_files()


def test_requirements_set_a_floor_the_image_already_meets(aws, job_dict):
    launch_job(job_dict)
    reqs = tarball_in_s3().extractfile("requirements.txt").read().decode().split()
    assert reqs and all("==" not in r for r in reqs)


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


def test_a_region_without_the_hf_image_is_a_config_error_before_anything_is_sent(monkeypatch, capsys, job_dict,
                                                                                 tmp_path):
    """A region SageMaker has but the HF training image does not: exit 2 naming aws.region, under
    either SDK major (it was an 'unexpected ValueError', exit 1, after the upload)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # no server: any request would fail
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    cfg = tmp_path / "job.json"
    cfg.write_text(json.dumps(job_dict))
    assert main(["launch", str(cfg), "--dry-run", "--set", "aws.region=mx-central-1", "--output", "json"]) == 2
    err = json.loads(capsys.readouterr().out)
    assert [p["path"] for p in err["problems"]] == ["aws.region"]
    assert "mx-central-1" in err["problems"][0]["message"] and "compute.image_uri" in err["problems"][0]["message"]


def test_the_transformers5_image_is_named_by_uri_in_the_registry_of_the_sdks_images(monkeypatch, capsys, job_dict,
                                                                                    tmp_path):
    """SDK v2's table stops at transformers 4.56.2: the 5.3.0 image goes by URI, same account."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    cfg = tmp_path / "job.json"
    cfg.write_text(json.dumps(job_dict | {"compute": job_dict["compute"] | {"image": "transformers5"}}))
    assert main(["launch", str(cfg), "--dry-run", "--output", "json"]) == 0
    image = json.loads(capsys.readouterr().out)["request"]["AlgorithmSpecification"]["TrainingImage"]
    assert image == ("763104351884.dkr.ecr.us-east-1.amazonaws.com/huggingface-pytorch-training:"
                     "2.9.0-transformers5.3.0-gpu-py312-cu130-ubuntu22.04")


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


def test_resume_with_auto_keeps_the_resumed_jobs_image(aws, job_dict):
    """A job started on the transformers 4 image holds checkpoints in that major's adapter layout,
    which a transformers 5 job refuses to resume: `auto` takes the resumed job's image, a named
    image is still taken as named."""
    first = launch_job(job_dict | {"compute": job_dict["compute"] | {"image": "transformers4"}})
    assert ":2.8.0-transformers4.56.2-" in describe(first.name)["AlgorithmSpecification"]["TrainingImage"]
    again = launch_job(job_dict, resume=first.name)
    assert describe(again.name)["AlgorithmSpecification"]["TrainingImage"] == \
        describe(first.name)["AlgorithmSpecification"]["TrainingImage"]
    fresh = launch_job(job_dict)  # auto without --resume: Mixtral goes to transformers 5
    assert ":2.9.0-transformers5.3.0-" in describe(fresh.name)["AlgorithmSpecification"]["TrainingImage"]


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
    assert launch_job(job_dict).submitted.uploaded == []


def test_the_container_starts_through_the_sigterm_wrapper_within_the_api_limits(aws, job_dict, checked_requests):  # noqa: F811
    request = launch_job(job_dict, dry_run=True).request
    entry = request["AlgorithmSpecification"]["ContainerEntrypoint"]
    assert entry[:2] == ["bash", "-c"] and "start_with_right_hostname.sh train" in entry[2]
    assert any(f" {ENTRY_SCRIPT} " in part and "kill -TERM" in part for part in entry)
    assert checked_requests and checked_requests[-1]["AlgorithmSpecification"]["ContainerEntrypoint"] == entry


def test_the_service_model_check_catches_what_sagemaker_refuses(aws, job_dict):
    request = launch_job(job_dict, dry_run=True).request
    assert violations(request) == []
    request["AlgorithmSpecification"]["ContainerEntrypoint"] = ["bash", "-c", "x" * 257]
    request["Tags"].append({"Key": "bad$key", "Value": "v"})
    problems = violations(request)
    assert any("ContainerEntrypoint[2]: 257 characters" in p for p in problems)
    assert any("Tags[" in p and "bad$key" in p for p in problems)


def test_submit_returns_a_typed_result_and_maps_the_callers_strategy(aws, job_dict):
    from launcher.config import load_config

    cfg = load_config(job_dict)
    done = submit(cfg, "model_parallel", dry_run=True, max_runtime_s=5400)
    assert isinstance(done, Submitted) and done.strategy == "model_parallel"
    hps = done.request["HyperParameters"]
    assert hps["strategy"] == '"model_parallel"' and "sagemaker_torch_distributed_enabled" not in hps
    assert done.request["StoppingCondition"]["MaxRuntimeInSeconds"] == 5400
    assert done.request["Environment"]["SM_QLORA_MAX_RUNTIME_S"] == "5400"
    assert "entrypoint/train.py" in done.source_files and "sm_qlora_merge.py" in done.source_files
    with pytest.raises(AttributeError):
        done.job_name = "x"  # frozen
    ddp = submit(cfg, "ddp", dry_run=True)
    assert ddp.request["HyperParameters"]["sagemaker_torch_distributed_enabled"] == "true"
    # without a budget the job still plans its end inside MaxRuntime (compute.max_run_hours)
    max_run = str(int(cfg.compute.max_run_hours * 3600))
    assert ddp.request["Environment"]["SM_QLORA_MAX_RUNTIME_S"] == max_run


def test_a_spot_budget_keeps_max_wait_at_least_max_runtime(aws, job_dict):
    from launcher.config import load_config

    job_dict["compute"] |= {"spot": True, "max_run_hours": 1, "instance_type": "ml.g6e.xlarge"}
    done = submit(load_config(job_dict), "single", dry_run=True, max_runtime_s=7200)
    stop = done.request["StoppingCondition"]
    assert stop["MaxRuntimeInSeconds"] == 7200 and stop["MaxWaitTimeInSeconds"] >= 7200


def test_an_installed_package_ships_the_same_source_dir(tmp_path):
    """pip-installed from a copy of the tracked files (no git checkout at run time), the
    launcher packs a byte-identical tarball."""
    import shutil
    import sys

    from launcher.submit import code_tarball

    tracked = subprocess.run(["git", "ls-files", "pyproject.toml", "README.md", "launcher", "entrypoint"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    src = tmp_path / "src"
    for rel in tracked:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, src / rel)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(site), str(src)], check=True, capture_output=True)
    out = subprocess.run([sys.executable, "-c", "import sys, launcher.submit as s; sys.stdout.buffer.write(s.code_tarball())"],
                         cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, capture_output=True, check=True)
    assert out.stdout == code_tarball()
