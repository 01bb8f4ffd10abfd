"""entrypoint.head (training.chunked_loss): the head and its loss a chunk of tokens at a time give
transformers' own causal-LM loss and gradients without keeping [tokens, vocab] logits, on random
inputs and on the tiny 4-bit Mixtral with LoRA (CPU; transformers 4 here, 5 in .venv-tf5). Its GPU
speed and memory are issue 22's (bench/README.md)."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.loss.loss_utils import ForCausalLMLoss

from entrypoint import head
from entrypoint.hyperparams import TrainingSpec
from tests.entrypoint import nets


def stock_and_chunked(hidden, weight, labels, num_items, chunk: int, scale: float = 1.0):
    """(loss, d loss / d hidden) from transformers' ForCausalLMLoss over the full logits, then from
    head.chunked_loss with `chunk` tokens a chunk; backward of scale * loss, as a GradScaler does."""
    out = []
    for chunked in (False, True):
        h = hidden.detach().clone().requires_grad_(True)
        if chunked:
            with mock.patch.object(head, "LOSS_CHUNK_BYTES", chunk * 4 * weight.shape[0]):
                loss = head.chunked_loss(h, weight, labels, num_items)
        else:
            loss = ForCausalLMLoss(torch.nn.functional.linear(h, weight), labels, weight.shape[0],
                                   num_items_in_batch=num_items)
        (loss * scale).backward()
        out.append((loss.detach(), h.grad))
    return out


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 3), seq=st.integers(1, 24), vocab=st.integers(2, 40), chunk=st.integers(1, 17),
       ignored=st.floats(0.0, 1.0), num_items=st.one_of(st.none(), st.integers(1, 80)),
       scale=st.sampled_from([1.0, 3.0, 2.0**16]), seed=st.integers(0, 2**16))
def test_chunked_loss_is_transformers_loss_and_gradient(rows, seq, vocab, chunk, ignored, num_items, scale, seed):
    """Any shape, chunk size (dividing the tokens or not), share of ignored labels (all of them
    included: nan for the mean, as transformers gives), num_items_in_batch or the mean, and loss
    scale: the loss and the hidden states' gradient of the stock loss (fp32, to rounding: within
    1e-5 of the gradient's norm, or of fp32's rounding of the logits' gradient where that is larger)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, seq, 8, generator=g)
    weight = torch.randn(vocab, 8, generator=g)
    labels = torch.randint(0, vocab, (rows, seq), generator=g)
    labels[torch.rand(rows, seq, generator=g) < ignored] = head.IGNORE
    (want, want_grad), (got, got_grad) = stock_and_chunked(hidden, weight, labels, num_items, chunk, scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)
    # relative to the whole gradient, and in absolute terms fp32's rounding of softmax minus one-hot
    # (entries of order 1: where the target's probability is near 1, their difference is all rounding)
    counted = num_items or max(int((labels[:, 1:] != head.IGNORE).sum()), 1)
    floor = 1e-6 * scale * weight.norm() / counted
    assert (got_grad - want_grad).norm() <= 1e-5 * want_grad.norm() + floor


