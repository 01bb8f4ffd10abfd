"""The hyperparameter schema: one Pydantic model that the launcher validates before
submitting and the job validates again on arrival, so both sides agree on every field.

SageMaker hyperparameters are a flat string map, so nested sections travel as dotted
keys (`lora.r`), each value JSON-encoded; `flatten` and `unflatten` are the two ends.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

HUB_ID_PATTERN = r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$"


# How the job spreads over devices. The launcher's plan decides it once per launch; ddp runs
# one process per GPU (torchrun), model_parallel spreads one copy of the model over the
# instance's GPUs, single uses one device.
Strategy = Literal["single", "ddp", "model_parallel"]
# What a config may say: auto leaves the choice to the launcher's plan (one flat Literal, so
# a wrong value gets one error listing the four).
StrategyChoice = Literal["auto", "ddp", "model_parallel", "single"]

# Hyperparameters SageMaker and the training toolkit add on their own (the names in
# sagemaker_training.params): accepted and ignored. A tuning job's objective metric
# arrives as a plain string, not JSON-encoded.
RESERVED_PREFIX = "sagemaker_"
RESERVED = frozenset({"_tuning_objective_metric", "default_user_module_name"})


class Strict(BaseModel):
    # allow_inf_nan=False: `lora.alpha: .inf` would train NaN and still end Completed.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelSpec(Strict):
    id: str = Field(min_length=1, description="hub id, s3:// prefix or local directory")
    revision: str | None = None
    trust_remote_code: bool = False


class Columns(Strict):
    prompt: str = "prompt"
    response: str = "response"
    system: str | None = None
    messages: str = "messages"
    text: str = "text"


class DataSpec(Strict):
    train: str = Field(min_length=1)
    validation: str | None = None
    validation_split: float = Field(0.0, ge=0.0, lt=0.5)
    format: Literal["instruction", "chat", "text"] = "instruction"
    columns: Columns = Columns()
    system_prompt: str | None = None

    @field_validator("train", "validation")
    @classmethod
    def _known_scheme(cls, v: str | None) -> str | None:
        if v is not None and "://" in v and not v.startswith(("s3://", "hf://")):
            raise ValueError("must be a local file, an s3:// URI or an hf:// dataset")
        if v is not None and v.startswith("hf://"):
            name, _, split = v[len("hf://"):].partition(":")
            if not re.match(HUB_ID_PATTERN, name) or (split and not re.fullmatch(r"[\w.\[\]:%+-]+", split)):
                raise ValueError(f"{v!r} is not an hf:// dataset like hf://org/name or hf://org/name:train")
        return v


class LoraSpec(Strict):
    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: Literal["auto", "all-linear"] | list[str] = "auto"


class TrainingSpec(Strict):
    epochs: int = Field(1, ge=1, le=1000)
    max_steps: int | None = Field(None, ge=1)
    learning_rate: float = Field(2e-4, gt=0.0, lt=1.0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, le=0.5)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    # auto: the launcher's plan picks the most packed rows that fit the GPU (1 on a CPU);
    # a job that receives "auto" unresolved runs 1.
    per_device_batch_size: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = "auto"
    gradient_accumulation_steps: int = Field(4, ge=1, le=4096)
    max_seq_length: int = Field(2048, ge=16, le=131072)
    packing: bool = Field(
        True,
        description="pack examples into rows of max_seq_length with per-example positions "
        "(no padding, no attention across examples)",
    )
    gradient_checkpointing: bool = True
    # With gradient_checkpointing on a GPU: each layer's checkpointed input waits for backward in
    # pinned host memory, not on the GPU (entrypoint/offload.py; 8 GiB less at 32 layers of Mixtral
    # and 8 packed rows of 2048). The same gradients; the copies overlap compute. Where the host
    # cannot hold them (offload_fits_host) the job keeps them on the GPU and says so.
    offload_checkpoints: bool = True
    # Mixtral only: one fused autograd pass per layer's experts (entrypoint/moe.py); the stock
    # transformers + PEFT path when false. Speed, memory and numerics: bench/README.md. Its first,
    # opt-in version was called low_memory_moe; that name is still read.
    fused_moe: bool = Field(True, validation_alias=AliasChoices("fused_moe", "low_memory_moe"))
    # bf16 models (Ampere+): the residual stream between the layers stays bf16 instead of the fp32
    # that peft's prepare_model_for_kbit_training makes of it (entrypoint.model.set_residual_dtype):
    # fewer casts, half-size checkpointed inputs; +9% tokens/s and -1.5 GiB at 32 layers of Mixtral
    # on an H100 (bench/README.md). fp16 and fp32 models keep fp32. Off by default: on CPU it holds
    # loss within 1% and gradient cosine >= 0.999 against the fp32 stream, but on the GPU at identical
    # weights its LoRA gradients are at cosine 0.9865 of the stock path's at 2 layers (the bar is
    # 0.999; stock against itself 0.999998; bench/README.md, 2026-12-06).
    bf16_residual: bool = False
    # CUDA: RMSNorm and the rotary embedding through torch.compile (entrypoint.model.compile_small_ops):
    # +2-8% tokens/s at 32 layers of Mixtral on an H100 (bench/README.md, 2026-12-06). Off by default:
    # at 2 layers its LoRA gradients are at cosine 0.99905 (r4) and 0.99886 (r8) of the stock path's
    # (the defaults: 0.99946; the bar is 0.999). CPU runs ignore it.
    compile_small_ops: bool = False
    # 4-bit attention projections with LoRA (q, k, v, o): q, k and v as one matmul on one cast of the
    # input, NF4 dequantized once per pass, LoRA beside it with its dropout masks drawn again instead of
    # stored (entrypoint.projections). The same adapter format and, on an H100, the same gradients as
    # the defaults at 2 layers and 0.4-0.6 GiB less peak memory at 32; speed within the noise of the
    # defaults (r5: the same; r8: -1% and +4%).
    fused_attention: bool = False
    # The head and its loss a chunk of tokens at a time, the loss's gradient taken in forward
    # (entrypoint.head): no [tokens, vocab] logits (15.7 bytes per token per vocabulary entry: 7.7 GiB
    # at 8 packed rows of 2048 with Mixtral's 32,000 entries, 31 GiB with Llama 3's 128,256), so more
    # rows fit where the head is the larger transient. The same loss and gradients on the CPU (tests);
    # off by default until it is measured on a GPU. CHUNKED_LOSS_MODELS only; others keep the stock head.
    chunked_loss: bool = False
    # CUDA: attention through FlexAttention with the packed rows' document mask as a BlockMask, so the
    # blocks across examples are skipped (entrypoint.model.use_flex_attention): +5-6% tokens/s at 32
    # layers of Mixtral on an H100. Off by default: at 2 layers its LoRA gradients are at cosine 0.9947
    # of the stock path's (the bar is 0.999; bench/README.md, 2026-12-06).
    flex_attention: bool = False
    # auto: bitsandbytes AdamW8bit on GPU (its step without a GPU wait per parameter:
    # entrypoint.optim), torch AdamW on CPU. Not paged by default: LoRA's
    # optimizer state is small (~0.5 GiB for Mixtral-8x7B r16), so paging to host memory buys
    # nothing, and it puts the state in CUDA managed memory; paged_adamw_8bit is one key away.
    optimizer: Literal["auto", "adamw_8bit", "paged_adamw_8bit", "adamw_torch"] = "auto"
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(200, ge=1)
    eval_steps: int | None = Field(None, ge=1)
    save_total_limit: int = Field(2, ge=1)
    seed: int = Field(42, ge=0, le=2**32 - 1)  # numpy and torch seeds are 32-bit
    # Also checkpoint on a clock: a SIGKILL or a lost instance (no SIGTERM) loses at most this.
    checkpoint_minutes: float = Field(30, gt=0, le=7 * 24 * 60)


# training.chunked_loss: the architectures whose stock head and loss are lm_head(hidden) and
# transformers' ForCausalLMLoss (the MoEs adding their router's load-balancing loss), which
# entrypoint.head reproduces; the launcher's plan counts the chunked head for these alone.
CHUNKED_LOSS_MODELS = frozenset({"mixtral", "qwen3_moe", "mistral", "llama", "qwen2"})
LOSS_CHUNK_BYTES = 256 * 2**20  # one chunk's fp32 logits (the plan counts three chunks alive)

# Offloaded checkpoints are pinned (never swapped out): the launcher's plan and the job both keep
# them to this share of the host's memory, the rest being the model load, data and the processes.
PINNED_HOST_SHARE = 0.5


def offloaded_checkpoint_bytes(tokens: int, layers: int, hidden: int, processes: int = 1) -> int:
    """Host memory that training.offload_checkpoints pins: every layer's input, fp32 (peft's
    prepare_model_for_kbit_training keeps the residual stream in fp32), for each GPU process,
    each input in a block rounded up to a power of two as torch's caching host allocator does."""
    per_layer = tokens * hidden * 4
    return (1 << (per_layer - 1).bit_length()) * layers * processes


