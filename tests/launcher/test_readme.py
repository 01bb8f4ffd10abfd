"""The README speaks to users and stays true: its table of config keys is the config model's
own (regenerated, not hand-kept), and every page it sends a reader to exists."""

from __future__ import annotations

import re

from launcher.keys import NOTES, keys_table, rows, with_table
from tests.conftest import ROOT

README = ROOT / "README.md"


def test_the_readme_key_table_is_the_config_models():
    text = README.read_text()
    assert keys_table() in text
    assert with_table(text) == text, "stale: run `python -m launcher.keys --write README.md`"


def test_every_config_key_is_in_the_table_with_its_default():
    from launcher.config import JobConfig

    table = keys_table()
    for key in ("training.learning_rate", "compute.max_cost_usd", "data.columns.prompt", "aws.hf_token_secret"):
        assert f"| `{key}` |" in table
    assert "| `compute.instance_count` | int (>= 1, <= 64) | `1` |" in table
    assert "| `output.s3_uri` | str | required |" in table
    paths = {r[0].strip("`") for r in rows(JobConfig)}
    assert set(NOTES) <= paths, f"notes for keys the model does not have: {set(NOTES) - paths}"


def test_the_readme_has_the_user_sections_and_its_links_exist():
    text = README.read_text()
    headings = re.findall(r"^#+ (.+)$", text, flags=re.M)
    for wanted in ("Install", "A first local run", "A first SageMaker job", "Config keys",
                   "For scripts and CI: JSON and exit codes", "Stops, spot and faults", "What validate checks",
                   "Which SageMaker SDK", "Training images"):
        assert wanted in headings, wanted
    for page in set(re.findall(r"\b((?:docs|bench)/[\w-]+\.md)\b", text)):
        assert (ROOT / page).is_file(), page
