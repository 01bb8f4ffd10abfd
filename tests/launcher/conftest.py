"""Configs as files, laid out the way a user keeps them: the YAML with its data beside it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import DATA, ROOT


@pytest.fixture
def job_yaml(tmp_path) -> Path:
    """examples/job.yaml in a project directory of its own, with data/medical.jsonl next to it."""
    (tmp_path / "data").mkdir()
    shutil.copy(DATA, tmp_path / "data" / "medical.jsonl")
    raw = yaml.safe_load((ROOT / "examples" / "job.yaml").read_text())
    raw["data"]["train"] = "data/medical.jsonl"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
