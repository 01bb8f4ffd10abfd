"""QLoRA throughput and memory on a Mixtral-8x7B-shaped model: the entrypoint against the
plain recipe, in one command, on the same model, data and GPU.

- model: Mixtral-8x7B's full width (hidden 4096, 8 experts of 14336, top-2, 32 heads,
  8 KV heads, vocab 32000), random bf16 weights, N decoder layers (default 2 and 4), loaded
  in 4-bit NF4 with double quantization; peak memory and step time are fitted as
  a + b * layers and extrapolated to Mixtral's 32 layers;
- data: instruction pairs built from the shipped medical set, lengths drawn to look like
  long medical records (log-normal, capped at max_seq_length);
- ours: `python -m launcher launch --local`, i.e. the real entrypoint (packed rows of
  max_seq_length, per-example positions, no padding);
- plain: transformers + peft + bitsandbytes as the notebooks do it: each batch of 8
  examples padded to its longest, attention mask, no packing; same LoRA targets, paged
  AdamW 8-bit, gradient checkpointing, SDPA.

`--shape mistral-7b` builds a dense Mistral-7B at full width instead (`--no-plain` measures
the entrypoint alone). Both count only real (non-padding) tokens in tokens/s. Needs one CUDA GPU (about 40 GiB
free at the default sizes) and the `[train]` extra.

    python bench/qlora_throughput.py --layers 2 4 8 --steps 20 --repeats 2 --rows 8 4 --out bench/results/h200.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from entrypoint.model import LORA_TARGETS  # noqa: E402  (the same targets as `target_modules: auto`)

WARMUP = 5  # steps left out of every timing
COMMON = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
              max_position_embeddings=32768, rope_theta=1e6, sliding_window=None, tie_word_embeddings=False)
SHAPES = {  # full-width configs of the built-in shapes the bench can build
    "mixtral-8x7b": ("MixtralConfig", "MixtralForCausalLM",
                     dict(COMMON, vocab_size=32000, num_local_experts=8, num_experts_per_tok=2)),
    "mistral-7b": ("MistralConfig", "MistralForCausalLM", dict(COMMON, vocab_size=32768)),
}
SHAPE = "mixtral-8x7b"


def build_model(work: Path, layers: list[int]) -> dict[int, Path]:
    """One checkpoint with max(layers) layers; smaller variants share its weight files and
    differ only in config.json (from_pretrained ignores the unused layers)."""
    import torch
    import transformers

    config_cls, model_cls, kwargs = SHAPES[SHAPE]
    top = max(layers)
    full = work / f"{SHAPE}-L{top}"
    if not (full / "config.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "examples" / "make_tiny_model.py"), str(work / "tok")], check=True)
        cfg = getattr(transformers, config_cls)(num_hidden_layers=top, **kwargs)
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = getattr(transformers, model_cls)(cfg).to(torch.bfloat16)
        model.save_pretrained(full, safe_serialization=True, max_shard_size="5GB")
        del model
        torch.cuda.empty_cache()
        for f in (work / "tok").iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                (full / f.name).write_bytes(f.read_bytes())
    out = {top: full}
    for n in layers:
        if n == top:
            continue
        d = work / f"{SHAPE}-L{n}"
        d.mkdir(exist_ok=True)
        cfg = json.loads((full / "config.json").read_text()) | {"num_hidden_layers": n}
        (d / "config.json").write_text(json.dumps(cfg))
        for f in full.iterdir():
            if f.name != "config.json" and not (d / f.name).exists():
                (d / f.name).symlink_to(f)
        out[n] = d
    return out


def build_data(path: Path, n: int, max_len: int, seed: int = 0) -> None:
    """Medical-record-like lengths: log-normal words, median ~350, long tail to max_len."""
    rows = [json.loads(x) for x in (ROOT / "examples" / "data" / "medical.jsonl").read_text().splitlines()]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        target = min(int(rng.lognormvariate(math.log(350), 0.75)), int(max_len * 0.95))
        q = rng.choice(rows)["question"]
        answer = ""
        while len(answer.split()) * 1.6 < target:
            answer += " " + rng.choice(rows)["answer"]
        out.append({"question": q, "answer": answer.strip()})
    path.write_text("".join(json.dumps(r) + "\n" for r in out))


def run_ours(model_dir: Path, data: Path, seq: int, steps: int, work: Path, rows: int) -> dict:
    cfg = {
        "job_name": f"bench-{model_dir.name.lower()}-s{seq}-b{rows}",
        "model": {"id": str(model_dir)},
        "data": {"train": str(data), "format": "instruction", "columns": {"prompt": "question", "response": "answer"}},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "auto"},
        "training": {"max_steps": steps, "per_device_batch_size": rows, "gradient_accumulation_steps": 1,
                     "max_seq_length": seq, "logging_steps": 1, "save_steps": 100000, "warmup_ratio": 0.0},
        "compute": {"instance_type": "ml.p5e.48xlarge"},
        "output": {"s3_uri": "s3://bench/none"},
        "aws": {"role": "arn:aws:iam::123456789012:role/Bench"},
    }
    cfg_path = work / f"{cfg['job_name']}.json"
    cfg_path.write_text(json.dumps(cfg))
    env = os.environ | {"SM_QLORA_RUNS_DIR": str(work / "runs"),
                        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "launcher", "launch", str(cfg_path), "--local"],
                          capture_output=True, text=True, env=env, check=False)
    lines = proc.stdout.splitlines()
    if proc.returncode != 0:
        raise RuntimeError(f"entrypoint failed ({proc.returncode}):\n" + "\n".join((proc.stdout + proc.stderr).splitlines()[-30:]))
    rates = [float(re.search(r"tokens_per_sec=(\S+)", x).group(1)) for x in lines if x.startswith("[train]")]
    done = next(x for x in lines if x.startswith("[done]"))
    data_line = next(x for x in lines if x.startswith("[data]"))
    steady = rates[WARMUP:] or rates  # the first steps pay for warm-up, clocks and paging
    tps = sorted(steady)[len(steady) // 2]
    fill = float(re.search(r"fill=(\S+)", data_line).group(1))
    return {"tokens_per_sec": tps, "peak_gib": float(re.search(r"peak_gpu_mem_gib=(\S+)", done).group(1)),
            "step_s": rows * seq * fill / tps, "tokens_per_step": rows * seq * fill, "padding_fraction": 1 - fill}


PLAIN = r'''
import json, sys, time, torch
sys.path.insert(0, ROOT)
from transformers import AutoTokenizer, AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorForSeq2Seq
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
import bitsandbytes as bnb
from entrypoint import data as D
from entrypoint.hyperparams import DataSpec
tok = AutoTokenizer.from_pretrained(MODEL)
rows, _ = D.load_rows(DATA)
ex = D.build_examples(rows, DataSpec(train="x", columns={"prompt": "question", "response": "answer"}), tok, SEQ, "d", D.DataReport())
model = AutoModelForCausalLM.from_pretrained(MODEL, quantization_config=BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16),
    dtype=torch.bfloat16, device_map={"": 0}, attn_implementation="sdpa")
model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM"))
opt = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
collator = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)
tok.pad_token = tok.pad_token or tok.eos_token
g = torch.Generator().manual_seed(0)
order = torch.randperm(len(ex), generator=g).tolist()
batches = [[{"input_ids": ex[i].input_ids, "labels": ex[i].labels, "attention_mask": [1] * len(ex[i].input_ids)}
            for i in order[k:k + 8]] for k in range(0, 8 * STEPS, 8)]
model.train(); times = []; real = []; padded = []
for b in batches:
    batch = {k: v.cuda() for k, v in collator(b).items()}
    torch.cuda.synchronize(); t = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**batch, use_cache=False).loss
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize(); times.append(time.perf_counter() - t)
    real.append(int(batch["attention_mask"].sum())); padded.append(batch["input_ids"].numel())
s = slice(WARMUP, None)
print("RESULT " + json.dumps({"tokens_per_sec": sum(real[s]) / sum(times[s]), "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
      "step_s": sum(times[s]) / len(times[s]), "tokens_per_step": sum(real[s]) / len(real[s]),
      "padding_fraction": 1 - sum(real) / sum(padded)}))
'''


def run_plain(model_dir: Path, data: Path, seq: int, steps: int) -> dict:
    code = (PLAIN.replace("ROOT", repr(str(ROOT))).replace("MODEL", repr(str(model_dir)))
            .replace("DATA", repr(str(data))).replace("SEQ", str(seq)).replace("STEPS", str(steps))
            .replace("TARGETS", repr(LORA_TARGETS[SHAPE.split("-")[0]]))
            .replace("WARMUP", str(WARMUP)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    result = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if result is None:
        raise RuntimeError("plain recipe failed:\n" + "\n".join(proc.stderr.splitlines()[-30:]))
    return json.loads(result[len("RESULT "):])


def fit(points: list[tuple[int, float]], at: int) -> float:
    """Least squares a + b * layers over every (layers, value) point, repeats included."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my + slope * (at - mx)


