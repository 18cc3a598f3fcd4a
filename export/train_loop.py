"""The one optimisation loop of the action parser and the frame embedder (issue 11).

Budgets are counted in steps, not wall time: on the shared 2-core machine a time box gave a
different number of steps (and so a different model) on every run. The learning rate follows a
cosine over the steps, so every budget ends annealed.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable

import torch


def cosine_lr(optimizer: torch.optim.Optimizer, base: float, progress: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_steps(parameters: Iterable[torch.nn.Parameter], step_losses: Callable[[int], dict[str, torch.Tensor]],
                *, steps: int, lr: float, name: str, log_every: int = 100, weight_decay: float = 1e-4) -> dict:
    """Run `steps` AdamW steps on the sum of the losses `step_losses(step)` returns; returns the
    run's record (steps, seconds, the logged losses) for the model's json."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    optimizer = torch.optim.AdamW(list(parameters), lr=lr, weight_decay=weight_decay)
    start, log = time.monotonic(), []
    for step in range(steps):
        cosine_lr(optimizer, lr, step / steps)
        losses = step_losses(step)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            entry = dict(step=step + 1, seconds=round(time.monotonic() - start),
                         **{k: round(v.item(), 4) for k, v in losses.items()})
            log.append(entry)
            print(f"{name} " + " ".join(f"{k} {v}" for k, v in entry.items()), file=sys.stderr, flush=True)
    return dict(steps=steps, seconds=round(time.monotonic() - start), lr=lr, log=log)
