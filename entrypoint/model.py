"""The base model in 4-bit NF4 and the LoRA adapters on it.

- precision: bf16 where the GPU has it, fp16 on V100/T4, fp32 on CPU (local runs);
- `check_quantized` proves every large linear layer, MoE experts included, is really
  4-bit: transformers 5.x stores MoE experts as fused 3D parameters that bitsandbytes
  leaves in bf16 (about 90 GB for Mixtral-8x7B); the job quantizes Mixtral's itself
  (entrypoint.experts_tf5), and any other 3D weight left in 16/32-bit fails the check;
- LoRA targets per architecture when `target_modules: auto`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from entrypoint import experts_tf5

# Per model_type: attention plus MLP / expert projections. Mixtral's router is also named
# `gate`, so its experts are named by w1/w2/w3 and the router is left alone.
LORA_TARGETS = {
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2_moe": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3_moe": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}


class QuantizationError(RuntimeError):
    pass


@dataclass
class Precision:
    dtype: torch.dtype
    name: str
    reason: str


def choose_precision(device: torch.device) -> Precision:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported():
            return Precision(torch.bfloat16, "bf16", f"{name} supports bf16")
        return Precision(torch.float16, "fp16", f"{name} has no bf16 (pre-Ampere, e.g. V100 on ml.p3)")
    return Precision(torch.float32, "fp32", "CPU run")


def attention_implementation(device: torch.device) -> str:
    """FlashAttention-2 on Ampere or newer when the image has it (the HF image does);
    SDPA otherwise. Both honour packed sequences given by position_ids."""
    if (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
            and importlib.util.find_spec("flash_attn") is not None):
        return "flash_attention_2"
    return "sdpa"


def load_4bit(source: str, precision: Precision, device_map, attn: str, token: str | None = None,
              revision: str | None = None, trust_remote_code: bool = False,
              skip_modules: list[str] | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source, token=token, revision=revision, trust_remote_code=trust_remote_code)
    fused = experts_tf5.applies(config)
    with experts_tf5.weightless_experts(config) if fused else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_pretrained(
            source, quantization_config=quantization(config, precision, skip_modules), dtype=precision.dtype,
            device_map=device_map,
            attn_implementation=attn, token=token, revision=revision, trust_remote_code=trust_remote_code,
            low_cpu_mem_usage=True,
        )
    if fused:
        experts_tf5.quantize_experts(model, source, precision.dtype, token=token, revision=revision)
    return model


def quantization(config, precision: Precision, skip_modules: list[str] | None = None):
    """NF4 with double quantization, compute in the job's precision; routers and head kept."""
    from transformers import BitsAndBytesConfig

    skip = list(skip_modules or []) + router_names(config)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=precision.dtype,
        # An explicit list replaces transformers' default one (the output head), so the head is named too.
        llm_int8_skip_modules=skip + ["lm_head"] if skip else None,
    )


def router_names(config) -> list[str]:
    """Full names of the MoE routers, kept in the compute dtype: a router is tiny (hidden x
    experts), its outputs pick the experts so 4-bit noise there changes the routing, and
    bitsandbytes' CPU eval path (AVX512-BF16) asserts out_features % 32 == 0, which a
    4- or 8-expert router fails. transformers 4.x skips a module whose full name equals an
    entry, or whose name starts with an entry plus "."; the full names match nothing else
    (a bare "gate" would also catch gate_proj where names are matched by substring)."""
    if config.model_type != "mixtral":
        return []
    return [f"model.layers.{i}.block_sparse_moe.gate" for i in range(config.num_hidden_layers)]


