"""The language-model head and its loss a chunk of tokens at a time (`training.chunked_loss`).

The stock path computes the logits of every token of a micro-batch at once: [tokens, vocab] in
the compute dtype, again in fp32 for the loss, the log-softmax kept for backward and, in backward,
fp32 gradients of the same size; about 15.7 bytes per token per vocabulary entry (launcher.plan's
HEAD_BYTES), 7.7 GiB at 8 packed rows of 2048 with Mixtral's 32,000 entries. Here the head runs
on one chunk of tokens at a time and takes the loss's gradient while that chunk's logits exist:
forward keeps only the gradient with respect to the hidden states ([tokens, hidden], the compute
dtype) and backward scales it. The matmuls are the stock path's (one per chunk for the logits, one
for the hidden states' gradient); the loss is taken in fp32 from the compute dtype's logits, as
transformers' ForCausalLMLoss takes it, with its label shift, ignore index and num_items_in_batch
(and, for Mixtral and Qwen3-MoE, the router's load-balancing loss where the config asks for it).

Only the loss changes: a forward given labels returns no logits (the job reads only the loss), a
forward without labels is the stock one. The head's weight stays frozen (LoRA never targets it);
where it trains, or the architecture's head is not a plain linear layer, the stock forward stays.

Liger-Kernel's fused linear cross-entropy does this in Triton; it is written here in torch ops so
that it runs, and is tested, on the CPU as on the GPU, with no further package in the image.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from entrypoint.hyperparams import CHUNKED_LOSS_MODELS, LOSS_CHUNK_BYTES

IGNORE = -100
ROUTED = {"mixtral", "qwen3_moe"}  # their forward adds the router's load-balancing loss where asked


def use_chunked_loss(model) -> bool:
    """Route the causal LM under `model` (a PeftModel or the bare model) through the chunked head
    and loss when labels are given. Returns whether it was switched."""
    causal = _causal(model)
    if not applies(causal):
        return False
    if not hasattr(causal, "_unchunked_forward"):
        stock = causal.forward

        def forward(*args, labels=None, **kwargs):
            # positional inputs, a tuple asked for, or labels already shifted / another ignore index
            # (transformers' loss takes those): the stock forward
            if (args or labels is None or kwargs.get("return_dict") is False
                    or {"shift_labels", "ignore_index"} & kwargs.keys()):
                return stock(*args, labels=labels, **kwargs)
            return _forward(causal, labels, kwargs)

        causal._unchunked_forward = stock
        causal.forward = forward
    return True


def applies(causal) -> bool:
    head = getattr(causal, "lm_head", None)
    return (getattr(causal.config, "model_type", None) in CHUNKED_LOSS_MODELS
            and isinstance(head, torch.nn.Linear) and head.bias is None and head.weight.is_floating_point()
            and not head.weight.requires_grad  # a 4-bit head (packed uint8) or a trained one keeps the stock path
            and head.weight.device.type != "meta"  # offloaded by accelerate: its hook loads it for the stock call
            and isinstance(getattr(causal, "model", None), torch.nn.Module))


def describe(model) -> str | None:
    """The [model] line's loss= part: "chunked" where the head runs in chunks, else None."""
    return "chunked" if hasattr(_causal(model), "_unchunked_forward") else None


