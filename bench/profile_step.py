"""Where a training step's GPU time goes: the entrypoint's model (4-bit Mixtral-8x7B shape, LoRA
r16 on attention and experts, checkpointing, bf16 autocast) on one packed micro-batch, under
torch.profiler. Prints the step time and the CUDA kernels that take most of it.

    python bench/profile_step.py --layers 2 --rows 8 [--stock-moe] [--compile-small-ops] [--bf16-residual]
        [--fused-attention] [--flex-attention]

After the kernel table, one line per kind of kernel (matmul, attention, dequantize, SwiGLU, casts and
copies, compiled (Triton) small ops, other elementwise, reductions, indexing) with its share of the
step's kernel time: run it at two depths to see what one more layer adds.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from entrypoint import model as M  # noqa: E402
from entrypoint.hyperparams import LoraSpec, TrainingSpec  # noqa: E402


def packed_batch(rows: int, seq: int, seed: int = 0) -> dict:
    """rows of seq tokens, each a run of examples with medical-record-like lengths."""
    rng = random.Random(seed)
    pos = []
    for _ in range(rows):
        row = []
        while len(row) < seq:
            n = min(max(16, int(rng.lognormvariate(6.3, 0.75))), seq - len(row))
            row += list(range(n))
        pos.append(row)
    ids = torch.randint(3, 32000, (rows, seq))
    return {"input_ids": ids.cuda(), "labels": ids.cuda(), "position_ids": torch.tensor(pos).cuda()}


def main() -> None:
    import qlora_throughput as Q

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--stock-moe", action="store_true")
    ap.add_argument("--gpu-checkpoints", action="store_true", help="keep checkpointed layer inputs on the GPU")
    ap.add_argument("--compile-small-ops", action="store_true", help="training.compile_small_ops")
    ap.add_argument("--bf16-residual", action="store_true", help="training.bf16_residual")
    ap.add_argument("--fused-attention", action="store_true", help="training.fused_attention")
    ap.add_argument("--flex-attention", action="store_true", help="training.flex_attention")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--work", type=Path, default=Path("/tmp/sm-qlora-bench"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    path = Q.build_model(args.work, [args.layers])[args.layers]
    precision = M.choose_precision(torch.device("cuda"))
    base = M.load_4bit(str(path), precision, {"": 0}, M.attention_implementation(torch.device("cuda")))
    net = M.attach_lora(base, LoraSpec(r=16, alpha=32, dropout=0.05, target_modules="auto"),
                        TrainingSpec(fused_moe=not args.stock_moe, offload_checkpoints=not args.gpu_checkpoints,
                                     compile_small_ops=args.compile_small_ops, bf16_residual=args.bf16_residual,
                                     fused_attention=args.fused_attention, flex_attention=args.flex_attention))
    net.train()
    batch = packed_batch(args.rows, args.seq)

    def step():
        with torch.autocast("cuda", dtype=precision.dtype):
            loss = net(**batch).loss
        loss.backward()
        net.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    print(f"layers={args.layers} rows={args.rows} fused_moe={not args.stock_moe}: step "
          f"{1e3 * sorted(times)[2]:.1f} ms (median of 5), peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB",
          flush=True)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.top, max_name_column_width=90)
    print(table, flush=True)
    kinds = kernel_kinds(prof, steps=2)
    total = sum(kinds.values())
    step_ms = 1e3 * sorted(times)[2]
    print(f"kernel time per step: {total:.1f} ms of a {step_ms:.1f} ms step "
          f"(the GPU idle or waiting for {max(0.0, step_ms - total):.1f} ms)")
    for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<12} {ms:8.1f} ms  {100 * ms / total:5.1f}%")


KINDS = (  # first match wins: (kind, substrings of the kernel's name)
    ("attention", ("sdpa", "flash", "fmha", "attention", "flex")),
    ("dequantize", ("dequantize",)),
    ("swiglu", ("_swiglu",)),
    ("matmul", ("nvjet", "gemm", "cutlass", "xmma", "sm90_", "sm80_", "ampere_", "cublas")),
    ("compiled", ("triton_",)),
    ("cast/copy", ("copy",)),
    ("indexing", ("index", "gather", "scatter", "sort", "radix")),
    ("reduction", ("reduce",)),
    ("elementwise", ("elementwise",)),
)


def kernel_kinds(prof, steps: int) -> dict[str, float]:
    """ms of kernel time per step, by kind of kernel (KINDS; the rest is "other")."""
    out: dict[str, float] = {}
    for e in prof.key_averages():
        if str(getattr(e, "device_type", "")).split(".")[-1] != "CUDA":
            continue
        name = e.key.lower()
        kind = next((k for k, parts in KINDS if any(p in name for p in parts)), "other")
        out[kind] = out.get(kind, 0.0) + e.self_device_time_total / 1e3 / steps
    return out


if __name__ == "__main__":
    main()
