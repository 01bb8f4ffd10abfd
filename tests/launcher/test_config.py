"""`sm-qlora validate`'s rules: every problem at once, each with its field path and fix."""

from __future__ import annotations

import pytest

from launcher.config import load_config
from launcher.errors import ConfigError


def problems(cfg: dict, *overrides: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load_config(cfg, list(overrides))
    return dict(info.value.problems)


def test_the_shipped_example_config_is_valid():
    cfg = load_config("examples/job.yaml")
    assert cfg.model.id == "mistralai/Mixtral-8x7B-Instruct-v0.1"
    assert cfg.compute.instance_type == "ml.p4d.24xlarge"
    assert cfg.data.train.endswith("examples/data/medical.jsonl")


BAD = [
    ("lora.r=0", "lora.r", "greater than or equal to 1"),
    ("training.learning_rate=1.5", "training.learning_rate", "less than 1"),
    ("training.learning_rate=0", "training.learning_rate", "greater than 0"),
    ("compute.instance_type=ml.p4d.8xlarge", "compute.instance_type",
     "'ml.p4d.8xlarge' is not a SageMaker GPU training instance; did you mean ml.p4d.24xlarge?"),
    ("compute.instance_type=ml.g5.xlarg", "compute.instance_type", "did you mean ml.g5.xlarge?"),
    ("compute.instance_type=ml.m5.xlarge", "compute.instance_type", "is not a SageMaker GPU training instance"),
    ("output.s3_uri=my-bucket/qlora", "output.s3_uri", "is not an S3 URI like s3://my-bucket/qlora"),
    ("aws.role=SageMakerRole", "aws.role", "is not an IAM role ARN"),
    ("aws.hf_token_secret=hf_abcdefghijklmnopqrstuvwxyz", "aws.hf_token_secret", "never put the token itself"),
    ("aws.region=useast1", "aws.region", "is not an AWS region"),
    ("job_name=my_job", "job_name", "only letters, digits and"),
    ("job_name=" + "a" * 48, "job_name", "at most 47 so that the 16-character timestamp suffix fits SageMaker's 63"),
    ("training.epochs=zero", "training.epochs", "valid integer"),
    ("data.format=alpaca", "data.format", "'instruction', 'chat' or 'text'"),
    ("data.train=missing.jsonl", "data.train", "file 'missing.jsonl' not found"),
    ("data.train=https://example.com/x.jsonl", "data.train", "local file, an s3:// URI or an hf:// dataset"),
    ("model.id=./no-such-model", "model.id", "model directory './no-such-model' not found"),
    ("model.id=not a model!", "model.id", "is not a hub id"),
    ("lorra.r=8", "lorra", "unknown key"),
    ("training.lr=1e-4", "training.lr", "unknown key"),
]


@pytest.mark.parametrize("override,path,message", BAD, ids=[b[0][:40] for b in BAD])
def test_each_bad_value_is_reported_with_its_path_and_fix(job_dict, override, path, message):
    found = problems(job_dict, override)
    assert path in found, found
    assert message in found[path]


def test_spot_wait_must_cover_run(job_dict):
    found = problems(job_dict, "compute.spot=true", "compute.max_run_hours=10", "compute.max_wait_hours=5")
    assert "must be >= max_run_hours (5 < 10)" in found["compute.max_wait_hours"]
    assert "only for spot jobs" in problems(job_dict, "compute.max_wait_hours=30")["compute.max_wait_hours"]
    ok = load_config(job_dict, ["compute.spot=true", "compute.max_run_hours=10", "compute.max_wait_hours=20"])
    assert ok.compute.max_wait_hours == 20


def test_all_problems_are_listed_in_one_pass(job_dict):
    found = problems(job_dict, "lora.r=0", "compute.instance_type=ml.p4d.8xlarge", "compute.spot=false",
                     "compute.max_wait_hours=1", "data.train=nope.jsonl", "bogus=1")
    assert set(found) == {"lora.r", "compute.instance_type", "compute.max_wait_hours", "data.train", "bogus"}


def test_error_text_names_every_problem(job_dict):
    with pytest.raises(ConfigError) as info:
        load_config(job_dict, ["lora.r=0", "bogus=1"])
    text = str(info.value)
    assert "2 problems" in text and "lora.r:" in text and "bogus: unknown key" in text
    assert info.value.exit_code == 2


def test_set_overrides_parse_yaml_scalars(job_dict):
    cfg = load_config(job_dict, ["training.learning_rate=1e-4", "lora.target_modules=[q_proj, v_proj]",
                                 "compute.spot=true"])
    assert cfg.training.learning_rate == 1e-4
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.compute.spot is True


def test_malformed_set_is_a_usage_error(job_dict):
    assert "--set" in problems(job_dict, "lora.r")


def test_json_configs_work_too(tmp_path, job_dict):
    import json

    path = tmp_path / "job.json"
    path.write_text(json.dumps(job_dict))
    assert load_config(path).job_name == "medical-mixtral"


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(bad)


def test_relative_data_path_resolves_from_the_config_directory(tmp_path, job_dict):
    import yaml

    (tmp_path / "data.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    job_dict["data"]["train"] = "data.jsonl"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job_dict))
    assert load_config(path).data.train == str((tmp_path / "data.jsonl").resolve())


def test_config_digest_changes_with_the_config(job_dict):
    assert load_config(job_dict).digest() != load_config(job_dict, ["lora.r=8"]).digest()
