"""Planning before paying: which instance fits, how to spread the model, how long, how much.

Memory per GPU for QLoRA is a sum of parts (bytes):
- NF4 weights of every decoder linear layer, experts included, with double-quantized
  constants (0.5 + 1/64 + 4/(64*256) bytes per parameter); MoE routers stay in bf16 but are
  counted as NF4 (hidden x experts a layer: 0.2 MiB at 32 layers of Mixtral, a rounding error);
- embeddings and output head in fp32 (peft's prepare_model_for_kbit_training casts them);
- LoRA parameters with their fp32 gradients and 8-bit AdamW states (10 bytes each);
- activations: with gradient checkpointing CKPT_BYTES per hidden unit per layer and token
  (read off the Mistral-7B runs' slope), for every layer, or for OFFLOAD_LAYERS_ON_GPU layers
  where training.offload_checkpoints keeps them in host memory; without checkpointing every
  layer keeps its activations (an estimate, not calibrated);
- the larger of two transients that are never alive together, since the head's buffers are
  freed before backward reaches the first decoder layer: the logits with their
  loss/gradient buffers (HEAD_BYTES per token per vocabulary entry; with training.chunked_loss
  only the hidden states' gradient and a few chunks of logits, CHUNKED_HEAD_BYTES), or one decoder layer's
  backward (its MLP or MoE block as measured alone, per routed token per ffn unit, for the
  path the job takes, training.fused_moe; plus the rest of the layer, per token per hidden
  unit: LAYER_BACKWARD_BYTES);
- then allocator slack (8%) and the CUDA context (0.6 GiB) that peak-allocated figures
  leave out.
The model is checked against peak memory measured on an H200 for real runs of the
entrypoint, Mixtral-8x7B (both MoE paths, checkpoints on the GPU or offloaded, up to all
32 layers) and Mistral-7B at full width (MEASURED); `calibration()` gives the error of each
and whether a constant was fitted on it.

Throughput comes from H200 runs of Mixtral-8x7B's shape, per MoE path (H200_TOKENS_PER_S):
a step costs a fixed part (kernel launches and Python per quantized linear module) plus a
part per token (scaled by active parameters per token, and by each GPU's dense bf16/fp16
rate and memory bandwidth, BANDWIDTH_SHARE fitted on an H100 measured against the H200). Every assumption is printed with the plan.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from entrypoint.data import chat_messages
from entrypoint.hyperparams import (
    CHUNKED_LOSS_MODELS,
    LOSS_CHUNK_BYTES,
    PINNED_HOST_SHARE,
    Strategy,
    offload_fits_host,
)
from launcher import images
from launcher.config import JobConfig
from launcher.datafiles import READERS, RowError, have_pyarrow
from launcher.errors import ConfigError
from launcher.instances import Instance, catalog, format_usd
from launcher.shapes import BUILT_IN, Shape, resolve

GIB = 2**30
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
EMBED_BYTES = 4
LORA_BYTES = 4 + 4 + 2
CKPT_BYTES = 4  # per token per layer per hidden unit kept with checkpointing (measured ~3.7 on Mistral-7B)
HEAD_BYTES = 15.7  # per token per vocabulary entry: least squares over the eight runs before the fused MoE path
# training.chunked_loss (entrypoint.head), per token per hidden unit: the last hidden states (fp32),
# their compute-dtype copy and their gradient (bf16); plus, once, three chunks' logits and the head's
# compute-dtype copy. From the design, not measured (issue 22).
CHUNKED_HEAD_BYTES = 8
# One MLP or MoE block's forward + backward, per routed token per ffn unit: bench/moe_layer.py on
# one full-width Mixtral layer, 16,384 tokens, LoRA dropout 0.05 (h200-2026-11-29-fused-moe-layer.json).
# fused: 6.11 GiB, of which u and v (fp32, 8 bytes) are kept for backward, the rest being the
# gathered inputs, their gradients and one expert's temporaries; stock transformers + PEFT: 9.09
# GiB, every ffn-wide intermediate in fp32. A dense MLP is taken as one stock expert.
MLP_BACKWARD_BYTES = {"fused": 14.0, "stock": 20.8}
LAYER_BACKWARD_BYTES = 44  # per token per hidden unit: the rest of the layer being differentiated
# (recomputed attention, norms, LoRA dropout copies, residual gradients); the one constant fitted
# since the fused path, on its 2- and 4-layer runs
# training.offload_checkpoints: the layer input still being copied out in forward and the one
# fetched ahead in backward (entrypoint/offload.py); a count from the design, not fitted.
OFFLOAD_LAYERS_ON_GPU = 2
# The job checks its host's MemTotal, which is below the instance's published memory (the kernel
# and firmware keep some): the plan counts 90% of it so what it approves the job accepts.
HOST_USABLE = 0.9
NO_CKPT_BYTES_PER_HIDDEN = 34  # per token per layer without checkpointing: an estimate, not measured
SLACK = 1.08
CUDA_CONTEXT_GIB = 0.6
# The transformers 5 image's fused MoE path peaked 0.62 GiB above transformers 4's at 2 layers and
# 16,384 tokens a micro-batch on an H100, with LoRA dropout on the experts (bench/README.md,
# h100-2026-12-06-tf5/after-expert-dropout/; 0.15 GiB without that dropout, the same at 2 and 4
# layers). Not known per layer: counted once, scaled with the micro-batch's tokens.
TRANSFORMERS5_MOE_EXTRA_GIB_PER_TOKEN = 0.62 / 16384

# Peak torch.cuda.max_memory_allocated of the entrypoint on an H200 at full width, LoRA r16 on
# `target_modules: auto`, max_seq_length 2048 (bench/README.md). moe: the Mixtral expert path
# (None: dense); offload: training.offload_checkpoints. in_sample: a constant was fitted on the
# run (HEAD_BYTES binds only where the head's transient is the larger: the Mistral runs); the
# rest are predicted out of sample: the stock-path Mixtral runs, the 8-layer fused run and
# every run with offloaded checkpoints or at 32 layers.
MEASURED = [
    # bench/h200-2026-11-29.json: the stock path, before entrypoint/moe.py
    {"shape": "mixtral-8x7b", "moe": "stock", "layers": 2, "rows": 4, "seq": 2048, "peak_gib": 8.69, "in_sample": False, "offload": False},
    {"shape": "mixtral-8x7b", "moe": "stock", "layers": 4, "rows": 4, "seq": 2048, "peak_gib": 10.09, "in_sample": False, "offload": False},
    {"shape": "mixtral-8x7b", "moe": "stock", "layers": 2, "rows": 1, "seq": 2048, "peak_gib": 4.07, "in_sample": False, "offload": False},
    {"shape": "mixtral-8x7b", "moe": "stock", "layers": 4, "rows": 1, "seq": 2048, "peak_gib": 5.62, "in_sample": False, "offload": False},
    # bench/h200-2026-11-29-fused-r1.json: the fused path (training.fused_moe, the default)
    {"shape": "mixtral-8x7b", "moe": "fused", "layers": 2, "rows": 8, "seq": 2048, "peak_gib": 11.94, "in_sample": True, "offload": False},
    {"shape": "mixtral-8x7b", "moe": "fused", "layers": 4, "rows": 8, "seq": 2048, "peak_gib": 13.86, "in_sample": True, "offload": False},
    {"shape": "mixtral-8x7b", "moe": "fused", "layers": 8, "rows": 8, "seq": 2048, "peak_gib": 18.04, "in_sample": False, "offload": False},
    # bench/h200-2026-11-29-mistral.json
    {"shape": "mistral-7b", "moe": None, "layers": 4, "rows": 4, "seq": 2048, "peak_gib": 5.96, "in_sample": True, "offload": False},
    {"shape": "mistral-7b", "moe": None, "layers": 8, "rows": 4, "seq": 2048, "peak_gib": 6.91, "in_sample": True, "offload": False},
    {"shape": "mistral-7b", "moe": None, "layers": 4, "rows": 1, "seq": 2048, "peak_gib": 2.67, "in_sample": True, "offload": False},
    {"shape": "mistral-7b", "moe": None, "layers": 8, "rows": 1, "seq": 2048, "peak_gib": 3.25, "in_sample": True, "offload": False},
    # bench/h200-2026-11-29-offload.json: the defaults (fused path, offloaded checkpoints)
    {"shape": "mixtral-8x7b", "moe": "fused", "layers": 2, "rows": 8, "seq": 2048, "peak_gib": 12.0, "in_sample": False, "offload": True},
    {"shape": "mixtral-8x7b", "moe": "fused", "layers": 4, "rows": 8, "seq": 2048, "peak_gib": 13.53, "in_sample": False, "offload": True},
    {"shape": "mixtral-8x7b", "moe": "fused", "layers": 8, "rows": 8, "seq": 2048, "peak_gib": 16.7, "in_sample": False, "offload": True},
    # bench/h200-2026-11-29-deep-32.json: all 32 layers (bench/deep_memory.py, the job's model and step)
    {"shape": "mixtral-8x7b", "moe": "fused", "layers": 32, "rows": 8, "seq": 2048, "peak_gib": 34.32, "in_sample": False, "offload": True},
    {"shape": "mixtral-8x7b", "moe": "fused", "layers": 32, "rows": 8, "seq": 2048, "peak_gib": 40.99, "in_sample": False, "offload": False},
    {"shape": "mixtral-8x7b", "moe": "fused", "layers": 32, "rows": 4, "seq": 2048, "peak_gib": 30.01, "in_sample": False, "offload": True},
    {"shape": "mixtral-8x7b", "moe": "fused", "layers": 32, "rows": 4, "seq": 2048, "peak_gib": 32.93, "in_sample": False, "offload": False},
]
# Real tokens/s at 32 layers, by MoE path, for two micro-batch sizes (tokens). stock: the
# entrypoint at 1 and 4 packed rows of 2048 (bench/h200-2026-11-29.json, extrapolated from 2 and
# 4 layers). fused: the entrypoint at 8 rows, 3,841 (h200-2026-11-29-offload.json, 2/4/8 layers
# extrapolated; 3,819 and 3,866 in the two repeats before offloading); at 4 rows, deep_memory.py's
# step measured at 32 layers, 3,458, times the entrypoint's rate over deep_memory's at 8 rows
# (3,841 / 4,020: data loading, logging, the scheduler) = 3,304.
H200_TOKENS_PER_S = {"stock": {2048: 1026.0, 8192: 2385.0}, "fused": {8192: 3304.0, 16384: 3841.0}}
# training.bf16_residual (opt-in, bf16 GPUs), measured on an H100 80GB at 32 layers and 8 rows,
# the same model and step with and without it, three interleaved repeats each (bench/deep_speed.py,
# h100-2026-12-06-deep-speed-r1.json): medians 4,149 against 3,794 tok/s. Applied to the fused
# H200 figures above as a ratio: scaled, not measured on an H200.
BF16_RESIDUAL_SPEEDUP = 4149.0 / 3794.0
# training.compile_small_ops (opt-in, CUDA), the same way: h100-2026-12-06-deep-speed-r3.json, two
# interleaved repeats, medians 4,021.5 (ours-compiled) against 3,749.5 (ours). With bf16_residual the
# two are multiplied (x1.173; measured together in that run: x1.189).
COMPILE_SMALL_OPS_SPEEDUP = 4021.5 / 3749.5
# Since 2026-12-06 the fused MoE pass skips, inside offloaded checkpoints, what each pass throws away
# (u, v in the forward, w2 and the output in the recomputation; entrypoint.offload.phase): on an H100
# at 32 layers and 8 rows, medians 4,198.5 against 3,825 tok/s for the same step without the skip
# (h100-2026-12-06-deep-speed-r6.json, two interleaved repeats). Applied to the H200 figures above
# (measured before it) as a ratio, where checkpoints are offloaded.
OFFLOADED_PASSES_SPEEDUP = 4198.5 / 3825.0
# training.flex_attention (opt-in, CUDA): 4,441 against 4,198.5 tok/s in that run (ours-flex, ours).
FLEX_ATTENTION_SPEEDUP = 4441.0 / 4198.5
# The kernels of 2026-12-06's fourth session, all default (LoRA dropout drawn in-kernel, the 8-bit
# AdamW without per-parameter waits, the gathers and sums of expert order in one pass, the LoRA
# terms multiplied inside the SwiGLU kernels; docs/speed.md): the defaults at 32 layers and 8 rows
# on an H100, median 4,429 tok/s of three repeats (h100-2026-12-06-deep-speed-r10.json) against the
# 4,198.5 of r6 above. Two calls, two H100s: each change's own ratio, measured in one call, is in
# bench/README.md (their product, 1.11, is above this 1.055). Applied where the fused path runs on a
# GPU its Triton kernels run on (bf16: A100, A10G, L4, L40S, H100, H200; V100 and T4 take torch ops).
KERNELS_SPEEDUP = 4429.0 / 4198.5
H200 = {"tflops": 989.0, "bandwidth_gbs": 4800.0}
# The per-token part's share that scales with memory bandwidth (the rest with dense TFLOP/s): fitted on
# the one pair of GPUs measured with the same step at 32 layers, 8 rows: H100 80GB (3.35 TB/s) 3,794
# tok/s (h100-2026-12-06-deep-speed-r1.json, median of 3) against H200 (4.8 TB/s) 4,020
# (h200-2026-11-29-deep-32.json); both have 989 TFLOP/s. Was 0.5 by assumption, which put the H100
# 10% below what it measured.
BANDWIDTH_SHARE = 0.14
MIXTRAL = BUILT_IN["mixtral-8x7b"]
DDP_EFFICIENCY = 0.9
STARTUP_HOURS = 0.25  # image pull, model download and 4-bit load before the first step
MIN_TRAINING_HOURS = 0.25  # the least MaxRuntime may leave after start-up (validate refuses less)
CHARS_PER_TOKEN = 4.0
TOKENIZE_BATCH = 1000  # rows per encode_batch: fast in Rust threads, memory bounded
AUTO_BATCH_MAX = 16  # more packed rows per micro-batch buys little once the GPU is busy (bench/README.md)


# --------------------------------------------------------------------------- memory

def mlp_path(shape: Shape, fused_moe: bool) -> str:
    """How the job runs a layer's MLP: entrypoint/moe.py fuses Mixtral's experts only."""
    return "fused" if fused_moe and shape.model_type == "mixtral" and shape.experts > 1 else "stock"


def memory_parts_gib(shape: Shape, tokens: int, r: int, layers: int | None = None, checkpointing: bool = True,
                     split: int = 1, fused_moe: bool = True, offload: bool = True,
                     chunked_loss: bool = False) -> dict[str, float]:
    """Peak allocated bytes by part, for one GPU holding 1/split of the layers (and, in
    the worst case, the embeddings, head and logits as well). The last part is the larger
    transient, "logits" or "layer_backward" (see the module docstring)."""
    n = layers if layers is not None else shape.layers
    per_gpu_layers = math.ceil(n / split)
    parts = {
        "nf4_weights": per_gpu_layers * shape.layer_quantized_params * NF4_BYTES,
        "embeddings_fp32": shape.embedding_params * EMBED_BYTES,
        "lora_and_optimizer": per_gpu_layers * shape.lora_params_per_layer(r) * LORA_BYTES,
    }
    if checkpointing:
        kept = min(per_gpu_layers, OFFLOAD_LAYERS_ON_GPU) if offload else per_gpu_layers
        parts["checkpoints"] = tokens * kept * shape.hidden * CKPT_BYTES
    else:
        parts["activations"] = tokens * per_gpu_layers * (
            shape.hidden * NO_CKPT_BYTES_PER_HIDDEN + shape.experts_per_token * shape.intermediate * 8)
    if chunked_loss and shape.model_type in CHUNKED_LOSS_MODELS:
        head = tokens * shape.hidden * CHUNKED_HEAD_BYTES + 3 * LOSS_CHUNK_BYTES + shape.vocab * shape.hidden * 2
    else:
        head = tokens * shape.vocab * HEAD_BYTES
    layer = tokens * (shape.hidden * LAYER_BACKWARD_BYTES + shape.experts_per_token * shape.intermediate
                      * MLP_BACKWARD_BYTES[mlp_path(shape, fused_moe)])
    parts["logits" if head >= layer else "layer_backward"] = max(head, layer)
    return {k: v / GIB for k, v in parts.items()}


def peak_allocated_gib(shape: Shape, tokens: int, r: int, **kw) -> float:
    return sum(memory_parts_gib(shape, tokens, r, **kw).values())


def needed_gib(shape: Shape, tokens: int, r: int, **kw) -> float:
    """What the GPU must have: allocated peak, allocator slack, CUDA context."""
    return peak_allocated_gib(shape, tokens, r, **kw) * SLACK + CUDA_CONTEXT_GIB


def calibration() -> list[dict]:
    """The memory model against every measured run, each with its own MoE path: predicted,
    measured, error, and in_sample (whether a constant was fitted on the run)."""
    out = []
    for m in MEASURED:
        pred = peak_allocated_gib(BUILT_IN[m["shape"]], m["rows"] * m["seq"], 16, layers=m["layers"],
                                  fused_moe=m["moe"] == "fused", offload=m["offload"])
        out.append(m | {"predicted_gib": round(pred, 2), "error_pct": round(100 * (pred - m["peak_gib"]) / m["peak_gib"], 1)})
    return out


# --------------------------------------------------------------------------- throughput

def tokens_per_second(shape: Shape, inst: Instance, tokens_per_micro_batch: int, strategy: str,
                      fused_moe: bool = True, bf16_residual: bool = False, compile_small_ops: bool = False,
                      offload: bool = True, flex_attention: bool = False) -> float:
    """Real tokens/s for the whole job on one instance (see the module docstring)."""
    (t1, r1), (t2, r2) = sorted(H200_TOKENS_PER_S[mlp_path(shape, fused_moe)].items())
    per_token = (t2 / r2 - t1 / r1) / (t2 - t1)  # s per token, Mixtral-8x7B on an H200
    fixed = t1 / r1 - per_token * t1  # s per step
    linears = shape.layers * (4 + 3 * shape.experts)
    fixed *= linears / (MIXTRAL.layers * (4 + 3 * MIXTRAL.experts))
    per_token *= shape.active_params_per_token / MIXTRAL.active_params_per_token
    gpu = inst.gpu
    per_token *= ((1 - BANDWIDTH_SHARE) * H200["tflops"] / gpu.tflops
                  + BANDWIDTH_SHARE * H200["bandwidth_gbs"] / gpu.bandwidth_gbs)
    rate = tokens_per_micro_batch / (fixed + per_token * tokens_per_micro_batch)
    if bf16_residual and gpu.bf16 and mlp_path(shape, fused_moe) == "fused":
        rate *= BF16_RESIDUAL_SPEEDUP
    if compile_small_ops and mlp_path(shape, fused_moe) == "fused":
        rate *= COMPILE_SMALL_OPS_SPEEDUP
    if offload and mlp_path(shape, fused_moe) == "fused":
        rate *= OFFLOADED_PASSES_SPEEDUP
    if gpu.bf16 and mlp_path(shape, fused_moe) == "fused":  # Triton's GPUs (compute capability 8.0+)
        rate *= KERNELS_SPEEDUP
    if flex_attention and mlp_path(shape, fused_moe) == "fused":
        rate *= FLEX_ATTENTION_SPEEDUP
    if strategy == "ddp":
        workers = inst.gpu_count
        rate *= workers * (DDP_EFFICIENCY if workers > 1 else 1.0)
    return rate  # model_parallel: one GPU works at a time (naive pipeline), so one GPU's rate


ASSUMPTIONS = [
    "throughput: the entrypoint measured on one H200 (Mixtral-8x7B width, 4-bit, 2048-token rows, 32 "
    "layers): the fused MoE path (training.fused_moe, the default) 3,304 tok/s at 4 rows and 3,841 at 8 "
    "per micro-batch; the stock path (and dense models) 1,026 at 1 row and 2,385 at 4; a step = fixed "
    "part per quantized linear module + per-token part scaled by active parameters per token",
    f"training.bf16_residual (bf16 GPUs, fused path): x{BF16_RESIDUAL_SPEEDUP:.2f}, measured on an H100 80GB at 32 "
    "layers (4,149 against 3,794 tok/s, same model and step), applied to the H200 figures as a ratio; "
    f"training.compile_small_ops (fused path): x{COMPILE_SMALL_OPS_SPEEDUP:.2f} the same way (4,022 against 3,750); "
    f"the fused pass inside offloaded checkpoints (the default) x{OFFLOADED_PASSES_SPEEDUP:.2f} (4,199 against 3,825); "
    f"training.flex_attention x{FLEX_ATTENTION_SPEEDUP:.2f} (4,441 against 4,199); the kernels of 2026-12-06 "
    f"(in-kernel LoRA dropout, the optimizer without waits, one-pass gathers and sums, LoRA inside SwiGLU; the "
    f"defaults) x{KERNELS_SPEEDUP:.3f} (4,429 against 4,199, two calls on H100s)",
    f"other GPUs: the per-token part scales {1 - BANDWIDTH_SHARE:.0%} with dense bf16/fp16 TFLOP/s and "
    f"{BANDWIDTH_SHARE:.0%} with memory bandwidth (fitted on the H100 80GB measured against the H200; "
    "A100 and other GPUs are scaled, not measured); "
    "the fixed part (kernel launches, Python) does not scale",
    f"data parallel: {DDP_EFFICIENCY:.0%} efficiency per extra GPU; model split over GPUs: one GPU busy at a time",
    f"time adds {STARTUP_HOURS} h of start-up (image, model download, 4-bit load); prices on demand, "
    "spot as the catalog's discount range",
    "memory: NF4 + double-quant constants, embeddings/head and checkpointed inputs counted in fp32 (bf16 with "
    "training.bf16_residual, so counted high: 33.4 GiB measured at 32 layers and 8 rows on an H100), "
    "LoRA with grads and 8-bit AdamW, "
    f"checkpointed activations ({OFFLOAD_LAYERS_ON_GPU} layers' worth on the GPU with training.offload_checkpoints, "
    f"the rest pinned in host memory where it fits in {PINNED_HOST_SHARE:.0%} of {HOST_USABLE:.0%} of the instance's), then the larger of the logits' buffers (with "
    "training.chunked_loss a few chunks of them, from its design, not measured) and one layer's backward (its "
    f"MoE block by training.fused_moe); x{SLACK} allocator slack + {CUDA_CONTEXT_GIB} GiB CUDA context; "
    "an MoE on the transformers 5 image +0.62 GiB per 16,384 tokens (measured at 2 layers on an H100)",
]


# --------------------------------------------------------------------------- tokens

def count_tokens(cfg: JobConfig) -> tuple[int | None, str]:
    """Tokens in the training set: counted with the model's tokenizer when it is a local
    directory, else estimated from characters; None when the data is not local or a row
    cannot be read (the job refuses that row, naming it). Rows are streamed and tokenized
    TOKENIZE_BATCH at a time, so memory stays flat in the file's size."""
    train = Path(cfg.data.train)
    if "://" in cfg.data.train or not train.is_file():
        return None, "unknown (data is not a local file; pass --tokens)"
    tok_path = Path(cfg.model.id) / "tokenizer.json"
    tok = None
    if tok_path.is_file():
        try:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(tok_path))
        except ImportError:
            pass
    total = rows = 0
    try:
        texts = _row_texts(train, cfg)
        while batch := list(itertools.islice(texts, TOKENIZE_BATCH)):  # itertools.batched is 3.12+
            rows += len(batch)
            total += (sum(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False)) if tok
                      else sum(len(t) for t in batch) / CHARS_PER_TOKEN)
    except (RowError, OSError) as exc:
        return None, f"not counted ({train}: {exc}; pass --tokens)"
    if tok:
        return total + 8 * rows, f"counted with {tok_path} (+8 template tokens per row)"
    return int(total) + 8 * rows, f"estimate: {CHARS_PER_TOKEN:g} characters per token"


