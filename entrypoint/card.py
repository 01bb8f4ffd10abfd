"""The model card written beside the adapter: what was trained on what, and how it went."""

from __future__ import annotations

import json
from pathlib import Path


def write_card(model_dir: Path, hp, report, history: dict, *, steps: int, runtime_s: float,
               trainable: int, precision: str) -> Path:
    last = lambda key: history[key][-1][1] if history.get(key) else None  # noqa: E731
    train_loss, eval_loss = last("train_loss"), last("eval_loss")
    sources = ", ".join(report.sources) or hp.data.train
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {hp.model.id}",
        "tags: [qlora, lora, sagemaker-qlora]",
        "---",
        "",
        f"# QLoRA adapter for {hp.model.id}",
        "",
        "Trained by sagemaker-qlora: the base model loaded in 4-bit NF4 with double quantization "
        f"(compute dtype {precision}), LoRA adapters trained on top.",
        "",
        "## Data",
        f"- source: {sources} (format `{hp.data.format}`, {report.template})",
        f"- examples: {report.examples} ({report.truncated} truncated at {hp.training.max_seq_length} tokens, "
        f"{report.dropped} dropped), {report.tokens} tokens, {report.label_tokens} of them trained on"
        + (" (response tokens only)" if hp.data.format != "text" else " (every token)"),
        "",
        "## Hyperparameters",
        "```json",
        json.dumps({"lora": hp.lora.model_dump(mode="json"), "training": hp.training.model_dump(mode="json")}, indent=2),
        "```",
        "",
        "## Results",
        f"- optimizer steps: {steps}",
        f"- final train loss: {train_loss if train_loss is not None else 'n/a'}",
        f"- final eval loss: {eval_loss if eval_loss is not None else 'n/a'}",
        f"- trainable parameters: {trainable:,}",
        f"- runtime: {runtime_s:.0f} s",
        "",
        "## Use",
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        "model = AutoPeftModelForCausalLM.from_pretrained('PATH_TO_THIS_DIRECTORY')",
        "```",
        "",
    ]
    path = model_dir / "README.md"
    path.write_text("\n".join(lines))
    (model_dir / "training_history.json").write_text(json.dumps(history))
    return path
