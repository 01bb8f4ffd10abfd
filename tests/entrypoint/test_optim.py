"""entrypoint.optim: the job's 8-bit AdamW against bitsandbytes' own."""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.optim.optimizer as bnb_optimizer
import torch

from entrypoint.optim import adamw_8bit


def params() -> list[torch.nn.Parameter]:
    """Two tensors big enough for 8-bit state (4096+ elements) and one that bitsandbytes keeps in fp32."""
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(n, generator=g)) for n in (5000, 4096, 300)]


def run(cls, steps: int = 3) -> tuple[list[torch.Tensor], list[dict], dict, int, int]:
    """`steps` steps of cls on params(), the same gradients each time; returns the parameters, each
    one's optimizer state, the optimizer's state_dict, and how many times bitsandbytes' GPU wait
    and its per-parameter update (config rebuilt, tensors re-checked) were called."""
    ps = params()
    opt = cls(ps, lr=1e-2, weight_decay=0.01)
    waits, updates = [], []
    update_step = opt.update_step
    opt.update_step = lambda *args: updates.append(args) or update_step(*args)
    real = bnb_optimizer.sync_gpu
    bnb_optimizer.sync_gpu = lambda t: waits.append(t)
    try:
        for i in range(steps):
            g = torch.Generator().manual_seed(10 + i)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
    finally:
        bnb_optimizer.sync_gpu = real
    return [p.detach().clone() for p in ps], [opt.state[p] for p in ps], opt.state_dict(), len(waits), len(updates)


def test_the_job_adamw_8bit_steps_as_bitsandbytes_without_a_gpu_wait_per_parameter():
    """Parameters and 8-bit states bit for bit those of bitsandbytes' AdamW8bit, and its
    checkpoints load into either; bitsandbytes' step waits for the device after each of the 3
    parameters in each of the 3 steps, the job's never, and it calls bitsandbytes' per-parameter
    update only for the tensor too small for 8-bit state."""
    ours, ours_states, _, ours_waits, ours_updates = run(adamw_8bit())
    theirs, theirs_states, theirs_dict, theirs_waits, theirs_updates = run(bnb.optim.AdamW8bit)
    assert (theirs_waits, theirs_updates) == (9, 9) and (ours_waits, ours_updates) == (0, 3)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    assert ours_states[0]["state1"].dtype == torch.uint8 and ours_states[2]["state1"].dtype == torch.float32
    for mine, other in zip(ours_states, theirs_states, strict=True):
        assert mine.keys() == other.keys()
        for key, value in other.items():
            assert torch.equal(torch.as_tensor(mine[key]), torch.as_tensor(value)), key
    ps = params()
    loaded = adamw_8bit()(ps, lr=1e-2, weight_decay=0.01)
    loaded.load_state_dict(theirs_dict)
    assert torch.equal(loaded.state[ps[0]]["state1"], theirs_states[0]["state1"])
