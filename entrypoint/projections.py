"""The attention projections of a 4-bit model with LoRA, each pass in one autograd Function
(`training.fused_attention`; its speed and numerics are in bench/README.md).

bitsandbytes + PEFT run q, k and v as three modules on the same input: each casts the fp32
residual stream's normed input to bf16, dequantizes its own NF4 weight, casts its output back to
fp32, clones it (PEFT's defensive copy), draws a dropout mask over the fp32 input, casts the
dropped input again for LoRA A, and keeps each of those for backward. Here, as entrypoint.moe does
for the experts:

- q, k and v are one matmul: the input is cast once and the three NF4 weights are dequantized
  into one buffer, once per pass (again in backward rather than kept);
- LoRA runs beside the base matmul, each projection with its own dropout mask, all drawn in one
  pass over the input from a seed (entrypoint.kernels.dropout_rows) and drawn again in backward
  instead of being stored;
- the outputs are what PEFT returns (the input's dtype, base and LoRA summed in it); backward keeps
  only the bf16 input.

q_proj's forward computes all three and leaves k and v for k_proj and v_proj, which take them when
they are called on the same input tensor (every Llama-style attention does that) and otherwise run
their own forward. o_proj runs the same Function alone. Only forwards change: module names, the
adapter format and merging stay PEFT's.
"""

from __future__ import annotations

import types

import torch

from entrypoint import moe

QKV = ("q_proj", "k_proj", "v_proj")


def use_fused_attention(model) -> int:
    """Route the q/k/v and o projections of every attention block whose four projections are
    4-bit (with or without one LoRA adapter) through the fused Functions. Returns how many
    blocks were switched."""
    switched = 0
    for attn in model.modules():
        mods = [getattr(attn, name, None) for name in (*QKV, "o_proj")]
        projs = [moe.lora_proj(m) if isinstance(m, torch.nn.Module) else None for m in mods]
        if None in projs or any(p.base.bias is not None and p.base.bias.requires_grad for p in projs):
            continue  # not 4-bit with one LoRA, or a trained bias (PEFT's bias="all", which PEFT's path trains)
        q, k, v, o = mods
        if not hasattr(q, "_stock_forward"):
            stash: dict = {}
            _switch(q, _q_forward, (k, v), stash)
            _switch(k, _taken_forward, 1, stash)
            _switch(v, _taken_forward, 2, stash)
            _switch(o, _o_forward, None, stash)
        switched += 1
    return switched


def describe(model) -> str | None:
    """The [model] line's projections= part: "fused" or "fused (n of m blocks)"; None when none is."""
    blocks = [m for m in model.modules() if isinstance(getattr(m, "q_proj", None), torch.nn.Module)]
    fused = [m for m in blocks if hasattr(m.q_proj, "_stock_forward")]
    if not fused:
        return None
    return "fused" if len(fused) == len(blocks) else f"fused ({len(fused)} of {len(blocks)} blocks)"


def _switch(module, forward, extra, stash: dict) -> None:
    module._stock_forward = module.forward
    module.forward = types.MethodType(lambda self, x, *args, **kwargs: forward(self, x, extra, stash, args, kwargs),
                                      module)


def _q_forward(q, x, kv, stash: dict, args, kwargs):
    stash.clear()
    projs = [moe.lora_proj(m) for m in (q, *kv)]
    if args or kwargs or None in projs:  # adapters disabled or merged since, or PEFT's adapter_names
        return q._stock_forward(x, *args, **kwargs)
    outs = run(x, projs)
    stash.update(x=x, outs=outs)
    return outs[0]


def _taken_forward(m, x, index: int, stash: dict, args, kwargs):
    if stash.get("x") is x and not args and not kwargs:
        out = stash["outs"][index]
        if index == 2:
            stash.clear()
        return out
    stash.clear()  # not the input q_proj saw: what it left is of no use (and holds its graph)
    return m._stock_forward(x, *args, **kwargs)


def _o_forward(o, x, _, stash: dict, args, kwargs):
    p = moe.lora_proj(o)
    if args or kwargs or p is None:
        return o._stock_forward(x, *args, **kwargs)
    return run(x, [p])[0]


def run(x: torch.Tensor, projs: list[moe.Proj]) -> tuple[torch.Tensor, ...]:
    """Each projection of x (..., in) through its 4-bit weight and LoRA, as PEFT returns it."""
    device = x.device.type
    compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    params = [t for p in projs for t in (p.lora_a, p.lora_b)]
    backward = torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad for t in params))
    # no dropout (evaluation), no draw: evaluating must not move the training run's RNG
    seed = int(torch.randint(0, 2**30, (1,)).item()) if any(moe._drop(p) for p in projs) else 0
    return _Projections.apply(x, (projs, compute, backward, seed), *params)


def _bias(projs: list[moe.Proj], dtype: torch.dtype) -> torch.Tensor | None:
    """The projections' biases side by side in `dtype` (zeros for one without), or None if none has one."""
    if all(p.base.bias is None for p in projs):
        return None
    return torch.cat([p.base.bias.to(dtype) if p.base.bias is not None
                      else torch.zeros(p.base.out_features, dtype=dtype, device=p.base.weight.device) for p in projs])


class _Projections(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, how, *params):
        projs, compute, backward, seed = how
        ctx.projs, ctx.compute, ctx.seed, ctx.shape, ctx.dtype = projs, compute, seed, x.shape, x.dtype
        lead = x.shape[:-1]
        with torch.autocast(x.device.type, enabled=False):
            xc = x.reshape(-1, x.shape[-1]).to(compute)
            # the bias (Qwen2's q/k/v have one; frozen) added by the matmul, as bitsandbytes does
            y = torch.nn.functional.linear(xc, moe._dequantize(tuple(projs), compute), _bias(projs, compute))
            outs, at = [], 0
            ins = moe.lora_inputs(xc, projs, moe.mask_keys(projs, seed, xc.shape[0], 0, first=0))
            for p, lora_in in zip(projs, ins, strict=True):
                n = p.base.out_features
                part = y[:, at:at + n]
                lora = moe._lora(lora_in, p)
                out = part.to(x.dtype) if lora is None else part.to(x.dtype) + lora.to(x.dtype)
                outs.append(out.contiguous().view(*lead, n))
                at += n
        if backward:
            ctx.save_for_backward(xc)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        (xc,) = ctx.saved_tensors
        projs, compute = ctx.projs, ctx.compute
        weight_grads = [None] * (2 * len(projs))
        with torch.autocast(xc.device.type, enabled=False):
            keys = moe.mask_keys(projs, ctx.seed, xc.shape[0], 0, first=0)  # the forward's masks
            ins = moe.lora_inputs(xc, projs, keys)
            g = torch.cat([(gr.reshape(-1, p.base.out_features) if gr is not None
                            else xc.new_zeros(xc.shape[0], p.base.out_features)).to(compute)
                           for p, gr in zip(projs, grads, strict=True)], dim=1)
            dx = (g @ moe._dequantize(tuple(projs), compute)).float() if ctx.needs_input_grad[0] else None
            at, input_grads = 0, []
            for i, (p, lora_in) in enumerate(zip(projs, ins, strict=True)):
                n = p.base.out_features
                dy = g[:, at:at + n]
                moe._lora_weight_grads(dy, p, lora_in, weight_grads, 2 * i)
                input_grads.append(moe._lora_input_grad(dy, p) if dx is not None else None)
                at += n
            del ins
            if dx is not None:
                moe.add_lora_input_grads(dx, input_grads, keys)
        grad_x = None if dx is None else dx.to(ctx.dtype).view(ctx.shape)
        return (grad_x, None, *weight_grads)
