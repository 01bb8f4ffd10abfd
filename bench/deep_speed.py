"""Tokens/s at full depth (all 32 layers of a Mixtral-8x7B shape), the job's recipe against the plain
recipe, measured directly in one process on one quantized model, repeats interleaved; and the
numerics of each lever against the stock path at identical weights.

The model: `--unique` distinct random layers (bf16, quantized in memory by transformers' own
bitsandbytes loading, as deep_memory.py does) copied up to `--layers`: the 93 GB bf16 model
deep_memory.py builds first does not fit an H100, and a copied layer costs the same time and
memory as a distinct one (the same shapes; random weights route about uniformly either way).
Each recipe is the same model switched in place, so all of them run on identical weights:

- plain: transformers + PEFT as the notebooks do it: the stock MoE forward, the fp32 residual
  stream prepare_model_for_kbit_training leaves, checkpoints on the GPU, batches of 8 examples
  padded to the longest (attention mask), paged AdamW 8-bit;
- ours: the job's defaults: fused MoE (entrypoint/moe.py), offloaded checkpoints
  (entrypoint/offload.py), LoRA dropout drawn in-kernel (kernels.SeededDropout), packed rows of
  2048, AdamW 8-bit;
- ours-bf16: ours with training.bf16_residual (entrypoint.model.set_residual_dtype);
- ours-bf16-flex: and FlexAttention, whose document mask skips the blocks across packed examples;
- ours-bf16-compiled: ours-bf16 with entrypoint.model.compile_small_ops (RMSNorm and rotary
  through torch.compile); ours-compiled: ours (fp32 residual stream) with it;
- ours-proj, ours-compiled-proj, ours-bf16-compiled-proj: those with training.fused_attention
  (entrypoint.projections: q/k/v as one matmul, NF4 dequantized once per pass, LoRA beside it);
- ours-flex, ours-compiled-flex: ours and ours-compiled with training.flex_attention (FlexAttention
  with q, k, v cast as SDPA's are under autocast; entrypoint.model.use_flex_attention);
- ours-noskip, ours-compiled-proj-noskip: ours and ours-compiled-proj without the MoE pass's skip,
  inside offloaded checkpoints, of what each pass throws away (what backward keeps, in the
  forward: a13 since d3f8733, u and v before; the SwiGLU pass, w2 and the output in the
  recomputation; entrypoint.offload.phase). Not quite the step before the skip: the
  backward's routing-weight gradient, which came with it, keeps no expert outputs (0.5 GiB less).
- ours-bnb-adamw: ours with bitsandbytes' own AdamW8bit, which waits for the GPU after each
  parameter (the job's, entrypoint.optim, does not);
- ours-torch-rows: ours with the MoE pass's gathers into and sums out of expert order as torch ops
  (index_select, casts, products, sum: what kernels.gather_rows and sum_rows do in one pass each);
- ours-chunked, ours-compiled-chunked: ours and ours-compiled with training.chunked_loss (the head
  and its loss a chunk of tokens at a time, no [tokens, vocab] logits: entrypoint.head);

Both recipes draw example lengths from one distribution (log-normal, median ~545 tokens, capped
at 2048: profile_step.packed_batch); tokens/s counts real tokens only. Every step is LoRA r16 on
`target_modules: auto`, dropout 0.05, bf16 autocast, gradient clipping; the median of steps 2+.

    python bench/deep_speed.py --layers 32 --repeats 3 --steps 6 --rows 8 --extra-rows 12 --out speed.json
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from deep_memory import checkpoints, compare, lora_model, random_model, timed_step  # noqa: E402
from profile_step import packed_batch  # noqa: E402

from entrypoint import head, kernels, moe, offload, projections  # noqa: E402
from entrypoint import model as M  # noqa: E402
from entrypoint.kernels import SeededDropout  # noqa: E402
from entrypoint.optim import adamw_8bit  # noqa: E402


class Recipe(NamedTuple):
    fused: bool  # the fused MoE pass (entrypoint.moe)
    offload: bool  # checkpoints in host memory (entrypoint.offload)
    bf16: bool  # training.bf16_residual
    attention: str  # the attention implementation
    compiled: bool  # training.compile_small_ops
    projections: bool = False  # training.fused_attention (entrypoint.projections)
    skip: bool = True  # offloaded passes of the MoE skip what they throw away (entrypoint.offload.phase)
    seeded: bool = True  # PEFT's LoRA dropout as kernels.SeededDropout (else nn.Dropout, PEFT's own)
    optimizer: str = "job"  # "job": entrypoint.optim's AdamW8bit; "bnb": bitsandbytes'; "paged": its paged one
    rows: bool = True  # the MoE pass's gathers and sums on Triton (kernels.gather_rows, sum_rows), else torch ops
    head: bool = False  # training.chunked_loss (entrypoint.head)


RECIPES = {
    "plain": Recipe(False, False, False, "sdpa", False, seeded=False, optimizer="paged"),
    "ours": Recipe(True, True, False, "sdpa", False),
    "ours-bf16": Recipe(True, True, True, "sdpa", False),
    "ours-bf16-flex": Recipe(True, True, True, "flex_attention", False),
    "ours-bf16-compiled": Recipe(True, True, True, "sdpa", True),
    "ours-compiled": Recipe(True, True, False, "sdpa", True),
    "ours-proj": Recipe(True, True, False, "sdpa", False, True),
    "ours-compiled-proj": Recipe(True, True, False, "sdpa", True, True),
    "ours-bf16-compiled-proj": Recipe(True, True, True, "sdpa", True, True),
    "ours-flex": Recipe(True, True, False, M.FLEX, False),
    "ours-compiled-flex": Recipe(True, True, False, M.FLEX, True),
    "ours-noskip": Recipe(True, True, False, "sdpa", False, False, False),
    "ours-bnb-adamw": Recipe(True, True, False, "sdpa", False, optimizer="bnb"),
    "ours-torch-rows": Recipe(True, True, False, "sdpa", False, rows=False),
    "ours-compiled-proj-noskip": Recipe(True, True, False, "sdpa", True, True, False),
    "ours-chunked": Recipe(True, True, False, "sdpa", False, head=True),
    "ours-compiled-chunked": Recipe(True, True, False, "sdpa", True, head=True),
}
PHASE = offload.phase
ROWS = {"gather_rows": kernels.gather_rows, "sum_rows": kernels.sum_rows}


def on_torch(fn):
    """fn with Triton off for its call: the torch ops the kernel replaced."""
    def run(*args, **kwargs):
        saved, kernels.triton = kernels.triton, None
        try:
            return fn(*args, **kwargs)
        finally:
            kernels.triton = saved
    return run


EAGER_ROTARY: dict = {}


def set_small_ops(net, compiled: bool) -> None:
    """Eager norms and rotary, then (if `compiled`) entrypoint.model.compile_small_ops."""
    for m in net.modules():
        if type(m).__name__.endswith("RMSNorm") and "forward" in vars(m):
            del m.forward
    for modeling, rotary in EAGER_ROTARY.items():
        modeling.apply_rotary_pos_emb = rotary
    if compiled:
        modeling = sys.modules[type(net.get_base_model()).__module__]
        EAGER_ROTARY.setdefault(modeling, modeling.apply_rotary_pos_emb)
        M.compile_small_ops(net)


def deep_model(shape: str, layers: int, unique: int, precision: M.Precision):
    """`layers` decoder layers: `unique` random ones, quantized, then copied in turn."""
    model = random_model(shape, unique, precision)
    stack = model.model.layers
    for i in range(unique, layers):
        layer = copy.deepcopy(stack[i % unique])
        layer.self_attn.layer_idx = i
        for m in layer.modules():  # the copy's own config would keep the attention implementation
            if isinstance(getattr(m, "config", None), type(model.config)):  # set_attn_implementation changes
                m.config = model.config
        stack.append(layer)
    model.config.num_hidden_layers = layers
    torch.cuda.empty_cache()
    return model


def switch(net, recipe: str) -> None:
    """The same model and LoRA weights, run as `recipe` says."""
    fused, offloaded, bf16, attention, compiled, fused_projections, skip, seeded, _, rows, chunked = RECIPES[recipe]
    offload.phase = PHASE if skip else (lambda: None)
    for name, fn in ROWS.items():
        setattr(kernels, name, fn if rows else on_torch(fn))
    for m in net.modules():  # the same module objects (numerics() sets their p)
        if isinstance(m, torch.nn.Dropout):
            m.__class__ = SeededDropout if seeded else torch.nn.Dropout
    for m in net.modules():
        keep = fused if type(m).__name__ in moe.MOE_BLOCKS else fused_projections
        if hasattr(m, "_stock_forward") and not keep:
            del m.forward, m._stock_forward  # back to the class's (stock) forward
    if fused:
        moe.use_fused_moe(net)
    if fused_projections:
        projections.use_fused_attention(net)
    causal = net.get_base_model()
    if chunked:
        head.use_chunked_loss(net)
    elif "_unchunked_forward" in vars(causal):
        del causal.forward, causal._unchunked_forward
    checkpoints(net, offloaded)
    M.set_residual_dtype(net, torch.bfloat16 if bf16 else torch.float32)
    # packed rows: transformers builds the document mask from the position ids, dense for SDPA,
    # a BlockMask for FlexAttention (which then skips the blocks across documents)
    if attention == M.FLEX:
        M.use_flex_attention(net)
    else:
        net.get_base_model().set_attn_implementation(attention)
    set_small_ops(net, compiled)


def padded_batches(n: int, seq: int, per_batch: int = 8, seed: int = 0) -> list[dict]:
    """The plain recipe's batches: `per_batch` examples of packed_batch's lengths, right-padded."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        lengths = [min(max(16, int(rng.lognormvariate(6.3, 0.75))), seq) for _ in range(per_batch)]
        longest = max(lengths)
        ids = torch.randint(3, 32000, (per_batch, longest))
        mask = torch.tensor([[1] * k + [0] * (longest - k) for k in lengths])
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids.cuda(), "attention_mask": mask.cuda(), "labels": labels.cuda()})
    return out


