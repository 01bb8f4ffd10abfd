"""A fused MoE expert pass for 4-bit Mixtral with LoRA (transformers 4.x module layout).
On by default (`training.fused_moe`); bench/README.md has its speed, memory and numerics.

transformers 4.56 runs each expert as three bnb Linear4bit layers wrapped by PEFT: every
projection dequantizes its NF4 weight inside bitsandbytes, PEFT clones the base output,
runs dropout and two skinny LoRA matmuls, and autograd keeps every ffn-wide intermediate in
fp32. Here one autograd Function does the whole expert computation of a layer:

- tokens are sorted by expert once (one gather per layer instead of one per expert) and gathered
  back to token order once, summing their top-k rows (no atomic scatter);
- w1 and w3 are dequantized once per pass into one (2 x ffn, hidden) bf16/fp16 tensor, so one
  matmul gives both; they are dequantized again in backward rather than kept;
- LoRA runs beside the base matmul (folding it into W would round its small delta away);
  its dropout masks are drawn inside kernels from a seed (entrypoint.kernels: dropout_rows for
  w1's and w3's input, in one pass; the SwiGLU kernel for w2's) and drawn again in backward,
  never stored;
- SwiGLU is one elementwise pass each way (entrypoint.kernels: Triton on CUDA) with the
  stock path's fp32 arithmetic; backward keeps only w1's and w3's matmul output a13 (bf16/fp16)
  and their LoRA terms' (tokens x rank) factors, from which its SwiGLU pass computes the fp32 u and
  v again, for the layer being differentiated (the layer checkpointing around it drops them in the
  first forward).

Only forwards change: the modules, parameter names, PEFT adapter format and the
4-bit check stay those of transformers + PEFT, so an adapter trained here loads with
`PeftModel.from_pretrained` on a stock model.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from entrypoint import kernels, offload

PROJECTIONS = ("w1", "w3", "w2")  # order matters: w2's input comes from w1's and w3's outputs


@dataclass
class Proj:
    base: torch.nn.Module  # bnb Linear4bit
    lora_a: torch.Tensor | None
    lora_b: torch.Tensor | None
    scaling: float
    dropout: float


# The MoE blocks the [model] line reports on: Mixtral's (fused on either transformers) and
# Qwen3-MoE's (fused on transformers 5, entrypoint.experts_tf5; the stock path on 4).
MOE_BLOCKS = ("MixtralSparseMoeBlock", "Qwen3MoeSparseMoeBlock")
# Decoder layers in which nothing after the MoE block saves a tensor for backward (the residual add
# alone follows it, on both transformers majors), so torch's checkpoint stops a recomputation at the
# block's own save: the blocks in them may skip the output there (_Experts, offload.phase). A block
# in any other layer runs whole in every pass.
SKIP_SAFE_LAYERS = frozenset({"MixtralDecoderLayer", "Qwen3MoeDecoderLayer"})


def mark_skip_safe(model) -> int:
    """Mark the MoE blocks of SKIP_SAFE_LAYERS (`skip_in_checkpoints`); returns how many."""
    marked = 0
    for layer in model.modules():
        if type(layer).__name__ in SKIP_SAFE_LAYERS:
            for child in layer.children():
                if type(child).__name__ in MOE_BLOCKS:
                    child.skip_in_checkpoints = True
                    marked += 1
    return marked


def use_fused_moe(model) -> int:
    """Route every Mixtral sparse-MoE block of `model` through the fused expert pass.
    Returns how many blocks were switched; blocks whose experts are not 4-bit (with or
    without LoRA) keep the stock forward."""
    switched, devices = 0, set()
    for module in model.modules():
        if type(module).__name__ == "MixtralSparseMoeBlock" and _plan(module) is not None:
            if not hasattr(module, "_stock_forward"):
                module._stock_forward = module.forward
                module.forward = types.MethodType(_moe_forward, module)
                devices.add(next(module.parameters()).device)
            switched += 1
    for device in devices:
        kernels.warm_up(device)
    mark_skip_safe(model)
    return switched


def describe(model) -> str | None:
    """How the model's MoE blocks run, for the job's [model] line: None without any,
    "stock", or "fused-triton" / "fused-torch" (the SwiGLU kernel's backend)."""
    blocks = [m for m in model.modules() if type(m).__name__ in MOE_BLOCKS]
    if not blocks:
        return None
    fused = [m for m in blocks if hasattr(m, "_stock_forward")]
    if not fused:
        return "stock"
    where = next(fused[0].parameters()).device
    label = "fused-" + kernels.backend(torch.empty(0, device=where))
    return label if len(fused) == len(blocks) else f"{label} ({len(fused)} of {len(blocks)} blocks)"


def _plan(block) -> list[list[Proj]] | None:
    if not isinstance(block.experts, torch.nn.ModuleList):  # transformers 5.x: fused 3D experts
        return None
    plan = []
    for expert in block.experts:
        projs = [lora_proj(getattr(expert, name)) for name in PROJECTIONS]
        if None in projs or any(p.base.bias is not None for p in projs):
            return None  # the fused pass has no expert biases (Mixtral's experts have none)
        plan.append(projs)
    return plan


def lora_proj(m: torch.nn.Module) -> Proj | None:
    """A bnb Linear4bit, bare or under one active PEFT LoRA adapter, as a Proj; None for anything
    else (no 4-bit base, several adapters at once, DoRA, merged or disabled adapters), which
    PEFT's own forward keeps."""
    import bitsandbytes as bnb

    if isinstance(m, bnb.nn.Linear4bit):
        return Proj(m, None, None, 0.0, 0.0)
    base = getattr(m, "base_layer", None)
    if not isinstance(base, bnb.nn.Linear4bit) or m.merged or m.disable_adapters:
        return None
    active = [a for a in m.active_adapters if a in m.lora_A]
    if len(active) != 1 or getattr(m, "lora_variant", {}).get(active[0]) is not None:
        return None
    a = active[0]
    drop = m.lora_dropout[a]
    p = drop.p if isinstance(drop, torch.nn.Dropout) and m.training else 0.0
    return Proj(base, m.lora_A[a].weight, m.lora_B[a].weight, float(m.scaling[a]), p)


def _moe_forward(self, hidden_states: torch.Tensor):
    plan = _plan(self)
    if plan is None:  # adapters disabled or merged since use_fused_moe
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
    out = run_experts(x, weights, selected, plan, skip=getattr(self, "skip_in_checkpoints", False))
    return out.view(batch, seq, hidden), router_logits


def run_experts(x: torch.Tensor, weights: torch.Tensor, selected: torch.Tensor, plan: list[list[Proj]],
                skip: bool = False):
    """The experts' weighted sum for tokens x (tokens, hidden) routed to `selected` with
    `weights` (tokens, top_k): the one kernel path both transformers layouts run. `skip`: inside an
    offloaded checkpoint, leave out what the pass throws away (only for SKIP_SAFE_LAYERS' blocks)."""
    device = x.device.type
    compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    params = [t for projs in plan for p in projs for t in (p.lora_a, p.lora_b)]
    backward = torch.is_grad_enabled() and (x.requires_grad or weights.requires_grad
                                             or any(t is not None and t.requires_grad for t in params))
    # The experts' LoRA dropout masks are drawn inside kernels from this seed (mask_keys: each
    # expert's w2 mask keyed on seed + its first row, w1's and w3's on seed + rows + that row and
    # seed + 2 rows + that row; a row's mask at its offset in the key's stream); the CPU generator
    # it comes from is what layer checkpointing replays.
    # No dropout (evaluation), no draw: evaluating must not move the training run's RNG.
    dropping = any(p.dropout > 0 for projs in plan for p in projs)
    seed = int(torch.randint(0, 2**30, (1,)).item()) if dropping else 0
    # one SwiGLU path for the whole layer, both ways (w2's dropout mask is drawn by either)
    tiles = kernels.tiles_fit({p.lora_a.shape[0] for projs in plan for p in projs if p.lora_a is not None})
    return _Experts.apply(x, weights, selected, (plan, compute, backward, seed, skip, tiles), *params)


def _dequantize(projs: tuple[Proj, ...], dtype: torch.dtype) -> torch.Tensor:
    """The projections' NF4 weights, dequantized and stacked along the output dim."""
    import bitsandbytes.functional as bnbf

    parts = []
    for p in projs:
        w = p.base.weight
        state = w.quant_state if getattr(w, "quant_state", None) is not None else p.base.quant_state
        parts.append((w.data, state))
    rows = sum(s.shape[0] for _, s in parts)
    if parts[0][0].is_cuda and all(s.dtype == dtype for _, s in parts):  # into one buffer, no copy
        # (bitsandbytes has the out= variant on CUDA only)
        full = torch.empty(rows, parts[0][1].shape[1], dtype=dtype, device=parts[0][0].device)
        at = 0
        for data, state in parts:
            bnbf.dequantize_4bit(data, state, out=full[at:at + state.shape[0]])
            at += state.shape[0]
        return full
    return torch.cat([bnbf.dequantize_4bit(data, state).to(dtype) for data, state in parts])


Key = tuple[float, int]  # a dropout mask: (probability, its Philox key)


def mask_keys(projs, seed: int, rows: int, start: int, first: int = 1) -> list[Key | None]:
    """The dropout mask of each projection's LoRA input (None: no LoRA or no dropout) for the rows
    start.. of a pass over `rows` rows: projection j's rows are keyed on seed + (first + j) rows +
    start, each row at its offset in that key's stream (kernels.dropout_rows), so no two experts or
    projections of a pass share a key (w2's mask, drawn in the SwiGLU kernel, has first 0). Projections sharing their LoRA A (transformers 5's
    gate_up_proj: one adapter, whose input is dropped once) share one mask."""
    keys: list[Key | None] = []
    for j, p in enumerate(projs):
        twin = next((i for i in range(j) if p.lora_a is not None and projs[i].lora_a is p.lora_a), None)
        keys.append(keys[twin] if twin is not None
                    else (p.dropout, seed + (first + j) * rows + start) if _drop(p) else None)
    return keys


def lora_inputs(x: torch.Tensor, projs, keys: list[Key | None]) -> list[torch.Tensor | None]:
    """Each projection's LoRA input: x after its dropout mask (all masks in one pass over x), x
    itself without dropout, None without LoRA. The same keys give the same inputs again."""
    masks = list(dict.fromkeys(k for p, k in zip(projs, keys, strict=True) if p.lora_a is not None and k))
    dropped = dict(zip(masks, kernels.dropout_rows(x, tuple(d for d, _ in masks), tuple(s for _, s in masks)),
                       strict=True)) if masks else {}
    return [None if p.lora_a is None else dropped[k] if k else x for p, k in zip(projs, keys, strict=True)]


def add_lora_input_grads(dx: torch.Tensor, grads: list[torch.Tensor | None], keys: list[Key | None]) -> None:
    """dx (fp32) += each LoRA input's gradient taken back through its dropout mask (in order)."""
    masked = [(g, k) for g, k in zip(grads, keys, strict=True) if g is not None and k]
    for g, k in zip(grads, keys, strict=True):
        if g is not None and not k:
            dx += g.float()
    if masked:
        kernels.add_dropped(dx, [g for g, _ in masked], tuple(k[0] for _, k in masked), tuple(k[1] for _, k in masked))


def _drop(p: Proj) -> float:
    return p.dropout if p.lora_a is not None else 0.0


def _lora_factors(lin: torch.Tensor | None, p: Proj) -> kernels.Lora | None:
    """p's LoRA term s (lin A^T) B^T as its factors (s lin A^T, B), in lin's (compute) dtype, lin
    being the LoRA input after dropout: the SwiGLU kernel multiplies them tile by tile."""
    if p.lora_a is None:
        return None
    dtype = lin.dtype
    return lin @ p.lora_a.to(dtype).t() * p.scaling, p.lora_b.to(dtype)


def _lora(lin: torch.Tensor | None, p: Proj) -> torch.Tensor | None:
    """s (lin A^T) B^T in lin's (compute) dtype, lin being the LoRA input after dropout."""
    factors = _lora_factors(lin, p)
    return None if factors is None else factors[0] @ factors[1].t()


def _order(selected: torch.Tensor, experts: int):
    flat = selected.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=experts).tolist()  # the one host sync per pass
    return order, order // selected.shape[1], counts