def test_chunked_loss_under_bf16_autocast_matches_the_stock_loss():
    """Under autocast (the GPU job's bf16): logits from bf16 matmuls, the loss in fp32, as the stock
    path; the loss within 0.1% and the gradient at cosine >= 0.9999 of the stock path's, as close to
    the fp32 gradient as the stock path's and its norm within 0.1% of it (the loss's scale applied in
    fp32, as the stock path applies it)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 64, 32, generator=g)
    weight = torch.randn(500, 32, generator=g) * 0.1
    labels = torch.randint(0, 500, (2, 64), generator=g)
    labels[:, :5] = head.IGNORE
    (_, exact), _ = stock_and_chunked(hidden, weight, labels, 12289, chunk=24)  # fp32 throughout
    with torch.autocast("cpu", dtype=torch.bfloat16):  # 12,289 tokens: 1/12,289 is 0.2% off in bf16
        (want, want_grad), (got, got_grad) = stock_and_chunked(hidden, weight, labels, 12289, chunk=24)
    assert got.dtype == torch.float32
    assert abs(got.item() - want.item()) <= 1e-3 * abs(want.item())
    assert torch.nn.functional.cosine_similarity(got_grad.flatten(), want_grad.flatten(), dim=0) >= 0.9999
    assert (got_grad - exact).norm() <= 1.1 * (want_grad - exact).norm()  # as close to fp32 as the stock path
    assert got_grad.norm().item() == pytest.approx(exact.norm().item(), rel=1e-3)  # the loss's scale unrounded


def lora_net(tiny_model, chunked: bool, dtype=torch.float32):
    return nets.lora_net(tiny_model, TrainingSpec(chunked_loss=chunked), dtype)


def grads(net) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float()
                      for p in net.parameters() if p.requires_grad])


def packed(g, rows: int = 2, seq: int = 96, vocab: int = 2048) -> dict:
    """Rows of three examples each, positions restarting per example and each example's first label
    ignored, as entrypoint.data.collate makes them."""
    ids = torch.randint(0, vocab, (rows, seq), generator=g)
    labels = ids.clone()
    pos = torch.cat([torch.arange(n) for n in (40, 30, seq - 70)]).repeat(rows, 1)
    labels[pos == 0] = head.IGNORE
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, True)], ids=["fp32", "bf16-autocast"])
def test_training_with_chunked_loss_tracks_the_stock_head_for_3_steps(tiny_model, monkeypatch, dtype, autocast):
    """3 AdamW steps on packed rows, the chunked net taking the stock net's LoRA weights after each
    (checkpointed layers recomputed as in the job; chunks of 40 tokens of 192): the loss within
    1e-6 (fp32) or 0.1% (bf16) and the LoRA gradients at cosine >= 0.999999 (fp32) or 0.9999."""
    monkeypatch.setattr(head, "LOSS_CHUNK_BYTES", 40 * 4 * 2048)
    stock, chunked = (lora_net(tiny_model, c, dtype) for c in (False, True))
    assert (head.describe(stock), head.describe(chunked)) == (None, "chunked")
    trainable = [[p for p in n.parameters() if p.requires_grad] for n in (stock, chunked)]
    opt = torch.optim.AdamW(trainable[0], lr=1e-2)
    data = torch.Generator().manual_seed(2)
    for _ in range(3):
        batch = packed(data)
        seen = []
        for net in (stock, chunked):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = net(**batch, use_cache=False, num_items_in_batch=150).loss
            loss.backward()
            seen.append((loss.item(), grads(net)))
            net.zero_grad(set_to_none=True)
        opt.step()
        with torch.no_grad():
            for a, b in zip(*trainable, strict=True):
                b.copy_(a)
        (want, want_grads), (got, got_grads) = seen
        assert abs(got - want) <= (1e-6 if dtype == torch.float32 else 1e-3) * abs(want)
        cos = torch.nn.functional.cosine_similarity(want_grads, got_grads, dim=0).item()
        assert cos >= (0.999999 if dtype == torch.float32 else 0.9999)


def test_no_logits_are_kept_for_backward(tiny_model, monkeypatch):
    """What backward keeps: the stock head saves [tokens, vocab] logits (and their log-softmax),
    the chunked one nothing that large; its loss is the same."""
    monkeypatch.setattr(head, "LOSS_CHUNK_BYTES", 32 * 4 * 2048)
    batch = packed(torch.Generator().manual_seed(3), rows=2, seq=128)
    logits = batch["input_ids"].numel() * 2048
    largest, losses = [], []
    for chunked in (False, True):
        net = lora_net(tiny_model, chunked)
        sizes = []

        def keep(t, sizes=sizes):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            losses.append(net(**batch, use_cache=False).loss.item())
        largest.append(max(sizes))
    assert largest[0] >= logits > largest[1]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


def test_what_only_the_stock_loss_takes_goes_to_the_stock_forward(tiny_model):
    """Labels already shifted (transformers' shift_labels), another ignore index, or a tuple asked
    for: the stock forward, its logits and its loss, as without the flag."""
    batch = packed(torch.Generator().manual_seed(6))
    stock, chunked = (lora_net(tiny_model, c).eval() for c in (False, True))
    shifted = torch.nn.functional.pad(batch["labels"], (0, 1), value=head.IGNORE)[:, 1:].roll(1, dims=1)
    with torch.no_grad():
        fives = batch | {"labels": batch["labels"].masked_fill(batch["labels"] == head.IGNORE, 5)}
        for inputs, extra in ((batch, {"shift_labels": shifted}), (fives, {"ignore_index": 5})):
            want, got = (n(**inputs, use_cache=False, **extra) for n in (stock, chunked))
            assert got.logits is not None and got.loss.item() == want.loss.item()
        want, got = (n(**batch, use_cache=False, return_dict=False) for n in (stock, chunked))
    assert isinstance(got, tuple) and got[0].item() == want[0].item()


def test_evaluation_generation_and_router_loss_stay_the_stock_models(tiny_model, monkeypatch):
    """Under no_grad (evaluation) the loss is the stock one and nothing is kept; without labels
    (generation, merge checks) the forward is the stock one with its logits; with the router's
    load-balancing loss asked for, the loss adds it as transformers does."""
    monkeypatch.setattr(head, "LOSS_CHUNK_BYTES", 50 * 4 * 2048)
    batch = packed(torch.Generator().manual_seed(4))
    stock, chunked = (lora_net(tiny_model, c).eval() for c in (False, True))
    with torch.no_grad():
        want, got = (n(**batch, use_cache=False, num_items_in_batch=120) for n in (stock, chunked))
        assert got.loss.item() == pytest.approx(want.loss.item(), rel=1e-6) and got.logits is None
        ids = batch["input_ids"][:, :20]
        torch.testing.assert_close(chunked(input_ids=ids).logits, stock(input_ids=ids).logits)
        want, got = (n(**batch, use_cache=False, output_router_logits=True) for n in (stock, chunked))
    assert want.aux_loss is not None
    torch.testing.assert_close(got.aux_loss, want.aux_loss)
    assert got.loss.item() == pytest.approx(want.loss.item(), rel=1e-6)


ROUTED = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 8,
          "output_router_logits": True, "router_aux_loss_coef": 0.1}  # the aux loss in the loss, weighed high


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3_moe"])
def test_other_architectures_give_their_stock_loss_and_gradients(kind, monkeypatch):
    """The other CHUNKED_LOSS_MODELS, as tiny random models in fp32 (head frozen, as LoRA leaves
    it; Qwen3-MoE with its router's load-balancing loss): the same loss and gradients as their own
    forward; an architecture outside the list (Gemma, its head's logits scaled) keeps its stock
    forward."""
    import copy

    from transformers import AutoConfig, AutoModelForCausalLM

    monkeypatch.setattr(head, "LOSS_CHUNK_BYTES", 24 * 4 * 300)
    config = AutoConfig.for_model(kind, vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2,
                                  **(ROUTED if kind == "qwen3_moe" else {}))
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(config)
    stock.lm_head.weight.requires_grad_(False)
    chunked = copy.deepcopy(stock)
    assert head.use_chunked_loss(chunked)
    batch = packed(torch.Generator().manual_seed(5), vocab=300)
    seen = []
    for net in (stock, chunked):
        loss = net(**batch, use_cache=False).loss
        loss.backward()
        seen.append((loss.item(), torch.cat([p.grad.flatten() for p in net.parameters() if p.requires_grad])))
    (want, want_grads), (got, got_grads) = seen
    assert got == pytest.approx(want, rel=1e-6)
    assert (got_grads - want_grads).norm() <= 1e-5 * want_grads.norm()
    if kind == "qwen3_moe":  # the aux loss was in both
        with torch.no_grad():
            aux = chunked(**batch, use_cache=False).aux_loss
        assert aux is not None and 0.1 * aux.item() > 1e-3 * got
    gemma = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gemma2", vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8))
    gemma.lm_head.weight.requires_grad_(False)
    assert not head.use_chunked_loss(gemma) and head.describe(gemma) is None
