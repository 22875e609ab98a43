"""The engine's stats: where the time goes, the speculation counters, and what compiling its steps cost."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineStats:
    """Where the time goes (seconds), and the speculation counters, accumulated over the engine's life."""
    prefill_s: float = 0.0
    drafter_prefill_s: float = 0.0  # the part of prefill_s the drafter spent on its own prefill
    draft_s: float = 0.0  # drafter compute (for a remote drafter, as its server measured it)
    wait_s: float = 0.0  # time the target waited for drafts (a local drafter: its compute; remote: not hidden)
    verify_s: float = 0.0
    accept_s: float = 0.0
    rounds: int = 0
    row_rounds: int = 0  # sum over rounds of rows in the batch
    tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    # compiled steps (EngineConfig.compile; engine/captured_step.py): shape buckets compiled, and the seconds of
    # their first calls (compile, CUDA graph capture, one run), part of draft_s and verify_s above
    compile_buckets: int = 0
    compile_s: float = 0.0

    def as_dict(self) -> dict:
        out = dict(vars(self))
        out["mean_batch"] = self.row_rounds / self.rounds if self.rounds else 0.0
        out["tokens_per_row_round"] = self.tokens / self.row_rounds if self.row_rounds else 0.0
        out["overlap"] = max(0.0, 1 - self.wait_s / self.draft_s) if self.draft_s else None
        return out
