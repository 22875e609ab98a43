"""The one optimisation loop every training step of the model pair goes through."""
from __future__ import annotations

import time
from typing import Callable, Iterable

import torch

PRECISIONS = ("auto", "bf16", "float32")


def uses_bf16(precision: str, device: str) -> bool:
    """`train.precision`: bf16 autocast (float32 weights and optimiser, bf16 matrix work) or float32. `auto`: bf16
    on a GPU and on a CPU with native bf16 (AMX or AVX512-BF16: a target step 1.3-1.55x faster than float32
    on a 2-core EPYC; the tiny drafters gain little); float32 on a CPU that would only emulate bf16 (there a
    Qwen2.5-VL step is ~20x slower)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        from engine.device import cpu_has_native_bf16

        return device.startswith("cuda") or cpu_has_native_bf16()
    return precision == "bf16"


def autocast(device: str, bf16: bool | None = None):
    """The context a training step (or the distillation set's generation) runs in: bf16 autocast where `bf16`
    (None: on a GPU)."""
    enabled = device.startswith("cuda") if bf16 is None else bf16
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=enabled)


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
