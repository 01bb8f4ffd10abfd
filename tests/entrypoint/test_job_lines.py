"""What the job writes for people and the toolkit to read: one write per log line, one
[error] line, and a model card that keeps its data line for every format."""

from __future__ import annotations

import io
import sys

import pytest

from entrypoint import progress
from entrypoint.card import write_card
from entrypoint.data import DataReport
from entrypoint.hyperparams import Hyperparameters


class RecordingStdout(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


def test_each_progress_line_reaches_stdout_in_one_write(monkeypatch):
    """The training toolkit re-prints what it reads from the job; a newline written on its
    own shows up as a blank line after every job line."""
    stdout = RecordingStdout()
    with monkeypatch.context() as m:  # set inside the test: pytest swaps sys.stdout per phase
        m.setattr(sys, "stdout", stdout)
        progress.emit("checkpoint", step=4, path="/opt/ml/checkpoints/step-4")
        progress.train_line(4, 24, 0.2, 1.2345, 3e-3, 0.5, 5120, 60)
        progress.fail("invalid hyperparameters: lora.r: too small")
    assert stdout.writes == [
        "[checkpoint] step=4 path=/opt/ml/checkpoints/step-4\n",
        "[train] step=4/24 epoch=0.20 loss=1.2345 lr=3.00e-03 grad_norm=0.50 tokens_per_sec=5120 eta=0:01:00\n",
        "[error] reason=invalid hyperparameters: lora.r: too small\n",
    ]


def test_an_error_line_is_printed_once_on_stdout_and_not_on_stderr(capsys):
    progress.fail("data.train: bad.jsonl: row 2: missing column 'answer'\nsecond line")
    out = capsys.readouterr()
    assert out.out == "[error] reason=data.train: bad.jsonl: row 2: missing column 'answer' second line\n"
    assert out.err == ""


@pytest.mark.parametrize("fmt,kept", [("text", "(every token)"), ("instruction", "(response tokens only)")])
def test_the_card_names_the_examples_for_every_data_format(tmp_path, fmt, kept):
    hp = Hyperparameters.model_validate({"model": {"id": "org/base"}, "data": {"train": "d.jsonl", "format": fmt}})
    report = DataReport(examples=12, truncated=1, dropped=0, tokens=900, label_tokens=850, sources=["d.jsonl"])
    card = write_card(tmp_path, hp, report, {"train_loss": [[3, 1.5]], "eval_loss": []}, steps=3, runtime_s=4.0,
                      trainable=1000, precision="fp32").read_text()
    line = next(x for x in card.splitlines() if x.startswith("- examples:"))
    assert line.startswith("- examples: 12 (1 truncated at 2048 tokens, 0 dropped), 900 tokens") and line.endswith(kept)