def _row_texts(path: Path, cfg: JobConfig) -> Iterator[str]:
    """The text of each row, read as the config check reads it (launcher.datafiles)."""
    if path.suffix == ".parquet" and not have_pyarrow():  # unread: a rough guess from the size, in pieces
        size = int(path.stat().st_size / 2)
        yield from ("x" * min(1 << 20, size - i) for i in range(0, size, 1 << 20))
        return
    if path.suffix not in READERS:
        return
    cols = cfg.data.columns
    for row_no, row in READERS[path.suffix](path):
        if not isinstance(row, dict):
            raise RowError(f"row {row_no}: expected an object, got {type(row).__name__}")
        if cfg.data.format == "instruction":
            yield f"{row.get(cols.prompt, '')} {row.get(cols.response, '')}"
        elif cfg.data.format == "chat":
            yield " ".join(m["content"] for m in chat_messages(row.get(cols.messages), cols.messages)[1])
        else:
            yield str(row.get(cols.text, ""))


# --------------------------------------------------------------------------- the plan

@dataclass
class Row:
    instance: str
    gpu: str
    gpus: int
    gpu_memory_gib: float
    fits: bool
    strategy: Strategy | None  # None: the model does not fit this instance
    rows_per_micro_batch: int
    needed_gib_per_gpu: float
    precision: str
    attention: str
    tokens_per_sec: float | None
    hours: float | None
    usd: float | None
    spot_usd: tuple[float, float] | None
    price_per_hour: float


