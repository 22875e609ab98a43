"""The one optimisation loop every training step of the model pair goes through."""
from __future__ import annotations

import time
from typing import Callable, Iterable

import torch


def fit(params: Iterable[torch.nn.Parameter], loss_fn: Callable[[], torch.Tensor], opt: torch.optim.Optimizer,
        sched, steps: int, name: str, log_every: int = 50) -> list[float]:
    """Run `steps` steps of loss_fn -> backward -> clip -> step; returns the mean loss of each logged window."""
    params = list(params)
    losses, window, t0 = [], [], time.time()
    for step in range(steps):
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        window.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            losses.append(sum(window) / len(window))
            window = []
            print(f"[{name}] step {step + 1}/{steps} loss {losses[-1]:.4f} ({time.time() - t0:.0f}s)", flush=True)
    return losses