def check_quantized(model: nn.Module) -> dict[str, int]:
    """Every linear layer but the output head and the MoE routers must be bitsandbytes
    4-bit, and no 3D+ weight (fused experts) may stay in 16/32-bit. Raises QuantizationError
    naming the layers and the bytes they hold. Returns the 4-bit layer count, and for an MoE
    model `experts="nf4"` and how many expert matrices (w1, w3, w2 of every expert) are 4-bit."""
    import bitsandbytes as bnb

    output = model.get_output_embeddings()
    num_experts = getattr(model.config, "num_local_experts", None) or getattr(model.config, "num_experts", None)
    quantized, expert_matrices, offenders, offender_bytes = 0, 0, [], 0
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            quantized += 1
            expert_matrices += ".experts." in f".{name}."
        elif isinstance(module, nn.Linear) and module is not output:
            is_router = num_experts is not None and module.out_features == num_experts
            if not is_router:
                offenders.append(name)
                offender_bytes += module.weight.numel() * module.weight.element_size()
        for pname, param in module.named_parameters(recurse=False):
            if param.ndim >= 3 and not isinstance(param, bnb.nn.Params4bit) \
                    and not experts_tf5.is_placeholder(module, pname):
                offenders.append(f"{name}.{pname}" if name else pname)
                offender_bytes += param.numel() * param.element_size()
    if offenders:
        import transformers

        shown = ", ".join(offenders[:4]) + (f" and {len(offenders) - 4} more" if len(offenders) > 4 else "")
        raise QuantizationError(
            f"{len(offenders)} large weights are not 4-bit ({_size(offender_bytes)} unquantized): {shown}. "
            f"transformers {transformers.__version__}: 5.x stores MoE experts as fused 3D parameters that "
            f"bitsandbytes does not quantize, and the job quantizes them itself only for "
            f"{', '.join(experts_tf5.LAYOUTS)}; use transformers 4.x (the HF training image 2.8.0-transformers4.56.2)"
        )
    if quantized == 0:
        raise QuantizationError("no layer was quantized to 4-bit; is bitsandbytes working on this device?")
    if num_experts is None:
        return {"linear4bit": quantized}
    return {"linear4bit": quantized, "experts": "nf4", "expert_matrices": expert_matrices}


def lora_targets(model: nn.Module, requested) -> list[str] | str:
    if requested == "auto":
        return LORA_TARGETS.get(model.config.model_type, "all-linear")
    return requested


def lora_config(model: nn.Module, lora):
    """PEFT's LoraConfig for `model`. With the experts as 3D parameters (transformers 5),
    w1/w3 and w2 are targeted as PEFT 0.18 does it on a stock model (`target_parameters`
    gate_up_proj and down_proj), so the adapter loads there; PEFT refuses LoRA dropout on a
    parameter, so the experts train without it and the dropout is set on the modules after."""
    from peft import LoraConfig

    targets = lora_targets(model, lora.target_modules)
    common = dict(r=lora.r, lora_alpha=lora.alpha, bias="none", task_type="CAUSAL_LM")
    if not any(isinstance(m, experts_tf5.NF4Experts) for m in model.modules()):
        return LoraConfig(lora_dropout=lora.dropout, target_modules=targets, **common)
    if isinstance(targets, str):
        # "all-linear" by name: PEFT would wrap the NF4 experts' inner modules, which the fused
        # pass never calls (their LoRA would train nothing); they become parameters below
        targets = _linear_names(model)
    experts = {"w1": "experts.gate_up_proj", "w3": "experts.gate_up_proj", "w2": "experts.down_proj",
               "gate_proj": "experts.gate_up_proj", "up_proj": "experts.gate_up_proj", "down_proj": "experts.down_proj"}
    params = sorted({experts[t] for t in targets if t in experts})
    return LoraConfig(lora_dropout=0.0, target_modules=[t for t in targets if t not in experts],
                      target_parameters=params, **common)


def _linear_names(model: nn.Module) -> list[str]:
    """What PEFT's "all-linear" selects, as module names: every linear layer but the output head."""
    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, nn.Linear) and m is not head})


