"""A fused MoE expert pass for 4-bit Mixtral with LoRA (transformers 4.x module layout).
Opt-in (`attach_lora(..., low_memory_moe=True)`): on an H200 it takes 2.2x less memory per MoE
layer than the stock path but runs at 0.79x its speed (bench/README.md), because its
elementwise work on (tokens x ffn) tensors is not fused yet.

transformers 4.56 runs each expert as three bnb Linear4bit layers wrapped by PEFT: every
projection dequantizes its NF4 weight inside bitsandbytes, PEFT clones the base output,
runs dropout and two skinny LoRA matmuls, and autograd keeps every ffn-wide intermediate.
Here one autograd Function does the whole expert computation of a layer:

- tokens are sorted by expert once (one gather, one scatter per layer instead of per expert);
- each NF4 weight is dequantized once per pass into a bf16/fp16 tensor the caching
  allocator hands back every time, and dequantized again in backward rather than kept;
- in fp32 the LoRA update is folded into that weight (W + s*B@A); in bf16/fp16 it runs
  beside it (folding rounds the small delta away); dropout masks are replayed from the
  saved RNG state instead of being stored;
- backward recomputes the ffn-wide activations of one expert at a time, so no
  (tokens x 14336) tensor outlives its expert.

Only forwards change: the modules, parameter names, PEFT adapter format and the
4-bit check stay those of transformers + PEFT, so an adapter trained here loads with
`PeftModel.from_pretrained` on a stock model.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PROJECTIONS = ("w1", "w3", "w2")  # order matters: dropout masks are replayed in it
# Elementwise work (SwiGLU, sums of base and LoRA outputs) in fp32, as bnb + PEFT do under
# autocast. False keeps it in bf16/fp16: faster, further from the stock numerics (bench/README.md).
EXACT = True


@dataclass
class Proj:
    base: torch.nn.Module  # bnb Linear4bit
    lora_a: torch.Tensor | None
    lora_b: torch.Tensor | None
    scaling: float
    dropout: float


def use_low_memory_moe(model) -> int:
    """Route every Mixtral sparse-MoE block of `model` through the fused expert pass.
    Returns how many blocks were switched; blocks whose experts are not 4-bit (with or
    without LoRA) keep the stock forward."""
    switched = 0
    for module in model.modules():
        if type(module).__name__ == "MixtralSparseMoeBlock" and _plan(module) is not None:
            if not hasattr(module, "_stock_forward"):
                module._stock_forward = module.forward
                module.forward = types.MethodType(_moe_forward, module)
            switched += 1
    return switched


def _plan(block) -> list[list[Proj]] | None:
    import bitsandbytes as bnb

    plan = []
    for expert in block.experts:
        projs = []
        for name in PROJECTIONS:
            m = getattr(expert, name)
            if isinstance(m, bnb.nn.Linear4bit):
                projs.append(Proj(m, None, None, 0.0, 0.0))
                continue
            base = getattr(m, "base_layer", None)
            if not isinstance(base, bnb.nn.Linear4bit) or m.merged or m.disable_adapters:
                return None
            active = [a for a in m.active_adapters if a in m.lora_A]
            if len(active) != 1 or getattr(m, "lora_variant", {}).get(active[0]) is not None:
                return None  # several adapters at once, or DoRA: leave it to PEFT
            a = active[0]
            drop = m.lora_dropout[a]
            p = drop.p if isinstance(drop, torch.nn.Dropout) and m.training else 0.0
            projs.append(Proj(base, m.lora_A[a].weight, m.lora_B[a].weight, float(m.scaling[a]), p))
        plan.append(projs)
    return plan


def _moe_forward(self, hidden_states: torch.Tensor):
    plan = _plan(self)
    if plan is None:  # adapters disabled or merged since use_low_memory_moe
        return self._stock_forward(hidden_states)
    batch, seq, hidden = hidden_states.shape
    if self.training and self.jitter_noise > 0:
        hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
            1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
    x = hidden_states.view(-1, hidden)
    router_logits = self.gate(x)
    weights = F.softmax(router_logits, dim=1, dtype=torch.float)
    weights, selected = torch.topk(weights, self.top_k, dim=-1)
    weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
    device = x.device.type
    compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    params = [t for projs in plan for p in projs for t in (p.lora_a, p.lora_b)]
    out = _Experts.apply(x, weights, selected, (plan, compute), *params)
    return out.view(batch, seq, hidden), router_logits


def _weight(p: Proj, dtype: torch.dtype, fold: bool) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    w = p.base.weight
    state = w.quant_state if getattr(w, "quant_state", None) is not None else p.base.quant_state
    full = bnbf.dequantize_4bit(w.data, state).to(dtype)
    if fold:
        full.addmm_(p.lora_b.to(dtype), p.lora_a.to(dtype), alpha=p.scaling)
    return full


def _folds(p: Proj, keep, dtype: torch.dtype) -> bool:
    """Fold LoRA into W only in fp32: in bf16/fp16 W + s*B@A rounds the (small) LoRA delta
    to W's precision, which moved LoRA gradients measurably (cosine 0.98 over 20 steps)."""
    return p.lora_a is not None and keep is None and dtype == torch.float32


def _keep(p: Proj, like: torch.Tensor) -> torch.Tensor | None:
    """Dropout as a 0 or 1/(1-p) multiplier; drawn in the same order in forward and backward."""
    if p.lora_a is None or p.dropout == 0.0:
        return None
    return F.dropout(torch.ones_like(like), p.dropout, training=True)


