"""entrypoint.model.compile_small_ops (RMSNorm and the rotary embedding through torch.compile) against
eager, on the tiny 4-bit Mixtral with the GPU recipe's switches (bf16 autocast, bf16 residual stream,
gradient checkpointing). Its GPU speed is in bench/README.md (issue 22)."""

from __future__ import annotations

import sys

import torch
from torch import nn

from entrypoint import model as M
from entrypoint.hyperparams import LoraSpec, TrainingSpec
from tests.entrypoint.test_residual import lora_net


def loss_and_grads(net, ids):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = net(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = torch.cat([p.grad.flatten().float() for p in net.parameters() if p.requires_grad and p.grad is not None])
    net.zero_grad(set_to_none=True)
    return loss.item(), grads


def test_compiled_norms_and_rotary_give_eager_loss_and_gradients(tiny_model, monkeypatch):
    """The same net before and after the switch (the rotary is replaced for its whole modeling
    module, so the eager reference is taken first), at two sequence lengths: the loss within 1e-4
    and the LoRA gradients at cosine >= 0.9999."""
    net = lora_net(tiny_model, True)
    modeling = sys.modules[type(net.base_model.model.model.norm).__module__]
    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", modeling.apply_rotary_pos_emb)  # put back afterwards
    data = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 2048, (2, n), generator=data) for n in (48, 40)]
    eager = [loss_and_grads(net, ids) for ids in batches]
    layers = net.base_model.model.model.layers
    assert M.compile_small_ops(net) == 2 * len(layers) + 1  # two norms a layer and the final one
    assert hasattr(modeling.apply_rotary_pos_emb, "_torchdynamo_orig_callable")
    calls = []
    layers[0].input_layernorm.register_forward_hook(lambda *_: calls.append(1))
    for (ref_loss, ref), ids in zip(eager, batches, strict=True):
        loss, got = loss_and_grads(net, ids)
        assert abs(loss - ref_loss) <= 1e-4 * abs(ref_loss)
        assert torch.nn.functional.cosine_similarity(ref, got, dim=0).item() >= 0.9999
    assert len(calls) >= 2  # the switched norm ran


class Olmo2RMSNorm(nn.Module):
    """Another architecture's norm: (weight * x).to(dtype), a different rounding."""

    def __init__(self):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.ones(8)), 1e-6

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        return (self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))).to(dtype)


def test_only_norms_of_the_same_arithmetic_are_switched_and_accelerate_hooks_stay():
    from accelerate.hooks import ModelHook, add_hook_to_module
    from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

    class Count(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return args, kwargs

    other, hooked = Olmo2RMSNorm(), MixtralRMSNorm(8)
    add_hook_to_module(hooked, Count())
    model = nn.ModuleList([other, hooked])
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    before = hooked(x)
    assert M.compile_small_ops(model) == 1
    assert "forward" not in vars(other)
    torch.testing.assert_close(hooked(x), before)
    assert Count.calls == 2  # the hook (which moves inputs between GPUs under a device_map) still runs


def test_the_switch_compiles_nothing_on_a_cpu_run(tiny_model):
    """training.compile_small_ops is for CUDA: a CPU run (the tiny local runs, CI) keeps eager
    norms, needs no C++ compiler, and its [model] line says nothing of it."""
    base = M.load_4bit(str(tiny_model), M.Precision(torch.float32, "fp32", "test"), {"": "cpu"}, "sdpa")
    net = M.attach_lora(base, LoraSpec(r=4, alpha=8, dropout=0.0, target_modules="auto"),
                        TrainingSpec(compile_small_ops=True, offload_checkpoints=False))
    assert not getattr(net, "compiled_small_ops", 0)
    assert all("forward" not in vars(m) for m in net.modules() if type(m).__name__.endswith("RMSNorm"))


def test_flex_attention_takes_q_k_v_in_the_autocast_dtype_with_a_document_block_mask(tiny_model, monkeypatch):
    """training.flex_attention: on packed rows (position ids restarting per example) the attention
    gets a BlockMask and bf16 q, k, v under bf16 autocast, on the fp32 residual stream as on the
    bf16 one, and the loss is SDPA's (forward only: torch has no FlexAttention backward on CPU, and
    the job switches it on for CUDA alone)."""
    import transformers.integrations.flex_attention as flex

    seen = []
    real = flex.flex_attention_forward
    monkeypatch.setattr(flex, "flex_attention_forward", lambda module, q, k, v, mask, **kw: (
        seen.append((q.dtype, k.dtype, v.dtype, type(mask).__name__)), real(module, q, k, v, mask, **kw))[1])
    positions = torch.tensor([list(range(20)) + list(range(28))] * 2)
    ids = torch.randint(0, 2048, (2, 48), generator=torch.Generator().manual_seed(2))
    for bf16 in (False, True):
        net = lora_net(tiny_model, bf16)
        losses = []
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            losses.append(net(input_ids=ids, labels=ids, position_ids=positions).loss.item())
            M.use_flex_attention(net)
            losses.append(net(input_ids=ids, labels=ids, position_ids=positions).loss.item())
        assert abs(losses[1] - losses[0]) <= 1e-4 * abs(losses[0])
    assert len(seen) == 2 * len(net.base_model.model.model.layers)
    assert set(seen) == {(torch.bfloat16, torch.bfloat16, torch.bfloat16, "BlockMask")}
    assert not TrainingSpec().flex_attention  # opt-in
