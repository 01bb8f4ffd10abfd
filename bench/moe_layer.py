"""One Mixtral-8x7B MoE layer (4-bit NF4 experts + PEFT LoRA r16 on w1/w2/w3): the stock
transformers 4.56 forward against entrypoint.moe, forward + backward, same weights and
inputs; the 20-step numerics check on a small Mixtral in bf16; and how long the SIGTERM
checkpoint (entrypoint.checkpoints.save: adapter + optimizer state) takes.

    python bench/moe_layer.py --tokens 8192 16384 --out bench/results/moe.json
    python bench/moe_layer.py --skip-layer --skip-numerics --ckpt /tmp/sm-qlora-bench/mixtral-8x7b-L2 ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from entrypoint import checkpoints, kernels  # noqa: E402
from entrypoint import model as M  # noqa: E402
from entrypoint.hyperparams import LoraSpec, TrainingSpec  # noqa: E402
from entrypoint.moe import use_fused_moe  # noqa: E402

FULL = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
            vocab_size=32000, num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False)
PROFILE = False
SMALL = dict(FULL, hidden_size=1024, intermediate_size=3584, num_attention_heads=8, num_key_value_heads=2)


def make(work: Path, layers: int, shape: dict, name: str) -> Path:
    import transformers

    out = work / name
    if not (out / "config.json").is_file():
        torch.manual_seed(0)
        with torch.device("cuda"):
            m = transformers.MixtralForCausalLM(transformers.MixtralConfig(num_hidden_layers=layers, **shape))
        m.to(torch.bfloat16).save_pretrained(out)
        del m
        torch.cuda.empty_cache()
    return out


def lora_model(path: Path, checkpointing: bool, dropout: float = 0.0):
    p = M.choose_precision(torch.device("cuda"))
    base = M.load_4bit(str(path), p, {"": 0}, "sdpa")
    M.check_quantized(base)
    net = M.attach_lora(base, LoraSpec(r=16, alpha=32, dropout=dropout, target_modules="auto"),
                        TrainingSpec(gradient_checkpointing=checkpointing, fused_moe=False, offload_checkpoints=False))
    g = torch.Generator().manual_seed(1)
    for n, prm in net.named_parameters():
        if "lora_B" in n:  # non-zero B, so every LoRA gradient is exercised from step 0
            prm.data = (torch.randn(prm.shape, generator=g) * 0.01).to(prm)
    return net


def set_fast(net, fast: bool) -> None:
    if fast:
        use_fused_moe(net)
        return
    for m in net.modules():
        if "forward" in vars(m) and hasattr(m, "_stock_forward"):
            del m.forward  # back to the class's (stock) forward
            del m._stock_forward


def timed(fn, repeats=5, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], times


def layer_bench(work: Path, tokens: list[int], dropout: float = 0.0) -> list[dict]:
    net = lora_model(make(work, 1, FULL, "moe-L1"), checkpointing=False, dropout=dropout)
    net.train()
    block = net.base_model.model.model.layers[0].block_sparse_moe
    params = [p for p in block.parameters() if p.requires_grad]
    rows = []
    for n in tokens:
        torch.manual_seed(2)
        x = torch.randn(1, n, 4096, device="cuda", requires_grad=True)
        gy = torch.randn(1, n, 4096, device="cuda")
        got = {}
        for fast in (False, True):
            set_fast(net, fast)

            def step(x=x, gy=gy, block=block):
                x.grad = None
                for p in params:
                    p.grad = None
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y = block(x)[0]
                y.backward(gy)
                return y

            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            med, times = timed(step)
            peak = (torch.cuda.max_memory_allocated() - before) / 2**30
            if fast and PROFILE:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    step()
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25,
                                                max_name_column_width=80), flush=True)
            y = step().detach().float()
            grads = torch.cat([x.grad.flatten()] + [p.grad.flatten() for p in params]).float()
            got[fast] = (y, grads)
            rows.append({"tokens": n, "path": "fused" if fast else "stock", "dropout": dropout, "fwd_bwd_ms": 1e3 * med,
                         "all_ms": [1e3 * t for t in times], "peak_extra_gib": peak})
            print(f"layer tokens={n} dropout={dropout} {rows[-1]['path']:5s} fwd+bwd {1e3 * med:7.1f} ms  peak +{peak:.2f} GiB", flush=True)
        cos = torch.nn.functional.cosine_similarity
        rows[-1]["out_cos"] = cos(got[False][0].flatten(), got[True][0].flatten(), dim=0).item()
        rows[-1]["grad_cos"] = cos(got[False][1], got[True][1], dim=0).item()
        print(f"  fused: speed-up {rows[-2]['fwd_bwd_ms'] / rows[-1]['fwd_bwd_ms']:.2f}x  output cos "
              f"{rows[-1]['out_cos']:.5f}  grad cos {rows[-1]['grad_cos']:.5f}", flush=True)
    del net
    torch.cuda.empty_cache()
    return rows


def kernel_check() -> dict:
    """entrypoint.kernels' Triton SwiGLU against its torch arithmetic, bf16 on this GPU."""
    torch.manual_seed(4)
    n, f = 3000, 14336
    a13 = torch.randn(n, 2 * f, device="cuda").bfloat16()
    dh = torch.randn(n, f, device="cuda").bfloat16()
    r = 16  # LoRA terms as their factors, as entrypoint.moe passes them
    l1, l3 = ((torch.randn(n, r, device="cuda").bfloat16() * 0.3, torch.randn(f, r, device="cuda").bfloat16() * 0.1)
              for _ in range(2))
    dl = (torch.randn(n, r, device="cuda").bfloat16() * 0.3, torch.randn(r, f, device="cuda").bfloat16() * 0.1)
    got = {}
    for triton in (kernels.triton, None):
        saved, kernels.triton = kernels.triton, triton
        h, _ = kernels.swiglu_forward(a13, l1, l3)
        d13, h2 = kernels.swiglu_backward(dh, dl, a13, l1, l3)
        got[triton is None] = [h, d13, h2]
        kernels.triton = saved
    out = {}
    for name, a, b in zip(("h", "d13", "h_bwd"), got[False], got[True], strict=True):
        out[name] = {"max_abs": (a.float() - b.float()).abs().max().item(), "mismatch": (a != b).float().mean().item()}
    print(f"kernel vs torch (bf16, {n}x{f}): {out}", flush=True)
    return out


