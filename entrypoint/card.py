"""The model card written beside the adapter: what was trained on what, and how it went, and
which transformers the adapter loads on (also asked by entrypoint.merge). Torch-free."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

# A LoRA tensor on one numbered expert's module (mlp.experts.3.gate_proj, block_sparse_moe.experts.3.w1):
# the per-expert layout of transformers 4, whatever the modules are called.
PER_EXPERT = re.compile(r"\.experts\.\d+\.")


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
        f"This adapter {_stack_line(model_dir)}.",
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


def _stack_line(model_dir: Path) -> str:
    """Which transformers the adapter loads on (saved beside this card as adapter_config.json)."""
    return adapter_stack(*read_adapter(model_dir))[1]


def read_adapter(adapter_dir: Path) -> tuple[dict, list[str]]:
    """(adapter_config.json, the names of the adapter's tensors), each empty where absent: the
    names come from the safetensors header alone (8 bytes of length, then JSON)."""
    config, weights = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    names = []
    if weights.is_file():
        try:
            with weights.open("rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                names = [k for k in json.loads(f.read(min(size, 100_000_000))) if k != "__metadata__"]
        except (struct.error, ValueError, OSError):
            names = []  # a damaged file: loading it says so, in safetensors' own words
    return (json.loads(config.read_text()) if config.is_file() else {}), names


def adapter_stack(adapter_config: dict, weight_names: list[str] | tuple = ()) -> tuple[int | None, str]:
    """(transformers major the adapter needs, or None for either; the card's line). An
    adapter on MoE experts is bound to the layout it was trained on: per-expert modules
    (transformers 4: Mixtral's w1/w2/w3, Qwen3-MoE's gate/up/down_proj under experts.N) or 3D
    gate_up_proj/down_proj parameters (transformers 5)."""
    modules = adapter_config.get("target_modules") or []
    modules = [modules] if isinstance(modules, str) else list(modules)
    if any(p.rsplit(".", 1)[-1] in ("gate_up_proj", "down_proj") for p in adapter_config.get("target_parameters") or []):
        return 5, ("needs transformers 5.x and peft >= 0.18 (its expert LoRA is on the 3D gate_up_proj/down_proj "
                   "parameters, through peft's target_parameters)")
    if any(m in ("w1", "w2", "w3") for m in modules) or any(PER_EXPERT.search(n) for n in weight_names):
        return 4, ("needs transformers 4.x (its expert LoRA is on per-expert modules, which "
                   "transformers 5 does not have)")
    return None, "loads on transformers 4.56+ and 5.x alike"


def stack_mismatch(adapter_config: dict, weight_names: list[str] | tuple = ()) -> str | None:
    """One line when the adapter cannot load on this transformers; None when it can."""
    import transformers

    needs, why = adapter_stack(adapter_config, weight_names)
    major = int(transformers.__version__.split(".")[0])
    if needs is None or needs == major:
        return None
    image = "2.9.0-transformers5.3.0" if needs == 5 else "2.8.0-transformers4.56.2"
    return (f"this adapter {why}, and this is transformers {transformers.__version__}: merge it on the "
            f"huggingface-pytorch-training:{image} image (compute.image) or with transformers {needs}.x")