@dataclass
class Plan:
    model: str
    shape_source: str
    dataset_tokens: float | None
    tokens_source: str
    epochs: int
    tokens_per_micro_batch: int  # on the configured instance
    configured: str
    instance_count: int
    rows: list[Row]
    assumptions: list[str] = field(default_factory=lambda: list(ASSUMPTIONS))
    calibration: list[dict] = field(default_factory=calibration)
    prices_read: str = ""
    max_cost_usd: float | None = None       # compute.max_cost_usd
    max_runtime_hours: float | None = None  # what the cap leaves as MaxRuntime
    image: str = ""                         # the training image and what it ships (launcher.images)

    @property
    def chosen(self) -> Row:
        return next(r for r in self.rows if r.instance == self.configured)

    @property
    def cheapest_fit(self) -> Row | None:
        fitting = [r for r in self.rows if r.fits and r.usd is not None]
        if fitting:
            return min(fitting, key=lambda r: r.usd)
        fitting = [r for r in self.rows if r.fits]
        return min(fitting, key=lambda r: r.price_per_hour) if fitting else None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["chosen"] = self.configured
        d["cheapest_fit"] = self.cheapest_fit.instance if self.cheapest_fit else None
        d["calibration_max_error_pct"] = max(abs(c["error_pct"]) for c in self.calibration)
        return d


