"""The fast MoE expert pass against transformers + PEFT, on the tiny 4-bit Mixtral (CPU)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrypoint import kernels, moe
from entrypoint import model as M
from entrypoint.hyperparams import LoraSpec, TrainingSpec
from tests.entrypoint import nets

STEPS = 20


def lora_net(tiny_model, fast: bool, dtype=torch.float32, dropout: float = 0.0):
    # the MoE arithmetic alone, on PEFT's fp32 residual stream; bf16_residual: tests/entrypoint/test_residual.py
    return nets.lora_net(tiny_model, TrainingSpec(fused_moe=fast, bf16_residual=False), dtype, dropout)


def lora_grads(net) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float()
                      for p in net.parameters() if p.requires_grad])  # an expert no token picked has none


def train_side_by_side(tiny_model, steps: int, dtype=torch.float32, autocast=None, sync: bool = False):
    """Both nets step their own optimizer from the same weights; with `sync` the fused net takes the
    stock net's LoRA weights after each step, so every step compares the two at identical weights
    (in bf16 two free trajectories part the way any change of rounding makes them part)."""
    nets = [lora_net(tiny_model, fast, dtype) for fast in (False, True)]
    assert moe.use_fused_moe(nets[1]) == 2  # both MoE blocks of the tiny model run the fast pass
    assert not any(hasattr(m, "_stock_forward") for m in nets[0].modules())
    opts = [torch.optim.AdamW([p for p in n.parameters() if p.requires_grad], lr=1e-2) for n in nets]
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, 2048, (2, 48), generator=g)
        step = []
        for net, opt in zip(nets, opts, strict=True):
            net.train()
            with autocast or torch.autocast("cpu", enabled=False):
                loss = net(input_ids=ids, labels=ids).loss
            loss.backward()
            step.append((loss.item(), lora_grads(net)))
            opt.step()
            opt.zero_grad(set_to_none=True)
        if sync:
            with torch.no_grad():
                for a, b in zip(*[[p for p in n.parameters() if p.requires_grad] for n in nets], strict=True):
                    b.copy_(a)
        (stock_loss, stock_grad), (fast_loss, fast_grad) = step
        out.append((stock_loss, fast_loss, torch.nn.functional.cosine_similarity(stock_grad, fast_grad, dim=0).item()))
    return out


def test_fused_moe_tracks_transformers_for_20_steps(tiny_model):
    for stock_loss, fast_loss, cos in train_side_by_side(tiny_model, STEPS):
        assert abs(fast_loss - stock_loss) <= 0.01 * abs(stock_loss)
        assert cos >= 0.999


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16-fallback"])
def test_fused_moe_in_half_precision(tiny_model, dtype):
    """bf16 on Ampere+, fp16 on V100/T4: the same autocast the job uses, on CPU; 5 steps, each at
    identical weights (sync): the loss within 0.1%, the LoRA gradients at cosine >= 0.9999."""
    steps = train_side_by_side(tiny_model, 5, dtype, torch.autocast("cpu", dtype=dtype), sync=True)
    for stock_loss, fast_loss, cos in steps:
        assert abs(fast_loss - stock_loss) <= 1e-3 * abs(stock_loss)
        assert cos >= 0.9999


def test_dropout_masks_drawn_again_in_backward_give_exact_gradients(tiny_model):
    """With LoRA dropout the backward draws the forward's masks again from its seed;
    its gradients must equal plain autograd through the same computation and masks."""
    net = lora_net(tiny_model, fast=True, dropout=0.3)
    net.train()
    block = net.base_model.model.model.layers[0].block_sparse_moe
    params = [p for p in block.parameters() if p.requires_grad]
    x = torch.randn(1, 40, 64, requires_grad=True)
    torch.manual_seed(7)
    block(x)[0].square().sum().backward()
    fast = [x.grad.clone()] + [p.grad.clone() for p in params]
    x.grad = None
    for p in params:
        p.grad = None
    torch.manual_seed(7)
    reference_moe(block, x).square().sum().backward()
    reference = [x.grad] + [p.grad for p in params]
    for a, b in zip(fast, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def reference_moe(block, hidden):
    """entrypoint.moe's forward, differentiated by autograd (masks drawn in the same order)."""
    x = hidden.view(-1, hidden.shape[-1])
    weights = torch.softmax(block.gate(x), dim=1, dtype=torch.float)
    weights, selected = torch.topk(weights, block.top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    plan = moe._plan(block)
    order, token, counts = moe._order(selected, len(plan))
    xs, ws = x[token], weights.reshape(-1)[order]
    out, start = torch.zeros_like(x), 0
    seed = int(torch.randint(0, 2**30, (1,)).item())  # drawn where moe._moe_forward draws it
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


def _real_avx512_bf16() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


# bitsandbytes 0.50 picks the CPU kernel of a 4-bit layer when it is built
# (Linear4bit.support_avx512bf16_for_cpu = has_avx512bf16()): with AVX512-BF16, eval
# without grad repacks the weight for a kernel that computes in bf16; without it, the
# layer dequantizes to fp32 and multiplies. Each path is forced here, whatever the CPU.
CPU_PATHS = [pytest.param(False, id="fp32-dequantize"),
             pytest.param(True, id="avx512-bf16", marks=pytest.mark.skipif(
                 not _real_avx512_bf16(), reason="the bf16 kernel needs a CPU with AVX512-BF16 to run"))]


@pytest.mark.parametrize("avx512_bf16", CPU_PATHS)
def test_adapter_trained_fast_loads_on_a_stock_model(tiny_model, tmp_path, monkeypatch, avx512_bf16):
    import bitsandbytes.nn.modules as bnb_modules
    from peft import PeftModel

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: avx512_bf16)
    net = lora_net(tiny_model, fast=True)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(3))
    net.train()
    for _ in range(2):
        net(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    net.save_pretrained(tmp_path)
    net.eval()
    with torch.no_grad():
        trained = net(input_ids=ids).logits
    stock = PeftModel.from_pretrained(
        M.load_4bit(str(tiny_model), M.choose_precision(torch.device("cpu")), {"": "cpu"}, "sdpa"), tmp_path)
    assert not any(hasattr(m, "_stock_forward") for m in stock.modules())
    with torch.no_grad():
        logits = stock(input_ids=ids).logits
    if not avx512_bf16:
        # The same NF4 dequantization and fp32 matmuls on both sides; only the experts'
        # summation order differs (fused vs per-expert): fp32 rounding, far below 1e-5.
        torch.testing.assert_close(logits, trained, rtol=0, atol=1e-5)
    else:
        # The stock experts now run bitsandbytes' bf16 kernel, the fused pass fp32: bf16
        # keeps 8 significant bits, so each activation carries up to 2^-8 relative error
        # (measured here: 1.8e-3 on logits of at most 0.81, i.e. 2^-8.8 of the largest).
        assert torch.isfinite(logits).all()
        assert (logits - trained).abs().max() <= 2**-8 * trained.abs().max()


def test_blocks_left_unquantized_keep_the_stock_forward(tiny_model):
    base = M.load_4bit(str(tiny_model), M.choose_precision(torch.device("cpu")), {"": "cpu"}, "sdpa",
                       skip_modules=["experts"])
    assert moe.use_fused_moe(base) == 0


def test_a_router_trained_alone_gets_its_gradient(tiny_model):
    """LoRA on the router only, no checkpointing: the expert pass must still keep what its
    backward needs (the routing weights carry the gradient)."""
    grads = []
    for fast in (False, True):
        torch.manual_seed(0)
        base = M.load_4bit(str(tiny_model), M.Precision(torch.float32, "fp32", "test"), {"": "cpu"}, "sdpa",
                           skip_modules=["gate"])
        net = M.attach_lora(base, LoraSpec(r=4, alpha=8, dropout=0.0, target_modules=["gate"]),
                            TrainingSpec(gradient_checkpointing=False, fused_moe=fast))
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.data = torch.full_like(p, 0.05)
        ids = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(5))
        net.train()
        net(input_ids=ids, labels=ids).loss.backward()
        grads.append(lora_grads(net))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(tokens=st.integers(0, 40), experts=st.integers(1, 16), k=st.sampled_from([1, 2, 4, 8]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_the_gather_back_to_token_order_sums_what_index_add_summed(tokens, experts, k, dtype, seed):
    """Any routing (top-k of 1 to 8, an expert chosen by no token or by all): each token gets the
    sum of its own k rows; for top-2 (Mixtral) the values are bitwise those of the atomic scatter
    it replaced, in bf16 too."""
    k = min(k, experts)
    g = torch.Generator().manual_seed(seed)
    selected = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)] or [torch.zeros(0, k)])
    order, token, _ = moe._order(selected.long().reshape(tokens, k), experts)
    rows = torch.randn(tokens * k, 6, generator=g).to(dtype)
    got = kernels.sum_rows(rows, order, k, dtype)
    scattered = torch.zeros(tokens, 6, dtype=dtype).index_add_(0, token, rows)
    if k <= 2:
        assert torch.equal(got, scattered)
    else:  # one rounding after an fp32 sum instead of one per addition
        torch.testing.assert_close(got, scattered, rtol=0.02 if dtype == torch.bfloat16 else 1e-6, atol=0.05)
    exact = torch.zeros(tokens, 6, dtype=torch.float64).index_add_(0, token, rows.double())
    torch.testing.assert_close(got.double(), exact, rtol=2**-7 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)


