"""The job's 8-bit AdamW (`training.optimizer: adamw_8bit`, the default on a GPU).

bitsandbytes' Optimizer8bit.step waits for the GPU after every parameter (utils.sync_gpu, which
its paged optimizers need: their states move between host and GPU). LoRA on Mixtral-8x7B has
1,792 parameter tensors, so a step of the unpaged optimizer waited 1,792 times: 0.14 s of a 3.9 s
step on an H100 (bench/README.md, deep_speed --phases), during which the GPU idled between
kernels of a few microseconds. The step here is bitsandbytes' own loop and update (the same
kernels and arguments, so the same bits) without those waits; the paged variant stays
bitsandbytes'.
"""

from __future__ import annotations

import functools

import torch

# what the step below calls on bitsandbytes' optimizer; a release without one of them keeps its own step
_USES = ("initialized", "check_overrides", "to_gpu", "init_state", "prefetch_state", "update_step")


@functools.cache
def adamw_8bit() -> type:
    """bitsandbytes.optim.AdamW8bit with step() not waiting for the GPU after each parameter."""
    import bitsandbytes as bnb

    base = bnb.optim.AdamW8bit
    probe = base([torch.nn.Parameter(torch.zeros(1))])
    if not all(hasattr(probe, name) for name in _USES):
        return base

    class AdamW8bit(base):
        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if not self.initialized:
                self.check_overrides()
                self.to_gpu()
                self.initialized = True
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    if len(self.state[p]) == 0:
                        self.init_state(group, p, gindex, pindex)
                    self.prefetch_state(p)  # a no-op unpaged; kept as bitsandbytes calls it
                    self.update_step(group, p, gindex, pindex)
            return loss

    return AdamW8bit
