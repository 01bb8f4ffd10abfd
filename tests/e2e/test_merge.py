"""`sm-qlora merge` on the tiny model: the merged model computes what base + adapter
computes through peft, and loads with transformers alone.

No training here: the adapter is made with peft on the tiny base with random LoRA A and
B (`init_lora_weights=False`), so the merge really changes every targeted weight.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from entrypoint.merge import MergeSpec, merge
from tests.conftest import ROOT

torch = pytest.importorskip("torch")

LOAD_WITHOUT_PEFT = """
import sys, json, torch
sys.modules["peft"] = None          # any attempt to import peft now fails
sys.modules["bitsandbytes"] = None
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = model(input_ids=ids).logits
torch.save({"logits": logits, "class": type(model).__name__,
            "lora": [n for n, _ in model.named_parameters() if "lora" in n]}, sys.argv[3])
"""

IDS = [[1, 17, 200, 45, 999, 3, 64, 1500, 7, 2]]


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


def peft_logits(tiny_model: Path, adapter: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits


def base_logits(tiny_model: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        return base(input_ids=torch.tensor(IDS)).logits


def test_merged_model_equals_base_plus_adapter_and_needs_no_peft(tiny_model, adapter, tmp_path):
    out = merge(MergeSpec(adapter=str(adapter), base=str(tiny_model), out=str(tmp_path / "merged"), dtype="fp32",
                          adapter_job="tiny-medical-20261129-101500", data="examples/data/medical.jsonl"))
    result = tmp_path / "result.pt"
    subprocess.run([sys.executable, "-c", LOAD_WITHOUT_PEFT, str(out), json.dumps(IDS), str(result)], check=True,
                   cwd=ROOT)
    loaded = torch.load(result)
    expected = peft_logits(tiny_model, adapter)
    assert loaded["class"] == "MixtralForCausalLM" and loaded["lora"] == []
    assert torch.allclose(loaded["logits"], expected, atol=1e-4, rtol=0), \
        f"max diff {(loaded['logits'] - expected).abs().max():.2e}"
    # the adapter matters: without it the logits differ by far more than the tolerance
    assert (base_logits(tiny_model) - expected).abs().max() > 1e-2
    names = {p.name for p in out.iterdir()}
    assert "config.json" in names and "tokenizer.json" in names and "README.md" in names
    assert any(n.endswith(".safetensors") for n in names) and "adapter_config.json" not in names
    card = (out / "README.md").read_text()
    assert f"base_model: {tiny_model}" in card
    assert "tiny-medical-20261129-101500" in card and "examples/data/medical.jsonl" in card
    assert not list(tmp_path.glob(".*partial*")), "the staging directory was left behind"


def test_default_dtype_on_cpu_writes_bf16(tiny_model, adapter, tmp_path):
    out = merge(MergeSpec(adapter=str(adapter), base=str(tiny_model), out=str(tmp_path / "merged")))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors import safe_open

    shard = next(out.glob("*.safetensors"))
    with safe_open(str(shard), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_a_failed_merge_leaves_nothing_and_an_existing_model_is_not_overwritten(tiny_model, adapter, tmp_path):
    import shutil

    from entrypoint.merge import BadInput

    broken = tmp_path / "broken-adapter"
    shutil.copytree(adapter, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(Exception, match="(?i)safetensors|header|deserializ"):
        merge(MergeSpec(adapter=str(broken), base=str(tiny_model), out=str(work / "m")))
    assert sorted(p.name for p in work.iterdir()) == []  # no model, no staging directory
    with pytest.raises(BadInput, match="not a model directory"):
        merge(MergeSpec(adapter=str(adapter), base=str(tmp_path / "no-such-base"), out=str(work / "m")))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "model.safetensors").write_text("someone's model")
    with pytest.raises(BadInput, match="not empty"):
        merge(MergeSpec(adapter=str(adapter), base=str(tiny_model), out=str(busy)))
    assert (busy / "model.safetensors").read_text() == "someone's model"
