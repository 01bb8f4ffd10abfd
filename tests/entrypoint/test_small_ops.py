"""entrypoint.model.compile_small_ops (RMSNorm and the rotary embedding through torch.compile) against
eager, on the tiny 4-bit Mixtral with the GPU recipe's switches (bf16 autocast, bf16 residual stream,
gradient checkpointing). Its GPU speed is in bench/README.md (issue 22)."""

from __future__ import annotations

import sys

import torch

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
    eager, compiled = lora_net(tiny_model, True), lora_net(tiny_model, True)
    modeling = sys.modules[type(compiled.base_model.model.model.norm).__module__]
    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", modeling.apply_rotary_pos_emb)  # put back afterwards
    layers = compiled.base_model.model.model.layers
    assert M.compile_small_ops(compiled) == 2 * len(layers) + 1  # two norms a layer and the final one
    assert hasattr(modeling.apply_rotary_pos_emb, "_torchdynamo_orig_callable")
    calls = []
    layers[0].input_layernorm.register_forward_hook(lambda *_: calls.append(1))
    ids = torch.randint(0, 2048, (2, 48), generator=torch.Generator().manual_seed(2))
    ref_loss, ref = loss_and_grads(eager, ids)
    loss, got = loss_and_grads(compiled, ids)
    assert calls  # the switched norm ran
    assert abs(loss - ref_loss) <= 1e-4 * abs(ref_loss)
    assert torch.nn.functional.cosine_similarity(ref, got, dim=0).item() >= 0.9999


def test_the_switch_compiles_nothing_on_a_cpu_run(tiny_model):
    """training.compile_small_ops is for CUDA: a CPU run (the tiny local runs, CI) keeps eager
    norms, needs no C++ compiler, and its [model] line says nothing of it."""
    base = M.load_4bit(str(tiny_model), M.Precision(torch.float32, "fp32", "test"), {"": "cpu"}, "sdpa")
    net = M.attach_lora(base, LoraSpec(r=4, alpha=8, dropout=0.0, target_modules="auto"),
                        TrainingSpec(compile_small_ops=True, offload_checkpoints=False))
    assert not getattr(net, "compiled_small_ops", 0)
    assert all("forward" not in vars(m) for m in net.modules() if type(m).__name__.endswith("RMSNorm"))
