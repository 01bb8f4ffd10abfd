"""The 4-bit check and LoRA targets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from entrypoint import model as M
from entrypoint.hyperparams import LoraSpec, TrainingSpec


@pytest.fixture(scope="module")
def fp32():
    return M.choose_precision(torch.device("cpu"))


def test_every_expert_of_the_tiny_mixtral_is_4bit(tiny_model, fp32):
    import bitsandbytes as bnb

    base = M.load_4bit(str(tiny_model), fp32, {"": "cpu"}, "sdpa")
    assert M.check_quantized(base)["linear4bit"] == 2 * (4 + 4 * 3)  # attn, 4 experts x w1/w2/w3
    experts = [m for n, m in base.named_modules() if n.endswith((".w1", ".w2", ".w3"))]
    assert len(experts) == 24 and all(isinstance(m, bnb.nn.Linear4bit) for m in experts)
    routers = [m for n, m in base.named_modules() if n.endswith("block_sparse_moe.gate")]
    assert len(routers) == 2 and all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in routers)
    assert type(base.lm_head) is nn.Linear  # naming the routers must not drop the default skip of the head


def test_router_names_match_only_the_routers():
    from transformers import MistralConfig, MixtralConfig

    names = M.router_names(MixtralConfig(num_hidden_layers=12))
    assert names[1] == "model.layers.1.block_sparse_moe.gate" and len(names) == 12
    assert not any(n in "model.layers.11.block_sparse_moe.gate" for n in names[:11])  # layer 1 is not layer 11
    assert M.router_names(MistralConfig()) == []  # dense models: gate_proj stays 4-bit


def test_eval_on_a_cpu_with_avx512_bf16(tiny_model, fp32, monkeypatch):
    """bitsandbytes re-packs 4-bit weights for AVX512-BF16 CPUs in eval without grad and
    asserts out_features % 32 == 0; a 4-bit router (4 outputs here) failed `make demo`.
    Forced on whatever CPU runs the test."""
    import bitsandbytes as bnb
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    base = M.load_4bit(str(tiny_model), fp32, {"": "cpu"}, "sdpa")
    layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.support_avx512bf16_for_cpu for m in layers)
    base.eval()
    with torch.no_grad():
        logits = base(input_ids=torch.arange(1, 17)[None]).logits
    assert all(m.out_features % 32 == 0 for m in layers)
    assert all(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)  # the path ran
    assert logits.shape == (1, 16, 2048) and torch.isfinite(logits).all()


def test_experts_left_in_full_precision_fail_the_check(tiny_model, fp32):
    base = M.load_4bit(str(tiny_model), fp32, {"": "cpu"}, "sdpa", skip_modules=["experts"])
    with pytest.raises(M.QuantizationError) as info:
        M.check_quantized(base)
    assert "24 large weights are not 4-bit" in str(info.value)  # the routers are not counted: never 4-bit
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
    net = M.attach_lora(base, LoraSpec(r=4, target_modules="auto"),
                        TrainingSpec(gradient_checkpointing=False, fused_moe=False))
    wrapped = {n.rsplit(".", 1)[-1] for n, m in net.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"}
    trainable, total = M.parameter_counts(net)
    assert 0 < trainable < total


def test_precision_on_cpu_is_fp32():
    p = M.choose_precision(torch.device("cpu"))
    assert p.name == "fp32" and p.dtype == torch.float32


def test_the_bench_quantizing_in_memory_builds_the_model_load_4bit_loads(tiny_model, fp32):
    """bench/deep_memory.py measures memory at full depth from weights it never writes to disk:
    its model must be the one the job loads (same modules, same NF4 bytes, same logits)."""
    import sys
    from pathlib import Path

    from safetensors.torch import load_file
    from transformers import AutoConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from deep_memory import quantized_in_memory

    state = {}
    for f in sorted(Path(tiny_model).glob("*.safetensors")):
        state.update(load_file(f))
    config = AutoConfig.from_pretrained(tiny_model)
    built = quantized_in_memory(config, state, fp32, {"": "cpu"}, "sdpa")
    loaded = M.load_4bit(str(tiny_model), fp32, {"": "cpu"}, "sdpa")
    assert M.check_quantized(built) == M.check_quantized(loaded)
    a, b = dict(built.named_parameters()), dict(loaded.named_parameters())
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 2048, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(built(input_ids=ids).logits, loaded(input_ids=ids).logits)
