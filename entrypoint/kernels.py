"""SwiGLU for entrypoint.moe, forward and backward, each one elementwise pass; LoRA dropout
drawn in-kernel (dropout_rows, add_dropped), whose masks are never stored; and the MoE pass's
gathers into and sums out of expert order (gather_rows, sum_rows), each one pass with the
rounding steps of the torch ops they replace.

The expert computes u = x W1^T + lora1(x), v = x W3^T + lora3(x), h = silu(u) * v. transformers
+ bitsandbytes + PEFT under autocast do that in fp32, one kernel per operation over
(tokens x 14336) tensors, and keep each result for backward. Here one pass reads the matmul
outputs (bf16/fp16) and the LoRA terms' factors, does the same fp32 arithmetic and writes h once;
it stores no u and v. The backward pass reads the output gradient and a13 again (half the bytes of
fp32 u, v), computes u and v again with the forward's code, and writes du and dv side by side (so
one matmul takes them to the input gradient) and h again (for the w2 LoRA gradients), instead of
keeping h.

Triton runs it on CUDA GPUs of compute capability 8.0+; elsewhere (CPU, V100/T4, Triton missing
or failing to launch) torch does the same arithmetic, in the same order as the stock path.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of torch; CPU builds and old images may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is absent
    triton = None

BLOCK = 1024  # columns a program of the row-wise kernels covers
TILE_M, TILE_N = 32, 128  # the SwiGLU kernels' tiles (rows x columns): LoRA B is read once per 32 rows
MAX_RANK = 128  # the largest LoRA rank the SwiGLU tiles take (larger: the torch ops, for the whole layer)
# Set to the reason when a Triton launch failed once (no compiler for its launcher, an
# unsupported GPU, ...): the job goes on with the torch arithmetic and says so once.
failed: str | None = None


def use_triton(t: torch.Tensor) -> bool:
    """Triton on CUDA GPUs of compute capability 8.0+ (bf16: A100, A10G, L4, L40S, H100, H200);
    V100 and T4 (fp16) take the torch path, which the CPU tests exercise."""
    if triton is None or failed is not None:
        return False
    if t.is_cuda:
        return torch.cuda.get_device_capability(t.device) >= (8, 0)
    return os.environ.get("TRITON_INTERPRET") == "1"


def backend(t: torch.Tensor) -> str:
    return "triton" if use_triton(t) else "torch"


def warm_up(device: torch.device) -> str:
    """Compile and run every kernel once, every option on, before training: a Triton that cannot
    run here fails now, not between a forward and its backward (whose dropout masks must come
    from the same generator). Returns the backend the job will use."""
    probe = torch.zeros(1, 2 * BLOCK, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    if use_triton(probe):
        uv = torch.zeros(2, 1, BLOCK, device=device)
        side = probe[:, :BLOCK].contiguous()
        t, b = probe.new_zeros(1, 16), probe.new_zeros(BLOCK, 16)
        swiglu_forward(probe, (t, b), (t, b), drop=0.1, seed=1)
        swiglu_backward(side, (t, b.t().contiguous()), probe, (t, b), (t, b), drop=0.1, seed=1,
                        dots=torch.zeros(1, device=device))
        for n in (1, 2, 3):
            outs = dropout_rows(side, (0.1,) * n, tuple(range(1, n + 1)))
            add_dropped(uv[0], outs, (0.1,) * n, tuple(range(1, n + 1)))
        order, ones = torch.arange(2, device=device), torch.ones(2, device=device)
        gather_rows(uv[0], order[:1], probe.dtype, ones[:1])
        gather_rows(uv[0], order[:1], probe.dtype)
        sum_rows(uv[:, 0], order, 2, torch.float32, uv[:, 0], weights=ones)
        sum_rows(uv[:, 0], order, 2, torch.float32)
    return backend(probe)


def _launch(kernel, grid, *args, **meta) -> bool:
    """Run a Triton kernel on its tensors' GPU (Triton launches on the current device; a model
    split over GPUs has layers on several); on failure remember why, warn once, return False."""
    global failed
    where = args[0].device
    try:
        with torch.cuda.device(where) if where.type == "cuda" else contextlib.nullcontext():
            kernel[grid](*args, **meta)
        return True
    except Exception as e:  # noqa: BLE001 - any failure to compile or launch: the torch path is exact
        failed = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        print(f"[warn] a Triton kernel failed ({failed}); the fused passes continue with torch ops",
              file=sys.stderr, flush=True)
        return False


Lora = tuple[torch.Tensor, torch.Tensor]  # a LoRA term as its two factors: the term is their product


def _rank_block(*loras: Lora | None) -> int:
    """The rank dimension of the kernels' LoRA tiles: the rank padded to a power of two, 16 at least
    (tl.dot's least)."""
    r = max((lora[0].shape[1] for lora in loras if lora is not None), default=1)
    return max(16, triton.next_power_of_2(r))


def tiles_fit(ranks: set[int]) -> bool:
    """Whether the SwiGLU kernels can take LoRA terms of these ranks (one rank, at most MAX_RANK:
    a tile holds the whole rank, and its shared memory grows with it). Decided once per layer from
    all its experts' ranks, so that forward and backward take the same path and draw w2's dropout
    mask the same way."""
    return len(ranks) <= 1 and max(ranks, default=1) <= MAX_RANK


def _torch_uv(a13: torch.Tensor, l1: Lora | None, l3: Lora | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch path's fp32 u = a1 + l1 and v = a3 + l3 (each LoRA term rounded to a13's dtype by
    its matmul): forward and backward compute them with these same ops, so alike."""
    f = a13.shape[1] // 2
    u = a13[:, :f].float()
    v = a13[:, f:].float()
    if l1 is not None:
        u = u + l1[0] @ l1[1].t()
    if l3 is not None:
        v = v + l3[0] @ l3[1].t()
    return u, v


def _contiguous(lora: Lora | None) -> Lora | None:
    return None if lora is None else tuple(t.contiguous() for t in lora)


def _tiled_rank(like: torch.Tensor, loras: tuple[Lora | None, ...], tiles: bool | None) -> int | None:
    """The LoRA rank the SwiGLU kernels' Triton tiles run at (1 without LoRA), or None where the
    torch ops run: no Triton for `like`, or the tiles not to run (`tiles`, the caller's tiles_fit
    over the whole layer; None: tiles_fit of these terms' ranks)."""
    ranks = {lo[0].shape[1] for lo in loras if lo is not None}
    if not use_triton(like) or not (tiles if tiles is not None else tiles_fit(ranks)):
        return None
    return ranks.pop() if ranks else 1


def _factors(lora: Lora | None, like: torch.Tensor) -> Lora:
    """A LoRA term's factors as kernel arguments (any tensor stands in for an absent term)."""
    return lora if lora is not None else (like, like)


def swiglu_forward(a13: torch.Tensor, l1: Lora | None, l3: Lora | None, drop: float = 0.0, seed: int = 0,
                   tiles: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """h = silu(a1 + l1) * (a3 + l3) in a13's dtype, where a13 = [a1 | a3] is (n, 2f) and l1, l3
    are None or w1's and w3's LoRA terms as factors (t, b): the term t b^T (t (n, r): the input's
    down-projection, scaled; b (f, r): LoRA B), rounded to a13's dtype, computed tile by tile on
    Triton and never stored; u = a1 + l1 and v = a3 + l3 in fp32, never stored either (backward
    computes them again from a13 and the same factors). Returns h and h * keep, keep being
    dropout(drop) drawn from seed (the input of w2's LoRA; h itself when drop is 0); row i's mask is
    at offset i f of seed's stream. `tiles`: whether the Triton tiles may run (the caller's
    tiles_fit over the whole layer); None: tiles_fit of l1, l3."""
    a13, l1, l3 = a13.contiguous(), _contiguous(l1), _contiguous(l3)
    n, f = a13.shape[0], a13.shape[1] // 2
    h = a13.new_empty(n, f)
    hk = a13.new_empty(n, f) if drop else h
    if n == 0:
        return h, hk
    r = _tiled_rank(a13, (l1, l3), tiles)
    if r is not None:
        if _launch(_swiglu_fwd, (triton.cdiv(n, TILE_M), triton.cdiv(f, TILE_N)),
                   a13, *_factors(l1, a13), *_factors(l3, a13), h, hk, n, f, r, drop, seed,
                   HAS_L1=l1 is not None, HAS_L3=l3 is not None, DROP=drop > 0,
                   BM=TILE_M, BN=TILE_N, R=_rank_block(l1, l3)):
            return h, hk
    u, v = _torch_uv(a13, l1, l3)
    h.copy_(F.silu(u) * v)
    if drop:
        hk.copy_(h.float() * keep_mask(n, f, drop, seed, h))
    return h, hk


def swiglu_backward(dh: torch.Tensor, dh_lora: Lora | None, a13: torch.Tensor, l1: Lora | None,
                    l3: Lora | None, drop: float = 0.0, seed: int = 0, dots: torch.Tensor | None = None,
                    tiles: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Given d(loss)/dh as dh + keep * dh_lora (base and LoRA parts of w2's input gradient, keep
    the forward's dropout mask; dh_lora as factors (g, a), the part being g a rounded to dh's dtype,
    computed tile by tile on Triton) and the forward's a13, l1, l3 (u and v are computed again from
    them, as swiglu_forward computes them): returns d13 = [du | dv] (n, 2f) and h * keep, both in
    dh's dtype. With `dots` (n, fp32), adds each row's d(loss)/dh . h to it: the output gradient
    times w2's output, y . dy = (dh W2) . h + the LoRA part, without y. `tiles` as for
    swiglu_forward (None: tiles_fit of all three LoRA terms)."""
    dh, a13 = dh.contiguous(), a13.contiguous()
    dh_lora, l1, l3 = _contiguous(dh_lora), _contiguous(l1), _contiguous(l3)
    n, f = a13.shape[0], a13.shape[1] // 2
    d13 = dh.new_empty(n, 2 * f)
    hk = dh.new_empty(n, f)
    if n == 0:
        return d13, hk
    r = _tiled_rank(dh, (dh_lora, l1, l3), tiles)
    if r is not None:
        blocks = triton.cdiv(f, TILE_N)
        partial = torch.empty(n, blocks, dtype=torch.float32, device=dh.device) if dots is not None else dh
        if _launch(_swiglu_bwd, (triton.cdiv(n, TILE_M), blocks),
                   dh, *_factors(dh_lora, dh), a13, *_factors(l1, a13), *_factors(l3, a13), d13, hk, partial,
                   n, f, r, blocks, drop, seed, HAS_LORA=dh_lora is not None, HAS_L1=l1 is not None,
                   HAS_L3=l3 is not None, DROP=drop > 0, DOTS=dots is not None,
                   BM=TILE_M, BN=TILE_N, R=_rank_block(dh_lora, l1, l3)):
            if dots is not None:
                dots += partial.sum(1)  # per-tile sums, added in a fixed order: the same bits every run
            return d13, hk
    u, v = _torch_uv(a13, l1, l3)
    keep = keep_mask(n, f, drop, seed, dh) if drop else None
    g = dh.float()
    if dh_lora is not None:
        lora = dh_lora[0] @ dh_lora[1]
        g = g + (lora if keep is None else (lora.float() * keep).to(dh.dtype)).float()
    sig = torch.sigmoid(u)
    silu = F.silu(u)  # the forward's, as autograd keeps it on the stock path (and h the forward's, bit for bit)
    d13[:, :f] = (g * v) * (sig * (1 + u * (1 - sig)))  # torch's silu_backward, after mul's
    d13[:, f:] = g * silu
    h = (silu * v).to(dh.dtype)
    if dots is not None:
        dots += (g * h.float()).sum(1)
    hk.copy_(h if keep is None else h.float() * keep)
    return d13, hk


def dropout_rows(x: torch.Tensor, drops: tuple[float, ...], seeds: tuple[int, ...],
                 dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """x * keep_j for each (drops[j], seeds[j]), in `dtype` (x's by default), in one pass over x
    (up to 3 masks). keep_j is 0 or 1/(1-drop) in fp32, keyed on seeds[j] at offset row d + column of x
    seen as rows of its last dim, as w2's mask in the SwiGLU kernels: the same seed gives the same
    mask again in backward, so no mask is stored; a product is rounded once, as dropout on fp32 is."""
    assert 1 <= len(drops) == len(seeds) <= 3
    dtype = dtype or x.dtype
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2.contiguous()
    n, d = x2.shape
    outs = [x2.new_empty((n, d), dtype=dtype) for _ in drops]
    if n and use_triton(x2) and _launch(
            _dropout_rows, (n, triton.cdiv(d, BLOCK)), x2, *_three(outs), d, *_three(drops), *_three(seeds),
            N=len(drops), BLOCK=BLOCK):
        return [o.view(x.shape) for o in outs]
    for out, drop, seed in zip(outs, drops, seeds, strict=True):
        out.copy_(x2.float() * keep_mask(n, d, drop, seed, x2))
    return [o.view(x.shape) for o in outs]


def add_dropped(acc: torch.Tensor, grads: list[torch.Tensor], drops: tuple[float, ...],
                seeds: tuple[int, ...]) -> None:
    """acc (fp32) += the sum over j of keep_j * grads[j] (dropout_rows' masks for the same
    seeds and shape), in fp32: the gradients that reach the input through the dropped copies."""
    assert 1 <= len(grads) == len(drops) == len(seeds) <= 3 and acc.dtype == torch.float32
    grads = [g.reshape(acc.shape).contiguous() for g in grads]
    if not acc.is_contiguous():  # the kernel's masks, on a contiguous copy
        whole = acc.contiguous()
        add_dropped(whole, grads, drops, seeds)
        acc.copy_(whole)
        return
    n, d = acc.shape
    if n and use_triton(acc) and _launch(
            _add_dropped, (n, triton.cdiv(d, BLOCK)), acc, *_three(grads), d, *_three(drops), *_three(seeds),
            N=len(grads), BLOCK=BLOCK):
        return
    for g, drop, seed in zip(grads, drops, seeds, strict=True):
        acc += g.float() * keep_mask(n, d, drop, seed, acc)


def gather_rows(src: torch.Tensor, index: torch.Tensor, dtype: torch.dtype,
                weights: torch.Tensor | None = None) -> torch.Tensor:
    """src[index] in `dtype`, each row times weights[i] first when given: what
    `(src.index_select(0, index) * weights[:, None].to(src.dtype)).to(dtype)` gives (the product
    rounded to src's dtype, then to dtype), in one pass."""
    src = src.contiguous()
    n, d = index.shape[0], src.shape[1]
    out = src.new_empty((n, d), dtype=dtype)
    if n and use_triton(src) and _launch(
            _gather_rows, (n, triton.cdiv(d, BLOCK)), src, index, weights if weights is not None else src, out, d,
            HAS_W=weights is not None, BLOCK=BLOCK, enable_fp_fusion=False):
        return out
    rows = src.index_select(0, index)
    if weights is not None:
        rows = rows * weights[:, None].to(src.dtype)
    return out.copy_(rows)


def sum_rows(rows: torch.Tensor, order: torch.Tensor, k: int, dtype: torch.dtype,
             extra: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Each token's k rows summed in token order, rows being in expert order (row p belongs to token
    order[p] // k): y = rows (+ extra) in `dtype`, times weights[p] when given, then the k summed in
    fp32 and rounded to `dtype`; what `((rows.to(dtype) + extra.to(dtype)) * weights[:, None].to(dtype))`
    gathered back to token order and summed over k gives, in one pass (no expert-order copy in dtype)."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    rows, extra = rows.contiguous(), None if extra is None else extra.contiguous()
    tokens, d = order.numel() // k, rows.shape[1]
    if tokens and use_triton(rows):
        out = rows.new_empty((tokens, d), dtype=dtype)
        if _launch(_sum_rows, (tokens, triton.cdiv(d, BLOCK)), rows, extra if extra is not None else rows,
                   weights if weights is not None else rows, inverse, out, d, K=k, HAS_EXTRA=extra is not None,
                   HAS_W=weights is not None, BLOCK=BLOCK, enable_fp_fusion=False):
            return out
    y = rows.to(dtype)
    if extra is not None:
        y = y + extra.to(dtype)
    if weights is not None:
        y = y * weights[:, None].to(dtype)
    return y.index_select(0, inverse).view(-1, k, d).sum(1)


def _three(items: list) -> list:
    """items padded to 3 with their first (the kernels' unused arguments)."""
    return list(items) + [items[0]] * (3 - len(items))


def keep_mask(n: int, f: int, drop: float, seed: int, like: torch.Tensor) -> torch.Tensor:
    """The torch path's dropout multiplier (fp32: 0 or 1/(1-drop)), a function of seed alone."""
    g = torch.Generator(device=like.device).manual_seed(seed)
    keep = torch.rand(n, f, generator=g, device=like.device) >= drop
    return keep.float() / (1 - drop)


class SeededDropout(torch.nn.Dropout):
    """nn.Dropout for a LoRA module's input (PEFT's lora_dropout) whose mask is drawn in-kernel
    from a seed (dropout_rows) and drawn again in backward: nothing is kept for backward but the
    seed, where nn.Dropout keeps its mask. Under autocast the output is in the autocast dtype, which
    the LoRA A matmul it feeds casts to anyway (the same bits: the product is rounded once either
    way). The seed comes from the CPU generator, which layer checkpointing replays."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        seed = int(torch.randint(0, 2**30, (1,)).item())
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        return _Dropout.apply(x, self.p, seed, dtype)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p, seed, dtype):
        ctx.how, ctx.dtype = (p, seed), x.dtype
        return dropout_rows(x, (p,), (seed,), dtype)[0]

    @staticmethod
    def backward(ctx, grad):
        p, seed = ctx.how
        return dropout_rows(grad, (p,), (seed,), ctx.dtype)[0], None, None, None


if triton is not None:
    @triton.jit
    def _keep(seed, at, drop):
        """1/(1-drop) or 0; Philox keyed on seed at offset `at` (row width + column; the SwiGLU
        kernels' w2 mask and the LoRA inputs' masks alike): every call and mask has its own key
        (moe.mask_keys), so no two share a stream, shifted or not."""
        return tl.where(tl.rand(seed, at) >= drop, 1.0 / (1.0 - drop), 0.0)

    @triton.jit
    def _lora_tile(t, b, rows, cols, n, f, r, R: tl.constexpr, B_ROWS_ARE_COLS: tl.constexpr):
        """(rows x cols) of t b^T (b (f, r): LoRA B) or of t b (b (r, f): LoRA A), t (n, r), in fp32."""
        ks = tl.arange(0, R)
        tt = tl.load(t + rows[:, None] * r + ks[None, :], mask=(rows[:, None] < n) & (ks[None, :] < r), other=0.0)
        if B_ROWS_ARE_COLS:
            bb = tl.load(b + cols[None, :] * r + ks[:, None], mask=(cols[None, :] < f) & (ks[:, None] < r), other=0.0)
        else:
            bb = tl.load(b + ks[:, None] * f + cols[None, :], mask=(ks[:, None] < r) & (cols[None, :] < f), other=0.0)
        return tl.dot(tt, bb, input_precision="ieee")

    @triton.jit
    def _tile(n, f, BM: tl.constexpr, BN: tl.constexpr):
        """This program's tile of (n, f): its rows, columns, bounds mask, offsets in an (n, f)
        tensor and in an (n, 2f) one ([u | v] side by side)."""
        rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        mask = (rows[:, None] < n) & (cols[None, :] < f)
        return rows, cols, mask, rows[:, None] * f + cols[None, :], rows[:, None] * 2 * f + cols[None, :]

    @triton.jit
    def _uv(a13, t1, b1, t3, b3, rows, cols, mask, src, n, f, r, HAS_L1: tl.constexpr, HAS_L3: tl.constexpr,
            R: tl.constexpr):
        """The tile's fp32 u = a1 + l1 and v = a3 + l3, each LoRA term rounded to a13's dtype: the one
        code both SwiGLU kernels compute them with (the backward's are the forward's)."""
        dt = a13.dtype.element_ty
        u = tl.load(a13 + src, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(a13 + src + f, mask=mask, other=0.0).to(tl.float32)
        if HAS_L1:
            u += _lora_tile(t1, b1, rows, cols, n, f, r, R, True).to(dt).to(tl.float32)
        if HAS_L3:
            v += _lora_tile(t3, b3, rows, cols, n, f, r, R, True).to(dt).to(tl.float32)
        return u, v

    @triton.jit
    def _swiglu_fwd(a13, t1, b1, t3, b3, h, hk, n, f, r, drop, seed, HAS_L1: tl.constexpr, HAS_L3: tl.constexpr,
                    DROP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, R: tl.constexpr):
        rows, cols, mask, at, src = _tile(n, f, BM, BN)
        dt = h.dtype.element_ty
        u, v = _uv(a13, t1, b1, t3, b3, rows, cols, mask, src, n, f, r, HAS_L1, HAS_L3, R)
        out = (u * tl.sigmoid(u) * v).to(dt)
        tl.store(h + at, out, mask=mask)
        if DROP:
            tl.store(hk + at, (out * _keep(seed, at, drop)).to(dt), mask=mask)

    @triton.jit
    def _swiglu_bwd(dh, g2, a2, a13, t1, b1, t3, b3, d13, hk, partial, n, f, r, blocks, drop, seed,
                    HAS_LORA: tl.constexpr, HAS_L1: tl.constexpr, HAS_L3: tl.constexpr, DROP: tl.constexpr,
                    DOTS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, R: tl.constexpr):
        rows, cols, mask, at, dst = _tile(n, f, BM, BN)
        dt = dh.dtype.element_ty
        g = tl.load(dh + at, mask=mask, other=0.0).to(tl.float32)
        if DROP:
            keep = _keep(seed, at, drop)
        if HAS_LORA:
            gl = _lora_tile(g2, a2, rows, cols, n, f, r, R, False).to(dt)
            if DROP:
                gl = (gl * keep).to(dt)
            g += gl.to(tl.float32)
        u, v = _uv(a13, t1, b1, t3, b3, rows, cols, mask, dst, n, f, r, HAS_L1, HAS_L3, R)
        sig = tl.sigmoid(u)
        silu = u * sig
        du = (g * v) * (sig * (1.0 + u * (1.0 - sig)))
        tl.store(d13 + dst, du.to(d13.dtype.element_ty), mask=mask)
        tl.store(d13 + dst + f, (g * silu).to(d13.dtype.element_ty), mask=mask)
        out = (silu * v).to(hk.dtype.element_ty)
        if DOTS:
            tl.store(partial + rows * blocks + tl.program_id(1), tl.sum(g * out.to(tl.float32), axis=1),
                     mask=rows < n)
        if DROP:
            out = (out * keep).to(hk.dtype.element_ty)
        tl.store(hk + at, out, mask=mask)

    @triton.jit
    def _row_block(d, BLOCK: tl.constexpr):
        """This program's row, its block of columns of d, their bounds mask and offsets."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        return row, cols, cols < d, row * d + cols

    @triton.jit
    def _dropout_rows(x, o1, o2, o3, d, drop1, drop2, drop3, seed1, seed2, seed3, N: tl.constexpr,
                      BLOCK: tl.constexpr):
        _, _, mask, at = _row_block(d, BLOCK)
        v = tl.load(x + at, mask=mask, other=0.0).to(tl.float32)
        tl.store(o1 + at, (v * _keep(seed1, at, drop1)).to(o1.dtype.element_ty), mask=mask)
        if N > 1:
            tl.store(o2 + at, (v * _keep(seed2, at, drop2)).to(o2.dtype.element_ty), mask=mask)
        if N > 2:
            tl.store(o3 + at, (v * _keep(seed3, at, drop3)).to(o3.dtype.element_ty), mask=mask)

    @triton.jit
    def _add_dropped(acc, g1, g2, g3, d, drop1, drop2, drop3, seed1, seed2, seed3, N: tl.constexpr,
                     BLOCK: tl.constexpr):
        _, _, mask, at = _row_block(d, BLOCK)
        total = tl.load(acc + at, mask=mask, other=0.0)
        total += tl.load(g1 + at, mask=mask, other=0.0).to(tl.float32) * _keep(seed1, at, drop1)
        if N > 1:
            total += tl.load(g2 + at, mask=mask, other=0.0).to(tl.float32) * _keep(seed2, at, drop2)
        if N > 2:
            total += tl.load(g3 + at, mask=mask, other=0.0).to(tl.float32) * _keep(seed3, at, drop3)
        tl.store(acc + at, total, mask=mask)

    @triton.jit
    def _gather_rows(src, index, w, out, d, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
        row, cols, mask, at = _row_block(d, BLOCK)
        v = tl.load(src + tl.load(index + row).to(tl.int64) * d + cols, mask=mask, other=0.0)
        if HAS_W:
            v = (v.to(tl.float32) * tl.load(w + row).to(src.dtype.element_ty).to(tl.float32)).to(src.dtype.element_ty)
        tl.store(out + at, v.to(out.dtype.element_ty), mask=mask)

    @triton.jit
    def _sum_rows(rows, extra, w, inverse, out, d, K: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_W: tl.constexpr,
                  BLOCK: tl.constexpr):
        token, cols, mask, here = _row_block(d, BLOCK)
        dt = out.dtype.element_ty
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in tl.static_range(K):
            at = tl.load(inverse + token * K + j).to(tl.int64)
            y = tl.load(rows + at * d + cols, mask=mask, other=0.0).to(dt).to(tl.float32)
            if HAS_EXTRA:
                y = (y + tl.load(extra + at * d + cols, mask=mask, other=0.0).to(dt).to(tl.float32)).to(dt).to(tl.float32)
            if HAS_W:
                y = (y * tl.load(w + at).to(dt).to(tl.float32)).to(dt).to(tl.float32)
            total += y
        tl.store(out + here, total.to(dt), mask=mask)
