"""Peak GPU memory and step time of the entrypoint's model at full depth (e.g. all 32 layers of a
Mixtral-8x7B shape), with no checkpoint on disk: random bf16 weights are built on the GPU and
quantized in memory by transformers' own bitsandbytes loading, with entrypoint.model's
quantization config (tests/entrypoint/test_model.py checks that this gives the same model as
loading from disk). Then the job's recipe: LoRA r16 on `target_modules: auto` with the fused
MoE pass (`--stock-moe` for the transformers path), gradient checkpointing with the layer inputs
offloaded to host memory (`--gpu-checkpoints` also measures them kept on the GPU), bf16 autocast,
8-bit AdamW with gradient clipping, packed rows with per-example positions. One step's LoRA
gradients are compared, offloaded against GPU-held checkpoints, on the same weights and data.

An H200 holds the 93 GB of bf16 Mixtral-8x7B while it is quantized (about 23 GB after).
Compare with qlora_throughput.py at the layer counts both can run to check that the two agree.

    python bench/deep_memory.py --layers 32 --rows 8 4 --steps 6 --gpu-checkpoints --out results.json
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
sys.path.insert(0, str(ROOT / "bench"))

from entrypoint import model as M  # noqa: E402
from entrypoint.hyperparams import LoraSpec, TrainingSpec  # noqa: E402
from entrypoint.offload import checkpointed_layers  # noqa: E402


def quantized_in_memory(config, state_dict: dict, precision: M.Precision, device_map, attn: str):
    """The model load_4bit would give from a checkpoint holding state_dict."""
    import transformers

    cls = getattr(transformers, config.architectures[0])
    return cls.from_pretrained(None, config=config, state_dict=state_dict, quantization_config=M.quantization(
        config, precision), dtype=precision.dtype, device_map=device_map, attn_implementation=attn)


def random_model(shape: str, layers: int, precision: M.Precision):
    """Random bf16 weights of the bench shape, built on the GPU and quantized there."""
    import qlora_throughput as Q
    import transformers

    config_cls, model_cls, kwargs = Q.SHAPES[shape]
    config = getattr(transformers, config_cls)(num_hidden_layers=layers, architectures=[model_cls], **kwargs)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: 188 GB in fp32 would not fit
    try:
        with torch.device("cuda"):
            full = getattr(transformers, model_cls)(config)
    finally:
        torch.set_default_dtype(torch.float32)
    state = full.state_dict()
    del full
    model = quantized_in_memory(config, state, precision, {"": 0}, M.attention_implementation(torch.device("cuda")))
    del state
    torch.cuda.empty_cache()
    return model


def lora_model(model, fused: bool):
    """The job's LoRA on `model`, with GPU-held checkpoints; `checkpoints(net, offload)` switches."""
    net = M.attach_lora(model, LoraSpec(r=16, alpha=32, dropout=0.05, target_modules="auto"),
                        TrainingSpec(fused_moe=fused, offload_checkpoints=False))
    g = torch.Generator().manual_seed(1)
    for n, p in net.named_parameters():
        if "lora_B" in n:  # non-zero B, so every LoRA gradient is exercised from step 0
            p.data = (torch.randn(p.shape, generator=g) * 0.01).to(p)
    net._gpu_checkpoints = {m: m._gradient_checkpointing_func for m in checkpointed_layers(net)}
    net.train()
    return net


def checkpoints(net, offload: bool) -> None:
    from entrypoint.offload import use_offloaded_checkpoints

    if offload:
        assert use_offloaded_checkpoints(net) == len(net._gpu_checkpoints)
    else:
        for m, f in net._gpu_checkpoints.items():
            m._gradient_checkpointing_func = f


def gradients(net, batch) -> torch.Tensor:
    torch.manual_seed(3)  # the same LoRA dropout masks in both runs
    with torch.autocast("cuda", dtype=torch.bfloat16):
        net(**batch).loss.backward()
    g = torch.cat([p.grad.flatten().float() for p in net.parameters() if p.requires_grad and p.grad is not None])
    net.zero_grad(set_to_none=True)
    return g


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    return {"max_abs_diff": (a - b).abs().max().item(), "bitwise_equal": bool(torch.equal(a, b)),
            "cosine": torch.nn.functional.cosine_similarity(a, b, dim=0).item()}


