"""How many tokens to draft each round (`decoding.num_draft_tokens: auto`), from measured acceptance and cost.

With a per-token acceptance rate a, a round that drafts k tokens yields (1 - a^(k+1)) / (1 - a) tokens per row
on average; it costs k drafter steps plus one verify forward of k+1 positions. Both costs are measured
(moving averages per k; verify cost for unmeasured k by a least-squares line over the measured ones), and a
comes from the rounds themselves (both in engine/estimates.py). The chosen k maximises tokens per second;
k = 0 is plain decoding, chosen whenever speculation would not pay. A few rounds are spent exploring at the
start and now and then afterwards, so that a shift in acceptance (a new kind of input) or in cost (a smaller
batch) is noticed.
"""
from __future__ import annotations

from engine.estimates import Acceptance, CostLine


class DraftLength:
    def __init__(self, fixed: int | None, max_k: int = 8, explore_every: int = 16, decay: float = 0.9):
        self.fixed = fixed
        self.max_k = max_k if fixed is None else fixed
        self.explore_every = explore_every
        self.decay = decay
        self.verify_s = CostLine(decay)  # k -> one verify forward
        self.draft_step_s: float | None = None  # one drafter step
        self.accept = Acceptance(decay)
        self.rounds = 0
        self.history: list[int] = []

    def rate(self, k: int) -> float:
        """Predicted tokens per second per row for k drafts."""
        a = min(self.accept.rate, 0.999)
        tokens = (1 - a ** (k + 1)) / (1 - a)
        return tokens / (self.verify_s(k) + k * (self.draft_step_s or 0.0))

    def choose(self) -> int:
        self.rounds += 1
        if self.fixed is not None:
            k = self.fixed
        elif self.rounds <= 2:
            k = 0  # measure plain decoding first
        elif self.rounds <= 6 or not self.accept.seen:
            k = min(4, self.max_k)
        else:
            best = max(range(self.max_k + 1), key=self.rate)
            k = best
            if self.rounds % self.explore_every == 0:  # keep neighbours' costs and the acceptance fresh
                k = max(1, best - 1) if (self.rounds // self.explore_every) % 2 else min(self.max_k, best + 1)
        self.history.append(k)
        return k

    def record(self, k: int, verify_s: float, draft_s: float, accepted: list[int], num_drafts: list[int],
               rows: int = 0) -> None:
        d = self.decay
        self.verify_s.add(k, verify_s)
        if k == 0:
            return
        step = draft_s / k
        self.draft_step_s = step if self.draft_step_s is None else d * self.draft_step_s + (1 - d) * step
        self.accept.observe(accepted, num_drafts)
