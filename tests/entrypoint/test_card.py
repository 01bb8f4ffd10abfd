"""The adapter card: which transformers an adapter loads on."""

from __future__ import annotations

import json


def test_an_adapter_on_numbered_experts_is_bound_to_transformers_4_whatever_its_module_names(tmp_path):
    """Qwen3-MoE on transformers 4 puts its expert LoRA on mlp.experts.N.gate_proj/up_proj/down_proj,
    names a dense model has too: the tensors' names (experts.N.) tell the layout, not target_modules."""
    import struct

    from entrypoint.card import adapter_stack, read_adapter

    def adapter(names: list[str]) -> tuple[dict, list[str]]:
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        d.mkdir()
        header = json.dumps({n: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]} for n in names}).encode()
        (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
        (d / "adapter_config.json").write_text(json.dumps({"target_modules": ["q_proj", "gate_proj", "up_proj",
                                                                              "down_proj"]}))
        return read_adapter(d)

    moe = adapter(["base_model.model.model.layers.0.mlp.experts.3.gate_proj.lora_A.weight"])
    dense = adapter(["base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight"])
    assert adapter_stack(*moe)[0] == 4
    assert adapter_stack(*dense)[0] is None