def _fit(shape: Shape, inst: Instance, cfg: JobConfig, rows: int) -> tuple[Strategy | None, float]:
    """How `inst` holds the model at `rows` packed rows per micro-batch (None: it cannot),
    and the GiB each GPU needs that way."""
    t, c = cfg.training, cfg.compute
    tokens = rows * t.max_seq_length

    def kw(processes: int) -> dict:  # processes on the host, each pinning its own checkpoints
        offload = t.offload_checkpoints and offload_fits_host(tokens, shape.layers, shape.hidden, processes,
                                                              inst.host_memory_gib * GIB * HOST_USABLE)
        return {"checkpointing": t.gradient_checkpointing, "fused_moe": t.fused_moe, "offload": offload,
                "chunked_loss": t.chunked_loss}

    extra = transformers5_extra_gib(cfg, shape, tokens)
    single = needed_gib(shape, tokens, cfg.lora.r, **kw(inst.gpu_count if c.strategy in ("auto", "ddp") else 1)) + extra
    multi = inst.gpu_count > 1 or c.instance_count > 1
    if c.strategy != "model_parallel" and single <= inst.gpu.memory_gib:
        return (c.strategy if c.strategy != "auto" else ("ddp" if multi else "single")), single
    if c.strategy in ("auto", "model_parallel") and inst.gpu_count > 1 and c.instance_count == 1:
        split = needed_gib(shape, tokens, cfg.lora.r, split=inst.gpu_count, **kw(1)) + extra
        return ("model_parallel" if split <= inst.gpu.memory_gib else None), split
    return None, single