def summarize(runs: list[dict], recipe: str) -> dict:
    mine = [r for r in runs if r["recipe"] == recipe]
    peak = [(r["layers"], r["peak_gib"]) for r in mine]
    step = [(r["layers"], r["step_s"]) for r in mine]
    tokens = sum(r["tokens_per_step"] for r in mine) / len(mine)
    return {"peak_gib_32_layers": fit(peak, 32), "tokens_per_sec_32_layers": tokens / fit(step, 32),
            "peak_gib_per_layer": fit(peak, 1) - fit(peak, 0), "step_s_per_layer": fit(step, 1) - fit(step, 0),
            "tokens_per_step": tokens, "points": len(mine), "max_fit_error": max(
                abs(y - fit(step, x)) / y for x, y in step)}


def ratio_spread(runs: list[dict], recipe: str, base: str) -> dict:
    """The 32-layer tokens/s ratio fitted on each repeat alone: median, min, max."""
    ratios = []
    for rep in sorted({r["repeat"] for r in runs}):
        these = [r for r in runs if r["repeat"] == rep]
        if len({r["layers"] for r in these if r["recipe"] == recipe}) > 1 and \
                len({r["layers"] for r in these if r["recipe"] == base}) > 1:
            ratios.append(summarize(these, recipe)["tokens_per_sec_32_layers"]
                          / summarize(these, base)["tokens_per_sec_32_layers"])
    ratios.sort()
    return {"median": statistics.median(ratios) if ratios else None, "min": min(ratios, default=None),
            "max": max(ratios, default=None), "per_repeat": ratios}


