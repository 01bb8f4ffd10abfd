"""`sm-qlora init`: a pip user with no examples/ directory gets a starter job that the
launcher itself accepts, shipped inside the package."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from launcher.cli import main
from tests.conftest import ROOT


def test_init_writes_a_local_and_a_sagemaker_job_that_validate(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["init", "my-job"]) == 0
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "my-job/data/train.jsonl", "my-job/local.yaml", "my-job/sagemaker.yaml"]
    assert "sm-qlora launch my-job/local.yaml --local" in capsys.readouterr().out
    assert main(["validate", "my-job/local.yaml", "--local"]) == 0
    assert main(["validate", "my-job/sagemaker.yaml"]) == 0
    text = (tmp_path / "my-job" / "sagemaker.yaml").read_text()
    assert text.count("#") > 10  # commented: each key says what it does


def test_init_never_overwrites(tmp_path, capsys):
    dest = tmp_path / "job"
    assert main(["init", str(dest)]) == 0
    (dest / "local.yaml").write_text("mine")
    assert main(["init", str(dest)]) == 2
    assert "exist(s) already; nothing was written" in capsys.readouterr().err
    assert (dest / "local.yaml").read_text() == "mine"


def test_the_wheel_ships_the_templates_with_an_spdx_license(tmp_path):
    """What `pip install sagemaker-qlora` installs, built as pip builds it (setuptools>=77:
    `license = "Apache-2.0"` without the license-table deprecation warning)."""
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    assert "License classifiers are deprecated" not in build.stderr + build.stdout
    assert "project.license` as a TOML table is deprecated" not in build.stderr + build.stdout
    wheel = next(tmp_path.glob("sagemaker_qlora-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert {"launcher/templates/local.yaml", "launcher/templates/sagemaker.yaml",
            "launcher/templates/train.jsonl"} <= set(names)
    assert "License-Expression: Apache-2.0" in metadata