def _project(x: torch.Tensor, p: Proj, keep, acc: torch.dtype) -> torch.Tensor:
    """x W^T + s (x*keep) A^T B^T: matmuls in x's (compute) dtype, the sum in acc, as
    bitsandbytes + PEFT do under autocast (their outputs come back in the input's dtype)."""
    dtype = x.dtype
    fold = _folds(p, keep, dtype)
    y = (x @ _weight(p, dtype, fold).t()).to(acc)
    if p.lora_a is not None and not fold:
        lin = x if keep is None else x * keep
        y += ((lin @ p.lora_a.to(dtype).t()) @ p.lora_b.to(dtype).t() * p.scaling).to(acc)
    return y


def _order(selected: torch.Tensor, experts: int):
    flat = selected.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=experts).tolist()  # the one host sync per pass
    return order, order // selected.shape[1], counts


def _rng_state(device: torch.device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


class _Experts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, selected, how, *params):
        plan, compute = how
        ctx.plan, ctx.compute, ctx.rng = plan, compute, _rng_state(x.device)
        with torch.autocast(x.device.type, enabled=False):
            order, token, counts = _order(selected, len(plan))
            acc = x.dtype if EXACT else compute
            xs = x.index_select(0, token).to(compute)
            ys = torch.empty(xs.shape, dtype=x.dtype, device=x.device)
            start = 0
            for projs, n in zip(plan, counts, strict=True):
                if n:
                    xe = xs[start:start + n]
                    w1, w3, w2 = projs
                    k1, k3 = _keep(w1, xe), _keep(w3, xe)
                    h = (F.silu(_project(xe, w1, k1, acc)) * _project(xe, w3, k3, acc)).to(compute)
                    ys[start:start + n] = _project(h, w2, _keep(w2, h), acc)
                start += n
            flat_w = weights.reshape(-1).index_select(0, order)
            out = torch.zeros_like(x).index_add_(0, token, ys * flat_w[:, None].to(x.dtype))
        ctx.counts = counts
        ctx.save_for_backward(x, weights, order, token, ys)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weights, order, token, ys = ctx.saved_tensors
        plan, compute = ctx.plan, ctx.compute
        grads = [None] * (2 * 3 * len(plan))
        with torch.autocast(x.device.type, enabled=False), torch.random.fork_rng(
                devices=[x.device] if x.device.type == "cuda" else [], device_type=x.device.type):
            if x.device.type == "cuda":
                torch.cuda.set_rng_state(ctx.rng, x.device)
            else:
                torch.set_rng_state(ctx.rng)
            flat_w = weights.reshape(-1).index_select(0, order)
            g = grad_out.index_select(0, token)
            grad_flat_w = (g.float() * ys.float()).sum(-1)
            gy_all = (g * flat_w[:, None].to(g.dtype)).to(compute)
            xs = x.index_select(0, token).to(compute)
            dxs = torch.empty(xs.shape, dtype=x.dtype, device=x.device)
            start = 0
            for e, (projs, n) in enumerate(zip(plan, ctx.counts, strict=True)):
                if n:
                    sl = slice(start, start + n)
                    dxs[sl] = _expert_backward(xs[sl], gy_all[sl], projs, grads, 6 * e)
                start += n
            dx = torch.zeros_like(x).index_add_(0, token, dxs)
            grad_w = torch.empty_like(grad_flat_w).index_copy_(0, order, grad_flat_w)
        return (dx, grad_w.view_as(weights).to(weights.dtype), None, None, *grads)


def _expert_backward(xe, gy, projs, grads, at: int) -> torch.Tensor:
    """Recompute one expert's activations, then its input gradient (in the accumulation
    dtype of grads' caller); LoRA gradients go to grads. Elementwise work runs in acc
    (fp32 under autocast), matmuls in xe's compute dtype, as in the stock path."""
    acc = torch.float32 if EXACT else xe.dtype
    w1, w3, w2 = projs
    k1, k3 = _keep(w1, xe), _keep(w3, xe)
    a1, a3 = _project(xe, w1, k1, acc), _project(xe, w3, k3, acc)
    s1 = F.silu(a1)
    h = (s1 * a3).to(xe.dtype)
    k2 = _keep(w2, h)
    dh = _input_grad(gy, w2, k2, h, grads, at + 4)
    sig = torch.sigmoid(a1)
    da1 = (dh * a3 * (sig * (1 + a1 * (1 - sig)))).to(xe.dtype)
    da3 = (dh * s1).to(xe.dtype)
    del h, dh, s1, sig, a1, a3
    return _input_grad(da1, w1, k1, xe, grads, at) + _input_grad(da3, w3, k3, xe, grads, at + 2)


def _input_grad(gy, p: Proj, keep, inp, grads, at: int) -> torch.Tensor:
    """d(input) in fp32 of y = inp W^T + s (inp*keep) A^T B^T; the LoRA grads into grads[at:at+2]."""
    dtype = gy.dtype
    fold = _folds(p, keep, dtype)
    dx = (gy @ _weight(p, dtype, fold)).float()
    if p.lora_a is not None:
        a, b = p.lora_a.to(dtype), p.lora_b.to(dtype)
        lora_in = inp if keep is None else inp * keep
        gb = gy @ b * p.scaling  # (n, r)
        grads[at] = (gb.t() @ lora_in).to(p.lora_a.dtype)
        grads[at + 1] = (gy.t() @ (lora_in @ a.t()) * p.scaling).to(p.lora_b.dtype)
        if not fold:
            lora_dx = gb @ a
            dx += (lora_dx if keep is None else lora_dx * keep).float()
    return dx