def same_gradients(net, rows: int, seq: int) -> dict:
    """Offloaded against GPU-held checkpoints on the same weights, data and dropout masks:
    - inputs_equal: each layer input the recomputation read back from host memory against
      a GPU copy of the forward's (the property the offload must keep, bit for bit);
    - offload_vs_gpu: one step's LoRA gradients, next to gpu_vs_gpu, the same GPU-held step
      twice: the run-to-run noise of the GPU's non-deterministic kernels (atomic adds in
      backward, as the MoE scatter), which random routing over many layers amplifies."""
    from profile_step import packed_batch

    from entrypoint import offload

    batch = packed_batch(rows, seq)
    kept, equal = {}, []
    init, take = offload._HostCopy.__init__, offload._HostCopy.take

    def keep(box, x, *rest):
        init(box, x, *rest)
        kept[id(box)] = x.detach().clone()

    def check(box):
        recompute = box.live is None
        x = take(box)
        if recompute:
            equal.append(bool(torch.equal(x, kept.pop(id(box)))))
        return x

    offload._HostCopy.__init__, offload._HostCopy.take = keep, check
    try:
        checkpoints(net, True)
        host = gradients(net, batch)
    finally:
        offload._HostCopy.__init__, offload._HostCopy.take = init, take
    checkpoints(net, False)
    gpu, again = gradients(net, batch), gradients(net, batch)
    return {"rows": rows, "inputs_read_back": len(equal), "inputs_equal": sum(equal),
            "offload_vs_gpu": compare(host, gpu), "gpu_vs_gpu": compare(again, gpu)}


def timed_step(net, params, opt, batch: dict) -> float:
    """One optimizer step as the job takes it (bf16 autocast, clipping), in seconds, synced."""
    t = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = net(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def measure(net, rows: int, seq: int, steps: int, offload: bool) -> dict:
    import bitsandbytes as bnb
    from profile_step import packed_batch

    checkpoints(net, offload)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = bnb.optim.AdamW8bit(params, lr=2e-4)
    batch = packed_batch(rows, seq)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = [timed_step(net, params, opt, batch) for _ in range(steps)]
    steady = sorted(times[1:] or times)
    peak = torch.cuda.max_memory_allocated() / 2**30
    del opt
    torch.cuda.empty_cache()
    return {"rows": rows, "tokens": rows * seq, "offload_checkpoints": offload, "peak_gib": peak,
            "step_s": steady[len(steady) // 2], "all_step_s": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="mixtral-8x7b")
    ap.add_argument("--layers", type=int, nargs="+", default=[32])
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--stock-moe", action="store_true")
    ap.add_argument("--gpu-checkpoints", action="store_true",
                    help="also measure each batch with checkpointed layer inputs kept on the GPU")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    precision = M.choose_precision(torch.device("cuda"))
    out = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "shape": args.shape,
           "fused_moe": not args.stock_moe, "runs": [], "gradients": []}
    for layers in args.layers:
        t = time.time()
        net = lora_model(random_model(args.shape, layers, precision), not args.stock_moe)
        built = time.time() - t
        print(f"layers={layers}: built and quantized in {built:.0f} s", flush=True)
        check = same_gradients(net, min(args.rows), args.seq) | {"layers": layers}
        out["gradients"].append(check)
        print(f"layers={layers}: offloaded vs GPU checkpoints: {check}", flush=True)
        for rows in args.rows:
            for offload in (True, False) if args.gpu_checkpoints else (True,):
                r = measure(net, rows, args.seq, args.steps, offload) | {"layers": layers, "build_s": built}
                out["runs"].append(r)
                print(f"layers={layers} rows={rows} offload={offload}: peak {r['peak_gib']:.2f} GiB, "
                      f"step {r['step_s']:.3f} s ({r['tokens'] / r['step_s']:.0f} tok/s)", flush=True)
                if args.out:
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(out, indent=2))
        del net
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
