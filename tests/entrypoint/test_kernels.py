"""entrypoint.kernels: the Triton kernels (SwiGLU, LoRA dropout, the gathers and sums of expert
order; what runs on a GPU) against the torch arithmetic (what runs on CPU), executed on this CPU by
Triton's interpreter (TRITON_INTERPRET=1, set before Triton is imported, hence a subprocess). fp32,
because the interpreter rounds to bf16 by truncation where a GPU rounds to nearest; bf16 is compared
on the GPU (bench/moe_layer.py, bench/deep_speed.py's numerics).

The same script and checks run the compiled kernels on a CUDA GPU where there is one (the `cuda`
cases; skipped elsewhere, CI included): `pytest tests/entrypoint/test_kernels.py -k cuda` on the
device (bench/README.md)."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, torch
import contextlib
from entrypoint import kernels as K
assert K.triton is not None
out = {}

@contextlib.contextmanager
def on(path):  # the kernels' Triton path, or ("torch") their torch ops, for the block
    saved = K.triton
    K.triton = saved if path == "triton" else None
    try:
        yield
    finally:
        K.triton = saved

# LoRA terms go in as factors (rank 8 and 20: padded to 16 and 32 in the kernels' tiles)
for n, f, lora, drop, r in [(37, 1500, True, 0.0, 8), (5, 1024, False, 0.0, 8), (64, 700, True, 0.3, 20),
                            (0, 256, True, 0.1, 16)]:
    g = torch.Generator().manual_seed(n)
    a13 = torch.randn(n, 2 * f, generator=g)
    dh = torch.randn(n, f, generator=g)
    l1, l3 = ((torch.randn(n, r, generator=g) * 0.3, torch.randn(f, r, generator=g) * 0.1) for _ in range(2))
    dl = (torch.randn(n, r, generator=g) * 0.3, torch.randn(r, f, generator=g) * 0.1)
    if not lora:
        l1 = l3 = dl = None
    got = {}
    for path in ("triton", "torch"):
        with on(path):
            h, hk = K.swiglu_forward(a13, l1, l3, drop=drop, seed=11)
            dots = torch.full((n,), 0.5)  # added to, not overwritten
            # backward computes u and v again from a13 and the same LoRA factors
            d13, hk_back = K.swiglu_backward(dh, dl, a13, l1, l3, drop=drop, seed=11, dots=dots)
        got[path] = dict(h=h, hk=hk, d13=d13, hk_back=hk_back, dots=dots)
    t, c = got["triton"], got["torch"]
    u = a13[:, :f] + (l1[0] @ l1[1].t() if lora else 0)  # fp32 here: no rounding of the LoRA terms
    v = a13[:, f:] + (l3[0] @ l3[1].t() if lora else 0)
    keep = torch.where(t["h"] != 0, t["hk"] / t["h"], torch.ones_like(t["h"]))  # the kernel's own mask
    # the torch arithmetic with the kernel's mask: what the kernel's backward must equal
    gsum = dh + (dl[0] @ dl[1] * keep if lora else 0)
    sig = torch.sigmoid(u)
    d13 = torch.cat([(gsum * v) * (sig * (1 + u * (1 - sig))), gsum * u * sig], 1)
    dots_err = 0.0
    for r in (t, c):  # d(loss)/dh . h, row by row, each path with its own dropout mask
        mask = torch.where(r["h"] != 0, r["hk"] / r["h"], torch.ones_like(r["h"]))
        want = 0.5 + ((dh + (dl[0] @ dl[1] * mask if lora else 0)) * r["h"]).sum(1)
        dots_err = max(dots_err, ((r["dots"] - want).abs() / (1 + want.abs())).max().item() if n else 0.0)
    out[f"{n}x{f} lora={lora} drop={drop} r={r}"] = {
        "dots": dots_err,
        "h": (t["h"] - c["h"]).abs().max().item() if n else 0.0,
        "h_ref": max((r["h"] - torch.nn.functional.silu(u) * v).abs().max().item() for r in (t, c)) if n else 0.0,
        "d13": (t["d13"] - d13).abs().max().item() if n else 0.0,
        "hk_replayed": torch.equal(t["hk"], t["hk_back"]) and torch.equal(c["hk"], c["hk_back"]),
        "keep_values": sorted({round(x, 5) for x in keep.flatten().tolist()}),
        "kept": (keep > 0).float().mean().item() if n else 1 - drop,
        "torch_kept": (c["hk"] != 0).float().mean().item() if n else 1 - drop,
    }
# one layer as entrypoint.moe runs it: experts' rows back to back, each keyed from seed + its
# first row; no row's dropout mask may repeat another's (two experts must not share a stream)
rows, f, masks, start = [30, 30, 30], 512, [], 0
for n in rows:
    a13 = torch.randn(n, 2 * f) + 3  # h > 0 everywhere, so h * keep shows the mask
    h, hk = K.swiglu_forward(a13, None, None, drop=0.5, seed=1000 + start)
    masks += [tuple((r != 0).tolist()) for r in hk]
    start += n
out["distinct_masks"] = len(set(masks)) == len(masks)
# LoRA input dropout: three masks in one pass over x (1100 columns: not a multiple of BLOCK), drawn
# again from the same seed; add_dropped takes gradients back through the same masks
x = torch.randn(300, 1100, generator=torch.Generator().manual_seed(3))
drops, seeds = (0.1, 0.3, 0.5), (7, 7 + 300, 7 + 600)
out["dropout_rows"] = {}
for path in ("triton", "torch"):
    with on(path):
        outs = K.dropout_rows(x, drops, seeds)
        again = K.dropout_rows(x.view(3, 100, 1100), drops[1:2], seeds[1:2])[0]
        grads = [torch.randn(x.shape, generator=torch.Generator().manual_seed(j)) for j in range(3)]
        acc = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
        base = acc.clone()
        K.add_dropped(acc, grads, drops, seeds)
    keeps = [o / x for o in outs]
    out["dropout_rows"][path] = {
        "kept": [(k > 0).float().mean().item() for k in keeps],
        "values": [sorted({round(v, 4) for v in k.flatten().tolist()}) for k in keeps],
        "again": again.shape == (3, 100, 1100) and torch.equal(again.view(300, 1100), outs[1]),
        "add": (acc - (base + sum(g * k for g, k in zip(grads, keeps)))).abs().max().item(),
        "distinct": len({tuple((k > 0).flatten().tolist()) for k in keeps}) == 3,
    }
# gathers into and sums out of expert order, Triton against the torch ops they replace (fp32: the
# interpreter truncates to bf16); for k <= 2 bit for bit
out["rows"] = {}
g = torch.Generator().manual_seed(5)
for tokens, k, d in [(37, 2, 1500), (9, 8, 300), (5, 1, 64), (0, 2, 64)]:
    order = torch.randperm(tokens * k, generator=g)
    rows, extra = torch.randn(tokens * k, d, generator=g), torch.randn(tokens * k, d, generator=g) * 0.1
    w, src = torch.rand(tokens * k, generator=g), torch.randn(tokens, d, generator=g)
    got = {}
    for path in ("triton", "torch"):
        with on(path):
            got[path] = [K.sum_rows(rows, order, k, torch.float32, extra, weights=w),
                         K.sum_rows(rows, order, k, torch.float32),
                         K.gather_rows(src, order // k, torch.float32, w), K.gather_rows(src, order // k, torch.float32)]
    out["rows"][f"{tokens}x{k}x{d}"] = [
        [torch.equal(a, b), (a - b).abs().max().item() if a.numel() else 0.0, list(a.shape)]
        for a, b in zip(got["triton"], got["torch"])]
print("RESULT " + json.dumps(out))
"""