def real_tokens(batch: dict) -> int:
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


def optimizer(recipe: str) -> type:
    import bitsandbytes as bnb

    kind = RECIPES[recipe].optimizer
    return {"job": adamw_8bit(), "bnb": bnb.optim.AdamW8bit, "paged": bnb.optim.PagedAdamW8bit}[kind]


def measure(net, recipe: str, batches: list[dict], steps: int) -> dict:
    switch(net, recipe)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = optimizer(recipe)(params, lr=2e-4)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, tokens = [], []
    for i in range(steps):
        batch = batches[i % len(batches)]
        times.append(timed_step(net, params, opt, batch))
        tokens.append(real_tokens(batch))
    del opt
    torch.cuda.empty_cache()
    steady = slice(1, None) if steps > 1 else slice(None)
    rate = sum(tokens[steady]) / sum(times[steady])  # padded batches vary: tokens over time, not a median
    return {"recipe": recipe, "tokens_per_sec": rate, "step_s": statistics.median(times[steady]),
            "tokens_per_step": statistics.mean(tokens[steady]), "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "all_step_s": times}


def loss_and_grads(net, recipe: str, batch: dict, autocast: bool = True) -> tuple[float, torch.Tensor]:
    switch(net, recipe)
    with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = net(**batch).loss
    loss.backward()
    g = torch.cat([p.grad.flatten().float() for p in net.parameters() if p.requires_grad and p.grad is not None])
    net.zero_grad(set_to_none=True)
    return loss.item(), g


def numerics(net, rows: int, seq: int, recipes=("plain", "ours", "ours-bf16")) -> dict:
    """Each recipe's loss and LoRA gradients against the stock path's (plain's model on packed
    rows) at identical weights and data, LoRA dropout off (the fused pass draws its masks
    differently); stock against itself gives the GPU's noise floor."""
    drops = [m for m in net.modules() if isinstance(m, torch.nn.Dropout)]
    kept = [m.p for m in drops]
    for m in drops:
        m.p = 0.0
    batch = packed_batch(rows, seq)
    try:
        stock_loss, stock = loss_and_grads(net, "plain", batch)
        out, grads = {"rows": rows, "stock_loss": stock_loss}, {}
        try:
            reference = fp32_reference(net, batch)
            out["stock_vs_fp32"] = compare(reference, stock)
        except Exception as e:  # noqa: BLE001 - a reference that cannot run here must not stop the run
            reference, out["stock_vs_fp32"] = None, {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            net.zero_grad(set_to_none=True)
        for recipe in ("plain", *[r for r in recipes if r != "plain"]):
            try:
                loss, g = loss_and_grads(net, recipe, batch)
            except Exception as e:  # noqa: BLE001 - FlexAttention may not compile here: say so
                out[recipe] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                net.zero_grad(set_to_none=True)
                continue
            grads[recipe] = g
            out["stock-again" if recipe == "plain" else recipe] = compare(stock, g) | {
                "loss": loss, "loss_rel_diff": abs(loss - stock_loss) / abs(stock_loss),
                "cosine_vs_fp32": None if reference is None else compare(reference, g)["cosine"]}
        if "ours" in grads and "ours-bf16" in grads:  # the bf16 residual alone, both with the fused MoE pass
            out["ours-bf16_vs_ours"] = compare(grads["ours"], grads["ours-bf16"])
    finally:
        for m, p in zip(drops, kept, strict=True):
            m.p = p
    return out


def fp32_reference(net, batch: dict) -> torch.Tensor:
    """The stock path's LoRA gradients computed in fp32 throughout (no autocast, the 4-bit weights
    dequantized to fp32, TF32 off): the arithmetic every bf16 recipe approximates. Each recipe's
    cosine against it sits beside the stock path's own, so a recipe that rounds differently from
    the stock path can be told from one that is less accurate."""
    import bitsandbytes as bnb

    fours = [m for m in net.modules() if isinstance(m, bnb.nn.Linear4bit)]
    kept = [m.compute_dtype for m in fours]
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    for m in fours:
        m.compute_dtype = torch.float32
    try:
        return loss_and_grads(net, "plain", batch, autocast=False)[1]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for m, dtype in zip(fours, kept, strict=True):
            m.compute_dtype = dtype


def ratios(runs: list[dict], recipe: str, rows: int) -> dict:
    per = []
    for rep in sorted({r["repeat"] for r in runs}):
        ok = [r for r in runs if r["repeat"] == rep and "error" not in r]
        mine = [r for r in ok if r["recipe"] == recipe and r["rows"] == rows]
        base = [r for r in ok if r["recipe"] == "plain"]
        if mine and base:
            per.append(mine[0]["tokens_per_sec"] / base[0]["tokens_per_sec"])
    return {"median": statistics.median(per) if per else None, "min": min(per, default=None),
            "max": max(per, default=None), "per_repeat": per}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="mixtral-8x7b")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--unique", type=int, default=4, help="distinct random layers, copied up to --layers")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--extra-rows", type=int, nargs="*", default=[], help="--extra-recipe at these rows too, every repeat")
    ap.add_argument("--extra-recipe", default="ours-bf16", choices=list(RECIPES), help="the recipe --extra-rows runs")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--recipes", nargs="+", default=["plain", "ours", "ours-bf16"], choices=list(RECIPES))
    ap.add_argument("--numerics-layers", type=int, nargs="*", default=[2],
                    help="also check numerics on models this deep (distinct layers), before the timed one")
    ap.add_argument("--numerics-recipes", nargs="*", choices=list(RECIPES), metavar="RECIPE",
                    help="the recipes the numerics check compares (default: --recipes)")
    ap.add_argument("--no-deep-numerics", action="store_true",
                    help="skip the numerics check on the timed (deep, copied-layer) model")
    ap.add_argument("--budget-s", type=float, default=520, help="start no measurement after this many seconds")
    ap.add_argument("--profile", nargs="*", default=[], choices=list(RECIPES), metavar="RECIPE",
                    help="at the end, where a step of each of these recipes spends its GPU time")
    ap.add_argument("--profile-ops", nargs="*", default=[], choices=list(RECIPES), metavar="RECIPE",
                    help="at the end, the GPU time of one step of each of these recipes by the torch op and the "
                         "Python lines that launched it")
    ap.add_argument("--phases", nargs="*", default=[], choices=list(RECIPES), metavar="RECIPE",
                    help="at the end, each phase of these recipes' steps timed on its own (synced)")
    ap.add_argument("--out", type=Path)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    t0 = time.time()
    precision = M.choose_precision(torch.device("cuda"))
    out = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "args": vars(args) | {"out": str(args.out)},
           "runs": []}
    out["numerics"] = []
    for layers in args.numerics_layers:  # shallow: deeper, random weights amplify any bf16 rounding (README)
        small = lora_model(deep_model(args.shape, layers, layers, precision), True)
        out["numerics"].append(numerics(small, min(4, args.rows), args.seq, args.numerics_recipes or args.recipes)
                               | {"layers": layers})
        print("numerics:", json.dumps(out["numerics"][-1]), flush=True)
        del small
        torch.cuda.empty_cache()
    net = lora_model(deep_model(args.shape, args.layers, args.unique, precision), True)
    out["build_s"] = time.time() - t0
    print(f"{args.layers} layers ({args.unique} unique) built in {out['build_s']:.0f} s", flush=True)
    if not args.no_deep_numerics:
        out["numerics"].append(numerics(net, min(4, args.rows), args.seq, args.numerics_recipes or args.recipes)
                               | {"layers": args.layers})
        print("numerics:", json.dumps(out["numerics"][-1]), flush=True)
    plain = padded_batches(args.steps, args.seq)
    packed = {rows: [packed_batch(rows, args.seq)] for rows in {args.rows, *args.extra_rows}}

    def save():
        out["ratio_vs_plain"] = {f"{r}-r{n}": ratios(out["runs"], r, n) for r, n in
                                 [(r, args.rows) for r in args.recipes if r != "plain"]
                                 + [(args.extra_recipe, n) for n in args.extra_rows]}
        if args.out:
            args.out.write_text(json.dumps(out, indent=2))

    plan = [(rep, recipe, rows) for rep in range(args.repeats)
            for recipe, rows in [(r, args.rows) for r in args.recipes] + [(args.extra_recipe, n) for n in args.extra_rows]]
    for rep, recipe, rows in plan:
        if time.time() - t0 > args.budget_s:
            print(f"time budget spent: skipped #{rep} {recipe} rows={rows} and after", flush=True)
            break
        try:
            r = measure(net, recipe, plain if recipe == "plain" else packed[rows], args.steps)
        except Exception as e:  # noqa: BLE001 - a larger micro-batch may not fit, flex may not compile: go on
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            print(f"#{rep} {recipe} rows={rows}: failed ({why})", flush=True)
            out["runs"].append({"recipe": recipe, "repeat": rep, "rows": rows, "error": why})
            torch.cuda.empty_cache()
            continue
        r |= {"repeat": rep, "rows": None if recipe == "plain" else rows, "layers": args.layers}
        out["runs"].append(r)
        print(f"#{rep} {recipe:10s} rows={r['rows']}: {r['tokens_per_sec']:7.0f} tok/s  step {r['step_s']:.3f} s  "
              f"{r['tokens_per_step']:.0f} tok/step  peak {r['peak_gib']:.2f} GiB", flush=True)
        save()
    save()
    print("ratio vs plain:", json.dumps(out["ratio_vs_plain"]), flush=True)
    for recipe in args.phases:
        out.setdefault("phases", {})[recipe] = phases(net, recipe, packed[args.rows])
        save()
    for recipe in args.profile:
        profile(net, recipe, packed[args.rows])
    for recipe in args.profile_ops:
        profile_ops(net, recipe, packed[args.rows])