def saved_for_backward(xs: torch.Tensor, ffn: int, plan: list[list[Proj]], keep: bool):
    """What the pass keeps for backward, for every routed row: w1's and w3's matmul output a13
    (rows, 2 ffn) and their LoRA terms' first factors (2, rows, largest rank; zeros beyond an
    expert's own rank), in the compute dtype. Not `keep` (the forward inside an offloaded checkpoint,
    which drops what a layer saves): stand-ins of the same shape, which hold no memory."""
    rank = max((p.lora_a.shape[0] for projs in plan for p in projs[:2] if p.lora_a is not None), default=0)
    shapes = (xs.shape[0], 2 * ffn), (2, xs.shape[0], rank)
    if keep:
        return xs.new_empty(shapes[0]), xs.new_zeros(shapes[1])
    return tuple(xs.new_empty(()).expand(shape) for shape in shapes)


class _Experts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, selected, how, *params):
        plan, compute, backward, seed, skip, tiles = how
        ctx.plan, ctx.compute, ctx.seed, ctx.tiles = plan, compute, seed, tiles
        # Inside an offloaded checkpoint each pass skips what it would throw away: the forward
        # keeps no a13 (the checkpoint drops what a layer saves), the recomputation stops at
        # a13 (only what the layer saves is used: not h, not w2, not the output)
        phase = offload.phase() if skip else None
        keep, output = backward and phase != "forward", phase != "recompute"
        with torch.autocast(x.device.type, enabled=False):
            order, token, counts = _order(selected, len(plan))
            xs = kernels.gather_rows(x, token, compute)
            ffn = plan[0][0].base.out_features
            a13s, factors = saved_for_backward(xs, ffn, plan, keep)
            # each row's w2 output, base and LoRA parts in the compute dtype (summed in x's dtype
            # by sum_rows, as bitsandbytes + PEFT sum them)
            y_base = torch.empty_like(xs) if output else None
            y_lora = torch.empty_like(xs) if output and any(projs[2].lora_a is not None for projs in plan) else None
            start = 0
            for projs, n in zip(plan, counts, strict=True):
                if n:
                    sl = slice(start, start + n)
                    w1, w3, w2 = projs
                    xe = xs[sl]
                    in1, in3 = lora_inputs(xe, (w1, w3), mask_keys((w1, w3), seed, xs.shape[0], start))
                    a13 = torch.matmul(xe, _dequantize((w1, w3), compute).t(), out=a13s[sl] if keep else None)
                    l13 = (_lora_factors(in1, w1), _lora_factors(in3, w3))
                    if keep:
                        for j, lo in enumerate(l13):
                            if lo is not None:
                                factors[j, sl, :lo[0].shape[1]] = lo[0]
                    if output:  # the recomputation needs no h: backward's SwiGLU pass computes it again
                        h, hk = kernels.swiglu_forward(a13, *l13, drop=_drop(w2), seed=seed + start, tiles=tiles)
                        del a13, in1, in3, l13
                        torch.matmul(h, _dequantize((w2,), compute).t(), out=y_base[sl])
                        if y_lora is not None:
                            lora = _lora(hk, w2)
                            y_lora[sl] = 0.0 if lora is None else lora
                start += n
            if output:
                flat_w = weights.reshape(-1).index_select(0, order)
                out = kernels.sum_rows(y_base, order, selected.shape[1], x.dtype, y_lora, weights=flat_w)
            else:  # the recomputation's output is not read: torch stops it at the layer's last save, which
                # is this pass's in SKIP_SAFE_LAYERS; NaN, so that a layer that read it anyway would give
                # NaN gradients (the job's gradient-norm check stops on them) rather than stale memory
                out = torch.full_like(x, float("nan"))
        ctx.counts = counts
        ctx.save_for_backward(x, weights, order, token, a13s, factors)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weights, order, token, a13s, factors = ctx.saved_tensors
        plan, compute = ctx.plan, ctx.compute
        grads = [None] * (2 * 3 * len(plan))
        with torch.autocast(x.device.type, enabled=False):
            flat_w = weights.reshape(-1).index_select(0, order)
            gy_all = kernels.gather_rows(grad_out, token, compute, flat_w)  # the output gradient times w
            xs = kernels.gather_rows(x, token, compute)
            dxs = torch.empty(xs.shape, dtype=x.dtype, device=x.device)
            # gy . y for each row (gy = g w: its expert's output y times the output gradient, times
            # its routing weight), from w2's input side: gy W2 . h (+ the LoRA part), the SwiGLU
            # backward's by-product; so no pass keeps or recomputes y for the routing weights
            dots = torch.zeros(xs.shape[0], dtype=torch.float32, device=x.device)
            start = 0
            for e, (projs, n) in enumerate(zip(plan, ctx.counts, strict=True)):
                if n:
                    sl = slice(start, start + n)
                    _expert_backward(xs[sl], gy_all[sl], a13s[sl], factors[:, sl], projs, grads, 6 * e,
                                     (ctx.seed, xs.shape[0], start, ctx.tiles), dots[sl], dxs[sl])
                start += n
            dx = kernels.sum_rows(dxs, order, weights.shape[1], x.dtype)
            # d loss / d w = g . y = (gy . y) / w; a weight of exactly 0 gets 0 (softmax's backward
            # multiplies what it gets by that weight anyway). gy is rounded to the compute dtype first:
            # in fp16 that needs the loss scaling the job always runs fp16 with (tiny unscaled
            # gradients would lose digits where g . y in fp32 did not)
            grad_flat_w = torch.where(flat_w > 0, dots / flat_w.float(), 0.0)
            grad_w = torch.empty_like(grad_flat_w).index_copy_(0, order, grad_flat_w)
        return (dx, grad_w.view_as(weights).to(weights.dtype), None, None, *grads)