def transformers5_extra_gib(cfg: JobConfig, shape: Shape, tokens: int) -> float:
    """What the transformers 5 image's fused MoE path needs beyond the memory model (fitted on
    transformers 4): TRANSFORMERS5_MOE_EXTRA_GIB_PER_TOKEN, for an MoE on that image."""
    if cfg.compute.image_uri or shape.experts <= 1 or mlp_path(shape, cfg.training.fused_moe) != "fused":
        return 0.0
    image = images.for_job(cfg)
    return tokens * TRANSFORMERS5_MOE_EXTRA_GIB_PER_TOKEN if image.transformers.startswith("5.") else 0.0


def auto_batch_size(cfg: JobConfig, instance: Instance | None, shape: Shape | None = None) -> int:
    """`per_device_batch_size: auto`: the most packed rows per micro-batch (at most
    AUTO_BATCH_MAX) that the instance's GPUs hold by the memory model; 1 on this machine's
    CPU (instance None), for a model of unknown shape, or where not even one row fits.
    The strategy stays the one a single row gets: more rows never buy a model split (one
    GPU busy at a time) in place of data parallel."""
    shape = shape or resolve(cfg.model.id, network=False)
    if instance is None or shape is None:
        return 1
    strategy = _fit(shape, instance, cfg, 1)[0]
    if strategy is None:
        return 1
    return next(rows for rows in range(AUTO_BATCH_MAX, 0, -1) if _fit(shape, instance, cfg, rows)[0] == strategy)