def offload_fits_host(tokens: int, layers: int, hidden: int, processes: int, host_bytes: float) -> bool:
    return offloaded_checkpoint_bytes(tokens, layers, hidden, processes) <= PINNED_HOST_SHARE * host_bytes


class Hyperparameters(Strict):
    """What the training job needs; the launcher adds AWS and compute settings around it."""

    model: ModelSpec
    data: DataSpec
    lora: LoraSpec = LoraSpec()
    training: TrainingSpec = TrainingSpec()
    # The launcher decides it (plan.choose_strategy, local.strategy_here); "auto" arrives only in
    # hyperparameters written by hand, and the job then picks ddp under torchrun.
    strategy: StrategyChoice = "auto"

    @model_validator(mode="after")
    def _columns_present(self) -> Hyperparameters:
        if self.data.format == "instruction" and self.data.columns.prompt == self.data.columns.response:
            raise ValueError("data.columns: prompt and response must name different columns")
        return self


def flatten(params: Hyperparameters) -> dict[str, Any]:
    """Nested model -> {"lora.r": 16, ...}; lists and scalars stay whole."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif value is not None:
            out[prefix] = value

    walk("", params.model_dump(mode="json"))
    return out


def unflatten(flat: dict[str, Any], encoded: bool = True) -> dict[str, Any]:
    """{"lora.r": "16"} -> {"lora": {"r": 16}}. In hyperparameters.json every value is
    JSON-encoded (the Estimator json.dumps each one); in SM_HPS they are already decoded.
    The reserved keys SageMaker and its toolkit add are dropped."""
    nested: dict[str, Any] = {}
    for key, raw in flat.items():
        if is_reserved(key):
            continue
        value = raw
        if encoded and isinstance(raw, str):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def is_reserved(key: str) -> bool:
    return key.startswith(RESERVED_PREFIX) or key in RESERVED
