"""Where a QLoRA step's time goes on a Mixtral-shaped layer stack: forward+backward time
per micro-batch for the same model under different batch layouts, in one process.

    python bench/micro_batch_cost.py MODEL_DIR   (e.g. one bench/qlora_throughput.py built)

Layouts: packed rows (position ids restart per example, no mask), plain causal rows
(no mask at all), and padded batches with an attention mask, at several token counts.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from entrypoint import model as M  # noqa: E402
from entrypoint.hyperparams import LoraSpec, TrainingSpec  # noqa: E402


def layouts(seq: int, vocab: int):
    g = torch.Generator().manual_seed(0)

    def ids(b, n):
        return torch.randint(3, vocab, (b, n), generator=g)

    def packed(rows, lengths):
        pos = torch.cat([torch.arange(n) for n in lengths]).repeat(rows, 1)
        x = ids(rows, pos.shape[1])
        return {"input_ids": x, "labels": x.clone(), "position_ids": pos}

    def padded(lengths):
        width = max(lengths)
        x = ids(len(lengths), width)
        mask = torch.zeros_like(x)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        labels = x.masked_fill(mask == 0, -100)
        return {"input_ids": x, "labels": labels, "attention_mask": mask}

    example = [300, 500, 248, 700, 300]  # sums to 2048
    yield "packed 1x2048 (5 examples)", packed(1, example), 2048
    yield "causal 1x2048 (no mask)", {"input_ids": (x := ids(1, seq)), "labels": x.clone()}, 2048
    yield "packed 4x2048 (20 examples)", packed(4, example), 8192
    yield "causal 4x2048 (no mask)", {"input_ids": (x := ids(4, seq)), "labels": x.clone()}, 8192
    lens = [2000, 900, 600, 450, 1300, 700, 1500, 400]
    yield "padded 8 (to longest, mask)", padded(lens), sum(lens)


def main() -> None:
    src = sys.argv[1]
    prec = M.choose_precision(torch.device("cuda"))
    net = M.attach_lora(M.load_4bit(src, prec, {"": 0}, "sdpa"), LoraSpec(r=16, target_modules="auto"),
                        TrainingSpec(fused_moe=False, offload_checkpoints=False))  # the path these numbers used
    net.train()
    vocab = net.config.vocab_size
    for name, batch, real in layouts(2048, vocab):
        batch = {k: v.cuda() for k, v in batch.items()}
        times = []
        for i in range(6):
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = net(**batch, use_cache=False).loss
            loss.backward()
            torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - t)
        net.zero_grad(set_to_none=True)
        s = sorted(times)[len(times) // 2]
        print(f"{name:30s} {s * 1000:8.1f} ms  {real / s:9.0f} real tok/s  layers={net.config.num_hidden_layers}",
              flush=True)


if __name__ == "__main__":
    main()