def micro_batch_rows(cfg: JobConfig, instance: Instance | None, shape: Shape | None = None) -> int:
    rows = cfg.training.per_device_batch_size
    return rows if isinstance(rows, int) else auto_batch_size(cfg, instance, shape)


def evaluate(shape: Shape, inst: Instance, cfg: JobConfig, dataset_tokens: float | None) -> Row:
    t = cfg.training
    rows = micro_batch_rows(cfg, inst, shape)
    strategy, need = _fit(shape, inst, cfg, rows)
    fits = strategy is not None
    tokens = rows * t.max_seq_length
    rate = (tokens_per_second(shape, inst, tokens, strategy, t.fused_moe, t.bf16_residual, t.compile_small_ops,
                              t.gradient_checkpointing and t.offload_checkpoints, t.flex_attention)
            * cfg.compute.instance_count
            if fits else None)
    hours = usd = spot = None
    if fits and dataset_tokens:
        hours = dataset_tokens * t.epochs / rate / 3600 + STARTUP_HOURS
        usd = hours * inst.price_per_hour * cfg.compute.instance_count
        lo, hi = catalog().spot_discount_range
        spot = (round(usd * (1 - hi), 2), round(usd * (1 - lo), 2))
    return Row(
        instance=inst.name, gpu=inst.gpu.model, gpus=inst.gpu_count, gpu_memory_gib=inst.gpu.memory_gib, fits=fits,
        strategy=strategy, rows_per_micro_batch=rows, needed_gib_per_gpu=round(need, 1),
        precision="bf16" if inst.gpu.bf16 else "fp16", attention="flash_attention_2" if inst.gpu.flash_attention else "sdpa",
        tokens_per_sec=round(rate) if rate else None, hours=round(hours, 2) if hours else None,
        usd=round(usd, 2) if usd else None, spot_usd=spot, price_per_hour=inst.price_per_hour,
    )


