"""Checkpointed layer inputs kept off the GPU (entrypoint/offload.py), on the tiny 4-bit Mixtral (CPU).

On a CPU the host copy is a plain copy; the CUDA side streams are exercised by
bench/deep_memory.py on a GPU, which compares one step's gradients the same way."""

from __future__ import annotations

import weakref

import pytest
import torch

from entrypoint.hyperparams import TrainingSpec
from tests.entrypoint import nets


def lora_net(tiny_model, offload: bool, fused: bool):
    return nets.lora_net(tiny_model, TrainingSpec(fused_moe=fused, offload_checkpoints=offload), dropout=0.2)


def layers(net):
    return net.base_model.model.model.layers


def moe_block(layer):
    """A decoder layer's MoE block: `block_sparse_moe` on transformers 4, `mlp` on 5."""
    return getattr(layer, "block_sparse_moe", None) or layer.mlp


@pytest.mark.parametrize("fused", [True, False], ids=["fused-moe", "stock-moe"])
def test_offloaded_checkpoints_give_the_same_gradients_over_three_steps(tiny_model, fused):
    """With LoRA dropout 0.2 (its masks redrawn in the recomputation) and the optimizer
    moving the weights between steps: bit for bit the loss and gradients of GPU-held checkpoints."""
    nets = [lora_net(tiny_model, offload, fused) for offload in (False, True)]
    assert layers(nets[1])[0]._gradient_checkpointing_func is not layers(nets[0])[0]._gradient_checkpointing_func
    opts = [torch.optim.AdamW([p for p in n.parameters() if p.requires_grad], lr=1e-2) for n in nets]
    data = torch.Generator().manual_seed(2)
    for _ in range(3):
        ids = torch.randint(0, 2048, (2, 48), generator=data)
        seen = []
        for net, opt in zip(nets, opts, strict=True):
            torch.manual_seed(5)
            loss = net(input_ids=ids, labels=ids).loss
            loss.backward()
            grads = [p.grad.clone() for p in net.parameters() if p.requires_grad and p.grad is not None]
            seen.append((loss.item(), grads))
            opt.step()
            opt.zero_grad(set_to_none=True)
        (gpu_loss, gpu_grads), (host_loss, host_grads) = seen
        assert host_loss == gpu_loss
        assert len(host_grads) == len(gpu_grads) > 0
        assert all(torch.equal(a, b) for a, b in zip(host_grads, gpu_grads, strict=True))


def test_each_offloaded_pass_of_the_fused_moe_skips_what_it_throws_away(tiny_model, monkeypatch):
    """In a checkpointed layer the forward's saved tensors are dropped and the recomputation's output
    is not read: the forward keeps no a13 (a tokens x 2 ffn tensor) and the recomputation runs no
    SwiGLU and no w2 projection, where GPU-held checkpoints run all of them in both passes (the
    gradients stay bit for bit theirs: the test above)."""
    from entrypoint import kernels, moe, offload

    calls: list[tuple[str, str | None]] = []
    sum_rows, swiglu, saved = kernels.sum_rows, kernels.swiglu_forward, moe.saved_for_backward

    def counted_sum_rows(*args, weights=None, **kwargs):  # with weights: the output, from w2's rows
        if weights is not None:
            calls.append(("w2", offload.phase()))
        return sum_rows(*args, weights=weights, **kwargs)

    def counted_swiglu(*args, **kwargs):
        calls.append(("h", offload.phase()))
        return swiglu(*args, **kwargs)

    def counted_saved(xs, ffn, plan, keep):
        calls.append(("a13 kept" if keep else "a13 not kept", offload.phase()))
        return saved(xs, ffn, plan, keep)

    monkeypatch.setattr(kernels, "sum_rows", counted_sum_rows)
    monkeypatch.setattr(kernels, "swiglu_forward", counted_swiglu)
    monkeypatch.setattr(moe, "saved_for_backward", counted_saved)
    ids = torch.randint(0, 2048, (2, 48), generator=torch.Generator().manual_seed(2))
    seen = {}
    for held in ("gpu", "host"):
        calls.clear()
        lora_net(tiny_model, held == "host", True)(input_ids=ids, labels=ids).loss.backward()
        seen[held] = sorted(set(calls)), sum(kind == "w2" for kind, _ in calls)
    assert seen["gpu"][0] == [("a13 kept", None), ("h", None), ("w2", None)]
    assert seen["host"][0] == [("a13 kept", "recompute"), ("a13 not kept", "forward"), ("h", "forward"),
                               ("w2", "forward")]
    assert seen["host"][1] * 2 == seen["gpu"][1] > 0  # w2 once per layer, not twice


