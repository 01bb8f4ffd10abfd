"""The tiny 4-bit Mixtral with LoRA as the job sets it up, for the entrypoint's CPU tests."""

from __future__ import annotations

import torch

from entrypoint import model as M
from entrypoint import moe
from entrypoint.hyperparams import LoraSpec, TrainingSpec


def lora_net(tiny_model, training: TrainingSpec, dtype=torch.float32, dropout: float = 0.0):
    """LoRA r4 on `target_modules: auto`, the same LoRA A init in every net (seed 0) and a non-zero
    B (PEFT starts B at zero; non-zero B exercises every LoRA gradient from step 1); train mode."""
    torch.manual_seed(0)
    base = M.load_4bit(str(tiny_model), M.Precision(dtype, str(dtype), "test"), {"": "cpu"}, "sdpa")
    net = M.attach_lora(base, LoraSpec(r=4, alpha=8, dropout=dropout, target_modules="auto"), training)
    g = torch.Generator().manual_seed(1)
    for name, p in net.named_parameters():
        if "lora_B" in name:
            p.data = (torch.randn(p.shape, generator=g) * 0.05).to(p)
    net.train()
    return net


def project(x: torch.Tensor, p, lora_in: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """x W^T + s lora_in A^T B^T of a moe.Proj: matmuls in x's (compute) dtype, the sum in acc, as
    bitsandbytes + PEFT do under autocast (the references the fused passes are tested against)."""
    y = (x @ moe._dequantize((p,), x.dtype).t()).to(acc)
    lora = moe._lora(lora_in, p)
    return y if lora is None else y + lora.to(acc)
