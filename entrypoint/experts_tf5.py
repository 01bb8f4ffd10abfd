"""Mixtral's experts in 4-bit on transformers 5: the job quantizes them itself as they load.

transformers 5 holds a layer's experts as two 3D parameters (`MixtralExperts.gate_up_proj`
[E, 2I, H] and `down_proj` [E, H, I]) and bitsandbytes quantizes only nn.Linear, so with a
BitsAndBytesConfig the experts would load in bf16, about 90 GB for Mixtral-8x7B
(bitsandbytes#1849; the fixes bitsandbytes#1965 and transformers#39859 are not released).
No library does this yet, so it is written here:

- while `from_pretrained` runs, a layer's experts module has no weights, so transformers
  neither reads the expert tensors nor allocates them (a checkpoint key with no parameter
  is skipped before it is read);
- then each expert matrix is read from the checkpoint's files (the hub's per-expert w1/w2/w3,
  or one expert's slice of a 3D tensor), quantized to NF4 with double quantization on the
  layer's device and kept as a bitsandbytes Linear4bit w1, w3 and w2 per expert, as on
  transformers 4: one expert matrix at a time is on the device in 16/32-bit;
- gate_up_proj and down_proj stay parameters of their 3D shape holding one element (a
  stride-0 view), so PEFT's `target_parameters` wraps them as on a stock model and the
  adapter it saves loads on stock transformers 5 + PEFT 0.18 (`check_quantized` knows them);
- the fused expert pass of entrypoint.moe runs every block: PEFT's LoRA for expert e of a
  parameter read as [E, in, out] adds s * A_e^T B_e^T, i.e. x -> s (x B_e) A_e, which is
  the pass's LoRA with its A = B_e^T and its B = A_e^T (split into w1 and w3 rows).
"""

from __future__ import annotations

import contextlib
import json
import types
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from entrypoint import moe


@dataclass(frozen=True)
class Layout:
    """Where a model type's experts live in transformers 5 and in the hub's checkpoints."""
    module: str          # the transformers 5 module that builds the experts
    experts: str         # its experts class (3D gate_up_proj and down_proj)
    pretrained: str      # its PreTrainedModel class
    block: str           # its sparse-MoE block class
    hub: dict            # w1/w3/w2 -> the per-expert checkpoint name under model.layers.N.
    num_experts: str     # config attribute names
    intermediate: str


LAYOUTS = {
    "mixtral": Layout("transformers.models.mixtral.modeling_mixtral", "MixtralExperts", "MixtralPreTrainedModel",
                      "MixtralSparseMoeBlock", {n: f"block_sparse_moe.experts.{{e}}.{n}.weight" for n in ("w1", "w3", "w2")},
                      "num_local_experts", "intermediate_size"),
    "qwen3_moe": Layout("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeExperts", "Qwen3MoePreTrainedModel",
                        "Qwen3MoeSparseMoeBlock", {"w1": "mlp.experts.{e}.gate_proj.weight",
                                                   "w3": "mlp.experts.{e}.up_proj.weight",
                                                   "w2": "mlp.experts.{e}.down_proj.weight"},
                        "num_experts", "moe_intermediate_size"),
}
BLOCKS = {layout.block for layout in LAYOUTS.values()}
# PEFT target_parameters for the experts (PEFT matches a suffix of the parameter's full name)
TARGET_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]
# what each 3D parameter is made of, per expert, in the hub's checkpoint names
PARTS = {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)}


def applies(config) -> bool:
    """Whether this transformers stores `config`'s experts as 3D parameters we load here."""
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5 and config.model_type in LAYOUTS


class NF4Experts(nn.Module):
    """Where transformers 5 puts MixtralExperts: the same forward signature, the experts as
    4-bit w1/w3/w2 Linear4bit per expert (`nf4`), filled by `quantize_experts`."""

    def __init__(self, config):
        super().__init__()
        self.layout = LAYOUTS[config.model_type]
        self.num_experts = getattr(config, self.layout.num_experts)
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = getattr(config, self.layout.intermediate)
        self.nf4 = nn.ModuleList()
        # lora.dropout for the LoRA on these experts, applied by the fused pass in training (PEFT
        # refuses dropout on a parameter; set_lora_dropout)
        self.expert_lora_dropout = 0.0
        # transformers' _init_weights finds this class under MixtralExperts' name while loading
        # and would initialise gate_up_proj, which is not there yet
        self._is_hf_initialized = True

    def forward(self, hidden_states, top_k_index, top_k_weights):
        plan = [[moe.Proj(expert[name], None, None, 0.0, 0.0) for name in moe.PROJECTIONS] for expert in self.nf4]
        return moe.run_experts(hidden_states, top_k_weights.to(hidden_states.dtype), top_k_index, plan)


