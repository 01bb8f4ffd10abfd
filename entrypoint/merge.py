"""Merge a trained LoRA adapter into its full-precision base: one model, ready to serve.

The training job loads the base in 4-bit; merging into those weights would bake the
quantization error into the result. Here the base is loaded in bf16 (fp16 where the GPU
has no bf16, fp32 only when asked), the adapter applied with peft and merged in
(`merge_and_unload`), and the result written as safetensors shards, config, tokenizer
and a model card naming the base, the adapter job and the data.

Runs three ways:
- `python -m entrypoint.merge --adapter DIR --base ID_OR_DIR --out DIR` (local runs;
  `sm-qlora merge` starts it in a subprocess);
- inside a SageMaker job as the entry script `sm_qlora_merge.py`: the adapter comes from
  the `adapter` channel, the base from the `model` channel or the hub id in the
  hyperparameters, and the result goes to SM_MODEL_DIR;
- `merge(...)` from Python (the tests).

The output is written to a temporary directory and moved into place at the end, so a
failed merge never leaves a half-written model behind. No launcher import.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from entrypoint import container
from entrypoint.card import adapter_stack, read_adapter, stack_mismatch
from entrypoint.hyperparams import unflatten
from entrypoint.progress import emit
from entrypoint.train import (  # one way to fail, one token rule
    BadInput,
    channel,
    hf_token,
    quiet_hub_kernel_warning,
    record_failure,
)

DTYPES = ("auto", "bf16", "fp16", "fp32")
MAX_SHARD_SIZE = "5GB"  # the hub's default: large enough for few files, small enough to resume downloads


@dataclass
class MergeSpec:
    adapter: str
    base: str
    out: str
    dtype: str = "auto"
    adapter_job: str | None = None
    data: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    base_name: str | None = None  # what the card calls the base when `base` is a channel path


def choose_dtype(requested: str):
    """(torch dtype, name, device map, why). `auto`: bf16 on a GPU that has it, fp16 on one
    that has not (V100, T4), bf16 on CPU (written for serving, not for this machine)."""
    import torch

    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    on_gpu = torch.cuda.is_available()
    device_map = "auto" if on_gpu else {"": "cpu"}
    if requested != "auto":
        return names[requested], requested, device_map, "asked for"
    if on_gpu and torch.cuda.is_bf16_supported():
        return torch.bfloat16, "bf16", device_map, f"{torch.cuda.get_device_name(0)} supports bf16"
    if on_gpu:
        return torch.float16, "fp16", device_map, f"{torch.cuda.get_device_name(0)} has no bf16"
    return torch.bfloat16, "bf16", device_map, "CPU; bf16 is what a GPU server loads"


def read_adapter_config(adapter: Path) -> dict:
    path = adapter / "adapter_config.json"
    if not path.is_file():
        raise BadInput(f"{adapter} holds no adapter (no adapter_config.json)")
    return json.loads(path.read_text())


def merge(spec: MergeSpec) -> Path:
    """Load base + adapter, merge, write `spec.out`; returns the output directory."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter, out = Path(spec.adapter), Path(spec.out)
    lora = read_adapter_config(adapter)
    mismatch = stack_mismatch(lora, read_adapter(adapter)[1])
    if mismatch:
        raise BadInput(mismatch)
    if spec.base.startswith(("/", ".", "~")) and not (Path(spec.base).expanduser() / "config.json").is_file():
        raise BadInput(f"base model {spec.base} is not a model directory (no config.json)")
    dtype, dtype_name, device_map, why = choose_dtype(spec.dtype)
    token = hf_token()
    started = time.time()
    tmp = _staging_dir(out)
    try:
        emit("merge", base=spec.base, adapter=adapter, dtype=dtype_name, reason=why)
        base = AutoModelForCausalLM.from_pretrained(
            spec.base, dtype=dtype, device_map=device_map, low_cpu_mem_usage=True, token=token,
            revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        model = PeftModel.from_pretrained(base, str(adapter))
        with torch.no_grad():
            merged = model.merge_and_unload()
        merged.config.use_cache = True  # training turned it off; serving wants it
        merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
        # The training job saved the tokenizer it used beside the adapter; prefer that one.
        own = (adapter / "tokenizer_config.json").is_file()
        AutoTokenizer.from_pretrained(str(adapter) if own else spec.base, token=token,
                                      revision=None if own else spec.revision).save_pretrained(tmp)
        write_card(tmp, spec, lora, dtype_name)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = sorted(p.name for p in out.iterdir())
    emit("done", merged=out, dtype=dtype_name, files=len(files), runtime_s=f"{time.time() - started:.0f}")
    return out


STAGING = ".merge-partial-"


def _others(out: Path) -> list[Path]:
    """What is in `out` besides merges still staging there."""
    return [p for p in out.iterdir() if not p.name.startswith(STAGING)]


def _staging_dir(out: Path) -> Path:
    """Where the files are written before they count: a directory of this merge's own, so
    two merges into one destination never write into each other's files. An existing
    (empty) output directory may be a mount point (SM_MODEL_DIR), so stage inside it;
    otherwise beside it."""
    if out.exists():
        if not out.is_dir() or _others(out):
            raise BadInput(f"{out} exists and is not empty; pick a new directory")
        return Path(tempfile.mkdtemp(prefix=STAGING, dir=out))
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{STAGING}{out.name}-", dir=out.parent))


def _publish(tmp: Path, out: Path) -> None:
    """Move the merged files into place; the second of two merges into one destination
    finds it taken and says so, leaving the first one's files whole."""
    taken = BadInput(f"{out} was filled by another merge while this one ran; its files are complete there")
    for f in tmp.rglob("*"):
        if f.is_file():
            container.readable_by_umask(f)
    if tmp.parent == out:
        if _others(out):
            raise taken
        for p in sorted(tmp.iterdir()):
            p.rename(out / p.name)
        return
    try:
        tmp.rename(out)  # atomic; refused when the other merge's directory is already there
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise taken from None
        raise


def write_card(directory: Path, spec: MergeSpec, lora: dict, dtype_name: str) -> Path:
    base = spec.base_name or spec.base
    targets = lora.get("target_modules")
    targets = ", ".join(sorted(targets)) if isinstance(targets, list) else targets
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: transformers",
        "tags: [qlora, lora, merged, sagemaker-qlora]",
        "---",
        "",
        f"# {base} with a QLoRA adapter merged in",
        "",
        f"The LoRA adapter was merged into the full-precision base weights ({dtype_name}), not into "
        "4-bit weights, so this model loads with `AutoModelForCausalLM.from_pretrained` alone: "
        "no peft, no bitsandbytes.",
        "",
        f"- base model: {base}" + (f" (revision {spec.revision})" if spec.revision else ""),
        f"- adapter job: {spec.adapter_job or 'unknown'}",
        f"- training data: {spec.data or 'unknown'}",
        f"- LoRA: r={lora.get('r')}, alpha={lora.get('lora_alpha')}, targets: {targets}",
        f"- the adapter {adapter_stack(lora, read_adapter(Path(spec.adapter))[1])[1]}; merged, the model loads on transformers {_version()}+",
        f"- weights: {dtype_name} safetensors",
        "",
        "## Use",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained('PATH_TO_THIS_DIRECTORY', dtype='auto')",
        "tokenizer = AutoTokenizer.from_pretrained('PATH_TO_THIS_DIRECTORY')",
        "```",
        "",
    ]
    path = directory / "README.md"
    path.write_text("\n".join(lines))
    return path