def versions() -> dict:
    from importlib.metadata import version

    import torch

    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(0)}
    for pkg in ("transformers", "peft", "bitsandbytes", "accelerate"):
        out[pkg] = version(pkg)
    return out


def main() -> None:
    global SHAPE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default=SHAPE)
    ap.add_argument("--no-plain", action="store_true", help="measure the entrypoint only")
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 4],
                    help="ours: packed rows of --seq tokens per micro-batch (per_device_batch_size)")
    ap.add_argument("--examples", type=int, default=1200)
    ap.add_argument("--repeats", type=int, default=2, help="every (layers, recipe) point this many times, interleaved")
    ap.add_argument("--merge", type=Path, default=None, help="add the runs of an earlier --out file (another repeat)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/sm-qlora-bench"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    SHAPE = args.shape
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    models = build_model(args.work, args.layers)
    data = args.work / "medical-long.jsonl"
    build_data(data, args.examples, args.seq)
    results = {"versions": versions(), "shape": SHAPE, "seq": args.seq, "steps": args.steps, "runs": []}
    print(f"model built in {time.time() - t0:.0f}s; {results['versions']}", flush=True)
    first = 0
    if args.merge and args.merge.is_file():
        earlier = json.loads(args.merge.read_text())
        results["runs"] = earlier["runs"]
        results["merged_from"] = earlier.get("versions")
        first = 1 + max(r.get("repeat", 0) for r in earlier["runs"])
    recipes = [f"ours-b{b}" for b in args.rows] + ([] if args.no_plain else ["plain"])
    for rep in range(first, first + args.repeats):
        for n in sorted(models):
            for name in recipes:
                t = time.time()
                r = (run_ours(models[n], data, args.seq, args.steps, args.work, int(name.split("-b")[1]))
                     if name.startswith("ours") else run_plain(models[n], data, args.seq, args.steps))
                r |= {"recipe": name, "layers": n, "repeat": rep}
                results["runs"].append(r)
                print(f"#{rep} {name:8s} L={n}: {r['tokens_per_sec']:8.0f} tok/s  peak {r['peak_gib']:6.2f} GiB  "
                      f"step {r['step_s']:.3f}s  padding {100 * r['padding_fraction']:.0f}%  ({time.time() - t:.0f}s)",
                      flush=True)
            if args.out:  # a run cut short by a time limit keeps what it measured
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=2))
    report(results, recipes, args.out)


def report(results: dict, recipes: list[str], out: Path | None) -> None:
    runs = results["runs"]
    if len({r["layers"] for r in runs}) < 2:  # a line needs two depths: the points above are the result
        print("one depth measured: no fit, no 32-layer extrapolation", flush=True)
        return
    recipes = [x for x in recipes if any(r["recipe"] == x for r in runs)]
    summary = {name: summarize(runs, name) for name in recipes}
    base_name = "plain" if "plain" in summary else recipes[0]
    for name in recipes:
        summary[name]["ratio_vs_" + base_name] = ratio_spread(runs, name, base_name)
    results["summary"] = summary
    base = summary[base_name]
    layers = sorted({r["layers"] for r in runs})
    print(f"\n{results['shape']}-shaped, 4-bit NF4, max_seq_length {results['seq']}, least-squares fit on {layers} "
          f"layers ({len(runs)} runs), extrapolated to 32:")
    print(f"{'recipe':10s}{'tok/step':>10s}{'tok/s':>9s}{'x base':>9s}{'x base (median [min, max] of repeats)':>40s}"
          f"{'peak GiB':>10s}{'GiB/layer':>11s}{'s/layer':>9s}{'fit err':>9s}")
    for name in recipes:
        o = summary[name]
        sp = o["ratio_vs_" + base_name]
        spread = f"{sp['median']:.2f} [{sp['min']:.2f}, {sp['max']:.2f}]" if sp["median"] else "-"
        print(f"{name:10s}{o['tokens_per_step']:10.0f}{o['tokens_per_sec_32_layers']:9.0f}"
              f"{o['tokens_per_sec_32_layers'] / base['tokens_per_sec_32_layers']:9.2f}{spread:>40s}"
              f"{o['peak_gib_32_layers']:10.1f}{o['peak_gib_per_layer']:11.3f}{o['step_s_per_layer']:9.3f}"
              f"{100 * o['max_fit_error']:8.1f}%")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
