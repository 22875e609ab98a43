"""The host waits for the device at most once per speculative round (engine/device_io.py).

A GPU left waiting on the host is idle: every value read back to the host (`.item()`, `int(t)`, `.tolist()`,
`.cpu()`, a data-dependent shape such as `nonzero` or boolean indexing, `torch.equal`) stops the host until the
device has finished everything queued before it. The engine's round reads back once: what each row accepted. This is
counted on a CPU, where the same calls are made: a dispatch mode sees the reads that go through aten, and the
Tensor methods that read on a CPU without going through it (`tolist`, `numpy`, `cpu`, `item`, and `int`, `float`,
`bool` or an index made of a tensor) are counted where they are called.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import engine.engine as engine_module
from engine.config import EngineConfig
from engine.engine import SpecEngine
from engine.processor import load_processor
from engine.request import SamplingParams
from tests.conftest import ROOT
from training.heldout import heldout_requests

TARGET, DRAFTER = str(ROOT / "models/target"), str(ROOT / "models/drafter-vlm")
aten = torch.ops.aten
WAITING_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
               aten.equal.default, aten.is_nonzero.default, aten._unique2.default, aten.unique_consecutive.default}

HOST_METHODS = ("tolist", "numpy", "cpu", "item", "__int__", "__float__", "__bool__", "__index__")


class HostReads(TorchDispatchMode):
    """Counts reads of device values by the host while it is on (see the module's docstring)."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []
        self.on = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.on and (func in WAITING_OPS or (func is aten.index.Tensor and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]))):
            self.reads.append(str(func))
        return func(*args, **kwargs)

    def patch(self, monkeypatch) -> None:
        for method in HOST_METHODS:
            monkeypatch.setattr(torch.Tensor, method, self.counting(method))

    def counting(self, method: str):
        original = getattr(torch.Tensor, method)

        def counted(t, *a, **k):
            if self.on:
                self.reads.append(f"Tensor.{method}")
            return original(t, *a, **k)

        return counted


@pytest.fixture(scope="module")
def requests():
    return heldout_requests(load_processor(TARGET), 24)


def rounds_reads(monkeypatch, requests, params: SamplingParams, drafter: str | None,
                 engine: SpecEngine | None = None) -> tuple[list[int], HostReads]:
    """Host reads in each round of a generate call (the round, then the next round's draft request), on the
    shipped target, or on `engine` (tests/engine/test_captured_step.py: compiled steps)."""
    engine = engine or SpecEngine(EngineConfig(TARGET, drafter, dtype="float32", max_batch_size=8, num_draft_tokens=3))
    reads = HostReads()
    per_round: list[int] = []
    reads.patch(monkeypatch)

    def counted(f, new_round: bool):
        def wrapper(*a, **k):
            before = len(reads.reads)
            reads.on = True
            try:
                return f(*a, **k)
            finally:
                reads.on = False
                if new_round:
                    per_round.append(len(reads.reads) - before)
                elif per_round:  # the next round's drafts are requested at the end of this round
                    per_round[-1] += len(reads.reads) - before
        return wrapper

    monkeypatch.setattr(engine_module, "speculative_round", counted(engine_module.speculative_round, True))
    monkeypatch.setattr(engine_module, "request_drafts", counted(engine_module.request_drafts, False))
    with reads:
        results = engine.generate(requests, params)
    assert all(r.error is None for r in results)
    if drafter is not None:
        assert sum(r.num_drafted_tokens for r in results) > 0  # the rounds did speculate
    return per_round, reads


@pytest.mark.parametrize("drafter", [None, DRAFTER], ids=["plain", "vlm"])
@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=24),
                                    SamplingParams(max_new_tokens=24, temperature=0.8, top_p=0.9, top_k=50, seed=3)],
                         ids=["greedy", "sampled"])
def test_one_read_per_round(monkeypatch, requests, params, drafter):
    per_round, reads = rounds_reads(monkeypatch, requests, params, drafter)
    assert len(per_round) >= 10
    assert max(per_round) == 1, (per_round, reads.reads)


def test_the_count_sees_a_read(monkeypatch, requests):
    """The counter is not blind: a forward whose length is read from the device (no `length` given) is seen."""
    engine = SpecEngine(EngineConfig(TARGET, None, dtype="float32", max_batch_size=8))
    dec = engine.target.decoder
    cache = dec.new_cache()
    cache.allocate(2, 16)
    reads = HostReads()
    reads.patch(monkeypatch)
    x = dec.embed(torch.tensor([[5, 6, 7], [8, 9, 10]]))
    with reads, torch.inference_mode():
        reads.on = True
        dec.forward(cache, x, torch.zeros(2, dtype=torch.long), length=3)
        assert reads.reads == []
        dec.forward(cache, x, torch.zeros(2, dtype=torch.long))
        assert reads.reads == ["Tensor.__int__"]
        torch.tensor([1, 2]).tolist()
        assert reads.reads[-1] == "Tensor.tolist"
