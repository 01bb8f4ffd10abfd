"""`sm-qlora validate`'s rules: every problem at once, each with its field path and fix."""

from __future__ import annotations

import pytest

from launcher.config import load_config
from launcher.errors import ConfigError


def problems(cfg: dict, *overrides: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load_config(cfg, list(overrides))
    return dict(info.value.problems)


def test_the_shipped_example_configs_are_valid(tiny_model):
    assert load_config("examples/local-tiny.yaml").model.id.endswith("examples/tiny-mixtral")
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
    # longer than the hub allows, and than a file name may be (the fuzz test's find: it once reached
    # the planner's lookup of <id>/config.json, an OSError)
    ("model.id=" + "x" * 300, "model.id", "'" + "x" * 60 + "... (300 characters)' is not a hub id (org/name, at most 96"),
    ("model.id=org/" + "y" * 97, "model.id", "is not a hub id"),
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


# --------------------------------------------------------------------------- one model

def test_the_config_is_the_jobs_hyperparameters_with_their_rules(job_dict):
    from entrypoint.hyperparams import Hyperparameters

    cfg = load_config(job_dict)
    assert isinstance(cfg, Hyperparameters)
    assert cfg.hyperparameters("model_parallel").strategy == "model_parallel"
    found = problems(job_dict, "data.columns={prompt: answer, response: answer}")
    assert found == {"": "data.columns: prompt and response must name different columns"}


def test_strategy_is_one_vocabulary_set_under_compute(job_dict):
    assert load_config(job_dict, ["compute.strategy=single"]).compute.strategy == "single"
    assert "'auto', 'ddp', 'model_parallel' or 'single'" in problems(job_dict, "compute.strategy=fsdp")["compute.strategy"]
    assert problems(job_dict, "strategy=ddp") == {"strategy": "unknown key; did you mean compute.strategy?"}


def test_job_name_suffix_is_defined_once():
    from launcher.config import JOB_NAME_MAX, JOB_NAME_SUFFIX_LEN, job_name_for

    name = job_name_for("a" * JOB_NAME_MAX, now=0)
    assert name == "a" * JOB_NAME_MAX + "-19700101-000000" and len(name) == 63 == JOB_NAME_MAX + JOB_NAME_SUFFIX_LEN


# --------------------------------------------------------------------------- values accepted silently before

SILENT = [
    ('job_name="x\\n"', "job_name", "only letters, digits"),
    ("output.s3_uri=s3://my-bucket/a b", "output.s3_uri", "has a space"),
    ("output.s3_uri=s3://my-bucket/q/../other", "output.s3_uri", "'..' segment"),
    ("data.train=s3://my-bucket/../x.jsonl", "data.train", "'..' segment"),
    ("model.id=s3://my-bucket/models /m", "model.id", "has a space"),
    ("aws.role=arn:aws-xx:iam::123456789012:role/R", "aws.role", "partition 'aws-xx' is not one of aws, aws-cn"),
    ("aws.hf_token_secret=arn:evil:secretsmanager:us-east-1:123456789012:secret:t", "aws.hf_token_secret",
     "partition 'evil'"),
    ("aws.role=arn:aws-cn:iam::123456789012:role/R", "aws.role", "aws.region us-east-1 is in 'aws'"),
    ("aws.region=xx-nowhere-9", "aws.region", "'xx-nowhere-9' is not a region with SageMaker"),
    ("aws.region=us-east-7", "aws.region", "did you mean us-east-2?"),
    ("aws.tags={'aws:cost': x}", "aws.tags", "'aws:cost': the aws: prefix is reserved"),
    ("aws.tags={k: " + "v" * 257 + "}", "aws.tags", "'k': a tag value is at most 256 characters, not 257"),
    ("aws.tags={" + "k" * 129 + ": v}", "aws.tags", "a tag key is 1 to 128 characters, not 129"),
    ("training.learnig_rate=1e-4", "training.learnig_rate", "did you mean training.learning_rate?"),
    ("learning_rate=1e-4", "learning_rate", "did you mean training.learning_rate?"),
    ("compute.instance_typo=ml.g5.xlarge", "compute.instance_typo", "did you mean compute.instance_type?"),
]


@pytest.mark.parametrize("override,path,message", SILENT, ids=[s[0][:40] for s in SILENT])
def test_values_once_accepted_silently_are_refused(job_dict, override, path, message):
    found = problems(job_dict, override)
    assert message in found.get(path, ""), found


def test_the_region_and_role_may_be_in_another_partition_together(job_dict):
    cfg = load_config(job_dict, ["aws.region=cn-north-1", "aws.role=arn:aws-cn:iam::123456789012:role/R"])
    assert cfg.aws.region == "cn-north-1"


# --------------------------------------------------------------------------- the file and --set

def write(tmp_path, text: str | bytes, name="job.yaml"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def file_problem(path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


def test_duplicate_keys_are_refused_naming_both_lines(tmp_path):
    assert "line 3: not valid YAML: duplicate key 'r' (first on line 2)" in \
        file_problem(write(tmp_path, "lora:\n  r: 8\n  r: 16\n"))
    assert "duplicate key 'job_name'" in file_problem(write(tmp_path, '{"job_name": "a", "job_name": "b"}', "j.json"))


def test_non_utf8_bytes_name_the_line(tmp_path):
    assert file_problem(write(tmp_path, b"job_name: a\nmodel: {id: \xff}\n")).endswith(
        "job.yaml: line 2: not UTF-8 text (byte 0xff)")


def test_deep_nesting_is_an_error_not_a_crash(tmp_path):
    assert "nested too deeply" in file_problem(write(tmp_path, "a: " + "[" * 50000 + "]" * 50000))
    assert "nested too deeply" in file_problem(write(tmp_path, "[" * 50000 + "]" * 50000, "j.json"))


def test_broken_yaml_in_set_names_the_override(job_dict):
    assert "--set training: line 1: not valid YAML" in problems(job_dict, "training={learning_rate: [}")[""]


def test_a_mapping_in_set_merges_into_its_section(job_dict):
    job_dict["training"]["epochs"] = 3
    cfg = load_config(job_dict, ["training={learning_rate: 1e-4}"])
    assert (cfg.training.learning_rate, cfg.training.epochs) == (1e-4, 3)
    cfg = load_config(job_dict, ["data={columns: {prompt: question}}"])
    assert (cfg.data.columns.prompt, cfg.data.columns.response) == ("question", "answer")


def test_set_through_a_value_is_refused(job_dict):
    assert "goes through 'job_name', which is not a section" in problems(job_dict, "job_name.x=1")["--set"]
    assert "is not key.path=value" in problems(job_dict, "lora..r=1")["--set"]


# --------------------------------------------------------------------------- local files

def data_config(tmp_path, job_dict, name: str, content: str | bytes) -> dict:
    write(tmp_path, content, name)
    job_dict["data"]["train"] = str(tmp_path / name)
    return job_dict


def test_a_column_missing_from_the_data_names_field_file_and_row(tmp_path, job_dict):
    cfg = data_config(tmp_path, job_dict, "d.jsonl", '{"question": "q", "answer": "a"}\n{"question": "q"}\n')
    assert problems(cfg)["data.columns.response"] == \
        f"column 'answer' is not in {tmp_path / 'd.jsonl'} (row 2 has: question)"
    found = problems(cfg, "data.columns.prompt=questoin")
    assert "row 1 has: question, answer); did you mean 'question'?" in found["data.columns.prompt"]


def test_data_rows_that_the_job_cannot_read_are_named(tmp_path, job_dict):
    path = tmp_path / "d.jsonl"
    cases = [(b"", "no rows (the file is empty or blank)"), (b"\n  \n", "no rows (the file is empty or blank)"),
             (b'{"question": "q", "answer": "a"}\nnot json\n', "row 2: not valid JSON"),
             (b'{"question": "q\xff", "answer": "a"}\n', "row 1: not UTF-8 text"),
             (b'["q", "a"]\n', "row 1: expected an object, got list")]
    for content, message in cases:
        assert problems(data_config(tmp_path, job_dict, "d.jsonl", content))["data.train"].startswith(f"{path}: {message}")


def test_csv_and_parquet_columns_are_checked(tmp_path, job_dict):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg = data_config(tmp_path, job_dict, "d.csv", "question,reply\nq,a\n")
    assert "column 'answer' is not in" in problems(cfg)["data.columns.response"]
    pq.write_table(pa.table({"question": ["q"], "answer": ["a"]}), tmp_path / "d.parquet")
    job_dict["data"]["train"] = str(tmp_path / "d.parquet")
    assert load_config(job_dict).data.train.endswith("d.parquet")
    assert "(row 1 has: question, answer)" in problems(job_dict, "data.format=text")["data.columns.text"]


def test_a_data_file_of_an_unknown_kind_is_refused(tmp_path, job_dict):
    cfg = data_config(tmp_path, job_dict, "d.txt", "hello\n")
    assert "is not a .jsonl, .json, .csv, .parquet file" in problems(cfg)["data.train"]


def test_a_mistyped_local_model_directory_is_not_taken_for_a_hub_id(tmp_path, job_dict, tiny_model, monkeypatch):
    import shutil

    shutil.copytree(tiny_model, tmp_path / "models" / "tiny")
    monkeypatch.chdir(tmp_path)
    assert load_config(job_dict, ["model.id=models/tiny"]).model.id == str(tmp_path / "models" / "tiny")
    assert "did you mean 'models/tiny'?" in problems(job_dict, "model.id=models/tinny")["model.id"]
    assert "did you mean 'models/tiny'?" in problems(job_dict, "model.id=modles/tiny")["model.id"]
    assert "not found" in problems(job_dict, "model.id=./elsewhere/model")["model.id"]
    assert load_config(job_dict, ["model.id=mistralai/Mistral-7B-v0.1"]).model.id == "mistralai/Mistral-7B-v0.1"


def test_relative_paths_are_not_read_from_the_working_directory(tmp_path, job_yaml, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "data").mkdir(parents=True)
    (elsewhere / "data" / "medical.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    monkeypatch.chdir(elsewhere)
    assert load_config(job_yaml).data.train == str(job_yaml.parent / "data" / "medical.jsonl")
    monkeypatch.chdir(tmp_path)
    moved = write(elsewhere, job_yaml.read_text().replace("data/medical.jsonl", "elsewhere/data/medical.jsonl"))
    assert "from the config file it is 'data/medical.jsonl'" in file_problem(moved)


def test_paths_the_system_refuses_are_not_found_not_a_crash(job_dict):
    for value in ("x" * 5000 + ".jsonl", "~no-such-user-here/d.jsonl", "a/" * 3000 + "d.jsonl"):
        assert "not found" in problems(job_dict, f"data.train={value}")["data.train"]
    assert "not found" in problems(job_dict, "model.id=" + "a/" * 3000)["model.id"]
    assert "not found" in problems(job_dict, "model.id=~no-such-user-here/model")["model.id"]


def test_an_unreadable_data_file_is_named(tmp_path, job_dict, monkeypatch):
    from launcher import datafiles

    def denied(path):
        raise PermissionError(13, "Permission denied")  # chmod 0 cannot show it: tests may run as root

    cfg = data_config(tmp_path, job_dict, "d.jsonl", '{"question": "q", "answer": "a"}\n')
    monkeypatch.setitem(datafiles.READERS, ".jsonl", denied)
    assert problems(cfg)["data.train"] == f"{tmp_path / 'd.jsonl'}: cannot be read (Permission denied)"


def test_launch_rules_depend_on_where_it_runs(job_dict):
    from launcher.validate import validate_for_launch

    cfg = load_config(job_dict, ["aws.hf_token_env=HF_TOKEN", "compute.instance_type=ml.g5.xlarge"])
    with pytest.raises(ConfigError) as info:
        validate_for_launch(cfg, resume="../../etc")
    assert set(dict(info.value.problems)) == {"aws.hf_token_env", "compute.instance_type", "--resume"}
    with pytest.raises(ConfigError, match="--resume: '../../etc' is not a local run's name"):
        validate_for_launch(cfg, local=True, resume="../../etc")
    assert validate_for_launch(cfg, local=True, resume="tiny-medical-20261129-101500") is cfg
