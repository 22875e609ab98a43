"""How many tokens to draft each round (`decoding.num_draft_tokens: auto`), from measured acceptance and cost.

With a per-token acceptance rate a, a round that drafts k tokens yields (1 - a^(k+1)) / (1 - a) tokens per row
on average; it costs k drafter steps plus one verify forward of k+1 positions. Both costs are measured
(moving averages per k; verify cost for unmeasured k by a least-squares line over the measured ones), and a
comes from the rounds themselves: a row that accepted m of k drafts contributes m successes and, if m < k,
one failure. The chosen k maximises tokens per second; k = 0 is plain decoding, chosen whenever speculation
would not pay. A few rounds are spent exploring at the start and now and then afterwards, so that a shift in
acceptance (a new kind of input) or in cost (a smaller batch) is noticed.
"""
from __future__ import annotations


class DraftLength:
    def __init__(self, fixed: int | None, max_k: int = 8, explore_every: int = 16, decay: float = 0.9):
        self.fixed = fixed
        self.max_k = max_k if fixed is None else fixed
        self.explore_every = explore_every
        self.decay = decay
        self.verify_s: dict[int, float] = {}  # k -> moving average of one verify forward
        self.draft_step_s: float | None = None  # one drafter step
        self.successes, self.trials = 0.0, 0.0
        self.rounds = 0
        self.history: list[int] = []

    @property
    def acceptance(self) -> float:
        return self.successes / self.trials if self.trials else 0.0

    def _verify(self, k: int) -> float:
        if k in self.verify_s:
            return self.verify_s[k]
        ks = sorted(self.verify_s)
        if len(ks) == 1:
            return self.verify_s[ks[0]]
        mean_k = sum(ks) / len(ks)
        mean_t = sum(self.verify_s[x] for x in ks) / len(ks)
        slope = sum((x - mean_k) * (self.verify_s[x] - mean_t) for x in ks) / sum((x - mean_k) ** 2 for x in ks)
        return max(1e-6, mean_t + max(0.0, slope) * (k - mean_k))

    def rate(self, k: int) -> float:
        """Predicted tokens per second per row for k drafts."""
        a = min(self.acceptance, 0.999)
        tokens = (1 - a ** (k + 1)) / (1 - a)
        return tokens / (self._verify(k) + k * (self.draft_step_s or 0.0))

    def choose(self) -> int:
        self.rounds += 1
        if self.fixed is not None:
            k = self.fixed
        elif self.rounds <= 2:
            k = 0  # measure plain decoding first
        elif self.rounds <= 6 or self.trials == 0:
            k = min(4, self.max_k)
        else:
            best = max(range(self.max_k + 1), key=self.rate)
            k = best
            if self.rounds % self.explore_every == 0:  # keep neighbours' costs and the acceptance fresh
                k = max(1, best - 1) if (self.rounds // self.explore_every) % 2 else min(self.max_k, best + 1)
        self.history.append(k)
        return k

    def record(self, k: int, verify_s: float, draft_s: float, accepted: list[int], num_drafts: list[int]) -> None:
        d = self.decay
        self.verify_s[k] = verify_s if k not in self.verify_s else d * self.verify_s[k] + (1 - d) * verify_s
        if k == 0:
            return
        step = draft_s / k
        self.draft_step_s = step if self.draft_step_s is None else d * self.draft_step_s + (1 - d) * step
        succ = sum(accepted)
        fail = sum(1 for a, n in zip(accepted, num_drafts) if a < n)
        self.successes = d * self.successes + succ
        self.trials = d * self.trials + succ + fail
