"""Launch-mode rules and the smaller promises of validate and plan: a local-only config, S3 data
on this machine, hf:// without a dataset, --tokens that are not a count, a moved project."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from launcher.cli import main
from launcher.config import load_config
from launcher.errors import ConfigError
from launcher.validate import validate_for_launch
from tests.conftest import DATA, ROOT


def local_only(tmp_path) -> dict:
    """What a newcomer writes for `launch --local`: no output section, no aws section."""
    raw = yaml.safe_load((ROOT / "examples" / "local-tiny.yaml").read_text())
    assert "output" not in raw and "aws" not in raw  # the shipped example is already local-only
    (tmp_path / "data").mkdir(exist_ok=True)
    shutil.copy(DATA, tmp_path / "data" / "medical.jsonl")
    (tmp_path / "tiny-mixtral").symlink_to(ROOT / "examples" / "tiny-mixtral")
    return raw


def test_a_local_only_config_needs_no_output_or_aws_section(tmp_path, tiny_model, capsys):
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(local_only(tmp_path)))
    assert main(["validate", str(tmp_path / "job.yaml"), "--local"]) == 0
    assert main(["validate", str(tmp_path / "job.yaml"), "--output", "json"]) == 2
    problems = {p["path"]: p["message"] for p in json.loads(capsys.readouterr().out.splitlines()[-1])["problems"]}
    assert set(problems) == {"output.s3_uri", "aws.role"}
    assert problems["output.s3_uri"].startswith("required for a SageMaker job")
    assert "only `launch --local` runs without it" in problems["aws.role"]


def test_preflight_of_a_local_only_config_says_what_is_missing(tmp_path, tiny_model):
    from launcher.preflight import preflight

    cfg = load_config(local_only(tmp_path) | {"model": {"id": str(tiny_model)},
                                              "data": {"train": str(DATA), "columns": {"prompt": "question",
                                                                                       "response": "answer"}}})
    with pytest.raises(ConfigError) as info:
        preflight(cfg)
    assert set(dict(info.value.problems)) == {"output.s3_uri", "aws.role"}


def test_validate_local_refuses_s3_data_the_local_run_cannot_read(job_dict):
    cfg = load_config(job_dict, ["data.train=s3://my-bucket/d/train.jsonl", "data.validation=s3://my-bucket/d/v.jsonl",
                                 "model.id=s3://my-bucket/models/mixtral"])
    validate_for_launch(cfg)  # SageMaker reads it
    with pytest.raises(ConfigError) as info:
        validate_for_launch(cfg, local=True)
    found = dict(info.value.problems)
    assert set(found) == {"data.train", "data.validation", "model.id"}
    assert found["data.train"].startswith("'s3://my-bucket/d/train.jsonl': a local run reads local files, hub ids")


@pytest.mark.parametrize("uri", ["hf://", "hf://:train", "hf:// /x", "hf://org/name:a b"])
def test_hf_without_a_dataset_is_refused(job_dict, uri):
    with pytest.raises(ConfigError) as info:
        load_config(job_dict | {"data": job_dict["data"] | {"train": uri}})
    assert dict(info.value.problems)["data.train"] == \
        f"{uri!r} is not an hf:// dataset like hf://org/name or hf://org/name:train"


def test_hf_datasets_with_a_split_still_pass(job_dict):
    assert load_config(job_dict, ["data.train=hf://org/name:train[:10%]"]).data.train == "hf://org/name:train[:10%]"


@pytest.mark.parametrize("tokens", ["nan", "-1", "inf", "0"])
def test_plan_refuses_tokens_that_are_not_a_count(job_yaml, capsys, tokens):
    assert main(["plan", str(job_yaml), "--tokens", tokens, "--output", "json"]) == 2
    out = capsys.readouterr().out
    assert "NaN" not in out and "Infinity" not in out
    assert json.loads(out)["problems"][0]["path"] == "--tokens"


def test_moving_a_project_keeps_its_config_hash(tmp_path, job_yaml):
    moved = tmp_path / "elsewhere" / "project"
    shutil.copytree(job_yaml.parent, moved)
    before, after = load_config(job_yaml), load_config(moved / "job.yaml")
    assert before.data.train != after.data.train  # absolute paths differ...
    assert before.digest() == after.digest()  # ...the hash does not
    assert load_config(moved / "job.yaml", ["lora.r=8"]).digest() != after.digest()
    (moved / "data" / "medical.jsonl").rename(moved / "data" / "other.jsonl")
    assert load_config(moved / "job.yaml", ["data.train=data/other.jsonl"]).digest() != after.digest()