# On a GPU: every tensor the script makes (on CPU, from its seeded generators) is moved to CUDA as
# it is made, so the same values go through the compiled kernels and through torch's CUDA ops.
ON_CUDA = r"""
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

class OnCuda(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        return tree_map(lambda t: t.cuda() if isinstance(t, torch.Tensor) and t.device.type == "cpu" else t, out)

OnCuda().__enter__()
"""

WHERE = ["interpreter", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                     reason="no CUDA GPU here"))]


@functools.cache
def run_kernels(where: str = "interpreter") -> dict:
    """The script's results, under Triton's interpreter on CPU or compiled on a CUDA GPU."""
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    script = SCRIPT
    if where == "interpreter":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
        script = ON_CUDA + SCRIPT
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None and not os.environ.get("CI"),
                                  reason="triton (the dev extra, Linux x86_64) is not installed; CI always has it")


# fp32 sums in another order (tl.dot against cuBLAS) on a GPU; the interpreter's follow torch's
TOLERANCE = {"interpreter": 1e-5, "cuda": 1e-4}


@needs_triton
@pytest.mark.parametrize("where", WHERE)
def test_triton_swiglu_matches_the_torch_arithmetic_and_replays_its_dropout(where):
    results = dict(run_kernels(where))
    tol = TOLERANCE[where]
    results.pop("dropout_rows")
    results.pop("rows")
    assert results.pop("distinct_masks")
    for case, r in results.items():
        assert r["h"] < tol and r["h_ref"] < tol, case  # silu(u) v, u and v with their LoRA terms
        assert r["d13"] < tol, case  # du, dv with the LoRA gradient masked as in forward
        assert r["hk_replayed"], case  # backward's u, v and mask are the forward's: its h too, bit for bit
        assert r["dots"] < tol, case  # each row's output gradient . h, both paths
        drop = float(case.split("drop=")[1].split()[0])
        if drop and case.startswith("64"):
            assert r["keep_values"] == [0.0, round(1 / (1 - drop), 5)], case
            assert abs(r["kept"] - (1 - drop)) < 0.02 and abs(r["torch_kept"] - (1 - drop)) < 0.02, case
        elif not drop:
            assert r["keep_values"] in ([1.0], []), case


