"""The job on transformers 5 (HF image 2.9.0-transformers5.3.0): Mixtral's experts in NF4,
quantized by the job from the hub's per-expert layout, LoRA on them in PEFT 0.18's format,
trained by the fused MoE pass. Runs in the second venv (`make test-tf5`, .venv-tf5); the
main venv (transformers 4.56.2) has nothing to run here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the transformers 5 path: run by `make test-tf5` in .venv-tf5", allow_module_level=True)

from entrypoint import experts_tf5, moe  # noqa: E402
from entrypoint import model as M  # noqa: E402
from entrypoint.hyperparams import LoraSpec, TrainingSpec  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from tests.entrypoint import nets  # noqa: E402

FP32 = M.Precision(torch.float32, "fp32", "test")
TF4_PYTHON = ROOT / ".venv" / "bin" / "python"
# The same 20 steps on either stack: same data, seed, rank; prints the losses as JSON.
TWENTY_STEPS = """
import json, sys, torch
from entrypoint import model as M
from entrypoint.hyperparams import LoraSpec, TrainingSpec
torch.manual_seed(0)
base = M.load_4bit(sys.argv[1], M.Precision(torch.float32, "fp32", "t"), {"": "cpu"}, "sdpa")
net = M.attach_lora(base, LoraSpec(r=8, alpha=16, dropout=0.0, target_modules="auto"), TrainingSpec())
opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=2e-2)
g = torch.Generator().manual_seed(2)
data = [torch.randint(0, 64, (4, 64), generator=g) for _ in range(4)]  # a small vocabulary: learnable
losses = []
net.train()
for step in range(20):
    ids = data[step % 4]
    loss = net(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(loss.item())
print(json.dumps(losses))
"""


def lora_net(tiny_model, r: int = 4, dropout: float = 0.0):
    torch.manual_seed(0)
    base = M.load_4bit(str(tiny_model), FP32, {"": "cpu"}, "sdpa")
    net = M.attach_lora(base, LoraSpec(r=r, alpha=2 * r, dropout=dropout, target_modules="auto"), TrainingSpec())
    g = torch.Generator().manual_seed(1)
    for name, p in net.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; non-zero B exercises every LoRA gradient
            p.data = (torch.randn(p.shape, generator=g) * 0.05).to(p)
    return net


def test_experts_load_as_nf4_one_expert_matrix_at_a_time(tiny_model, monkeypatch):
    seen = []
    real = experts_tf5._linear4bit

    def spy(weight, dtype, device):
        seen.append(tuple(weight.shape))
        return real(weight, dtype, device)

    monkeypatch.setattr(experts_tf5, "_linear4bit", spy)
    base = M.load_4bit(str(tiny_model), FP32, {"": "cpu"}, "sdpa")
    config = base.config
    e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
    # every unquantized tensor the job held was one expert matrix, never a layer's experts
    assert seen == [(i, h), (i, h), (h, i)] * (e * config.num_hidden_layers)
    assert M.check_quantized(base) == {"linear4bit": 8 + 3 * e * 2, "experts": "nf4", "expert_matrices": 3 * e * 2}
    experts = base.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (e, 2 * i, h)
    assert experts.gate_up_proj.untyped_storage().nbytes() == 4  # a stand-in, not bf16 experts
    # transformers' own MixtralExperts is back in place for whatever loads next
    from transformers.models.mixtral import modeling_mixtral

    assert modeling_mixtral.MixtralExperts is not experts_tf5.NF4Experts


def test_a_stand_in_left_as_a_full_3d_weight_still_fails_the_check(tiny_model):
    base = M.load_4bit(str(tiny_model), FP32, {"": "cpu"}, "sdpa")
    experts = base.model.layers[1].mlp.experts
    experts.nf4 = torch.nn.ModuleList()  # as if quantize_experts had not run on this layer
    experts.down_proj = torch.nn.Parameter(torch.zeros(4, 64, 128, dtype=torch.bfloat16))
    with pytest.raises(M.QuantizationError, match="mlp.experts"):
        M.check_quantized(base)


def test_fused_pass_equals_peft_delta_on_the_dequantized_experts(tiny_model):
    """The block's output and LoRA gradients against transformers' own MixtralExperts on the
    dequantized NF4 weights plus PEFT's delta (get_delta_weight, what a merge adds)."""
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    net = lora_net(tiny_model)
    block = net.base_model.model.model.layers[0].mlp
    assert hasattr(block, "_stock_forward")
    x = torch.randn(1, 40, 64)
    out = block(x)
    wrappers = experts_tf5._experts(block)[1]
    params = [w.lora_A["default"].weight for w in wrappers.values()] + [w.lora_B["default"].weight for w in wrappers.values()]
    fast = torch.autograd.grad(out.square().sum(), params)

    nf4 = experts_tf5._experts(block)[0]
    dense = {name: torch.stack([moe._dequantize(tuple(moe.Proj(ex[n], None, None, 0, 0) for n in names), torch.float32)
                                for ex in nf4.nf4]) for name, names in experts_tf5.PARTS.items()}
    ref = MixtralExperts(net.config)
    for name in wrappers:
        setattr(ref, name, torch.nn.Parameter(dense[name], requires_grad=False))
    _, weights, selected = block.gate(x.view(-1, 64))
    for name, w in wrappers.items():
        delta = w.get_delta_weight("default")
        torch.nn.utils.parametrize.register_parametrization(ref, name, _Add(delta))
    expected = ref(x.view(-1, 64), selected, weights).view_as(out)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    slow = torch.autograd.grad(expected.square().sum(), params)
    for a, b in zip(fast, slow, strict=True):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


class _Add(torch.nn.Module):
    def __init__(self, delta):
        super().__init__()
        self.delta = delta

    def forward(self, w):
        return w + self.delta


def test_adapter_loads_with_peft_018_on_a_stock_transformers_5_model(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    net = lora_net(tiny_model)
    net.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj"]
    stock = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(stock, tmp_path)
    ours = {k: v for k, v in net.state_dict().items() if "lora_" in k}
    theirs = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert ours.keys() == theirs.keys() and len(ours) == 2 * (4 + 2) * 2
    for k in ours:
        torch.testing.assert_close(theirs[k], ours[k])


@pytest.mark.skipif(not TF4_PYTHON.is_file(), reason="needs the main venv (transformers 4.56.2) beside this one")
def test_twenty_steps_on_transformers_5_end_within_5_percent_of_transformers_4(tiny_model):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = {}
    for stack, python in (("tf5", sys.executable), ("tf4", str(TF4_PYTHON))):
        done = subprocess.run([python, "-c", TWENTY_STEPS, str(tiny_model)], capture_output=True, text=True,
                              env=env, cwd=ROOT, check=True)
        runs[stack] = json.loads(done.stdout.strip().splitlines()[-1])
    tf4, tf5 = runs["tf4"], runs["tf5"]
    assert tf4[0] == pytest.approx(tf5[0], rel=1e-4)  # the same model and data: LoRA starts at zero
    assert abs(tf5[-1] - tf4[-1]) <= 0.05 * tf4[-1], (tf4, tf5)
    # the tiny random model's frozen head allows only a small fall (7.65 -> 7.47 on either stack);
    # a stack that did not train at all would still be within 5%, so the falls must agree too
    fall4, fall5 = tf4[0] - min(tf4[-3:]), tf5[0] - min(tf5[-3:])
    assert fall4 > 0.1 and abs(fall5 - fall4) <= 0.25 * fall4, (tf4, tf5)


def test_the_tiny_model_is_saved_in_the_hubs_per_expert_layout_on_transformers_5_too(tmp_path):
    """As the real Mixtral checkpoint: w1/w2/w3 per expert under block_sparse_moe, which
    transformers 5 converts at load and the job reads one expert matrix at a time."""
    from safetensors import safe_open

    subprocess.run([sys.executable, str(ROOT / "examples" / "make_tiny_model.py"), str(tmp_path)], check=True,
                   capture_output=True)
    keys = set()
    for shard in tmp_path.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            keys |= set(f.keys())
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in keys
    assert sum(".experts." in k for k in keys) == 2 * 4 * 3
    assert not any("gate_up_proj" in k or ".mlp." in k for k in keys)


def test_qwen3_moe_trains_on_the_same_path(tmp_path):
    """Beyond Mixtral: Qwen3-MoE (the Qwen3-30B-A3B shape at toy width) has the same 3D experts
    in transformers 5; its experts load as NF4, and the fused pass equals PEFT's delta there too."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=False)
    Qwen3MoeForCausalLM(config).save_pretrained(tmp_path)
    assert M.check_quantized(M.load_4bit(str(tmp_path), FP32, {"": "cpu"}, "sdpa"))["expert_matrices"] == 2 * 8 * 3
    net = lora_net(tmp_path)
    block = net.base_model.model.model.layers[1].mlp
    assert hasattr(block, "_stock_forward")
    assert moe.describe(net) == "fused-torch"  # the [model] line's moe=, as for Mixtral
    assert experts_tf5.BLOCKS <= set(moe.MOE_BLOCKS)
    x = torch.randn(1, 24, 64)
    out = block(x)
    nf4, wrappers = experts_tf5._experts(block)
    ref = Qwen3MoeExperts(net.config)
    for name, names in experts_tf5.PARTS.items():
        dense = torch.stack([moe._dequantize(tuple(moe.Proj(ex[n], None, None, 0, 0) for n in names), torch.float32)
                             for ex in nf4.nf4])
        setattr(ref, name, torch.nn.Parameter(dense, requires_grad=False))
        torch.nn.utils.parametrize.register_parametrization(ref, name, _Add(wrappers[name].get_delta_weight("default")))
    _, weights, selected = block.gate(x.view(-1, 64))
    torch.testing.assert_close(out, ref(x.view(-1, 64), selected, weights).view_as(out), rtol=1e-5, atol=1e-5)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=2e-2)
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(4))
    losses = []
    for _ in range(5):
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_all_linear_trains_the_experts_through_the_fused_pass(tiny_model):
    """target_modules: all-linear on transformers 5 means the experts too, as on transformers 4:
    as PEFT target_parameters, every LoRA tensor of the adapter gets a gradient."""
    torch.manual_seed(0)
    base = M.load_4bit(str(tiny_model), FP32, {"": "cpu"}, "sdpa")
    net = M.attach_lora(base, LoraSpec(r=4, alpha=8, dropout=0.0, target_modules="all-linear"), TrainingSpec())
    assert not [n for n, _ in net.named_parameters() if ".experts.nf4." in n and "lora_" in n]
    expert_lora = [n for n, _ in net.named_parameters() if "experts" in n and "lora_" in n]
    assert expert_lora, "all-linear left the experts without LoRA"
    for name, p in net.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn_like(p) * 0.05
    ids = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(1))
    net(input_ids=ids, labels=ids).loss.backward()
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    assert [n for n, p in trainable if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_the_local_example_runs_on_transformers_5_with_its_experts_in_4_bit(tiny_model, tmp_path):
    """What a user of the 5.3.0 stack runs first: `sm-qlora launch examples/local-tiny.yaml --local`
    (cut to 12 steps), through the launcher and the job's own entry; its [model] line says the
    experts are NF4 and trained by the fused pass, and the adapter is written."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SM_QLORA_RUNS_DIR": str(tmp_path / "runs")}
    done = subprocess.run([sys.executable, "-m", "launcher", "launch", str(ROOT / "examples" / "local-tiny.yaml"),
                           "--local", "--set", "training.max_steps=12"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    model = next(x for x in done.stdout.splitlines() if x.startswith("[model]") and "experts=" in x)
    assert "experts=nf4 expert_matrices=24" in model and "moe=fused" in model
    assert "experts.gate_up_proj" in model  # PEFT 0.18's target_parameters: the transformers 5 format
    assert any(x.startswith("[done] steps=12") for x in done.stdout.splitlines())
    adapters = list((tmp_path / "runs").glob("*/model/adapter_model.safetensors"))
    assert len(adapters) == 1


def test_lora_dropout_reaches_the_experts_with_one_mask_for_gate_up_and_exact_gradients(tiny_model):
    """PEFT 0.18 refuses dropout on a target parameter, so the fused pass applies lora.dropout to
    the experts itself, as transformers 4's expert LoRA modules have it: in training only, one mask
    on gate_up_proj's input (its one adapter), one on down_proj's; backward replays the masks, so
    the gradients equal autograd's through the same masks."""
    from entrypoint import kernels

    net = lora_net(tiny_model, dropout=0.3)
    net.train()
    block = net.base_model.model.model.layers[0].mlp
    plan = experts_tf5.plan(block)
    assert {p.dropout for projs in plan for p in projs} == {0.3}
    w1, w3, _ = plan[0]
    k1, k3 = moe.mask_keys((w1, w3), 5, 6, 0)
    assert k1 == k3 == (0.3, 5 + 6)  # one mask, at w1's key
    in1, in3 = moe.lora_inputs(torch.ones(6, 64), (w1, w3), [k1, k3])
    assert in1 is in3 and (in1 == 0).any()
    params = [p for p in block.parameters() if p.requires_grad]
    x = torch.randn(1, 40, 64, requires_grad=True)
    grads = []
    for run in (block, lambda h: reference_experts(block, h, kernels)):
        torch.manual_seed(7)
        run(x).square().sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in params])
        x.grad = None
        for p in params:
            p.grad = None
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.manual_seed(8)
    assert not torch.allclose(block(x), block(x))  # new masks each pass in training
    net.eval()
    assert {p.dropout for projs in experts_tf5.plan(block) for p in projs} == {0.0}
    torch.testing.assert_close(block(x), block(x))


def reference_experts(block, hidden, kernels):
    """The fused pass's forward on transformers 5, differentiated by autograd (masks drawn in the
    same order)."""
    x = hidden.view(-1, hidden.shape[-1])
    _, weights, selected = block.gate(x)
    plan = experts_tf5.plan(block)
    order, token, counts = moe._order(selected, len(plan))
    xs, ws = x[token], weights.to(x.dtype).reshape(-1)[order]
    out, start = torch.zeros_like(x), 0
    seed = int(torch.randint(0, 2**30, (1,)).item())  # drawn where moe.run_experts draws it
    for (w1, w3, w2), n in zip(plan, counts, strict=True):
        if n:
            xe = xs[start:start + n]
            in1, in3 = moe.lora_inputs(xe, (w1, w3), moe.mask_keys((w1, w3), seed, xs.shape[0], start))
            h = (torch.nn.functional.silu(nets.project(xe, w1, in1, x.dtype))
                 * nets.project(xe, w3, in3, x.dtype))
            y = nets.project(h, w2, h * kernels.keep_mask(*h.shape, w2.dropout, seed + start, h), x.dtype)
            out = out.index_add(0, token[start:start + n], y * ws[start:start + n, None])
        start += n
    return out.view_as(hidden)


def test_offloaded_passes_skip_on_transformers_5_with_the_gradients_of_gpu_held_checkpoints(tiny_model):
    """On transformers 5 the MoE blocks (`mlp`, NF4Experts inside) are marked for the skip in
    offloaded checkpoints too, and with LoRA dropout the loss and LoRA gradients equal those of
    GPU-held checkpoints, which run every pass whole."""
    ids = torch.randint(0, 2048, (2, 48), generator=torch.Generator().manual_seed(2))
    seen = []
    for offload in (False, True):
        net = nets.lora_net(tiny_model, TrainingSpec(offload_checkpoints=offload), dropout=0.2)
        blocks = [layer.mlp for layer in net.base_model.model.model.layers]
        assert all(getattr(b, "skip_in_checkpoints", False) for b in blocks)
        torch.manual_seed(5)
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        seen.append((loss.item(), [p.grad.clone() for p in net.parameters() if p.requires_grad and p.grad is not None]))
    (held_loss, held), (host_loss, host) = seen
    assert host_loss == held_loss and len(host) == len(held) > 0
    assert all(torch.equal(a, b) for a, b in zip(host, held, strict=True))
