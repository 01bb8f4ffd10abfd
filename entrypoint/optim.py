"""The job's 8-bit AdamW (`training.optimizer: adamw_8bit`, the default on a GPU).

bitsandbytes' Optimizer8bit.step waits for the GPU after every parameter (utils.sync_gpu, which
its paged optimizers need: their states move between host and GPU), and around each update it
rebuilds the parameter's config and re-checks its tensors in Python. LoRA on Mixtral-8x7B has
1,792 parameter tensors, each updated by one kernel of a few microseconds, so the step is host
time: 0.17 s of a 4 s step on an H100, 0.11 s without the waits (bench/README.md, deep_speed
--phases). The step here calls bitsandbytes' own update op with the same arguments (so the same
bits), without the waits, with each group's config built once; anything else (per-parameter
overrides, 32-bit state for small tensors, non-contiguous tensors, a bitsandbytes without the op)
takes bitsandbytes' own update. The paged variant stays bitsandbytes'.
"""

from __future__ import annotations

import functools

import torch

# what the step below calls on bitsandbytes' optimizer; a release without one of them keeps its own step
_USES = ("initialized", "check_overrides", "to_gpu", "init_state", "prefetch_state", "update_step")


@functools.cache
def adamw_8bit() -> type:
    """bitsandbytes.optim.AdamW8bit with a step that does not wait for the GPU after each parameter
    and builds each group's config once."""
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
            update = getattr(torch.ops.bitsandbytes, "optimizer_update_8bit_blockwise", None)
            overrides = self.mng.index2config or getattr(self.mng, "pid2config", None)
            for gindex, group in enumerate(self.param_groups):
                config = self.get_config(gindex, 0, group) if group["params"] else None
                for pindex, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if len(state) == 0:
                        self.init_state(group, p, gindex, pindex)
                    self.prefetch_state(p)  # a no-op unpaged; kept as bitsandbytes calls it
                    if (update is None or overrides or state["state1"].dtype != torch.uint8
                            or not p.is_contiguous() or not p.grad.is_contiguous()):
                        self.update_step(group, p, gindex, pindex)
                        continue
                    state["step"] += 1
                    betas = config["betas"]
                    update(self.optimizer_name, p.grad, p, state["state1"], state["state2"], betas[0], betas[1],
                           betas[2] if len(betas) >= 3 else 0.0, config["alpha"], config["eps"], state["step"],
                           config["lr"], state["qmap1"], state["qmap2"], state["absmax1"], state["absmax2"],
                           config["weight_decay"], 1.0, config["skip_zeros"])
            return loss

    return AdamW8bit
