"""training.bf16_residual against the fp32 residual stream PEFT leaves, on the tiny 4-bit Mixtral (CPU,
bf16 autocast as on an Ampere+ GPU). bench/README.md has the 32-layer GPU numerics and speed."""

from __future__ import annotations

import pytest
import torch

from entrypoint import model as M
from entrypoint.hyperparams import TrainingSpec
from tests.entrypoint import nets


def lora_net(tiny_model, bf16_residual: bool, dtype=torch.bfloat16, fused: bool = True):
    return nets.lora_net(tiny_model, TrainingSpec(fused_moe=fused, bf16_residual=bf16_residual,
                                                  offload_checkpoints=False), dtype)


def layer_input_dtypes(net) -> list[torch.dtype]:
    seen = []
    for layer in net.base_model.model.model.layers:
        layer.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(
            (args[0] if args else kwargs["hidden_states"]).dtype), with_kwargs=True)
    return seen


@pytest.mark.parametrize("ref_fused,fused", [(True, True), (False, False), (False, True)],
                         ids=["fused-moe", "stock-moe", "stock-fp32-vs-fused-bf16"])
def test_bf16_residual_halves_the_stream_and_keeps_loss_and_gradients(tiny_model, ref_fused, fused):
    """At identical LoRA weights for 5 optimizer steps: every decoder layer's input (what a checkpoint
    keeps) is bf16 instead of fp32, the loss within 1% and the LoRA gradients at cosine >= 0.999
    of the fp32 residual stream's, the lever alone (either MoE path) and the job's defaults against
    the stock transformers + PEFT path; the adapter itself stays fp32 (the same file format).
    Unsynced, Adam turns bf16-level differences into different trajectories within a few steps
    (tests/entrypoint/test_moe.py), so weights are synced as on the GPU (bench/README.md)."""
    stock, half = lora_net(tiny_model, False, fused=ref_fused), lora_net(tiny_model, True, fused=fused)
    dtypes = [layer_input_dtypes(n) for n in (stock, half)]
    trainable = [p for p in half.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    opt = torch.optim.AdamW([p for p in stock.parameters() if p.requires_grad], lr=1e-2)
    data = torch.Generator().manual_seed(2)
    for _ in range(5):
        with torch.no_grad():  # the bf16-residual net takes the reference's LoRA weights: gradients at identical weights
            for a, b in zip([p for p in stock.parameters() if p.requires_grad], trainable, strict=True):
                b.copy_(a)
        ids = torch.randint(0, 2048, (2, 48), generator=data)
        seen = []
        for net in (stock, half):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = net(input_ids=ids, labels=ids).loss
            loss.backward()
            seen.append((loss.item(), torch.cat([p.grad.flatten().float() for p in net.parameters()
                                                 if p.requires_grad and p.grad is not None])))
        (ref_loss, ref_grad), (loss, grad) = seen
        assert abs(loss - ref_loss) <= 0.01 * abs(ref_loss)
        assert torch.nn.functional.cosine_similarity(ref_grad, grad, dim=0).item() >= 0.999
        opt.step()
        opt.zero_grad(set_to_none=True)
        half.zero_grad(set_to_none=True)
    assert set(dtypes[0]) == {torch.float32} and set(dtypes[1]) == {torch.bfloat16}
    assert len(dtypes[1]) == len(dtypes[0]) >= 5 * len(half.base_model.model.model.layers)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_bf16_residual_leaves_fp16_and_fp32_models_in_fp32(tiny_model, dtype):
    """An fp16 residual stream can overflow (why PEFT upcasts it) and an fp32 model has nothing to
    gain: the switch changes nothing there."""
    net = lora_net(tiny_model, True, dtype=dtype)
    assert {p.dtype for p in M.residual_params(net)} == {torch.float32}


def test_bf16_residual_trains_with_lora_dropout_and_offloaded_checkpoints_as_gpu_held(tiny_model):
    """The bf16 stream with LoRA dropout (the experts' input gradients then sum their LoRA parts through
    the masks before rounding to bf16): every LoRA weight gets a finite gradient, and offloaded
    checkpoints give the loss and gradients of GPU-held ones bit for bit."""
    ids = torch.randint(0, 2048, (2, 48), generator=torch.Generator().manual_seed(2))
    seen = []
    for offload in (False, True):
        net = nets.lora_net(tiny_model, TrainingSpec(bf16_residual=True, offload_checkpoints=offload),
                            torch.bfloat16, dropout=0.2)
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = [p.grad for p in net.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        seen.append((loss.item(), grads))
    (held_loss, held), (host_loss, host) = seen
    assert host_loss == held_loss
    assert all(torch.equal(a, b) for a, b in zip(host, held, strict=True))
