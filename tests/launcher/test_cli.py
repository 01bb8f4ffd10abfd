"""The CLI's promises: fast verbs stay fast, exit codes, one JSON object with --output json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from launcher.cli import main
from launcher.errors import ConfigError

PROBE = """
import sys, time
t = time.perf_counter()
import pytest

from launcher.cli import main
from launcher.errors import ConfigError
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
    for verb in ("validate", "plan", "launch", "preflight", "status", "list", "logs", "stop", "plot", "download",
                 "merge"):
        proc = subprocess.run([sys.executable, "-m", "launcher", verb, "--help"], capture_output=True, text=True,
                              check=False)
        assert proc.returncode == 0
        assert "example:\n  sm-qlora " + verb in proc.stdout


def test_console_script_answers_quickly():
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "launcher", "--help"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "launch" in proc.stdout
    assert time.perf_counter() - t < 2.0


def test_validate_accepts_exactly_what_launch_accepts(job_yaml, capsys, monkeypatch):
    from launcher.job import launch_job

    monkeypatch.setenv("HF_TOKEN", "x")
    token_env = ["--set", "aws.hf_token_env=HF_TOKEN"]
    assert main(["validate", str(job_yaml), *token_env]) == 2
    assert "aws.hf_token_env: is for local runs" in capsys.readouterr().err
    assert main(["validate", str(job_yaml), "--local", *token_env]) == 0
    assert "valid for this machine" in capsys.readouterr().out
    for launch in (["launch", str(job_yaml), "--dry-run", *token_env],
                   ["launch", str(job_yaml), "--dry-run", "--set", "compute.instance_type=ml.g5.xlarge"]):
        assert main(launch) == 2
        assert "error: " in capsys.readouterr().err
    with pytest.raises(ConfigError, match="aws.hf_token_env"):
        launch_job(job_yaml, overrides=["aws.hf_token_env=HF_TOKEN"], dry_run=True)


def test_set_is_offered_only_by_verbs_that_read_a_config(capsys):
    assert main(["status", "some-job", "--set", "lora.r=8"]) == 2
    assert "unrecognized arguments: --set" in capsys.readouterr().err
    for verb in ("validate", "plan", "launch"):
        assert main([verb, "--help"]) == 0
        assert "--set KEY.PATH=VALUE" in capsys.readouterr().out


def closed_pipe_run(argv: list[str]) -> subprocess.CompletedProcess:
    """Run the CLI with stdout a pipe whose reader has already gone (`sm-qlora plan | head`
    once head has exited): every write meets EPIPE."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run([sys.executable, "-m", "launcher", *argv], stdout=w, stderr=subprocess.PIPE, text=True,
                              env=os.environ | {"PYTHONPATH": os.getcwd()}, check=False)
    finally:
        os.close(w)


def test_a_closed_pipe_ends_quietly_with_exit_0(job_yaml):
    for argv in (["plan", str(job_yaml)], ["plan", str(job_yaml), "--output", "json"], ["validate", str(job_yaml)]):
        proc = closed_pipe_run(argv)
        assert (proc.returncode, proc.stderr) == (0, ""), argv


def test_an_unexpected_error_is_one_line_and_the_traceback_is_kept(job_yaml, capsys, monkeypatch):
    import launcher.cli as cli

    def broken(args, out):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "cmd_validate", broken)
    assert main(["validate", str(job_yaml)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unexpected RuntimeError: boom (a bug: the traceback is /") and err.count("\n") == 1
    kept = err.split("the traceback is ")[1].split(";")[0]
    assert "Traceback" in open(kept).read() and "boom" in open(kept).read()
    os.remove(kept)
    monkeypatch.setenv("SM_QLORA_DEBUG", "1")
    assert main(["validate", str(job_yaml)]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_ctrl_c_exits_130(job_yaml, capsys, monkeypatch):
    import launcher.cli as cli

    def interrupted(args, out):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_plan", interrupted)
    assert main(["plan", str(job_yaml)]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_a_wrong_column_fails_validate_and_launch_before_anything_is_sent(job_yaml, capsys):
    (job_yaml.parent / "data" / "medical.jsonl").write_text('{"question": "a?", "answer": "b."}\n{"question": "c?"}\n')
    for argv in (["validate", str(job_yaml)], ["launch", str(job_yaml), "--dry-run"], ["plan", str(job_yaml)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err == (f"error: data.columns.response: column 'answer' is not in {job_yaml.parent / 'data' / 'medical.jsonl'}"
                       " (row 2 has: question)\n"), argv