@contextlib.contextmanager
def weightless_experts(config):
    """While loading, the experts module of `config`'s architecture is an empty NF4Experts."""
    import importlib

    layout = LAYOUTS[config.model_type]
    module, class_name = importlib.import_module(layout.module), layout.experts
    stock, pretrained = getattr(module, class_name), getattr(module, layout.pretrained)
    ignored = pretrained._keys_to_ignore_on_load_unexpected
    setattr(module, class_name, NF4Experts)
    # the expert tensors are read afterwards by quantize_experts: not "unexpected" in the load report
    pretrained._keys_to_ignore_on_load_unexpected = (ignored or []) + [r"\.experts\.(gate_up_proj|down_proj)$"]
    try:
        yield
    finally:
        setattr(module, class_name, stock)
        pretrained._keys_to_ignore_on_load_unexpected = ignored


def quantize_experts(model, source: str, dtype: torch.dtype, token: str | None = None,
                     revision: str | None = None) -> int:
    """Fill every NF4Experts of `model` from the checkpoint at `source`, one expert matrix
    at a time, on the device of the layer's router. Returns how many matrices are 4-bit."""
    files = _weight_files(source, token, revision)
    count = 0
    for i, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        if not isinstance(experts, NF4Experts):
            continue
        device = layer.mlp.gate.weight.device
        for e in range(experts.num_experts):
            mats = {name: _read(files, i, e, name, experts.layout) for name in moe.PROJECTIONS}
            experts.nf4.append(nn.ModuleDict({name: _linear4bit(w, dtype, device) for name, w in mats.items()}))
            count += len(mats)
        e, i_dim, h = experts.num_experts, experts.intermediate_dim, experts.hidden_dim
        # one fp32 element each: PEFT reads shape, device and dtype (its LoRA weights take that dtype)
        one = torch.zeros((), dtype=torch.float32, device=device)
        experts.gate_up_proj = nn.Parameter(one.expand(e, 2 * i_dim, h), requires_grad=False)
        experts.down_proj = nn.Parameter(one.expand(e, h, i_dim), requires_grad=False)
        experts.gate_up_proj.nf4_experts = experts.down_proj.nf4_experts = True
    return count


def is_placeholder(module: nn.Module, name: str) -> bool:
    """The one-element 3D stand-ins of an NF4Experts (their experts are Linear4bit)."""
    return isinstance(module, NF4Experts) and name in PARTS and len(module.nf4) > 0