def numerics(work: Path, steps: int, pair=(False, True), sync: bool = False) -> dict:
    """Same weights, data and LoRA init, bf16 autocast, checkpointing on; pair = (fast?, fast?).
    sync: after each step the second model takes the first one's LoRA weights, so every
    step compares gradients at identical weights (Adam turns tiny bf16 differences on
    near-zero gradients into diverging trajectories otherwise)."""
    path = make(work, 2, SMALL, "small-L2")
    nets = []
    for fast in pair:
        torch.manual_seed(0)
        net = lora_model(path, checkpointing=True)
        set_fast(net, fast)
        net.train()
        nets.append((net, torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)))
    g = torch.Generator().manual_seed(3)
    losses, cosines = [], []
    for _ in range(steps):
        ids = torch.randint(0, 32000, (2, 1024), generator=g).cuda()
        out = []
        for net, opt in nets:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = net(input_ids=ids, labels=ids).loss
            loss.backward()
            out.append((loss.item(), torch.cat([p.grad.flatten().float() for p in net.parameters() if p.requires_grad])))
            opt.step()
            opt.zero_grad(set_to_none=True)
        if sync:
            with torch.no_grad():
                for a, b in zip([p for p in nets[0][0].parameters() if p.requires_grad],
                                [p for p in nets[1][0].parameters() if p.requires_grad], strict=True):
                    b.copy_(a)
        losses.append([out[0][0], out[1][0]])
        cosines.append(torch.nn.functional.cosine_similarity(out[0][1], out[1][1], dim=0).item())
    worst = max(abs(a - b) / abs(a) for a, b in losses)
    print(f"numerics {pair} sync={sync} {steps} steps: max loss rel diff {worst:.2e}, min grad cos {min(cosines):.5f}"
          f" {[round(c, 4) for c in cosines]}", flush=True)
    del nets
    torch.cuda.empty_cache()
    return {"pair": pair, "sync": sync, "losses": losses, "grad_cos": cosines, "max_loss_rel_diff": worst,
            "min_grad_cos": min(cosines)}


def checkpoint_time(model_dirs: list[Path], work: Path) -> list[dict]:
    import bitsandbytes as bnb

    rows = []
    for path in model_dirs:
        net = lora_model(path, checkpointing=True, dropout=0.05)
        use_fused_moe(net)
        opt = bnb.optim.AdamW8bit([p for p in net.parameters() if p.requires_grad], lr=1e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        ids = torch.randint(0, 32000, (1, 512)).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            net(input_ids=ids, labels=ids).loss.backward()
        opt.step()  # so the optimizer state exists, as in a real SIGTERM
        times = []
        for i in range(3):
            torch.cuda.synchronize()
            t = time.perf_counter()
            saved = checkpoints.save(work / "ckpt", 10 + i, net, opt, sched, None, checkpoints.rng_state(), {}, keep=1)
            times.append(time.perf_counter() - t)
        size = sum(f.stat().st_size for f in saved.iterdir()) / 2**20
        layers = net.config.num_hidden_layers
        rows.append({"layers": layers, "save_s": sorted(times)[1], "all_s": times, "mib": size})
        print(f"checkpoint L={layers}: {sorted(times)[1]:.2f} s (runs {[round(t, 2) for t in times]}), {size:.0f} MiB",
              flush=True)
        del net, opt
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dropout", type=float, nargs="+", default=[0.0],
                    help="LoRA dropout of the layer timing (numerics compare at 0: masks differ)")
    ap.add_argument("--skip-layer", action="store_true")
    ap.add_argument("--drift", action="store_true", help="unsynced runs: stock vs stock, stock vs fast")
    ap.add_argument("--skip-numerics", action="store_true")
    ap.add_argument("--ckpt", type=Path, nargs="*", default=[], help="model dirs to time the checkpoint on")
    ap.add_argument("--work", type=Path, default=Path("/tmp/sm-qlora-moe"))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--profile", action="store_true", help="print the fused pass's top CUDA kernels")
    args = ap.parse_args()
    global PROFILE
    PROFILE = args.profile
    args.work.mkdir(parents=True, exist_ok=True)
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    result["kernel"] = kernel_check()
    if not args.skip_layer:
        result["layer"] = [r for d in args.dropout for r in layer_bench(args.work, args.tokens, d)]
    if not args.skip_numerics:
        result["numerics"] = [numerics(args.work, args.steps, (False, True), sync=True)]
        if args.drift:
            result["numerics"] += [numerics(args.work, args.steps, (False, False)),  # stock against itself
                                   numerics(args.work, args.steps, (False, True))]
    if args.ckpt:
        result["checkpoint"] = checkpoint_time(args.ckpt, args.work)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