def _version() -> str:
    import transformers

    return transformers.__version__


# --------------------------------------------------------------------------- the two ways in

def spec_from_container() -> MergeSpec:
    """Inside a SageMaker merge job: hyperparameters.json (JSON-encoded values, as the
    launcher writes them), the `adapter` and `model` channels, SM_MODEL_DIR."""
    path = container.input_config_dir() / "hyperparameters.json"
    if path.is_file():
        raw = unflatten(json.loads(path.read_text()), encoded=True)  # reserved toolkit names dropped
    else:
        raw = unflatten(json.loads(os.environ.get(container.HPS, "{}")), encoded=False)
    adapter = channel("adapter")
    if adapter is None:
        raise BadInput("no `adapter` channel: the merge job needs the adapter job's output")
    base = channel("model") or raw.get("base_model")
    if not base:
        raise BadInput("no base model: neither a `model` channel nor a base_model hyperparameter")
    return MergeSpec(adapter=adapter, base=base, out=str(container.model_dir()), dtype=raw.get("dtype", "auto"),
                     adapter_job=raw.get("adapter_job"), data=raw.get("data"), revision=raw.get("revision"),
                     trust_remote_code=bool(raw.get("trust_remote_code", False)), base_name=raw.get("base_model"))


def parse_args(argv: list[str]) -> MergeSpec:
    p = argparse.ArgumentParser(prog="python -m entrypoint.merge", description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", required=True, help="directory with adapter_config.json")
    p.add_argument("--base", required=True, help="hub id or directory of the full-precision base")
    p.add_argument("--out", required=True, help="new directory for the merged model")
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--adapter-job", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--revision", default=None)
    p.add_argument("--trust-remote-code", action="store_true")
    a = p.parse_args(argv)
    return MergeSpec(adapter=a.adapter, base=a.base, out=a.out, dtype=a.dtype, adapter_job=a.adapter_job,
                     data=a.data, revision=a.revision, trust_remote_code=a.trust_remote_code)


def main(argv: list[str] | None = None) -> None:
    """`argv` None: inside a SageMaker job (the entry script calls `main()`). The training
    toolkit passes the hyperparameters as command-line flags too, so sys.argv is not ours
    there: the container's files and channels are read instead."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # no carriage returns in CloudWatch
    quiet_hub_kernel_warning()
    try:
        spec = spec_from_container() if argv is None else parse_args(argv)
        if spec.dtype not in DTYPES:
            raise BadInput(f"dtype {spec.dtype!r} is not one of {', '.join(DTYPES)}")
        merge(spec)
    except BadInput as exc:
        sys.exit(record_failure(str(exc), container.EXIT_BAD_INPUT))
    sys.exit(container.EXIT_OK)


if __name__ == "__main__":
    main(sys.argv[1:])
