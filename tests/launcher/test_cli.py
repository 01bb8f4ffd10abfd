"""The CLI's promises: fast verbs stay fast, exit codes, one JSON object with --output json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from launcher.cli import main

PROBE = """
import sys, time
t = time.perf_counter()
from launcher.cli import main
try:
    code = main({argv!r})
except SystemExit as e:
    code = e.code
print("HEAVY=" + ",".join(m for m in ("sagemaker", "boto3", "botocore", "torch") if m in sys.modules))
print("CODE=%s SECONDS=%.3f" % (code, time.perf_counter() - t))
"""


def run_probe(argv: list[str]) -> tuple[str, int, float]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True,
                         env=os.environ | {"PYTHONPATH": os.getcwd()}, check=False).stdout
    heavy = out.split("HEAVY=")[1].splitlines()[0]
    code, seconds = out.split("CODE=")[1].split(" SECONDS=")
    return heavy, int(code), float(seconds)


def test_help_and_validate_load_neither_the_sdk_nor_boto3(job_yaml):
    for argv in (["--help"], ["validate", str(job_yaml)], ["launch", "--help"]):
        heavy, code, seconds = run_probe(argv)
        assert heavy == "", f"{argv} imported {heavy}"
        assert code == 0
        assert seconds < 1.0, f"{argv} took {seconds:.2f}s"


def test_validate_exit_codes_and_messages(capsys, job_yaml):
    assert main(["validate", str(job_yaml)]) == 0
    assert "valid" in capsys.readouterr().out
    assert main(["validate", str(job_yaml), "--set", "lora.r=0", "--set", "compute.instance_type=ml.p4d.8xlarge"]) == 2
    err = capsys.readouterr().err
    assert "lora.r:" in err and "did you mean ml.p4d.24xlarge?" in err
    assert "Traceback" not in err


def test_validate_json_is_one_object(capsys, job_yaml):
    assert main(["validate", str(job_yaml), "--set", "lora.r=0", "--output", "json"]) == 2
    out = capsys.readouterr().out
    obj = json.loads(out)
    assert obj["error"] == "ConfigError"
    assert obj["problems"] == [{"path": "lora.r", "message": "Input should be greater than or equal to 1"}]


def test_usage_errors_exit_2(job_yaml, capsys):
    proc = subprocess.run([sys.executable, "-m", "launcher", "launch"], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "usage" in proc.stderr
    assert main(["launch", str(job_yaml), "--local", "--dry-run"]) == 2
    assert "--dry-run: is for SageMaker jobs" in capsys.readouterr().err


def test_every_verb_help_shows_an_example():
    for verb in ("validate", "plan", "launch", "status", "list", "logs", "stop", "plot", "download"):
        proc = subprocess.run([sys.executable, "-m", "launcher", verb, "--help"], capture_output=True, text=True,
                              check=False)
        assert proc.returncode == 0
        assert "example:\n  sm-qlora " + verb in proc.stdout


def test_console_script_answers_quickly():
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "launcher", "--help"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "launch" in proc.stdout
    assert time.perf_counter() - t < 2.0
