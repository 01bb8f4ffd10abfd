"""Checkpoints for spot and stop resume, in /opt/ml/checkpoints (SageMaker syncs that
directory to the job's checkpoint S3 URI and restores it into a new job).

A checkpoint is `step-N/` holding the adapter, optimizer, scheduler, scaler and the RNG
state as it was when step N+1 began, so a resumed run replays exactly what an
uninterrupted one would have done. It is written as `step-N.partial/` and renamed, then
marked COMPLETE: a run killed mid-write leaves nothing that looks finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from entrypoint import container

COMPLETE = "COMPLETE"
STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = STEP_DIR.match(p.name)
            if m and (p / COMPLETE).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def latest(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def save(root: Path, step: int, model, optimizer, scheduler, scaler, rngs: list[dict], state: dict,
         keep: int) -> Path:
    """`rngs`: each rank's RNG state as its step began, in rank order."""
    final = root / f"step-{step}"
    if (final / COMPLETE).is_file():
        return final
    tmp = root / f"step-{step}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)  # the peft adapter only
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None, "rng": rngs[0], "rng_ranks": rngs},
               tmp / "trainer.pt")
    (tmp / "state.json").write_text(json.dumps(state | {"step": step}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    (final / COMPLETE).write_text("")
    for _, old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: Path, model, optimizer, scheduler, scaler, rank: int = 0, world: int = 1) -> dict:
    """Restore into the live objects; returns state.json (its `step` and history). Each
    rank takes its own RNG state when the world is the one that saved it; on another world
    size (a 2-GPU run resumed on 1) every rank takes rank 0's."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(path / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise RuntimeError(f"{path}: checkpoint does not match this model's adapter ({unexpected[:3]}...)")
    blob = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    if scaler is not None and blob["scaler"] is not None:
        scaler.load_state_dict(blob["scaler"])
    ranks = blob.get("rng_ranks") or [blob["rng"]]
    set_rng_state(ranks[rank] if len(ranks) == world else blob["rng"])
    return json.loads((path / "state.json").read_text())


@contextlib.contextmanager
def staged(dest: Path, last: str = "adapter_config.json") -> Iterator[Path]:
    """Write into a temporary directory inside `dest`, then move each file in with
    os.replace, `last` at the end (peft and vLLM look for it first). `dest` itself is
    never renamed: on SageMaker /opt/ml/model may be a mount point. A failure while
    writing leaves `dest` as it was: no 0-byte or half-written file appears there."""
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=dest))
    try:
        yield tmp
        files = sorted((p for p in tmp.rglob("*") if p.is_file()), key=lambda p: (p.name == last, str(p)))
        for f in files:
            container.readable_by_umask(f)
            target = dest / f.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
