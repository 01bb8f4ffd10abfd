"""How the job ends when it does not simply finish: a bad hyperparameter (in a second,
before torch), a clock checkpoint when no signal will come, SIGTERM, the MaxRuntime
budget, and a loss that stops being a number. The tiny model, on CPU, through the same
/opt/ml layout and SM_* environment the local runner gives a job."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.e2e.test_local_run import config


def lay_out_run(tiny_model: Path, tmp_path: Path, **training) -> tuple[Path, dict]:
    from launcher.config import load_config
    from launcher.local import lay_out

    os.environ["SM_QLORA_RUNS_DIR"] = str(tmp_path / "runs")
    try:
        root, sm_env = lay_out(load_config(config(tiny_model, **training)), "stops")
    finally:
        del os.environ["SM_QLORA_RUNS_DIR"]
    return root, os.environ | sm_env | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def start(root: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "entrypoint"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_bad_hyperparameter_fails_in_about_a_second_without_importing_torch(tmp_path):
    cfg = tmp_path / "config"
    cfg.mkdir()
    (cfg / "hyperparameters.json").write_text(json.dumps(
        {"model.id": '"x/y"', "data.train": '"d.jsonl"', "lora.alpha": '"Infinity"', "training.seed": str(2**32)}))
    probe = ("import sys\nfrom entrypoint.train import main\ntry:\n    main()\nexcept SystemExit as e:\n"
             "    print('exit', e.code, 'torch' in sys.modules)\n")
    began = time.time()
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                          env=os.environ | {"SM_INPUT_CONFIG_DIR": str(cfg), "SM_OUTPUT_DIR": str(tmp_path / "out"),
                                            "PYTHONPATH": str(ROOT)})
    took = time.time() - began
    lines = proc.stdout.splitlines()
    assert lines[-1] == "exit 2 False", proc.stderr  # exit 2, and torch never imported
    assert lines[0].startswith("[error] reason=invalid hyperparameters: lora.alpha: ")
    assert "training.seed: Input should be less than or equal to 4294967295" in lines[0]
    assert (tmp_path / "out" / "failure").read_text().startswith("invalid hyperparameters")
    assert took < 5, f"took {took:.1f} s"


def test_the_clock_checkpoints_when_no_step_would_and_sigterm_stops_with_its_time(tiny_model, tmp_path):
    """save_steps is past the end of the run, so only the clock can checkpoint: what a
    SIGKILL or a lost instance would otherwise lose. Then SIGTERM stops the job."""
    root, env = lay_out_run(tiny_model, tmp_path, max_steps=400, save_steps=1000, checkpoint_minutes=0.001)
    proc = start(root, env)
    deadline = time.time() + 240
    while time.time() < deadline and not list((root / "checkpoints").glob("step-*/COMPLETE")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert re.search(r"^\[checkpoint\] step=\d+ path=\S+/checkpoints/step-\d+ reason=clock$", out, re.M), out
    stopped = re.search(r"^\[stopped\] step=(\d+) reason=signal_15 checkpoint_s=(\d+\.\d\d)$", out, re.M)
    assert stopped, out
    step = int(stopped.group(1))
    assert 1 <= step < 400
    assert (root / "checkpoints" / f"step-{step}" / "COMPLETE").is_file()
    assert "[done]" not in out and not (root / "model" / "adapter_config.json").exists()


def test_near_max_runtime_the_job_checkpoints_saves_the_adapter_and_exits_0(tiny_model, tmp_path):
    """SM_QLORA_MAX_RUNTIME_S already inside the margin: one step, then a clean stop."""
    root, env = lay_out_run(tiny_model, tmp_path, save_steps=1000)
    proc = start(root, env | {"SM_QLORA_MAX_RUNTIME_S": "60"})
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert re.search(r"^\[checkpoint\] step=1 path=\S+/checkpoints/step-1$", out, re.M), out
    assert re.search(r"^\[stopped\] step=1 reason=max_runtime checkpoint_s=\d+\.\d\d$", out, re.M), out
    assert re.search(r"^\[done\] steps=1 ", out, re.M)
    assert out.index("[stopped]") < out.index("[done]")
    assert (root / "checkpoints" / "step-1" / "COMPLETE").is_file()
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {p.name for p in (root / "model").iterdir()}
    assert not list((root / "model").glob(".partial-*"))


def assert_failed_with(proc: subprocess.Popen, root: Path, pattern: str) -> None:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-2000:]
    error = [x for x in out.splitlines() if x.startswith("[error]")]
    assert len(error) == 1 and re.match(pattern, error[0]), out[-2000:]
    assert "learning_rate" in error[0] and "Traceback" not in err
    assert (root / "output" / "failure").read_text().startswith("non-finite")
    assert "[done]" not in out and not (root / "model" / "adapter_config.json").exists()


def test_a_loss_that_turns_nan_fails_the_job_instead_of_completing(tiny_model, tmp_path):
    """The loss function returns NaN from step 3 on (2 micro-batches per step)."""
    root, env = lay_out_run(tiny_model, tmp_path, save_steps=1000)
    probe = ("import torch.nn.functional as F\nreal, calls = F.cross_entropy, [0]\n"
             "def nan_after_two_steps(*a, **k):\n    calls[0] += 1\n"
             "    return real(*a, **k) * (float('nan') if calls[0] > 4 else 1.0)\n"
             "F.cross_entropy = nan_after_two_steps\nfrom entrypoint.train import main\nmain()\n")
    proc = subprocess.Popen([sys.executable, "-c", probe], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert_failed_with(proc, root, r"\[error\] reason=non-finite loss \(nan\) at step 3; ")


def test_an_alpha_that_blows_up_the_gradients_fails_the_job(tiny_model, tmp_path):
    root, env = lay_out_run(tiny_model, tmp_path, learning_rate=0.9, save_steps=1000)
    hps = root / "input" / "config" / "hyperparameters.json"
    hps.write_text(json.dumps(json.loads(hps.read_text()) | {"lora.alpha": "1e30"}))
    assert_failed_with(start(root, env), root, r"\[error\] reason=non-finite gradient norm \(inf\) at step 1; ")


@pytest.mark.parametrize("fails_in", ["weights", "tokenizer"])
def test_a_failure_while_saving_leaves_no_partial_adapter(tmp_path, fails_in):
    """Disk full halfway through: the model dir keeps the previous adapter, whole."""
    from types import SimpleNamespace

    import torch

    from entrypoint.data import DataReport
    from entrypoint.hyperparams import Hyperparameters
    from entrypoint.train import Batches, DistContext, History, Model, save_adapter

    class Writer:
        def __init__(self, name: str, fail: bool):
            self.name, self.fail = name, fail

        def save_pretrained(self, where):
            Path(where, "adapter_config.json").write_text('{"r": 8}') if self.name == "weights" else None
            Path(where, self.name + ".bin").write_bytes(b"half")
            if self.fail:
                raise OSError(28, "No space left on device")

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "adapter_config.json").write_text('{"r": 4}')  # from an earlier, complete save
    os.environ["SM_MODEL_DIR"] = str(model_dir)
    hp = Hyperparameters.model_validate({"model": {"id": "org/base"}, "data": {"train": "d.jsonl"}})
    model = Model(None, Writer("weights", fails_in == "weights"), [], SimpleNamespace(name="fp32"), 1, None)
    batches = Batches(Writer("tokenizer", fails_in == "tokenizer"), 0, [], [], DataReport(), True)
    try:
        with pytest.raises(OSError, match="No space left"):
            save_adapter(hp, DistContext(0, 1, 0, torch.device("cpu")), model, batches, History(), 3, time.time())
    finally:
        del os.environ["SM_MODEL_DIR"]
    assert sorted(p.name for p in model_dir.iterdir()) == ["adapter_config.json"]
    assert (model_dir / "adapter_config.json").read_text() == '{"r": 4}'


def test_the_stop_margin_is_two_minutes_or_three_checkpoints_whichever_is_longer():
    from entrypoint.train import Clock

    clock = Clock(started=0.0, every_s=1800, deadline=3600.0)
    assert not clock.budget_low(3600 - 121) and clock.budget_low(3600 - 119)
    clock.checkpoint_s = 100.0  # a slow checkpoint: stop 300 s before the end
    assert clock.budget_low(3600 - 299) and not clock.budget_low(3600 - 301)
    assert not Clock(started=0.0, every_s=1800, deadline=None).budget_low(10**9)
    assert clock.checkpoint_due(1800) and not clock.checkpoint_due(1799)
