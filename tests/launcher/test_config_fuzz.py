"""Property: whatever a config file or a `--set` holds, `sm-qlora validate` answers with
exit 0 (valid) or 2 (a listed problem), never a traceback and never another exit code."""

from __future__ import annotations

import contextlib
import io
import shutil
from datetime import timedelta

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.cli import main
from tests.conftest import DATA, ROOT

FUZZ = settings(max_examples=200, deadline=timedelta(seconds=5),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
BASE = yaml.safe_load((ROOT / "examples" / "job.yaml").read_text()) | {
    "data": {"train": "data/medical.jsonl", "columns": {"prompt": "question", "response": "answer"}}}
PATHS = ["job_name", "model.id", "data.train", "data.format", "data.columns", "data.columns.prompt", "lora",
         "lora.r", "lora.alpha", "lora.target_modules", "training", "training.learning_rate", "training.seed",
         "compute.instance_type", "compute.strategy", "compute.max_wait_hours", "output.s3_uri", "aws.region",
         "aws.role", "aws.tags", "aws.hf_token_secret", "strategy", "bogus", "training.bogus"]

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=3), max_leaves=10)


def validate(project, argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["validate", str(project / "job.yaml"), *argv])
    return code, err.getvalue()


def project_dir(tmp_path):
    (tmp_path / "data").mkdir(exist_ok=True)
    shutil.copy(DATA, tmp_path / "data" / "medical.jsonl")
    return tmp_path


def check(code: int, err: str) -> None:
    assert code in (0, 2), err
    assert "Traceback" not in err and "error: unexpected " not in err, err


@FUZZ
@given(text=st.text(max_size=300) | st.binary(max_size=300))
def test_any_file_content_is_valid_or_a_listed_problem(tmp_path, text):
    project = project_dir(tmp_path)
    (project / "job.yaml").write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    check(*validate(project, []))


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(PATHS), values, max_size=4))
def test_any_yaml_document_near_a_valid_one_is_valid_or_a_listed_problem(tmp_path, changes):
    project = project_dir(tmp_path)
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        node = doc
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node.get(part), dict) else node
        node[leaf] = value
    (project / "job.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True))
    check(*validate(project, []))


ODD = st.sampled_from(["~nobody-here/x", "a/" * 3000, "x" * 5000, "./../..", "/", "{a: [", "&a [*a]", "!!python/none"])


@FUZZ
@given(overrides=st.lists(st.tuples(st.sampled_from(PATHS) | st.text(max_size=12), st.text(max_size=40) | ODD),
                          max_size=3))
def test_any_set_override_is_valid_or_a_listed_problem(tmp_path, overrides):
    project = project_dir(tmp_path)
    (project / "job.yaml").write_text(yaml.safe_dump(BASE))
    argv = [a for key, value in overrides for a in ("--set", f"{key}={value}")]
    check(*validate(project, argv))


def test_the_untouched_base_is_valid(tmp_path):
    project = project_dir(tmp_path)
    (project / "job.yaml").write_text(yaml.safe_dump(BASE))
    assert validate(project, []) == (0, "")
