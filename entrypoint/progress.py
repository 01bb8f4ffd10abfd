"""The progress lines of the SPEC: written by the job, read back by `sm-qlora logs`,
by SageMaker's metric_definitions and by a person reading CloudWatch. One line per
event, no carriage returns, `key=value` pairs after a `[kind]` tag:

    [train] step=120/3000 epoch=0.04 loss=1.2345 lr=1.98e-04 grad_norm=0.53 tokens_per_sec=5120 eta=2:31:04
    [eval] step=200/3000 eval_loss=1.1034
    [checkpoint] step=200 path=/opt/ml/checkpoints/step-200
    [done] steps=3000 train_loss=0.9811 runtime_s=9120 adapter=/opt/ml/model

No torch here: the launcher imports this module.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field

LINE_RE = re.compile(r"^\[(?P<kind>[a-z_]+)\] (?P<body>.*)$")
PAIR_RE = re.compile(r"(\w+)=(\S+)")

# SageMaker metric definitions: the regexes read the same lines (Regex must capture one group).
METRIC_DEFINITIONS = [
    {"Name": "train:loss", "Regex": r"\[train\] .*?loss=([0-9.eE+-]+)"},
    {"Name": "train:learning_rate", "Regex": r"\[train\] .*? lr=([0-9.eE+-]+)"},
    {"Name": "train:grad_norm", "Regex": r"\[train\] .*?grad_norm=([0-9.eE+-]+)"},
    {"Name": "train:tokens_per_sec", "Regex": r"\[train\] .*?tokens_per_sec=([0-9.eE+-]+)"},
    {"Name": "train:epoch", "Regex": r"\[train\] .*?epoch=([0-9.eE+-]+)"},
    {"Name": "eval:loss", "Regex": r"\[eval\] .*?eval_loss=([0-9.eE+-]+)"},
]


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def emit(kind: str, **pairs: object) -> str:
    """Print one progress line and flush (CloudWatch only sees what reaches stdout)."""
    body = " ".join(f"{k}={_fmt(v)}" for k, v in pairs.items())
    line = f"[{kind}] {body}"
    _write(line)
    return line


def _write(line: str) -> None:
    # One write per line: print() writes the text and the newline separately, and the
    # training toolkit re-prints each piece it reads, a blank line after every line.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v).replace(" ", "_")


def train_line(step: int, total: int, epoch: float, loss: float, lr: float, grad_norm: float,
               tokens_per_sec: float, eta_s: float) -> str:
    return emit("train", step=f"{step}/{total}", epoch=f"{epoch:.2f}", loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                grad_norm=f"{grad_norm:.2f}", tokens_per_sec=f"{tokens_per_sec:.0f}", eta=format_eta(eta_s))


@dataclass
class Event:
    kind: str
    values: dict[str, str]

    def number(self, key: str) -> float | None:
        try:
            return float(self.values[key])
        except (KeyError, ValueError):
            return None

    def typed(self) -> dict[str, object]:
        """The values for JSON: numbers as numbers (`loss` as `eval_loss` is), and
        `step=120/3000` as step 120 and total_steps 3000."""
        out: dict[str, object] = {k: _number(v) for k, v in self.values.items()}
        if self.total is not None:
            out["step"], out["total_steps"] = self.step, self.total
        return out

    @property
    def step(self) -> int | None:
        raw = self.values.get("step") or self.values.get("steps")
        if raw is None:
            return None
        try:
            return int(raw.split("/")[0])
        except ValueError:
            return None

    @property
    def total(self) -> int | None:
        raw = self.values.get("step", "")
        return int(raw.split("/")[1]) if "/" in raw and raw.split("/")[1].isdigit() else None


def _number(text: str) -> object:
    """int or float when `text` is a finite number, else the text (JSON has no NaN)."""
    for kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            continue
        return value if value == value and value not in (float("inf"), float("-inf")) else text
    return text


def parse(line: str) -> Event | None:
    """A progress line -> Event; any other line -> None. CloudWatch may prefix nothing,
    but a local log or torchrun may prefix `[rank0]:`-style tags, so search, not match."""
    line = line.strip()
    start = line.find("[")
    while start != -1:
        m = LINE_RE.match(line[start:])
        if m and m.group("kind") in KINDS:
            body = m.group("body")
            if m.group("kind") == "error":  # the reason is free text, spaces included
                return Event("error", {"reason": body.partition("reason=")[2] or body})
            return Event(m.group("kind"), dict(PAIR_RE.findall(body)))
        start = line.find("[", start + 1)
    return None


KINDS = {"train", "eval", "checkpoint", "done", "error", "info", "data", "model", "stopped", "resume"}


@dataclass
class Progress:
    """What the lines so far say: the latest training line, the loss curves, the outcome."""

    step: int = 0
    total: int | None = None
    last_train: Event | None = None
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    eval_loss: list[tuple[int, float]] = field(default_factory=list)
    done: Event | None = None
    error: str | None = None

    def update(self, line: str) -> Event | None:
        ev = parse(line)
        if ev is None:
            return None
        if ev.kind == "train":
            self.last_train = ev
            self.step = ev.step or self.step
            self.total = ev.total or self.total
            loss = ev.number("loss")
            if loss is not None and ev.step is not None:
                self.train_loss.append((ev.step, loss))
        elif ev.kind == "eval":
            loss = ev.number("eval_loss")
            if loss is not None and ev.step is not None:
                self.eval_loss.append((ev.step, loss))
        elif ev.kind == "done":
            self.done = ev
            self.step = ev.step or self.step
        elif ev.kind == "error":
            self.error = ev.values["reason"]
        return ev


def fail(reason: str) -> str:
    """The one-line reason a job stopped early, on stdout only: SageMaker and the local
    runner send stdout and stderr to the same log, so once is enough."""
    line = f"[error] reason={reason.replace(chr(10), ' ')}"
    _write(line)
    return line


def skipped(name: str, why: str) -> str:
    """`[resume] skipped step-16: trainer.pt missing`: a checkpoint resume passed over, in
    words (a `[resume]` line with no pairs, which the readers above ignore)."""
    line = f"[resume] skipped {name}: {why.replace(chr(10), ' ')}"
    _write(line)
    return line