def phases(net, recipe: str, batches: list[dict], steps: int = 4) -> dict:
    """Median seconds of each phase of a step (forward, backward, clipping, optimizer step, zeroing
    the gradients), each synced; for the optimizer also the host time before its sync (its launch
    time: the GPU waits where that is not below the GPU time). The first step is left out."""
    switch(net, recipe)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = optimizer(recipe)(params, lr=2e-4)
    seen: dict[str, list[float]] = {}
    for i in range(steps + 1):
        batch = batches[i % len(batches)]
        torch.cuda.synchronize()
        t = [time.perf_counter()]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = net(**batch).loss
        torch.cuda.synchronize()
        t.append(time.perf_counter())
        loss.backward()
        torch.cuda.synchronize()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        torch.cuda.synchronize()
        t.append(time.perf_counter())
        opt.step()
        launched = time.perf_counter()
        torch.cuda.synchronize()
        t.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        t.append(time.perf_counter())
        if i:
            for name, a, b in zip(("forward", "backward", "clip", "optimizer", "zero_grad"), t, t[1:], strict=False):
                seen.setdefault(name, []).append(b - a)
            seen.setdefault("optimizer_launch", []).append(launched - t[3])
    del opt
    torch.cuda.empty_cache()
    got = {k: statistics.median(v) for k, v in seen.items()}
    print(f"phases of {recipe} (median s): " + "  ".join(f"{k} {v:.4f}" for k, v in got.items()), flush=True)
    return got


