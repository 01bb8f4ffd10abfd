"""A local run has one owner at a time, ends in a recorded final state whatever happens
(a hang-up, a full disk, a NaN loss), and `--resume` only names a run under runs/.

The trainer here is a stand-in script that prints the SPEC's lines and exits as the
entrypoint does (0 done, 1 with an [error] line, 143 after SIGTERM), so that these
tests take seconds; test_local_run.py runs the real one."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher import local
from launcher.cli import main
from tests.conftest import DATA, ROOT

FAKE = r'''
import os, signal, sys, time
mode = os.environ.get("FAKE_MODE", "done")
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
print("[train] step=1/3 epoch=0.33 loss=2.0000 lr=1.00e-04 grad_norm=0.50 tokens_per_sec=10 eta=0:00:02", flush=True)
if mode == "nan":
    print("[error] reason=non-finite loss at step 2 (loss=nan); lower training.learning_rate", flush=True)
    sys.exit(1)
if mode == "wait":
    while not stop:
        time.sleep(0.05)
    print("[stopped] step=1 reason=signal_15", flush=True)
    sys.exit(143)
print("[done] steps=3 train_loss=1.0000 runtime_s=1 adapter=model", flush=True)
open(os.path.join(os.environ["SM_MODEL_DIR"], "adapter_config.json"), "w").write("{}")
'''

OWNER = ("import sys, launcher.local as l; l.TRAINER = (sys.argv[1],); from launcher.cli import main; "
         "raise SystemExit(main(sys.argv[2:]))")


@pytest.fixture
def runs(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SM_QLORA_RUNS_DIR", str(tmp_path / "runs"))
    return tmp_path / "runs"


@pytest.fixture
def fake(tmp_path, monkeypatch) -> Path:
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE)
    monkeypatch.setattr(local, "TRAINER", (str(script),))
    return script


@pytest.fixture
def cfg(tmp_path, tiny_model) -> Path:
    path = tmp_path / "job.json"
    path.write_text(json.dumps({
        "job_name": "tiny-test", "model": {"id": str(tiny_model)},
        "data": {"train": str(DATA), "format": "instruction", "columns": {"prompt": "question", "response": "answer"}},
        "training": {"max_steps": 3, "learning_rate": 1e-4},
        "output": {"s3_uri": "s3://local/tiny"}, "aws": {"role": "arn:aws:iam::123456789012:role/Local"}}))
    return path


def state(runs: Path, name: str) -> dict:
    return json.loads((runs / name / "job.json").read_text())


def start_owner(fake: Path, cfg: Path, runs: Path, mode: str, *extra: str) -> tuple[subprocess.Popen, str]:
    """`sm-qlora launch CFG --local` in its own process, with the trainer waiting for a signal."""
    env = os.environ | {"PYTHONPATH": str(ROOT), "FAKE_MODE": mode, "SM_QLORA_RUNS_DIR": str(runs)}
    proc = subprocess.Popen([sys.executable, "-c", OWNER, str(fake), "launch", str(cfg), "--local", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 60
    while time.time() < deadline:
        logs = [p for p in runs.glob("*/output/job.log") if "[train]" in p.read_text()]
        if logs and state(runs, logs[0].parent.parent.name).get("pid"):
            return proc, logs[0].parent.parent.name
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the run never started: {proc.communicate()}")


def test_resume_names_only_a_run_under_the_runs_dir(runs, fake, cfg, tmp_path, capsys):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for bad in ("../elsewhere", str(outside), "a/b", ".."):
        assert main(["launch", str(cfg), "--local", "--resume", bad]) == 2
        assert "not a local run's name" in capsys.readouterr().err
    assert list(outside.iterdir()) == []
    assert not runs.exists() or list(runs.iterdir()) == []


def test_a_hang_up_stops_the_trainer_and_the_run_is_stopped_and_owned_once(runs, fake, cfg, monkeypatch, capsys):
    proc, name = start_owner(fake, cfg, runs, "wait")
    try:
        # a second owner is refused while the first one lives
        assert main(["launch", str(cfg), "--local", "--resume", name]) == 2
        assert f"local run {name} is still running" in capsys.readouterr().err
        assert main(["status", name]) == 0
        assert "InProgress (Training)" in capsys.readouterr().out
        proc.send_signal(signal.SIGHUP)  # the terminal closed
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    s = state(runs, name)
    assert s["status"] == "Stopped" and s["exit_code"] == 143
    assert main(["status", name]) == 1  # SPEC: 1 when the job was Stopped
    assert f"{name}: Stopped [local]" in capsys.readouterr().out

    # now nobody owns it: a resume takes it over and finishes it
    monkeypatch.setenv("FAKE_MODE", "done")
    assert main(["launch", str(cfg), "--local", "--resume", name]) == 0
    assert state(runs, name)["status"] == "Completed"
    assert main(["status", name]) == 0
    assert f"{name}: Completed [local]" in capsys.readouterr().out  # not "Completed (Completed)"


def test_a_completed_run_is_not_resumed(runs, fake, cfg, capsys):
    assert main(["launch", str(cfg), "--local"]) == 0
    name = next(runs.iterdir()).name
    before = (runs / name / "model" / "adapter_config.json").stat().st_mtime_ns
    assert main(["launch", str(cfg), "--local", "--resume", name]) == 2
    assert f"local run {name} has Completed" in capsys.readouterr().err
    assert (runs / name / "model" / "adapter_config.json").stat().st_mtime_ns == before


def test_a_resume_with_another_config_warns_with_both_hashes(runs, fake, cfg, monkeypatch, capsys):
    from launcher.config import load_config

    monkeypatch.setenv("FAKE_MODE", "wait")
    proc, name = start_owner(fake, cfg, runs, "wait")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert state(runs, name)["status"] == "Stopped"
    changed = json.loads(cfg.read_text())
    changed["training"]["learning_rate"] = 2e-4
    cfg2 = cfg.with_name("job2.json")
    cfg2.write_text(json.dumps(changed))
    monkeypatch.setenv("FAKE_MODE", "done")
    capsys.readouterr()
    assert main(["launch", str(cfg2), "--local", "--resume", name]) == 0
    err = capsys.readouterr().err
    old, new = load_config(cfg).digest(), load_config(cfg2).digest()
    assert old != new and f"started with config {old}; this config is {new}" in err


def test_a_non_finite_loss_fails_the_run_and_the_cli_exits_1(runs, fake, cfg, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_MODE", "nan")
    assert main(["launch", str(cfg), "--local"]) == 1
    assert "non-finite loss at step 2" in capsys.readouterr().err
    name = next(runs.iterdir()).name
    s = state(runs, name)
    assert s["status"] == "Failed" and s["failure_reason"].startswith("non-finite loss at step 2")
    assert main(["status", name]) == 1


def test_a_full_disk_while_laying_out_ends_failed_with_a_clear_error(runs, fake, cfg, monkeypatch, capsys):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[1]))

    monkeypatch.setattr(local.shutil, "copy2", full)
    assert main(["launch", str(cfg), "--local"]) == 1
    err = capsys.readouterr().err
    assert "could not lay the run out: No space left on device" in err and "free space under" in err
    name = next(runs.iterdir()).name
    assert state(runs, name)["status"] == "Failed"
    assert main(["status", name]) == 1


def test_a_full_disk_when_recording_the_end_still_gives_a_final_state(runs, fake, cfg, monkeypatch, capsys):
    real = local.write_state

    def write_state(root, **changes):
        if changes.get("status") in ("Completed", "Failed", "Stopped"):
            raise OSError(errno.ENOSPC, "No space left on device", str(root / "job.json"))
        return real(root, **changes)

    monkeypatch.setattr(local, "write_state", write_state)
    assert main(["launch", str(cfg), "--local"]) == 1
    assert "its state could not be recorded: No space left on device" in capsys.readouterr().err
    name = next(runs.iterdir()).name
    assert state(runs, name)["status"] == "InProgress"  # what the full disk left behind
    assert main(["status", name, "--output", "json"]) == 0  # still full: the outcome, read from the log
    assert json.loads(capsys.readouterr().out)["status"] == "Completed"
    assert state(runs, name)["status"] == "InProgress"
    monkeypatch.setattr(local, "write_state", real)  # space freed: the next reader records the outcome
    assert main(["status", name, "--output", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "Completed"
    assert state(runs, name)["status"] == "Completed"