def _linear4bit(weight: torch.Tensor, dtype: torch.dtype, device: torch.device):
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=dtype,
                              compress_statistics=True, quant_type="nf4", device="meta")
    # Params4bit quantizes as it moves to the device: only this matrix is there unquantized
    layer.weight = bnb.nn.Params4bit(weight.to(dtype), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4").to(device)
    return layer


def _weight_files(source: str, token: str | None, revision: str | None) -> dict[str, Path]:
    """Checkpoint key -> safetensors file, for a local directory or a hub id (already in the
    cache: from_pretrained has just fetched it)."""
    from transformers.utils import cached_file

    def fetch(name: str, required: bool = True):
        local = Path(source).expanduser() / name
        if local.is_file():
            return local
        found = cached_file(source, name, token=token, revision=revision,
                            _raise_exceptions_for_missing_entries=required)
        return Path(found) if found else None

    index = fetch("model.safetensors.index.json", required=False)
    if index is None:
        single = fetch("model.safetensors")
        from safetensors import safe_open

        with safe_open(single, "pt") as f:
            return dict.fromkeys(f.keys(), single)
    weight_map = json.loads(index.read_text())["weight_map"]
    return {key: fetch(file) for key, file in weight_map.items()}


def _read(files: dict[str, Path], layer: int, expert: int, name: str, layout: Layout) -> torch.Tensor:
    """One expert matrix (out, in) from the hub's per-expert layout, or its slice of the 3D
    layout transformers 5 may have saved."""
    from safetensors import safe_open

    hub = f"model.layers.{layer}." + layout.hub[name].format(e=expert)
    if hub in files:
        with safe_open(files[hub], "pt") as f:
            return f.get_tensor(hub)
    fused = "gate_up_proj" if name in PARTS["gate_up_proj"] else "down_proj"
    key = f"model.layers.{layer}.mlp.experts.{fused}"
    if key not in files:
        raise KeyError(f"the checkpoint has neither {hub} nor {key}")
    with safe_open(files[key], "pt") as f:
        w = f.get_slice(key)[expert]
    if fused == "gate_up_proj":
        half = w.shape[0] // 2
        w = w[:half] if name == "w1" else w[half:]
    return w.contiguous()


# --------------------------------------------------------------------------- the fused pass

def use_fused_moe(model) -> int:
    """Route every MoE block whose experts are NF4Experts through the fused expert pass of
    entrypoint.moe, LoRA read from PEFT's ParamWrappers. Returns how many blocks."""
    switched, devices = 0, set()
    for module in model.modules():
        if type(module).__name__ in BLOCKS and _experts(module)[0] is not None:
            if not hasattr(module, "_stock_forward"):
                module._stock_forward = module.forward
                module.forward = types.MethodType(_moe_forward, module)
                devices.add(module.gate.weight.device)
            switched += 1
    for device in devices:
        moe.kernels.warm_up(device)
    moe.mark_skip_safe(model)
    return switched


def set_lora_dropout(model, p: float) -> int:
    """lora.dropout on the experts' LoRA input, as transformers 4's per-expert LoRA modules have it:
    PEFT 0.18 refuses dropout on a target parameter, so the fused pass draws it (one mask for
    gate_up_proj's input, one for down_proj's). Returns how many expert modules."""
    experts = [m for m in model.modules() if isinstance(m, NF4Experts)]
    for m in experts:
        m.expert_lora_dropout = p
    return len(experts)


def _experts(block) -> tuple[NF4Experts | None, dict]:
    """The block's NF4Experts under any PEFT ParamWrappers, and those wrappers by parameter."""
    wrappers, m = {}, block.experts
    while hasattr(m, "parameter_name") and hasattr(m, "base_layer"):
        wrappers[m.parameter_name] = m
        m = m.base_layer
    return (m if isinstance(m, NF4Experts) and len(m.nf4) else None), wrappers


def plan(block) -> list[list[moe.Proj]] | None:
    """Per expert: w1, w3, w2 as the fused pass takes them; None when PEFT must run instead
    (adapters merged or disabled, several at once)."""
    experts, wrappers = _experts(block)
    if experts is None:
        return None
    loras = {}
    for pname, w in wrappers.items():
        active = [a for a in w.active_adapters if a in w.lora_A]
        if w.merged or w.disable_adapters or len(active) != 1:
            return None
        loras[pname] = (w.lora_A[active[0]].weight, w.lora_B[active[0]].weight, float(w.scaling[active[0]]))
    out = []
    drop = experts.expert_lora_dropout if block.training else 0.0
    for e, expert in enumerate(experts.nf4):
        projs = {}
        for pname, names in PARTS.items():
            a, b = _expert_lora(loras.get(pname), e, experts.num_experts)
            rows = None if b is None else b.chunk(len(names), dim=0)
            scaling = loras[pname][2] if pname in loras else 0.0
            for j, name in enumerate(names):  # w1 and w3 share `a`: the pass then drops their input once
                projs[name] = moe.Proj(expert[name], a, None if rows is None else rows[j], scaling, drop)
        out.append([projs[name] for name in moe.PROJECTIONS])
    return out


def _expert_lora(lora, e: int, experts: int):
    """Expert e's (A, B) in the fused pass's convention (A: r x in, B: out x r) from PEFT's
    ParamWrapper factors lora_A [r*E, P] and lora_B [Q, r*E] (PEFT's in/out = P/Q)."""
    if lora is None:
        return None, None
    lora_a, lora_b, _ = lora
    r = lora_a.shape[0] // experts
    a_e = lora_a.view(experts, r, -1)[e]          # r x P, P = the matrix's output rows
    b_e = lora_b.view(lora_b.shape[0], r, experts)[:, :, e]  # Q x r, Q = its input columns
    return b_e.t(), a_e.t()


def _moe_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    projs = plan(self)
    if projs is None:
        return self._stock_forward(hidden_states)
    batch, seq, hidden = hidden_states.shape
    if self.training and getattr(self, "jitter_noise", 0) > 0:  # Mixtral's; Qwen3-MoE has none
        hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
            1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
    x = hidden_states.reshape(-1, hidden)
    _, weights, selected = self.gate(x)
    out = moe.run_experts(x, weights.to(x.dtype), selected, projs, skip=getattr(self, "skip_in_checkpoints", False))
    return out.view(batch, seq, hidden)

