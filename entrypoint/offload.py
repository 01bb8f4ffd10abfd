"""Gradient checkpointing with each decoder layer's input kept in host memory
(`training.offload_checkpoints`, on by default; bench/README.md has its memory and speed).

With checkpointing, what stays on the GPU between a layer's forward and its backward is the
layer's input: tokens x hidden in fp32 (peft's prepare_model_for_kbit_training keeps the
residual stream in fp32), 0.25 GiB a layer for 8 packed rows of 2048 at Mixtral's width, 8 GiB
over 32 layers. Here that input is copied to pinned host memory on a side stream while the
layer computes, and copied back, one layer ahead, while backward runs the layer above it.

It is torch's own non-reentrant checkpoint (torch.utils.checkpoint, the one
transformers uses with `use_reentrant: False`): the RNG and autocast state are replayed
by torch and the autograd graph stays whole, so DDP sees every parameter. Only where the
recomputation reads the layer's input changes: from the host copy, not from a GPU tensor
held by the checkpoint. The recomputation sees the same bits, so gradients are the
checkpoint's own (tests/entrypoint/test_offload.py). Unsloth's "unsloth" gradient
checkpointing does the same with a reentrant Function; this one keeps DDP's unused-parameter
search working. Written by hand: neither torch, transformers nor peft has it for a layer's input
(torch.autograd.graph.save_on_cpu moves every saved tensor, and copies synchronously).
"""

from __future__ import annotations

import contextvars
import weakref

import torch
from torch.utils.checkpoint import checkpoint

_streams: dict[torch.device, torch.cuda.Stream] = {}
_phase: contextvars.ContextVar[str | None] = contextvars.ContextVar("offloaded_checkpoint_phase", default=None)


def phase() -> str | None:
    """Where the code running now is, inside an offloaded checkpoint: "forward" (what the layer
    saves for backward is dropped, the recomputation saves it again), "recompute" (backward's
    recomputation: only what the layer saves is used, not its output), None outside one. The
    fused MoE pass (entrypoint.moe) skips what each of those throws away."""
    return _phase.get()


class _HostCopy:
    """One layer input: given back as is to the forward that builds the graph, then from
    host memory to the recomputation in backward."""

    def __init__(self, x: torch.Tensor, previous: _HostCopy | None, capacity: int):
        self.live: torch.Tensor | None = x
        self.device = x.device
        self.requires_grad = x.requires_grad  # the recomputation must save what the forward saved
        self.previous = weakref.ref(previous) if previous is not None else None
        self.fetched: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None
        if x.is_cuda:
            stream = _copy_stream(x.device)
            stream.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(stream):
                # torch's caching host allocator rounds a pinned block up to a power of two and
                # reuses only blocks of that size: every input asks for the largest size seen, so
                # a smaller batch (an epoch's last) reuses blocks instead of pinning new ones
                self.host = torch.empty(capacity, dtype=x.dtype, pin_memory=True)[:x.numel()].view(x.shape)
                self.host.copy_(x.detach(), non_blocking=True)
            x.record_stream(stream)  # its memory is not reused before the copy has read it
            self.copied = stream.record_event()
        else:  # nothing to offload on a CPU run; a copy keeps the code path the same
            self.host = x.detach().clone()

    def take(self) -> torch.Tensor:
        if self.live is not None:  # the first forward: the graph's own tensor
            x, self.live = self.live, None
            return x
        if self.host is None:
            raise RuntimeError("an offloaded checkpoint was recomputed twice; retain_graph is not supported")
        if self.fetched is None:
            self.prefetch()
        x = self.fetched
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).wait_event(self.ready)
        self.host = self.fetched = self.ready = None
        x.requires_grad_(self.requires_grad)
        previous = self.previous() if self.previous is not None else None
        if previous is not None:
            previous.prefetch()  # the layer below: its copy overlaps this layer's backward
        return x

    def prefetch(self) -> None:
        if self.host is None or self.fetched is not None or self.live is not None:
            return
        if self.device.type != "cuda":  # the CPU run's copy is already where it is used
            self.fetched = self.host
            return
        compute = torch.cuda.current_stream(self.device)
        # Allocated on the compute stream, which frees it; the copy waits for everything
        # queued there so far, as that memory may have been freed by work not yet run.
        self.fetched = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)
        stream = _copy_stream(self.device)
        stream.wait_stream(compute)
        stream.wait_event(self.copied)
        with torch.cuda.stream(stream):
            self.fetched.copy_(self.host, non_blocking=True)
        self.fetched.record_stream(stream)  # freed unread (an aborted backward): not reused mid-copy
        self.ready = stream.record_event()


