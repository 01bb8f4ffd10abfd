"""Checkpoints as SageMaker's sync and restore leave them: files missing, short or planted,
a manifest that reached S3 before the weights, a config that changed the adapter. Real
peft, torch and bitsandbytes objects on a small module (no model load)."""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import shutil
from types import SimpleNamespace

import pytest
import torch

from entrypoint import checkpoints
from entrypoint.train import DistContext, Model, Optim, resume

FILES = ("adapter_model.safetensors", "adapter_config.json", "trainer.pt", "state.json")


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(64, 64)
        self.v = torch.nn.Linear(64, 64)

    def forward(self, x):
        return self.v(torch.relu(self.q(x)))


def setup(r: int = 4, optimizer: str = "adamw"):
    from peft import LoraConfig, get_peft_model
    from transformers import get_scheduler

    torch.manual_seed(0)
    peft = get_peft_model(Net(), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q", "v"], lora_dropout=0.1))
    params = [p for p in peft.parameters() if p.requires_grad]
    if optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=1e-2)
    else:
        opt = torch.optim.AdamW(params, lr=1e-2)
    sched = get_scheduler("linear", opt, num_warmup_steps=1, num_training_steps=100)
    return peft, opt, sched


def step(peft, opt, sched) -> None:
    peft.train()
    peft(torch.randn(8, 64)).square().mean().backward()  # dropout: draws from the global RNG
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def save(root, n, peft, opt, sched, keep=2):
    return checkpoints.save(root, n, peft, opt, sched, None, [checkpoints.rng_state()], {"history": {}}, keep)


def resume_into(root, peft, opt, sched, monkeypatch) -> int:
    monkeypatch.setenv("SM_QLORA_CHECKPOINT_DIR", str(root))
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    model = Model(peft, peft, [], SimpleNamespace(name="fp32"), 0, None)
    return resume(ctx, model, Optim(opt, sched, None, 100, 100, None, 1.0))[0]


def lora_weights(peft) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in peft.state_dict().items() if "lora_" in k}


@pytest.fixture
def two(tmp_path):
    """step-4 and step-8, both whole, and what the run held right after step 4."""
    peft, opt, sched = setup()
    for _ in range(4):
        step(peft, opt, sched)
    save(tmp_path, 4, peft, opt, sched)
    at4 = lora_weights(peft)
    for _ in range(4):
        step(peft, opt, sched)
    save(tmp_path, 8, peft, opt, sched)
    return tmp_path, at4