def attach_lora(model, lora, training):
    """PEFT LoRA on the 4-bit model, set up as the job's `lora` and `training` sections say
    (hyperparams.LoraSpec and TrainingSpec): training.fused_moe routes Mixtral's expert blocks
    through entrypoint.moe (same modules and adapter format; on an H200 1.4x faster per MoE
    layer with less memory than the stock path, bench/README.md); training.offload_checkpoints
    keeps checkpointed layer inputs in host memory (entrypoint.offload); training.bf16_residual
    keeps the residual stream in bf16 where the model was loaded in bf16 (set_residual_dtype);
    training.compile_small_ops compiles the norms and rotary embedding on CUDA (compile_small_ops);
    training.fused_attention runs the 4-bit attention projections as entrypoint.projections does;
    training.flex_attention runs attention through FlexAttention on CUDA (use_flex_attention);
    training.chunked_loss runs the head and its loss a chunk of tokens at a time (entrypoint.head)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    loaded = model.get_input_embeddings().weight.dtype
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=training.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    # transformers 5 makes the embedding output require grad whenever checkpointing is on (which
    # reentrant checkpoints need); with torch's non-reentrant checkpoint, the job's, that only adds a
    # gradient for the embedding output and keeps the first layer's input alive until backward,
    # offloaded or not. PEFT skips it for non-reentrant checkpoints, and transformers 4 never set it.
    if getattr(model, "_require_grads_hook", None) is not None:
        model.disable_input_require_grads()
    if training.bf16_residual and loaded == torch.bfloat16:
        set_residual_dtype(model, torch.bfloat16)
    if training.gradient_checkpointing and training.offload_checkpoints:
        from entrypoint.offload import use_offloaded_checkpoints

        use_offloaded_checkpoints(model)
    config = lora_config(model, lora)
    with warnings.catch_warnings():  # PEFT warns on any module type it does not know, NF4Experts included
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        model = get_peft_model(model, config)
    model.config.use_cache = False
    if config.target_parameters:
        experts_tf5.set_lora_dropout(model, lora.dropout)
    seeded_lora_dropout(model, lora.dropout)
    # NF4Experts run only the fused pass: PEFT's own forward on them would add its LoRA
    # delta to the one-element stand-in parameters
    experts_tf5.use_fused_moe(model)
    if training.fused_moe:
        from entrypoint.moe import use_fused_moe

        use_fused_moe(model)
    if training.fused_attention:
        from entrypoint.projections import use_fused_attention

        use_fused_attention(model)
    if training.compile_small_ops and model.get_input_embeddings().weight.is_cuda:
        model.compiled_small_ops = compile_small_ops(model)
    if training.flex_attention and model.get_input_embeddings().weight.is_cuda:
        use_flex_attention(model)
    if training.chunked_loss:
        from entrypoint.head import use_chunked_loss

        use_chunked_loss(model)
    return model


def seeded_lora_dropout(model: nn.Module, p: float) -> int:
    """Every LoRA module's input dropout as kernels.SeededDropout (its mask drawn in-kernel and
    drawn again in backward, not kept), except under DoRA, whose PEFT forward reads the dropped
    input in its own dtype. On transformers 5 this also sets lora.dropout on the attention
    modules, whose config had none (model.lora_config). Returns how many modules it set."""
    from entrypoint.kernels import SeededDropout

    n = 0
    for module in model.modules():
        if ("default" in getattr(module, "lora_dropout", {}) and not hasattr(module, "parameter_name")
                and not getattr(module, "use_dora", {}).get("default", False)):
            module.lora_dropout["default"] = SeededDropout(p) if p else nn.Identity()
            n += 1
    return n


FLEX = "sm_qlora_flex"


def _flex_forward(module, query, key, value, attention_mask, **kwargs):
    """transformers' FlexAttention with q, k, v in the autocast dtype, as SDPA takes them under
    autocast (flex is not an autocast op: on the fp32 residual stream it would run in fp32)."""
    from transformers.integrations.flex_attention import flex_attention_forward

    device = query.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        query, key, value = (t.to(dtype) for t in (query, key, value))
    return flex_attention_forward(module, query, key, value, attention_mask, **kwargs)


def use_flex_attention(model: nn.Module) -> None:
    """training.flex_attention: the model's attention through FlexAttention. transformers builds its
    mask as a BlockMask from the packed rows' position ids (each example attends to itself only),
    so the blocks across examples are skipped where SDPA computes the dense causal square and
    masks them. Registered under its own name (FLEX) to cast q, k, v as autocast does for SDPA.
    CUDA only (torch has no FlexAttention backward on CPU)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flex_attention_mask

    AttentionInterface.register(FLEX, _flex_forward)
    AttentionMaskInterface.register(FLEX, flex_attention_mask)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(FLEX)


