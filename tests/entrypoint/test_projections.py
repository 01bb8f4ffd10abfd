"""entrypoint.projections (training.fused_attention) against bitsandbytes + PEFT, and the LoRA
modules' seeded dropout (kernels.SeededDropout), on the tiny 4-bit Mixtral (CPU). Its GPU speed and numerics are in bench/README.md (issue 22)."""

from __future__ import annotations

import pytest
import torch

from entrypoint import experts_tf5, kernels, moe, projections
from entrypoint import model as M
from entrypoint.hyperparams import TrainingSpec
from tests.entrypoint import nets


def lora_net(tiny_model, fused: bool, dtype=torch.float32, dropout: float = 0.0, bf16_residual: bool = False):
    return nets.lora_net(tiny_model, TrainingSpec(fused_attention=fused, bf16_residual=bf16_residual), dtype, dropout)


def attention(net, layer: int = 0):
    return net.base_model.model.model.layers[layer].self_attn


def grads(net) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float()
                      for p in net.parameters() if p.requires_grad])


CASES = {  # model dtype, autocast, bf16 residual stream
    "fp32": (torch.float32, False, False),
    "bf16-autocast": (torch.bfloat16, True, False),
    "bf16-residual": (torch.bfloat16, True, True),
}


@pytest.mark.parametrize("case", CASES)
def test_fused_projections_track_peft_for_5_steps(tiny_model, case):
    """5 AdamW steps, the fused net taking the stock net's LoRA weights after each (so every step
    compares the two at identical weights; checkpointed layers recomputed as the job does): the
    loss within 0.1% and the LoRA gradients at cosine >= 0.9999 of the stock path's (fp32: equal
    to rounding)."""
    dtype, autocast, bf16 = CASES[case]
    nets = [lora_net(tiny_model, fused, dtype, bf16_residual=bf16) for fused in (False, True)]
    assert projections.describe(nets[0]) is None
    assert projections.describe(nets[1]) == "fused"  # every attention block of the tiny model
    trainable = [[p for p in n.parameters() if p.requires_grad] for n in nets]
    opt = torch.optim.AdamW(trainable[0], lr=1e-2)
    data = torch.Generator().manual_seed(2)
    for _ in range(5):
        ids = torch.randint(0, 2048, (2, 48), generator=data)
        seen = []
        for net in nets:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = net(input_ids=ids, labels=ids).loss
            loss.backward()
            seen.append((loss.item(), grads(net)))
        opt.step()
        with torch.no_grad():
            for a, b in zip(*trainable, strict=True):
                b.copy_(a)
        for net in nets:
            net.zero_grad(set_to_none=True)
        (stock_loss, stock), (fused_loss, fused) = seen
        assert abs(fused_loss - stock_loss) <= 1e-3 * abs(stock_loss)
        cos = torch.nn.functional.cosine_similarity(stock, fused, dim=0).item()
        assert cos >= (0.999999 if dtype == torch.float32 else 0.9999)


def reference(attn, x):
    """q, k, v and o of x as entrypoint.projections computes them, differentiated by autograd, with
    the dropout masks drawn in its order (q, k, v in one call, then o)."""
    qkv = [moe.lora_proj(getattr(attn, n)) for n in projections.QKV]

    def dropped(t, projs):  # drawn where projections.run draws its seed
        seed = int(torch.randint(0, 2**30, (1,)).item())
        return moe.lora_inputs(t, projs, moe.mask_keys(projs, seed, t.reshape(-1, t.shape[-1]).shape[0], 0, first=0))

    outs = [nets.project(x, p, lin, x.dtype) for p, lin in zip(qkv, dropped(x, qkv), strict=True)]
    o = moe.lora_proj(attn.o_proj)
    y = outs[0]
    return outs, nets.project(y, o, dropped(y, [o])[0], y.dtype)


def test_dropout_masks_drawn_again_in_backward_give_exact_gradients(tiny_model):
    """With LoRA dropout the backward draws the forward's masks again from its seed; its
    gradients equal plain autograd through the same computation and masks, and the masks were
    applied (the outputs differ from evaluation's)."""
    net = lora_net(tiny_model, True, dropout=0.3)
    attn = attention(net)
    params = [p for n in (*projections.QKV, "o_proj") for p in getattr(attn, n).parameters() if p.requires_grad]
    x = torch.randn(2, 6, 64, requires_grad=True)

    def run(forward):
        torch.manual_seed(7)
        (q, k, v), o = forward()
        (q.square().sum() + k.square().sum() + (v * 0.5).sum() + o.square().sum()).backward()
        got = [x.grad.clone()] + [p.grad.clone() for p in params]
        x.grad = None
        for p in params:
            p.grad = None
        return got, q.detach()

    def fused():
        q = attn.q_proj(x)
        return (q, attn.k_proj(x), attn.v_proj(x)), attn.o_proj(q)

    got, q_train = run(fused)
    want, _ = run(lambda: reference(attn, x))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    net.eval()
    with torch.no_grad():
        assert not torch.allclose(attn.q_proj(x), q_train)