def model_shape(cfg: JobConfig, network: bool = True) -> Shape:
    shape = resolve(cfg.model.id, network=network)
    if shape is None:
        raise ConfigError([("model.id", f"cannot tell the shape of {cfg.model.id!r}: not a local model directory, "
                            "the hub is unreachable, and it is not in the built-in table "
                            f"({', '.join(s.name for s in BUILT_IN.values())})")])
    return shape


def make_plan(cfg: JobConfig, dataset_tokens: float | None = None, network: bool = True) -> Plan:
    if dataset_tokens is not None and not (math.isfinite(dataset_tokens) and dataset_tokens > 0):
        raise ConfigError([("--tokens", f"{dataset_tokens!r} is not a number of tokens; give a positive count, "
                            "like --tokens 2.5e7")])
    shape = model_shape(cfg, network)
    if dataset_tokens is None:
        counted, source = count_tokens(cfg)
        dataset_tokens = counted
    else:
        source = "given with --tokens"
    rows = [evaluate(shape, inst, cfg, dataset_tokens) for inst in catalog().instances.values()]
    rows.sort(key=lambda r: (not r.fits, r.usd if r.usd is not None else r.price_per_hour))
    configured = next(r for r in rows if r.instance == cfg.compute.instance_type)
    return Plan(model=cfg.model.id, shape_source=shape.source, dataset_tokens=dataset_tokens, tokens_source=source,
                epochs=cfg.training.epochs,
                tokens_per_micro_batch=configured.rows_per_micro_batch * cfg.training.max_seq_length,
                configured=cfg.compute.instance_type, instance_count=cfg.compute.instance_count, rows=rows,
                prices_read=catalog().prices_read, max_cost_usd=cfg.compute.max_cost_usd,
                max_runtime_hours=budget_runtime_s(cfg) / 3600 if cfg.compute.max_cost_usd else None,
                image=cfg.compute.image_uri or images.describe(images.for_job(cfg)))


