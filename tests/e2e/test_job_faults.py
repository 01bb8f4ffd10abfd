"""Faults a SageMaker job meets, through the same /opt/ml layout and SM_* environment the
local runner gives a job (the tiny model, CPU): what FailureReason says when the job
fails in a way nobody checked for, a resume with another adapter shape, and evaluation
leaving the training run exactly as it would be without it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from entrypoint.container import FAILURE_MAX_CHARS
from tests.conftest import DATA
from tests.e2e.test_job_stops import lay_out_run


def run(root: Path, env: dict, **hyperparameters) -> subprocess.CompletedProcess:
    path = root / "input" / "config" / "hyperparameters.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {k: json.dumps(v) for k, v in hyperparameters.items()}))
    return subprocess.run([sys.executable, "-m", "entrypoint"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)


def failure(root: Path) -> str:
    text = (root / "output" / "failure").read_text()
    assert len(text) <= FAILURE_MAX_CHARS and text.count("\n") <= 1, text
    return text


def test_a_model_the_job_cannot_reach_fails_with_one_line_naming_it(tiny_model, tmp_path):
    """No internet in the job (HF_HUB_OFFLINE here) and a hub id nothing has cached: the
    toolkit's dump was 1,380 characters over 6 lines."""
    root, env = lay_out_run(tiny_model, tmp_path)
    (root / "input" / "data" / "model").unlink()  # no model channel: the id is all there is
    proc = run(root, env | {"HF_HUB_OFFLINE": "1"}, **{"model.id": "nobody/not-cached-anywhere"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    reason = failure(root)
    assert reason.startswith("model.id nobody/not-cached-anywhere could not be loaded (OSError: "), reason
    assert "s3:// prefix" in reason  # the hint
    assert "Traceback (most recent call last)" in proc.stderr  # the whole story stays in the log
    errors = [line for line in proc.stdout.splitlines() if line.startswith("[error]")]
    assert errors == [f"[error] reason={reason.strip()}"]


def test_any_unexpected_exception_gives_a_first_line_and_the_traceback_goes_to_the_log(tiny_model, tmp_path):
    root, env = lay_out_run(tiny_model, tmp_path)
    probe = ("import entrypoint.train as t\n"
             "def boom(*a, **k):\n    raise KeyError('x' * 5000)\n"
             "t.setup_optimizer = boom\nt.main()\n")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1
    reason = failure(root)
    assert reason.startswith("the job failed: KeyError: 'xxxx") and "sm-qlora logs" in reason
    assert "Traceback (most recent call last)" in proc.stderr and "in boom" in proc.stderr


def test_a_resume_whose_config_changes_the_adapter_shape_fails_at_once_naming_the_key(tiny_model, tmp_path):
    """The toolkit's dump was 15,207 characters of size mismatch."""
    root, env = lay_out_run(tiny_model, tmp_path, max_steps=2, save_steps=1)
    first = run(root, env)
    assert first.returncode == 0, first.stderr[-3000:]
    (root / "model").rename(root / "model-first")
    (root / "model").mkdir()
    shutil.rmtree(root / "checkpoints" / "step-2", ignore_errors=True)  # resume from step 1
    again = run(root, env, **{"lora.r": 16, "training.max_steps": 4})
    assert again.returncode == 2, again.stderr[-3000:]
    reason = failure(root)
    assert reason.startswith("step-1 was trained with another adapter shape: lora.r 8 -> 16. "), reason
    assert "Traceback" not in again.stderr and "[train]" not in again.stdout


def adapter(root: Path) -> dict[str, torch.Tensor]:
    return load_file(str(root / "model" / "adapter_model.safetensors"))


def test_evaluation_never_changes_the_training_run(tiny_model, tmp_path):
    """The same job with an evaluation every 2 steps and with none ends with bit-identical
    adapters; so does a resume from the checkpoint written right after an evaluation. LoRA
    dropout is on, so a draw from the RNG during evaluation would move every later mask;
    on an AVX512-BF16 CPU bitsandbytes would also repack the 4-bit layers in eval."""
    steps = {"max_steps": 8, "logging_steps": 2}
    plain, env = lay_out_run(tiny_model, tmp_path / "plain", save_steps=1000, **steps)
    assert (r := run(plain, env)).returncode == 0, r.stderr[-3000:]
    evaluated, env = lay_out_run(tiny_model, tmp_path / "eval", save_steps=4, eval_steps=2, **steps)
    r = run(evaluated, env, **{"data.validation": str(DATA)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("[eval] ") == 4
    a, b = adapter(plain), adapter(evaluated)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, (a[k] - b[k]).abs().max())
    resumed, env = lay_out_run(tiny_model, tmp_path / "resumed", save_steps=4, eval_steps=2, **steps)
    shutil.copytree(evaluated / "checkpoints" / "step-4", resumed / "checkpoints" / "step-4")
    r = run(resumed, env, **{"data.validation": str(DATA)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[resume] step=4 " in r.stdout
    c = adapter(resumed)
    for k in a:
        assert torch.equal(c[k], b[k]), (k, (c[k] - b[k]).abs().max())