def test_k_and_v_on_another_input_and_disabled_adapters_take_the_stock_forward(tiny_model):
    """k_proj and v_proj take what q_proj computed only for the same input tensor; on any other they
    run their own forward, and with the adapters disabled the net is the base model."""
    net = lora_net(tiny_model, True)
    attn = attention(net)
    x, other = torch.randn(1, 5, 64), torch.randn(1, 5, 64)
    with torch.no_grad():
        attn.q_proj(x)  # leaves k and v of x
        for proj in (attn.k_proj, attn.v_proj):
            torch.testing.assert_close(proj(other), proj._stock_forward(other), rtol=0, atol=1e-5)
            torch.testing.assert_close(proj(x), proj._stock_forward(x), rtol=0, atol=1e-5)
        plain = lora_net(tiny_model, False)
        ids = torch.randint(0, 2048, (1, 12), generator=torch.Generator().manual_seed(4))
        with net.disable_adapter(), plain.disable_adapter():
            torch.testing.assert_close(net(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_the_adapter_keeps_peft_format(tiny_model, tmp_path):
    """A stock PeftModel loads what the switched net saves and gives its outputs (both in train mode,
    dropout 0: bitsandbytes' eval kernel on an AVX512-BF16 CPU rounds otherwise, test_moe.py). Both
    run the job's MoE pass (on transformers 5 the 4-bit experts run no other), so what differs is
    the attention projections alone."""
    from peft import PeftModel

    net = lora_net(tiny_model, True)
    net.save_pretrained(tmp_path)
    ids = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(3))
    stock = PeftModel.from_pretrained(
        M.load_4bit(str(tiny_model), M.Precision(torch.float32, "fp32", "test"), {"": "cpu"}, "sdpa"), tmp_path)
    assert projections.describe(stock) is None
    experts_tf5.use_fused_moe(stock)
    moe.use_fused_moe(stock)
    stock.train()
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, net(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_q_k_v_biases_are_added_as_bitsandbytes_adds_them(tmp_path):
    """Qwen2-style attention (biases on q, k and v, none on o; the built-in Qwen2.5 shapes): the
    fused Function adds them (frozen), giving PEFT's loss and gradients."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_(0, 1.0)  # large, as in real Qwen2 checkpoints
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    seen = []
    for fused in (False, True):
        net = lora_net(tmp_path, fused)
        assert projections.describe(net) == ("fused" if fused else None)
        assert attention(net).q_proj.base_layer.bias is not None
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        seen.append((loss.item(), grads(net)))
    (stock_loss, stock), (fused_loss, fused_grads) = seen
    assert abs(fused_loss - stock_loss) <= 1e-5 * abs(stock_loss)
    assert torch.nn.functional.cosine_similarity(stock, fused_grads, dim=0).item() >= 0.999999


def test_lora_dropout_is_drawn_from_a_seed_and_keeps_no_mask_for_backward(tiny_model):
    """Every LoRA module's dropout (the experts' on transformers 5 are the fused pass's, test_tf5)
    is kernels.SeededDropout: it drops about p of its input with 0 or
    1/(1-p), keeps nothing but its seed for backward (nn.Dropout keeps its mask) and takes the
    gradient back through the same mask; under autocast its output is what the LoRA A matmul
    would cast it to; in evaluation it is the identity and draws nothing."""
    net = nets.lora_net(tiny_model, TrainingSpec(gradient_checkpointing=False), dropout=0.3)
    drops = [m.lora_dropout["default"] for m in net.modules()
             if "default" in getattr(m, "lora_dropout", {}) and not hasattr(m, "parameter_name")]
    assert drops and all(type(d) is kernels.SeededDropout and d.p == 0.3 for d in drops)
    drop = drops[0]
    x = torch.randn(4, 50, 64, requires_grad=True)
    w = torch.randn(4, 50, 64)
    saved = []
    torch.manual_seed(3)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = drop(x)
    (y * w).sum().backward()
    keep = y.detach() / x.detach()
    assert saved == []
    assert abs((keep == 0).float().mean().item() - 0.3) < 0.03
    assert {round(v, 5) for v in keep.unique().tolist()} == {0.0, round(1 / 0.7, 5)}
    torch.testing.assert_close(x.grad, w * keep)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = drop(x)
    assert low.dtype == torch.bfloat16 and torch.equal(low, y.to(torch.bfloat16))
    drop.eval()
    state = torch.get_rng_state()
    assert drop(x) is x and torch.equal(torch.get_rng_state(), state)