def test_a_triton_launch_that_fails_falls_back_to_torch_once(monkeypatch, capsys):
    """No compiler for Triton's launcher, an unsupported GPU: the job goes on, exactly, on torch ops."""
    import torch

    from entrypoint import kernels

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")
            return launch

    monkeypatch.setattr(kernels, "triton", type("T", (), {"cdiv": staticmethod(lambda a, b: -(-a // b)),
                                                          "next_power_of_2": staticmethod(lambda n: 16)}))
    monkeypatch.setattr(kernels, "_swiglu_fwd", Broken(), raising=False)
    monkeypatch.setattr(kernels, "failed", None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    a13, l1 = torch.randn(4, 16), (torch.randn(4, 2), torch.randn(8, 2))
    assert kernels.backend(a13) == "triton"
    h, _ = kernels.swiglu_forward(a13, l1, None)
    torch.testing.assert_close(h, torch.nn.functional.silu(a13[:, :8] + l1[0] @ l1[1].t()) * a13[:, 8:])
    assert kernels.backend(a13) == "torch"  # not tried again
    kernels.swiglu_forward(a13, l1, None)
    err = capsys.readouterr().err
    assert err.count("[warn] a Triton kernel failed (RuntimeError: Failed to find C compiler") == 1


@needs_triton
@pytest.mark.parametrize("where", WHERE)
def test_lora_input_dropout_draws_each_mask_again_from_its_seed_on_both_paths(where):
    """kernels.dropout_rows (the LoRA inputs' dropout, drawn in-kernel) on Triton and on torch: each
    mask drops its share with 0 or 1/(1-p), three masks differ, the same seed gives the same mask
    for any shape of the same rows, and add_dropped takes gradients back through those masks."""
    for path, r in run_kernels(where)["dropout_rows"].items():
        for drop, kept, values in zip((0.1, 0.3, 0.5), r["kept"], r["values"], strict=True):
            assert abs(kept - (1 - drop)) < 0.01, path
            assert values == [0.0, round(1 / (1 - drop), 4)], path
        assert r["again"] and r["distinct"], path
        assert r["add"] < 1e-5, path


@needs_triton
@pytest.mark.parametrize("where", WHERE)
def test_the_gathers_and_sums_of_expert_order_match_the_torch_ops_they_replace(where):
    """kernels.gather_rows and sum_rows (the MoE pass's way into and out of expert order, with the
    routing weights and w2's LoRA part folded in) on Triton give the torch ops' values: bit for bit
    for top-1 and top-2 (Mixtral), within fp32 rounding for top-8, and empty for no tokens."""
    for case, results in run_kernels(where)["rows"].items():
        tokens, k, d = (int(v) for v in case.split("x"))
        shapes = [[tokens, d], [tokens, d], [tokens * k, d], [tokens * k, d]]
        assert [shape for _, _, shape in results] == shapes, case
        for equal, diff, _ in results:
            assert equal if k <= 2 else diff < 1e-5, case