class Offloader:
    """The checkpoint function of one model's decoder layers; links each layer's host
    copy to the one below it so backward can fetch one layer ahead."""

    def __init__(self):
        self.last: _HostCopy | None = None
        self.largest = 0  # elements of the largest layer input so far

    def __call__(self, function, hidden_states: torch.Tensor, *args, **kwargs):
        if not torch.is_grad_enabled():
            return function(hidden_states, *args, **kwargs)
        self.largest = max(self.largest, hidden_states.numel())
        box = _HostCopy(hidden_states, self.last, 1 << (self.largest - 1).bit_length())
        self.last = box
        # torch stashes and replays the RNG state only of the devices its tensor arguments are
        # on (the CPU's always): empty tensors on the input's device and on the layer's own (not
        # the same where accelerate splits the model over GPUs) keep the LoRA dropout masks of
        # the recomputation those of the forward.
        layer = _layer(function)
        anchors = [hidden_states.new_empty(0, device=d) for d in {hidden_states.device, _device(layer)}
                   if d is not None]
        version = hidden_states._version
        out = checkpoint(_run, function, box, len(anchors), *anchors, *args, use_reentrant=False, **kwargs)
        if hidden_states._version != version:  # the host copy ran beside the layer: it may hold either
            raise RuntimeError(f"{type(layer).__name__} changed its input in place, which "
                               "training.offload_checkpoints cannot copy; set it to false")
        return out


def _run(function, box: _HostCopy, n_anchors: int, *args, **kwargs):
    token = _phase.set("forward" if box.live is not None else "recompute")
    try:
        return function(box.take(), *args[n_anchors:], **kwargs)
    finally:
        _phase.reset(token)


def _layer(function) -> torch.nn.Module | None:
    """The layer behind transformers' `partial(layer.__call__, **kwargs)`."""
    layer = getattr(getattr(function, "func", function), "__self__", None)
    return layer if isinstance(layer, torch.nn.Module) else None


def _device(layer: torch.nn.Module | None) -> torch.device | None:
    """Where `layer` runs: accelerate's execution device when it dispatched the model over
    devices, else its first parameter's device."""
    if layer is None:
        return None
    hook = getattr(layer, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    param = next(layer.parameters(), None)
    return param.device if param is not None else None


def checkpointed_layers(model) -> list[torch.nn.Module]:
    """The modules transformers' gradient_checkpointing_enable gave a checkpoint function: the
    decoder layers, which call it, and (in 4.56) the model holding them, which does not."""
    return [m for m in model.modules()
            if getattr(m, "gradient_checkpointing", False) is True and hasattr(m, "_gradient_checkpointing_func")]


def use_offloaded_checkpoints(model) -> int:
    """Give every checkpointed layer of `model` the offloading checkpoint. Returns how many
    layers it switched."""
    offloader, layers = Offloader(), checkpointed_layers(model)
    for layer in layers:
        layer._gradient_checkpointing_func = offloader
    return len(layers)


def describe(model) -> str:
    """Where checkpointed layer inputs wait for backward: "host", "gpu" (the device the
    model is on; "gpu" also on a CPU run) or "off" (no checkpointing)."""
    layers = checkpointed_layers(model)
    if not layers:
        return "off"
    return "host" if all(isinstance(m._gradient_checkpointing_func, Offloader) for m in layers) else "gpu"


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]
