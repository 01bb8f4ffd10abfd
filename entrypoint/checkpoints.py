"""Checkpoints for spot and stop resume, in /opt/ml/checkpoints (SageMaker syncs that
directory to the job's checkpoint S3 URI file by file, deletions too, and restores it into
a new job).

A checkpoint is `step-N/` holding the adapter, optimizer, scheduler, scaler and the RNG
state as it was when step N+1 began, so a resumed run replays exactly what an
uninterrupted one would have done. It is written into `step-N.partial/`, renamed, and
then its manifest, `COMPLETE` (each file's size and sha256), is written last. It counts
only while every file matches the manifest: the sync may upload the manifest before a
1.4 GB trainer.pt, or a restore may bring a half-uploaded file. The prune keeps the
checkpoint before the newest one until the next save, so the S3 copy always holds one
that counts while the newest is still uploading (docs/faults.md).

Nothing is unpickled: trainer.pt is read with torch.load(weights_only=True), whose
loader builds only tensors and plain containers; anything else is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from entrypoint import container

COMPLETE = "COMPLETE"  # the manifest
STEP_DIR = re.compile(r"^step-(\d+)$")
PARTIAL_DIR = re.compile(r"^step-(\d+)\.partial$")
# The adapter's shape: peft's adapter_config.json key -> the job config's key.
SHAPE_KEYS = {"r": "lora.r", "lora_alpha": "lora.alpha", "target_modules": "lora.target_modules",
              "use_rslora": "lora.use_rslora", "use_dora": "lora.use_dora"}


class Invalid(Exception):
    """This checkpoint does not count; the message says why, in a few words."""


class AdapterMismatch(Exception):
    """The checkpoint's adapter has another shape than the config asks for: resuming would
    mix two adapters, so the job fails and names the key."""


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(ckpt: Path, step: int) -> None:
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != COMPLETE)
    manifest = {"step": step, "files": {str(p.relative_to(ckpt)): {"size": p.stat().st_size, "sha256": _sha256(p)}
                                        for p in files}}
    tmp = ckpt / (COMPLETE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, ckpt / COMPLETE)


def check(ckpt: Path, hashes: bool = True) -> None:
    """Raises Invalid when `ckpt` does not match its manifest: a file missing, short or
    changed (sizes first, so a missing or truncated file costs no hashing). `hashes=False`:
    sizes only, for the prune, which judges this run's own writes and runs at every save."""
    try:
        manifest = json.loads((ckpt / COMPLETE).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise Invalid("no manifest (not finished)") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise Invalid("manifest unreadable") from None
    for need in ("adapter_model.safetensors", "adapter_config.json", "trainer.pt", "state.json"):
        if need not in files:
            raise Invalid(f"{need} not in the manifest")
    for name, meta in files.items():
        p = ckpt / name
        if not p.is_file():
            raise Invalid(f"{name} missing")
        if p.stat().st_size != meta["size"]:
            raise Invalid(f"{name} is {p.stat().st_size} bytes, the manifest says {meta['size']}")
    for name, meta in files.items() if hashes else ():
        if _sha256(ckpt / name) != meta["sha256"]:
            raise Invalid(f"{name} does not match its sha256")


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Every step-N directory, finished or not, oldest first."""
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = STEP_DIR.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
    return sorted(found)


def _counts(ckpt: Path, hashes: bool = True) -> bool:
    try:
        check(ckpt, hashes)
    except Invalid:
        return False
    return True


def valid_checkpoints(root: Path, hashes: bool = True) -> list[tuple[int, Path]]:
    return [(n, p) for n, p in step_dirs(root) if _counts(p, hashes)]


def newest_valid(root: Path, exclude: set[Path] = frozenset()) -> tuple[Path | None, list[tuple[str, str]]]:
    """The newest checkpoint that counts, and (name, why) for each newer one skipped
    (`step-16`, `trainer.pt missing`); `exclude`: ones already refused, not said again.
    Hashes only down to the first that counts."""
    skipped = []
    for _, p in reversed(step_dirs(root)):
        if p in exclude:
            continue
        try:
            check(p)
        except Invalid as why:
            skipped.append((p.name, str(why)))
            continue
        return p, skipped
    return None, skipped


def save(root: Path, step: int, model, optimizer, scheduler, scaler, rngs: list[dict], state: dict,
         keep: int) -> Path:
    """`rngs`: each rank's RNG state as its step began, in rank order."""
    final = root / f"step-{step}"
    if _counts(final):
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
    write_manifest(final, step)  # last: until it is there and matches, step-N does not count
    prune(root, keep)
    return final


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints that count, and at least two: the sync may still
    be uploading the newest, and deleting the one before would leave S3 none that counts.
    Unfinished directories older than the newest that counts go too."""
    valid = valid_checkpoints(root, hashes=False)
    if not valid:
        return
    kept = {p for _, p in valid[-max(keep, 2):]}
    newest = valid[-1][0]
    for p in root.iterdir():
        m = STEP_DIR.match(p.name) or PARTIAL_DIR.match(p.name)
        if m and int(m.group(1)) < newest and p not in kept:
            shutil.rmtree(p, ignore_errors=True)


def check_shape(path: Path, model) -> None:
    """Raises AdapterMismatch naming each key whose value changed (`lora.r 8 -> 16`)."""
    try:
        saved = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError):
        raise Invalid("adapter_config.json unreadable") from None
    live = model.peft_config["default"].to_dict()
    changed = []
    for key, name in SHAPE_KEYS.items():
        was, now = saved.get(key), live.get(key)
        if isinstance(was, (list, set, tuple)) or isinstance(now, (list, set, tuple)):
            was, now = sorted(was or []), sorted(now or [])
        if key in saved and was != now:
            changed.append(f"{name} {was} -> {now}")
    if changed:
        raise AdapterMismatch(
            f"{path.name} was trained with another adapter shape: {', '.join(changed)}. "
            "Resume with the config it was started with, or start a new job")


def load(path: Path, model, optimizer, scheduler, scaler, rank: int = 0, world: int = 1) -> dict:
    """Restore into the live objects; returns state.json (its `step` and history). Each
    rank takes its own RNG state when the world is the one that saved it; on another world
    size (a 2-GPU run resumed on 1) every rank takes rank 0's. Raises Invalid before
    changing anything when trainer.pt holds more than tensors and plain values."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    check_shape(path, model)
    try:
        blob = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise Invalid(f"trainer.pt refused (holds more than tensors: {first})") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise Invalid(f"trainer.pt unreadable ({type(exc).__name__})") from None
    weights = load_file(str(path / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise AdapterMismatch(f"{path.name} does not match this model's adapter ({unexpected[:3]}...)")
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
