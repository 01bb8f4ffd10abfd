"""Evaluation leaves the training run as it was, on either bitsandbytes CPU path: it draws
nothing from the global RNG and does not repack the 4-bit weights training runs on.
(tests/e2e/test_job_faults.py shows the whole job: bit-identical adapters.)"""

from __future__ import annotations

import pytest
import torch

from entrypoint import model as M
from entrypoint.hyperparams import LoraSpec, TrainingSpec
from entrypoint.train import one_cpu_kernel


def lora_net(tiny_model, dropout: float = 0.1):
    torch.manual_seed(0)
    base = M.load_4bit(str(tiny_model), M.Precision(torch.float32, "fp32", "test"), {"": "cpu"}, "sdpa")
    one_cpu_kernel(base)
    return M.attach_lora(base, LoraSpec(r=4, alpha=8, dropout=dropout, target_modules="auto"),
                         TrainingSpec(fused_moe=True))


IDS = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("avx512_bf16", [False, True], ids=["fp32-dequantize", "avx512-bf16"])
def test_an_evaluation_leaves_the_4bit_weights_and_the_training_forward_as_they_were(
        tiny_model, monkeypatch, avx512_bf16):
    """Forced either way, whatever this CPU has: bitsandbytes picks the path when a layer is
    built (Linear4bit.support_avx512bf16_for_cpu); the job keeps every layer on one."""
    import bitsandbytes as bnb
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: avx512_bf16)
    net = lora_net(tiny_model, dropout=0.0)
    layers = [m for m in net.modules() if isinstance(m, bnb.nn.Linear4bit)]
    before = [m.weight.data.clone() for m in layers]
    net.train()
    with torch.no_grad():
        trained_before = net(input_ids=IDS).logits
    net.eval()
    with torch.no_grad():
        net(input_ids=IDS)
    net.train()
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert all(torch.equal(m.weight.data, b) for m, b in zip(layers, before, strict=True))
    with torch.no_grad():
        assert torch.equal(net(input_ids=IDS).logits, trained_before)


def test_an_evaluation_draws_nothing_from_the_global_rng(tiny_model):
    net = lora_net(tiny_model, dropout=0.1)
    net.eval()
    state = torch.get_rng_state()
    with torch.no_grad():
        net(input_ids=IDS)
    assert torch.equal(torch.get_rng_state(), state)
    net.train()  # the same forward in training does draw (dropout masks, the kernel's seed)
    net(input_ids=IDS)
    assert not torch.equal(torch.get_rng_state(), state)