def _expert_backward(xe, gy, a13, factors, projs, grads, at: int, where: tuple[int, int, int, bool],
                     dots: torch.Tensor, dx: torch.Tensor) -> None:
    """One expert's input gradient into dx (x's dtype; its parts summed in fp32 first, as the stock
    path does) from its output gradient gy and the saved a13 and w1's and w3's LoRA factors; the
    LoRA gradients go to grads[at:at+6], each row's gy . y to dots. Matmuls run in xe's compute
    dtype, as in the stock path. `where`: the pass's seed, its rows, this expert's first row
    (the forward's dropout masks are drawn again from them), whether the SwiGLU tiles run."""
    seed, rows, start, tiles = where
    w1, w3, w2 = projs
    ffn = a13.shape[1] // 2
    l13 = [None if p.lora_a is None else (factors[j, :, :p.lora_a.shape[0]], p.lora_b.to(gy.dtype))
           for j, p in enumerate((w1, w3))]
    d13, hk = kernels.swiglu_backward(gy @ _dequantize((w2,), gy.dtype), _lora_input_factors(gy, w2), a13, *l13,
                                      drop=_drop(w2), seed=seed + start, dots=dots, tiles=tiles)
    del l13
    _lora_weight_grads(gy, w2, hk, grads, at + 4)
    del hk
    acc = dx if dx.dtype == torch.float32 else torch.empty(dx.shape, dtype=torch.float32, device=dx.device)
    acc.copy_(d13 @ _dequantize((w1, w3), gy.dtype))
    keys = mask_keys((w1, w3), seed, rows, start)
    ins = lora_inputs(xe, (w1, w3), keys)
    dys = [d13[:, j * ffn:(j + 1) * ffn] for j in range(2)]
    for j, p in enumerate((w1, w3)):
        _lora_weight_grads(dys[j], p, ins[j], grads, at + 2 * j)
    del ins
    add_lora_input_grads(acc, [_lora_input_grad(dy, p) for dy, p in zip(dys, (w1, w3), strict=True)], keys)
    if acc is not dx:  # a bf16 residual stream: rounded once, after the sum
        dx.copy_(acc)


def _lora_input_factors(gy, p: Proj) -> kernels.Lora | None:
    """d(lora_in) of y = ... + s lora_in A^T B^T as its factors (s gy B, A), in gy's dtype."""
    if p.lora_a is None:
        return None
    return gy @ p.lora_b.to(gy.dtype) * p.scaling, p.lora_a.to(gy.dtype)


def _lora_input_grad(gy, p: Proj) -> torch.Tensor | None:
    """d(lora_in) of y = ... + s lora_in A^T B^T, in gy's dtype (before the dropout mask)."""
    factors = _lora_input_factors(gy, p)
    return None if factors is None else factors[0] @ factors[1]


def _lora_weight_grads(gy, p: Proj, lora_in, grads, at: int) -> None:
    """A's and B's gradients for y = ... + s lora_in A^T B^T, into grads[at:at+2]."""
    if p.lora_a is None:
        return
    dtype = gy.dtype
    a, b = p.lora_a.to(dtype), p.lora_b.to(dtype)
    grads[at] = ((gy @ b * p.scaling).t() @ lora_in).to(p.lora_a.dtype)
    grads[at + 1] = (gy.t() @ (lora_in @ a.t()) * p.scaling).to(p.lora_b.dtype)
