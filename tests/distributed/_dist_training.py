"""The model, data and training loop shared by the distributed workers and the single-process references.

A 4-layer MLP with VeRA on lin0..lin2 (one shared projection; the head stays a plain frozen Linear), lambdas
randomized so every gradient is non-zero. Each step uses a fresh full batch of 8 rows; rank k of a 2-rank job
takes rows [4k, 4k+4). The loss is a mean, and DDP/FSDP average gradients over ranks, so a 2-rank step equals a
single-process step on the full batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vera_models import mlp, ours, randomize_lambdas

R = 8
TARGETS = ["lin0", "lin1", "lin2"]
ROWS = 8
STEPS = 3
LR = 0.5


def vera_mlp(dtype: torch.dtype = torch.float32):
    """Identical on every call (seeded): base weights in ``dtype``, lambdas fp32."""
    model = ours(mlp(0, dtype), r=R, target_modules=TARGETS)
    randomize_lambdas(model)
    return model


def batch(step: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (ROWS, 10) in ``dtype`` and fp32 targets (ROWS, 3) of a training step."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(ROWS, 10, generator=g).to(dtype), torch.randn(ROWS, 3, generator=g)


def lambda_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if "vera_lambda" in n]


def full(t: torch.Tensor) -> torch.Tensor:
    """A detached copy of the whole tensor (gathered if it is an FSDP2 shard, a DTensor)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().clone()


def train(model: nn.Module, named: nn.Module, *, rank=None, world=1, steps=STEPS, dtype=torch.float32, shares=1):
    """SGD with momentum on the trainable parameters of ``named`` (the unwrapped model, for its parameter names),
    stepping ``model`` (possibly a DDP/FSDP wrapper). Rank ``rank`` of ``world`` uses its share of each batch;
    ``rank=None`` uses the full batch, in ``shares`` equal parts whose mean losses are averaged (one process doing
    what ``shares`` ranks do: the same row counts per forward, so the same kernels). Returns (gradients of the first
    step, lambdas after ``steps`` steps)."""
    params = {n: p for n, p in named.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(params.values(), lr=LR, momentum=0.9)
    first_grads = {}
    for step in range(steps):
        x, y = batch(step, dtype)
        if rank is not None:
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        for xs, ys in zip(x.chunk(shares), y.chunk(shares)):
            (F.mse_loss(model(xs).float(), ys) / shares).backward()
        if step == 0:
            first_grads = {n: full(p.grad) for n, p in params.items()}
        optimizer.step()
        optimizer.zero_grad()
    lambdas = {n: full(p) for n, p in named.named_parameters() if "vera_lambda" in n}
    return first_grads, lambdas
