"""A training step's peak of live tensor bytes on this machine's CPU, counted at the dispatcher:
every tensor an op returns is counted from its birth to the death of the last tensor on its
storage. No GPU needed, no allocator in the way (an RSS high-water mark mostly shows what glibc
keeps): for comparing what two code paths hold at once, e.g. transformers 4 against 5.

The model: a Mixtral of hidden 512, 8 experts of 1792, top-2, 2 layers, random bf16 weights,
loaded in 4-bit NF4 by the job's own loader (entrypoint.model.load_4bit), LoRA r16 on `auto`
targets with the given dropout, gradient checkpointing, bf16 autocast, 8 rows of 1024 tokens.
The checkpoint is written once by whatever transformers runs the first call; write it with
transformers 4 (the hub's per-expert layout, as Mixtral's real checkpoint), then run each stack:

    .venv/bin/python bench/step_peak_cpu.py /tmp/mid --dropout 0.05
    .venv-tf5/bin/python bench/step_peak_cpu.py /tmp/mid --dropout 0.05
"""

from __future__ import annotations

import argparse
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from entrypoint import model as M  # noqa: E402
from entrypoint.hyperparams import LoraSpec, TrainingSpec  # noqa: E402


class LiveBytes(TorchDispatchMode):
    """Bytes of CPU storages alive, by the ops that made them; `peak` and the op that reached it."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, tensors on it]
        self.now = self.peak = 0
        self.peak_op = ""

    def _drop(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            del self.live[key]
            self.now -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or not t.untyped_storage().data_ptr():
                continue
            key = t.untyped_storage().data_ptr()
            if key in self.live:
                self.live[key][1] += 1
            else:
                self.live[key] = [t.untyped_storage().nbytes(), 1]
                self.now += self.live[key][0]
                if self.now > self.peak:
                    self.peak, self.peak_op = self.now, str(func)
            weakref.finalize(t, self._drop, key)
        return out


def build(path: Path) -> None:
    import transformers

    config = transformers.MixtralConfig(vocab_size=2048, hidden_size=512, intermediate_size=1792, num_hidden_layers=2,
                                        num_attention_heads=8, num_key_value_heads=2, num_local_experts=8,
                                        num_experts_per_tok=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(config).to(torch.bfloat16).save_pretrained(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--dropout", type=float, default=0.05)
    args = ap.parse_args()
    if not (args.model / "config.json").is_file():
        build(args.model)
    base = M.load_4bit(str(args.model), M.Precision(torch.bfloat16, "bf16", "bench"), {"": "cpu"}, "sdpa")
    net = M.attach_lora(base, LoraSpec(r=16, alpha=32, dropout=args.dropout, target_modules="auto"),
                        TrainingSpec(offload_checkpoints=False))
    net.train()
    ids = torch.randint(0, 2048, (8, 1024), generator=torch.Generator().manual_seed(0))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            net(input_ids=ids, labels=ids).loss.backward()
        net.zero_grad(set_to_none=True)

    step()  # first-step allocations (optimizer-free here, but lazy buffers) out of the count
    counter = LiveBytes()
    with counter:
        step()
    import transformers

    print(f"transformers {transformers.__version__}, dropout {args.dropout}: step peak {counter.peak / 2**20:.1f} MiB "
          f"of live tensors (reached at {counter.peak_op}), {counter.now / 2**20:.1f} MiB left after the step")


if __name__ == "__main__":
    main()