def damage(ckpt, how: str) -> None:
    if how == "trainer.pt missing":
        (ckpt / "trainer.pt").unlink()
    elif how == "adapter_model.safetensors missing":
        (ckpt / "adapter_model.safetensors").unlink()
    elif how == "state.json missing":
        (ckpt / "state.json").unlink()
    elif how == "trainer.pt 0 bytes":
        (ckpt / "trainer.pt").write_bytes(b"")
    elif how == "trainer.pt truncated":
        data = (ckpt / "trainer.pt").read_bytes()
        (ckpt / "trainer.pt").write_bytes(data[: len(data) // 2])
    elif how == "trainer.pt changed, same size":
        data = bytearray((ckpt / "trainer.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (ckpt / "trainer.pt").write_bytes(bytes(data))
    elif how == "0-byte marker (no manifest)":
        (ckpt / "COMPLETE").write_text("")
    elif how == "marker missing":
        (ckpt / "COMPLETE").unlink()


DAMAGE = {
    "trainer.pt missing": "trainer.pt missing",
    "adapter_model.safetensors missing": "adapter_model.safetensors missing",
    "state.json missing": "state.json missing",
    "trainer.pt 0 bytes": r"trainer.pt is 0 bytes, the manifest says \d+",
    "trainer.pt truncated": r"trainer.pt is \d+ bytes, the manifest says \d+",
    "trainer.pt changed, same size": "trainer.pt does not match its sha256",
    "0-byte marker (no manifest)": "manifest unreadable",
    "marker missing": r"no manifest \(not finished\)",
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_skipped_with_its_cause_and_the_older_one_resumes(
        two, how, monkeypatch, capsys):
    root, at4 = two
    damage(root / "step-8", how)
    peft, opt, sched = setup()
    assert resume_into(root, peft, opt, sched, monkeypatch) == 4
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(rf"\[resume\] skipped step-8: {DAMAGE[how]}", out[0]), out
    assert out[1].startswith("[resume] step=4 ")
    for k, v in lora_weights(peft).items():
        assert torch.equal(v, at4[k]), k


def test_nothing_that_counts_starts_from_step_0_and_says_so(two, monkeypatch, capsys):
    root, _ = two
    damage(root / "step-8", "trainer.pt missing")
    damage(root / "step-4", "trainer.pt 0 bytes")
    assert resume_into(root, *setup(), monkeypatch) == 0
    out = capsys.readouterr().out
    assert "[resume] skipped step-8: trainer.pt missing" in out and "[resume] skipped step-4: trainer.pt is 0" in out


class Payload:
    """What someone with write access to the checkpoint prefix would plant."""

    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PAYLOAD_MARK']}",))


def test_a_pickle_payload_in_trainer_pt_never_runs_and_the_checkpoint_is_refused(two, monkeypatch, capsys, tmp_path):
    root, at4 = two
    mark = tmp_path / "ran"
    monkeypatch.setenv("PAYLOAD_MARK", str(mark))
    planted = root / "step-8"
    blob = torch.load(planted / "trainer.pt", weights_only=True)
    blob["scheduler"]["x"] = Payload()
    torch.save(blob, planted / "trainer.pt")
    checkpoints.write_manifest(planted, 8)  # the planter rewrites the manifest too
    peft, opt, sched = setup()
    assert resume_into(root, peft, opt, sched, monkeypatch) == 4
    assert not mark.exists()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[resume] skipped step-8: trainer.pt refused (holds more than tensors")
    assert len(lines[0]) < 300 and lines[1].startswith("[resume] step=4 ")
    for k, v in lora_weights(peft).items():  # nothing of step-8 was applied before the refusal
        assert torch.equal(v, at4[k]), k
    # the payload does run under a full unpickler: the test would catch a weights_only=False
    torch.load(planted / "trainer.pt", weights_only=False)
    assert mark.exists()


def test_a_changed_adapter_shape_fails_at_once_naming_the_key(two, monkeypatch):
    root, _ = two
    peft, opt, sched = setup(r=16)
    monkeypatch.setenv("SM_QLORA_CHECKPOINT_DIR", str(root))
    with pytest.raises(checkpoints.AdapterMismatch) as info:
        resume_into(root, peft, opt, sched, monkeypatch)
    message = str(info.value)
    assert "lora.r 4 -> 16" in message and "lora.alpha 8 -> 32" in message
    assert "\n" not in message and len(message) < 300


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
def test_resume_continues_exactly_as_the_uninterrupted_run(tmp_path, monkeypatch, optimizer, capsys):
    """Optimizer (bitsandbytes' 8-bit state too), scheduler and RNG come back through
    weights_only: the next steps are bit-identical."""
    peft, opt, sched = setup(optimizer=optimizer)
    for _ in range(3):
        step(peft, opt, sched)
    random.random()
    save(tmp_path, 3, peft, opt, sched)
    for _ in range(3):
        step(peft, opt, sched)
    whole = lora_weights(peft)
    peft2, opt2, sched2 = setup(optimizer=optimizer)
    torch.manual_seed(123)  # a restarted job's RNG is elsewhere until the checkpoint sets it
    assert resume_into(tmp_path, peft2, opt2, sched2, monkeypatch) == 3
    for _ in range(3):
        step(peft2, opt2, sched2)
    for k, v in lora_weights(peft2).items():
        assert torch.equal(v, whole[k]), k


def test_prune_keeps_the_checkpoint_before_the_newest_even_at_limit_1(tmp_path):
    peft, opt, sched = setup()
    for n in (1, 2, 3):
        step(peft, opt, sched)
        save(tmp_path, n, peft, opt, sched, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2", "step-3"]


def test_a_prune_never_deletes_the_last_checkpoint_that_counts_for_one_that_does_not(tmp_path):
    peft, opt, sched = setup()
    save(tmp_path, 1, peft, opt, sched, keep=1)
    (tmp_path / "step-5").mkdir()  # a newer, unfinished directory (a restore mid-upload)
    (tmp_path / "step-5" / "COMPLETE").write_text("")
    save(tmp_path, 2, peft, opt, sched, keep=1)
    assert {"step-1", "step-2"} <= {p.name for p in tmp_path.iterdir()}


def test_whatever_the_sync_has_uploaded_the_s3_copy_holds_a_checkpoint_that_counts(tmp_path):
    """SageMaker's sync uploads file by file in any order, a file possibly half-written,
    and propagates deletions. After each save, take S3 as the local directory with the
    newest checkpoint's files cut down to any subset, each whole or half: a restore of that
    must still resume, from the newest checkpoint or the one before it."""
    peft, opt, sched = setup()
    local = tmp_path / "local"
    for n in (1, 2, 3):
        step(peft, opt, sched)
        save(local, n, peft, opt, sched, keep=1)
        newest = local / f"step-{n}"
        names = sorted(p.name for p in newest.iterdir())
        for kept in itertools.chain.from_iterable(itertools.combinations(names, k) for k in range(len(names) + 1)):
            for half in [None, *kept]:
                s3 = tmp_path / "s3"
                shutil.rmtree(s3, ignore_errors=True)
                shutil.copytree(local, s3)
                for name in names:
                    if name not in kept:
                        (s3 / newest.name / name).unlink()
                if half:
                    data = (s3 / newest.name / half).read_bytes()
                    (s3 / newest.name / half).write_bytes(data[: len(data) // 2])
                found, _ = checkpoints.newest_valid(s3)
                assert found is not None and found.name in (f"step-{n}", f"step-{n - 1}") or n == 1, (kept, half)
                if len(kept) == len(names) and half is None:
                    assert found.name == f"step-{n}"


def test_the_manifest_lists_each_file_with_its_size_and_sha256(two):
    root, _ = two
    manifest = json.loads((root / "step-8" / "COMPLETE").read_text())
    assert manifest["step"] == 8 and set(FILES) <= set(manifest["files"])
    for name, meta in manifest["files"].items():
        assert meta["size"] == (root / "step-8" / name).stat().st_size and len(meta["sha256"]) == 64
