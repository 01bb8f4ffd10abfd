"""The table of bench/tf5_vs_tf4.sh: transformers 5 against 4 from DIR/tf4.json and DIR/tf5.json.

Per depth: each stack's step time and peak memory (median over the rounds, and every round), the
ratio tf5/tf4 of each round, and memory per layer as (peak at 4 layers - peak at 2) / 2.

    python bench/tf5_table.py bench/h100-2026-12-06-tf5
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def load(path: Path) -> tuple[dict, dict[int, list[dict]]]:
    """The versions line and the runs by depth, in round order."""
    results = json.loads(path.read_text())
    by_layers: dict[int, list[dict]] = {}
    for run in sorted(results["runs"], key=lambda r: r["repeat"]):
        by_layers.setdefault(run["layers"], []).append(run)
    return results["versions"], by_layers


def main(folder: Path) -> None:
    stacks = {v: load(folder / f"{v}.json") for v in ("tf4", "tf5") if (folder / f"{v}.json").is_file()}
    for v, (ver, _) in stacks.items():
        print(f"{v}: transformers {ver['transformers']}, peft {ver['peft']}, accelerate {ver['accelerate']}, "
              f"bitsandbytes {ver['bitsandbytes']}, torch {ver['torch']}, {ver['gpu']}")
    print(f"{'stack':6s}{'layers':>7s}{'s/step (median)':>17s}{'tok/s':>8s}{'peak GiB':>10s}  every round (s/step)")
    for v, (_, by_layers) in stacks.items():
        for n, runs in sorted(by_layers.items()):
            step = statistics.median(r["step_s"] for r in runs)
            tps = statistics.median(r["tokens_per_sec"] for r in runs)
            peak = max(r["peak_gib"] for r in runs)
            every = " ".join(f"{r['step_s']:.3f}" for r in runs)
            print(f"{v:6s}{n:7d}{step:17.3f}{tps:8.0f}{peak:10.2f}  {every}")
    if len(stacks) < 2:
        return
    four, five = stacks["tf4"][1], stacks["tf5"][1]
    for n in sorted(set(four) & set(five)):
        ratios = [b["step_s"] / a["step_s"] for a, b in zip(four[n], five[n], strict=False)]
        peak = max(r["peak_gib"] for r in five[n]) / max(r["peak_gib"] for r in four[n])
        print(f"{n} layers: tf5/tf4 step time per round {' '.join(f'{x:.3f}' for x in ratios)} "
              f"(median {statistics.median(ratios):.3f}; below 1 is tf5 faster), peak memory {peak:.3f}")
    if {2, 4} <= set(four) & set(five):
        per_layer = {v: (max(r["peak_gib"] for r in by[4]) - max(r["peak_gib"] for r in by[2])) / 2
                     for v, (_, by) in stacks.items()}
        print(f"memory per layer: tf4 {per_layer['tf4']:.3f} GiB, tf5 {per_layer['tf5']:.3f} GiB, "
              f"tf5/tf4 {per_layer['tf5'] / per_layer['tf4']:.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