def _experts_plan(experts: int, hidden: int, ffn: int, lora: bool, g: torch.Generator):
    from entrypoint.experts_tf5 import _linear4bit

    plan = []
    for _ in range(experts):
        projs = []
        for out_f, in_f in ((ffn, hidden), (ffn, hidden), (hidden, ffn)):
            base = _linear4bit(torch.randn(out_f, in_f, generator=g) * 0.2, torch.float32, torch.device("cpu"))
            a = (torch.randn(3, in_f, generator=g) * 0.2).requires_grad_() if lora else None
            b = (torch.randn(out_f, 3, generator=g) * 0.2).requires_grad_() if lora else None
            projs.append(moe.Proj(base, a, b, 2.0, 0.0))
        plan.append(projs)
    return plan


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(0, 24), experts=st.integers(1, 6), k=st.integers(1, 4), lora=st.booleans(),
       gap=st.sampled_from([0.0, 69.0, 200.0]), seed=st.integers(0, 2**16))
def test_routing_weight_gradients_from_the_row_dots_are_autograds(tokens, experts, k, lora, gap, seed):
    """The routing weights' gradient is g . y, taken from w2's input side (gy W2 . h and the LoRA
    part, over the weight) so no pass keeps y. For any routing (top-1 to top-4, experts no token
    chose, a chosen expert's probability 1e-30 or underflowed to 0), the gradients of the router
    logits, the tokens and LoRA equal plain autograd through the same arithmetic, in fp32. (An
    underflowed weight's own gradient is 0 rather than g . y; softmax's backward multiplies it by
    that 0 probability, so the logits' gradient is the same.)"""
    k = min(k, experts)
    g = torch.Generator().manual_seed(seed)
    hidden, ffn = 8, 12
    plan = _experts_plan(experts, hidden, ffn, lora, g)
    x = torch.randn(tokens, hidden, generator=g, requires_grad=True)
    logits = torch.randn(tokens, experts, generator=g)
    if tokens and gap:
        logits[0, 0] -= gap  # with top-k of all experts, a chosen expert of probability ~1e-30 or 0
    logits.requires_grad_()
    params = [t for projs in plan for p in projs for t in (p.lora_a, p.lora_b) if t is not None]
    probe = torch.randn(tokens, hidden, generator=g)

    def routed():
        w, selected = torch.topk(torch.softmax(logits, dim=-1), experts if gap else k, dim=-1)
        return w / w.sum(-1, keepdim=True), selected

    def grads(out):
        (out * probe).sum().backward()
        got = [t.grad.clone() if t.grad is not None else torch.zeros_like(t) for t in (x, logits, *params)]
        for t in (x, logits, *params):
            t.grad = None
        return got

    weights, selected = routed()
    fused = grads(moe.run_experts(x, weights, selected, plan))
    weights, selected = routed()
    ref = 0 * x  # (tokens, hidden), in the graph even when no token is routed
    for e, (w1, w3, w2) in enumerate(plan):
        for slot in range(selected.shape[1]):
            rows = (selected[:, slot] == e).nonzero().flatten()
            if rows.numel():
                xe = x[rows]
                h = torch.nn.functional.silu(nets.project(xe, w1, xe, x.dtype)) * nets.project(xe, w3, xe, x.dtype)
                ref = ref.index_add(0, rows, nets.project(h, w2, h, x.dtype) * weights[rows, slot, None])
    want = grads(ref)
    for name, a, b in zip(["x", "logits"] + ["lora"] * len(params), fused, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