def budget_runtime_s(cfg: JobConfig) -> int | None:
    """compute.max_cost_usd as MaxRuntimeInSeconds: the cap over the on-demand price of
    the instances (spot included: a spot job then costs less than its cap), never above
    compute.max_run_hours. None without a cap."""
    c = cfg.compute
    if c.max_cost_usd is None:
        return None
    per_hour = catalog().get(c.instance_type).price_per_hour * c.instance_count
    return max(1, int(min(c.max_cost_usd / per_hour, c.max_run_hours) * 3600))


def runtime_floor_problem(cfg: JobConfig) -> tuple[str, str] | None:
    """A job whose MaxRuntime (from compute.max_cost_usd or compute.max_run_hours) leaves less
    than start-up plus MIN_TRAINING_HOURS of training would be paid for and stopped before it
    has anything to save; refused, naming both numbers. Needs no data, so S3 data too."""
    c = cfg.compute
    floor_h = STARTUP_HOURS + MIN_TRAINING_HOURS
    runtime_h = budget_runtime_s(cfg) / 3600 if c.max_cost_usd is not None else c.max_run_hours
    if runtime_h >= floor_h:
        return None
    need = f"at least {floor_h:g} h ({STARTUP_HOURS:g} h start-up + {MIN_TRAINING_HOURS * 60:g} min of training)"
    if c.max_cost_usd is not None and runtime_h < c.max_run_hours:
        per_hour = catalog().get(c.instance_type).price_per_hour * c.instance_count
        return ("compute.max_cost_usd",
                f"{format_usd(c.max_cost_usd)} buys {_duration(runtime_h)} on {c.instance_type} x{c.instance_count} "
                f"({format_usd(per_hour)}/h); a job needs {need}, {format_usd(floor_h * per_hour)} at this price")
    return ("compute.max_run_hours", f"{c.max_run_hours:g} h ({_duration(runtime_h)}) is too short; a job needs {need}")


def _duration(hours: float) -> str:
    return f"{hours * 3600:.0f} s" if hours < 1 / 60 else f"{hours * 60:.1f} min"


def budget_problem(cfg: JobConfig) -> tuple[str, str] | None:
    """A plan whose estimated cost is above compute.max_cost_usd is refused, naming both.
    Data that is not local cannot be counted here: then only MaxRuntime holds the cap
    (and runtime_floor_problem, which validate runs first)."""
    cap = cfg.compute.max_cost_usd
    if cap is None:
        return None
    row = make_plan(cfg, network=False).chosen
    if row.usd is None or row.usd <= cap:
        return None
    return ("compute.max_cost_usd",
            f"the plan estimates {format_usd(row.usd)} ({row.hours:.1f} h on {row.instance} "
            f"x{cfg.compute.instance_count}), above the cap {format_usd(cap)}; raise the cap, train less "
            "(training.epochs, training.max_steps) or see `sm-qlora plan` for cheaper instances")


def fit_problem(cfg: JobConfig) -> tuple[str, str] | None:
    """The configured instance must hold the model. No network: a model whose shape is
    not local or built in is not checked here."""
    shape = resolve(cfg.model.id, network=False)
    if shape is None:
        return None
    row = evaluate(shape, catalog().get(cfg.compute.instance_type), cfg, None)
    if row.fits:
        return None
    cheapest = make_plan(cfg, dataset_tokens=None, network=False).cheapest_fit
    hint = f"; the cheapest instance that fits is {cheapest.instance}" if cheapest else "; no catalog instance fits"
    forced = f" with compute.strategy {cfg.compute.strategy}" if cfg.compute.strategy != "auto" else ""
    return ("compute.instance_type",
            f"{row.instance} ({row.gpus}x {row.gpu}, {row.gpu_memory_gib:g} GiB each) cannot hold {shape.name} for "
            f"QLoRA{forced} at {row.rows_per_micro_batch * cfg.training.max_seq_length} tokens per micro-batch: it "
            f"needs ~{row.needed_gib_per_gpu:g} GiB per GPU{hint} (see `sm-qlora plan`)")


def choose_strategy(cfg: JobConfig) -> Strategy:
    """The one decision on how the job spreads over the GPUs: compute.strategy when the
    config forces one, else the plan's for the configured instance."""
    if cfg.compute.strategy != "auto":
        return cfg.compute.strategy
    inst = catalog().get(cfg.compute.instance_type)
    shape = resolve(cfg.model.id, network=False)
    strategy = evaluate(shape, inst, cfg, None).strategy if shape is not None else None
    if strategy is not None:
        return strategy
    return "ddp" if inst.gpu_count > 1 or cfg.compute.instance_count > 1 else "single"