def test_only_blocks_of_verified_layers_skip_and_a_layer_reading_the_output_gets_nan(tiny_model):
    """The recomputation's MoE output is never computed, for blocks of the decoder layers in which
    nothing after the block saves a tensor (Mixtral, Qwen3-MoE: torch stops there). If such a layer
    read it anyway (here a hook scaling it by a trained weight, whose backward keeps it) its gradients
    are NaN, which the job's gradient-norm check stops on, not stale memory. A block of any other
    layer runs whole in every pass: the same hook then gets the gradient of GPU-held checkpoints."""
    from entrypoint import moe

    ids = torch.randint(0, 2048, (2, 48), generator=torch.Generator().manual_seed(2))

    def scale_grad(offload: bool, marked: bool) -> torch.Tensor:
        net = lora_net(tiny_model, offload, True)
        assert [getattr(moe_block(layer), "skip_in_checkpoints", False) for layer in layers(net)] == [True] * 2
        block = moe_block(layers(net)[0])
        if not marked:
            del block.skip_in_checkpoints
        scale = torch.nn.Parameter(torch.ones(()))
        block.register_forward_hook(lambda _m, _a, out: (out[0] * scale, *out[1:]) if isinstance(out, tuple)
                                    else out * scale)
        torch.manual_seed(5)
        net(input_ids=ids, labels=ids).loss.backward()
        return scale.grad

    assert moe.SKIP_SAFE_LAYERS >= {type(layers(lora_net(tiny_model, True, True))[0]).__name__}
    assert torch.isnan(scale_grad(offload=True, marked=True))
    held, unmarked = scale_grad(offload=False, marked=True), scale_grad(offload=True, marked=False)
    assert torch.isfinite(held) and torch.equal(unmarked, held)


def test_a_layer_input_is_not_held_between_forward_and_backward(tiny_model):
    """What the offload is for: after the forward, nothing keeps a decoder layer's input
    tensor (the checkpoint holds the host copy); with GPU-held checkpoints every one stays."""
    held = {}
    for offload in (False, True):
        net = lora_net(tiny_model, offload, fused=True)
        inputs = []
        hooks = [layer.register_forward_pre_hook(lambda _m, args, seen=inputs: seen.append(weakref.ref(args[0])))
                 for layer in layers(net)]
        ids = torch.randint(0, 2048, (2, 48), generator=torch.Generator().manual_seed(3))
        loss = net(input_ids=ids, labels=ids).loss
        for h in hooks:
            h.remove()
        assert len(inputs) == len(layers(net))
        held[offload] = sum(ref() is not None for ref in inputs)
        loss.backward()  # the recomputation still finds each input
        assert all(p.grad is not None for n, p in net.named_parameters() if "layers.0." in n and "lora_A" in n)
    assert held == {False: len(inputs), True: 0}


def test_without_grad_the_offloaded_layers_just_run(tiny_model):
    """An evaluation pass in train mode under no_grad: no copies, the same logits."""
    ids = torch.randint(0, 2048, (1, 32), generator=torch.Generator().manual_seed(4))
    logits = []
    for offload in (False, True):
        net = lora_net(tiny_model, offload, fused=True)
        net.eval()  # no dropout, so the two models compute the same
        for layer in layers(net):  # checkpointing runs only in train mode: force it on for the pass
            layer.training = True
        with torch.no_grad():
            logits.append(net(input_ids=ids).logits)
    assert torch.equal(*logits)


def test_a_host_too_small_to_pin_the_checkpoints_keeps_them_on_the_gpu_and_says_so(monkeypatch, capsys):
    """The job applies the plan's rule to the host it runs on: 8 rows of 2048 at Mixtral's 32
    layers of 4096 pin 8 GiB per process; 8 processes on a 96 GiB host may pin half of it, 48."""
    import os
    from types import SimpleNamespace

    from entrypoint import train
    from entrypoint.hyperparams import Hyperparameters

    hp = Hyperparameters.model_validate({"model": {"id": "mistralai/Mixtral-8x7B-Instruct-v0.1"},
                                         "data": {"train": "train.jsonl"},
                                         "training": {"per_device_batch_size": 8, "max_seq_length": 2048}})
    mixtral = SimpleNamespace(num_hidden_layers=32, hidden_size=4096)
    ctx = train.DistContext(0, 1, 0, torch.device("cpu"))
    real = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda name: 96 * 2**18 if name == "SC_PHYS_PAGES" else 4096
                        if name == "SC_PAGE_SIZE" else real(name))  # 96 GiB
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert train._host_holds_checkpoints(hp, ctx, mixtral)  # 32 GiB
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert not train._host_holds_checkpoints(hp, ctx, mixtral)
    assert capsys.readouterr().out.strip() == ("[info] checkpoints=gpu reason=host_memory pinned_gib_needed=64.0 "
                                               "host_gib=96.0 pinned_share_allowed=0.5")


def test_a_layer_that_changes_its_input_in_place_is_refused():
    """The host copy runs beside the layer, so it could hold the input before or after the
    change: an error naming the layer and the way out, not wrong gradients."""
    from functools import partial

    from entrypoint.offload import Offloader

    class Doubling(torch.nn.Module):
        def forward(self, x):
            return x.mul_(2)

    x = torch.randn(3, 4, requires_grad=True) * 1  # a non-leaf, as a layer input is
    with pytest.raises(RuntimeError, match="Doubling changed its input in place.*offload_checkpoints"):
        Offloader()(partial(Doubling().__call__), x)