def _causal(model):
    """The causal LM under a PeftModel, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _forward(causal, labels, kwargs: dict):
    """The stock forward of transformers 4.56 and 5.x, with chunked_loss for lm_head + loss_function."""
    from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

    kwargs.pop("logits_to_keep", None)
    kwargs.pop("return_dict", None)
    moe = causal.config.model_type in ROUTED
    if moe:
        router = kwargs.get("output_router_logits")
        kwargs["output_router_logits"] = causal.config.output_router_logits if router is None else router
    outputs = causal.model(**kwargs)
    # on the head's GPU, as accelerate's hook on lm_head would move them (device_map="auto" may put a
    # tied head beside the embeddings, far from the last layer)
    hidden = outputs.last_hidden_state.to(causal.lm_head.weight.device)
    loss = chunked_loss(hidden, causal.lm_head.weight, labels, kwargs.get("num_items_in_batch"))
    if not moe:
        return CausalLMOutputWithPast(loss=loss, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)
    aux_loss = None
    if kwargs["output_router_logits"]:
        balance = sys.modules[type(causal).__module__].load_balancing_loss_func
        aux_loss = balance(outputs.router_logits, causal.num_experts, causal.num_experts_per_tok,
                           kwargs.get("attention_mask"))
        loss = loss + causal.router_aux_loss_coef * aux_loss.to(loss.device)
    return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, past_key_values=outputs.past_key_values,
                                     hidden_states=outputs.hidden_states, attentions=outputs.attentions,
                                     router_logits=outputs.router_logits)


def chunked_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                 num_items_in_batch=None) -> torch.Tensor:
    """transformers' ForCausalLMLoss of `hidden @ weight.T` without those logits: labels shifted
    left by one, IGNORE skipped, the token losses summed and divided by num_items_in_batch (their
    mean where it is None). Matmuls in the autocast dtype where autocast is on, the loss in fp32."""
    kind = hidden.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype
    shifted = F.pad(labels, (0, 1), value=IGNORE)[..., 1:].reshape(-1).to(hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    head = weight.detach().to(dtype)
    if num_items_in_batch is None:
        denominator = (shifted != IGNORE).sum().float()
    else:
        denominator = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=hidden.device)
    with torch.autocast(kind, enabled=False):
        if torch.is_grad_enabled() and flat.requires_grad:
            return _ChunkedLoss.apply(flat, head, shifted, denominator)
        return _chunks(flat, head, shifted, with_grad=False)[0] / denominator


class _ChunkedLoss(torch.autograd.Function):
    """Forward: the summed token losses over the denominator, the hidden states' gradient taken
    chunk by chunk. Backward: that gradient times grad_output over the denominator."""

    @staticmethod
    def forward(ctx, flat, head, shifted, denominator):
        total, grad = _chunks(flat, head, shifted, with_grad=True)
        ctx.save_for_backward(grad, denominator)
        return total / denominator

    @staticmethod
    def backward(ctx, grad_output):
        grad, denominator = ctx.saved_tensors
        # no token counted (every label ignored): the stock loss is nan and its gradient zero. The
        # product in fp32, as the stock path scales before it rounds (a bf16 scale is off by up to 0.4%)
        scale = torch.where(denominator > 0, grad_output.float() / denominator, 0.0)
        return (grad.float() * scale).to(grad.dtype), None, None, None


def _chunks(flat, head, shifted, with_grad: bool):
    """The fp32 sum of the token losses and, with_grad, d(sum)/d(flat) in flat's dtype."""
    tokens, vocab = flat.shape[0], head.shape[0]
    step = max(1, LOSS_CHUNK_BYTES // (4 * vocab))
    total = torch.zeros((), dtype=torch.float32, device=flat.device)
    grad = torch.empty_like(flat) if with_grad else None
    for start in range(0, tokens, step):
        logits = (flat[start:start + step] @ head.T).float()
        labels = shifted[start:start + step]
        keep = (labels != IGNORE).unsqueeze(1)
        target = labels.clamp(min=0).unsqueeze(1)  # an ignored token's index 0 is masked out below
        lse = torch.logsumexp(logits, dim=1, keepdim=True)
        total += ((lse - logits.gather(1, target)) * keep).sum()
        if with_grad:  # softmax minus the one-hot target: the token loss's gradient for its logits
            logits.sub_(lse).exp_().scatter_add_(1, target, -keep.float()).mul_(keep)
            grad[start:start + step] = logits.to(flat.dtype) @ head
        del logits  # before the next chunk's are made
    return total, grad
