"""Peak memory of `validate` and `plan` against the size of a local JSONL file: a generated
file of SIZE MB (the baseline) and of 10x SIZE MB, each command in a fresh process, peak RSS
read from the kernel (wait4). Memory flat in the file's size gives a ratio near 1.0.

    python bench/data_memory.py --mb 15 [--tokenizer examples/tiny-mixtral] [--out result.json]

The files go to a temporary directory and are removed. CPU only; no network.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
WORDS = "patient fever dose symptom treatment doctor blood pressure heart lung kidney liver pain chronic".split()


def write_jsonl(path: Path, mb: float) -> int:
    rng = random.Random(0)
    rows = 0
    with path.open("w") as f:
        while f.tell() < mb * 2**20:
            q, a = (" ".join(rng.choices(WORDS, k=rng.randint(lo, hi))) for lo, hi in ((8, 40), (20, 120)))
            f.write(json.dumps({"question": q + "?", "answer": a + "."}) + "\n")
            rows += 1
    return rows


def peak_rss_mb(argv: list[str]) -> tuple[float, float, int]:
    """(peak RSS in MB, seconds, exit code) of one fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=os.environ | {"HF_HUB_OFFLINE": "1"})
    _, status, usage = os.wait4(proc.pid, 0)
    return usage.ru_maxrss / 1024, time.perf_counter() - start, os.waitstatus_to_exitcode(status)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=15.0)
    ap.add_argument("--tokenizer", default=None, help="a local model directory: plan counts with its tokenizer")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for scale in (1, 10):
            data = Path(tmp) / f"d{scale}.jsonl"
            rows = write_jsonl(data, args.mb * scale)
            raw = yaml.safe_load((ROOT / "examples" / "job.yaml").read_text())
            raw["data"] = {"train": str(data), "columns": {"prompt": "question", "response": "answer"}}
            if args.tokenizer:
                raw["model"]["id"] = str(Path(args.tokenizer).resolve())
            config = Path(tmp) / "job.yaml"
            config.write_text(yaml.safe_dump(raw))
            cli = [sys.executable, "-m", "launcher"]
            for verb in (["validate", str(config)], ["validate", str(config), "--set", "compute.max_cost_usd=1e6"],
                         ["plan", str(config), "--output", "json"]):
                rss, seconds, code = peak_rss_mb(cli + verb)
                results.append({"mb": args.mb * scale, "rows": rows, "command": " ".join(verb[:1] + verb[2:]),
                                "peak_rss_mb": round(rss, 1), "seconds": round(seconds, 2), "exit": code})
                print(json.dumps(results[-1]), flush=True)
    for r1 in results[:3]:
        r10 = next(r for r in results[3:] if r["command"] == r1["command"])
        print(f"{r1['command'] or 'validate':45s} peak RSS x10 file / x1 file = {r10['peak_rss_mb'] / r1['peak_rss_mb']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