def residual_params(model: nn.Module) -> list[nn.Parameter]:
    """The floating-point weights that are neither 4-bit nor trainable: embeddings, norms, routers,
    output head. prepare_model_for_kbit_training upcasts them to fp32, which makes the residual
    stream between the layers fp32: every projection then casts its input down and its output up."""
    return [p for p in model.parameters()
            if p.is_floating_point() and not p.requires_grad and p.__class__.__name__ != "Params4bit"]


def set_residual_dtype(model: nn.Module, dtype: torch.dtype) -> int:
    """training.bf16_residual: those weights back in the dtype the model was loaded in, so the
    residual stream and each checkpointed layer input are bf16 (half the bytes). Each layer still
    computes its norms in fp32 and its matmuls in bf16 under autocast; what changes is that the
    sums of the residual stream round to bf16, as in bf16 training without QLoRA. bf16 only: an
    fp16 residual stream can overflow (why PEFT upcasts). Returns how many weights were cast."""
    params = residual_params(model)
    for p in params:
        p.data = p.data.to(dtype)
    return len(params)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) with 4-bit weights counted as the parameters they stand for."""
    trainable = total = 0
    for p in model.parameters():
        if getattr(p, "nf4_experts", False):
            continue  # a stand-in: its experts are counted as the Linear4bit layers they are
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


# The RMSNorms whose forward is exactly _rms_norm (weight times the input-dtype result); others
# (Olmo2, GptOss, Gemma, ...) round in another order and keep their own forward.
LLAMA_RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen2MoeRMSNorm",
                             "Qwen3RMSNorm", "Qwen3MoeRMSNorm"})


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama/Mistral/Mixtral/Qwen RMSNorm, the same arithmetic: fp32 inside."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def compile_small_ops(model: nn.Module) -> int:
    """RMSNorm and the rotary embedding through torch.compile: one fused kernel each way where
    eager runs about eight elementwise passes over (rows, seq, hidden) fp32 copies.

    - one compiled function per op, shared by every layer (no recompile per module); each norm
      keeps its own weight and eps; shapes that vary (unpacked batches) make it dynamic after the
      first recompile instead of compiling each width;
    - only the norms in LLAMA_RMS_NORMS, and the rotary function of their modeling modules;
    - a norm under an accelerate hook (device_map over several GPUs) keeps the hook, which moves
      its inputs to its device: the hook's inner forward is replaced, not the hook.
    Returns how many norms were switched."""
    import sys

    # emulate_precision_casts: round where eager rounds (each bf16 op's result, each .to(bf16));
    # inductor otherwise keeps fp32 across them, which on CPU moved the LoRA gradients of the bf16
    # residual stream to cosine 0.9996 of eager's (0.999994 with it)
    options = {"emulate_precision_casts": True}
    norm = torch.compile(_rms_norm, dynamic=None, options=options)
    count = 0
    modeling = set()
    for module in model.modules():
        if type(module).__name__ in LLAMA_RMS_NORMS:
            inner = "_old_forward" if hasattr(module, "_hf_hook") else "forward"
            setattr(module, inner, lambda x, m=module: norm(x, m.weight, m.variance_epsilon))
            count += 1
            modeling.add(sys.modules[type(module).__module__])
    for mod in modeling:
        rotary = getattr(mod, "apply_rotary_pos_emb", None)
        if rotary is not None and not hasattr(rotary, "_torchdynamo_orig_callable"):
            mod.apply_rotary_pos_emb = torch.compile(rotary, dynamic=None, options=options)
    return count
