"""The 4-bit check and LoRA targets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from entrypoint import model as M
from entrypoint.hyperparams import LoraSpec


@pytest.fixture(scope="module")
def fp32():
    return M.choose_precision(torch.device("cpu"))


def test_every_expert_of_the_tiny_mixtral_is_4bit(tiny_model, fp32):
    import bitsandbytes as bnb

    base = M.load_4bit(str(tiny_model), fp32, {"": "cpu"}, "sdpa")
    assert M.check_quantized(base)["linear4bit"] == 2 * (4 + 1 + 4 * 3)  # attn, router, 4 experts x w1/w2/w3
    experts = [m for n, m in base.named_modules() if n.endswith((".w1", ".w2", ".w3"))]
    assert len(experts) == 24 and all(isinstance(m, bnb.nn.Linear4bit) for m in experts)


def test_experts_left_in_full_precision_fail_the_check(tiny_model, fp32):
    base = M.load_4bit(str(tiny_model), fp32, {"": "cpu"}, "sdpa", skip_modules=["experts"])
    with pytest.raises(M.QuantizationError) as info:
        M.check_quantized(base)
    assert "24 large weights are not 4-bit" in str(info.value)
    assert "block_sparse_moe.experts.0.w1" in str(info.value)


def test_fused_3d_expert_weights_fail_the_check(tiny_model, fp32):
    """transformers 5.x: experts.gate_up_proj / experts.down_proj are 3D parameters."""
    base = M.load_4bit(str(tiny_model), fp32, {"": "cpu"}, "sdpa")
    moe = base.model.layers[0].block_sparse_moe
    moe.fused = nn.Module()
    moe.fused.gate_up_proj = nn.Parameter(torch.zeros(4, 256, 64, dtype=torch.bfloat16))
    with pytest.raises(M.QuantizationError, match=r"fused.gate_up_proj.*5.x stores MoE experts as fused 3D"):
        M.check_quantized(base)


def test_auto_targets_for_mixtral_are_attention_and_experts_not_the_router(tiny_model, fp32):
    base = M.load_4bit(str(tiny_model), fp32, {"": "cpu"}, "sdpa")
    net = M.attach_lora(base, LoraSpec(r=4, target_modules="auto"), gradient_checkpointing=False)
    wrapped = {n.rsplit(".", 1)[-1] for n, m in net.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"}
    trainable, total = M.parameter_counts(net)
    assert 0 < trainable < total


def test_precision_on_cpu_is_fp32():
    p = M.choose_precision(torch.device("cpu"))
    assert p.name == "fp32" and p.dtype == torch.float32
