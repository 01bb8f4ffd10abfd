"""Model shapes for planning: from a local model directory's config.json, from the hub's
config.json when it is reachable, else from a small built-in table of the models users
fine-tune most. Each answer says which source it came from."""

from __future__ import annotations

import json
import os
import re
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class Shape:
    name: str
    model_type: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    experts: int = 1
    experts_per_token: int = 1
    head_dim: int | None = None
    tied_embeddings: bool = False
    source: str = "built-in table"

    @property
    def dh(self) -> int:
        return self.head_dim or self.hidden // self.heads

    # Linear weights of one decoder layer, all of which bitsandbytes quantizes.
    @property
    def attention_params(self) -> int:
        q = self.hidden * self.heads * self.dh
        kv = 2 * self.hidden * self.kv_heads * self.dh
        return 2 * q + kv  # q and o, k and v

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden * self.intermediate

    @property
    def layer_quantized_params(self) -> int:
        router = self.hidden * self.experts if self.experts > 1 else 0
        return self.attention_params + self.experts * self.expert_params + router

    def lora_params_per_layer(self, r: int) -> int:
        """LoRA r on q,k,v,o and every expert's three projections (`target_modules: auto`)."""
        q = r * (self.hidden + self.heads * self.dh)
        kv = r * (self.hidden + self.kv_heads * self.dh)
        mlp = r * (self.hidden + self.intermediate) * 3
        return 2 * q + 2 * kv + self.experts * mlp

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def total_params(self) -> int:
        """Every weight: what a bf16 copy of the model holds (the merge sizes its instance by it)."""
        return self.layers * self.layer_quantized_params + self.embedding_params

    @property
    def active_params_per_token(self) -> int:
        """What one token passes through: attention, top-k experts, the output head."""
        per_layer = self.attention_params + self.experts_per_token * self.expert_params
        return self.layers * per_layer + self.vocab * self.hidden


def _mixtral(name, **kw):
    return Shape(name=name, model_type="mixtral", experts=8, experts_per_token=2, **kw)


BUILT_IN: dict[str, Shape] = {
    "mixtral-8x7b": _mixtral("Mixtral-8x7B", vocab=32000, hidden=4096, intermediate=14336, layers=32, heads=32,
                             kv_heads=8),
    "mixtral-8x22b": _mixtral("Mixtral-8x22B", vocab=32768, hidden=6144, intermediate=16384, layers=56, heads=48,
                              kv_heads=8),
    "mistral-7b": Shape("Mistral-7B", "mistral", vocab=32768, hidden=4096, intermediate=14336, layers=32, heads=32,
                        kv_heads=8),
    "llama-3-8b": Shape("Llama-3-8B", "llama", vocab=128256, hidden=4096, intermediate=14336, layers=32, heads=32,
                        kv_heads=8),
    "llama-3-70b": Shape("Llama-3-70B", "llama", vocab=128256, hidden=8192, intermediate=28672, layers=80, heads=64,
                         kv_heads=8),
    "qwen2.5-7b": Shape("Qwen2.5-7B", "qwen2", vocab=152064, hidden=3584, intermediate=18944, layers=28, heads=28,
                        kv_heads=4),
    "qwen2.5-72b": Shape("Qwen2.5-72B", "qwen2", vocab=152064, hidden=8192, intermediate=29568, layers=80, heads=64,
                         kv_heads=8),
    # 128 experts of moe_intermediate_size 768, 8 per token (the job runs it on the transformers 5 image)
    "qwen3-30b-a3b": Shape("Qwen3-30B-A3B", "qwen3_moe", vocab=151936, hidden=2048, intermediate=768, layers=48,
                           heads=32, kv_heads=4, experts=128, experts_per_token=8, head_dim=128),
}
# hub-id spellings -> table key (searched in the lower-cased id)
ALIASES = [
    (r"mixtral-8x22b", "mixtral-8x22b"), (r"mixtral-8x7b", "mixtral-8x7b"), (r"mistral-7b", "mistral-7b"),
    (r"llama-3(\.\d)?-70b", "llama-3-70b"), (r"llama-3(\.\d)?-8b", "llama-3-8b"),
    (r"qwen2\.5-72b", "qwen2.5-72b"), (r"qwen2\.5-7b", "qwen2.5-7b"), (r"qwen3-30b-a3b", "qwen3-30b-a3b"),
]


def from_config(cfg: dict, name: str, source: str) -> Shape:
    text = cfg.get("text_config", cfg)
    experts = text.get("num_local_experts") or text.get("num_experts") or 1
    return Shape(
        name=name, model_type=text.get("model_type", "?"), vocab=text["vocab_size"], hidden=text["hidden_size"],
        intermediate=text.get("moe_intermediate_size") if experts > 1 and text.get("moe_intermediate_size")
        else text["intermediate_size"],
        layers=text["num_hidden_layers"], heads=text["num_attention_heads"],
        kv_heads=text.get("num_key_value_heads") or text["num_attention_heads"], experts=experts,
        experts_per_token=text.get("num_experts_per_tok") or 1, head_dim=text.get("head_dim"),
        tied_embeddings=bool(text.get("tie_word_embeddings", False)), source=source,
    )


def built_in(model_id: str) -> Shape | None:
    lowered = model_id.lower()
    for pattern, key in ALIASES:
        if re.search(pattern, lowered):
            return replace(BUILT_IN[key], source=f"built-in table ({BUILT_IN[key].name})")
    return None


def offline() -> bool:
    return any(os.environ.get(k) in ("1", "true", "True") for k in ("HF_HUB_OFFLINE", "SM_QLORA_OFFLINE"))


def from_hub(model_id: str, timeout_s: float = 3.0) -> Shape | None:
    if offline() or "://" in model_id or not re.match(r"^[\w.-]+/[\w.-]+$", model_id):
        return None
    req = urllib.request.Request(f"https://huggingface.co/{model_id}/resolve/main/config.json")
    if os.environ.get("HF_TOKEN"):
        req.add_header("Authorization", f"Bearer {os.environ['HF_TOKEN']}")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return from_config(json.loads(resp.read()), model_id, "the hub's config.json")
    except Exception:  # unreachable, gated, not a transformers model: fall back to the table
        return None


def resolve(model_id: str, network: bool = True) -> Shape | None:
    """Local directory, then the hub (if `network` and reachable), then the built-in table."""
    path = Path(model_id)
    try:
        local = (path / "config.json").is_file()
    except OSError:  # a name the system refuses (too long): not a local directory
        local = False
    if local:
        return from_config(json.loads((path / "config.json").read_text()), path.name, f"{path}/config.json")
    if network:
        shape = from_hub(model_id)
        if shape is not None:
            return shape
    return built_in(model_id)