def profile(net, recipe: str, batches: list[dict], steps: int = 2) -> None:
    """The kernels that take most of `steps` steps (after one unprofiled step), then the share
    of each kind of kernel (profile_step.kernel_kinds) against the steps' wall time."""
    from profile_step import kernel_kinds
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as run

    measure(net, recipe, batches, 1)
    with run(activities=[ProfilerActivity.CUDA]) as prof:
        r = measure(net, recipe, batches, steps)
    print(f"profile of {recipe}:", flush=True)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70), flush=True)
    kinds = kernel_kinds(prof, steps)
    total, wall = sum(kinds.values()), 1e3 * sum(r["all_step_s"]) / steps
    print(f"{recipe}: kernel time per step {total:.1f} ms of a {wall:.1f} ms step (profiled)")
    for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<12} {ms:8.1f} ms  {100 * ms / total:5.1f}%", flush=True)


def profile_ops(net, recipe: str, batches: list[dict]) -> None:
    """One step's GPU time by the torch op that launched it, with its input shapes, then by the
    Python lines above it (the model's, PEFT's, ours): which casts, adds and copies are left."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as run

    measure(net, recipe, batches, 1)
    with run(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True, with_stack=True) as prof:
        measure(net, recipe, batches, 1)
    print(f"ops of {recipe} (one step):", flush=True)
    print(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=45, max_shapes_column_width=90), flush=True)
    print(f"Python lines of {recipe} (one step):", flush=True)
    print(prof.key_averages(group_by_stack_n=6).table(
        sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=45, max_src_column_width=110), flush=True)


if __name__ == "__main__":
    main()
