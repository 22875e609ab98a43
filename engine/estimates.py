"""Running estimates that the draft-length policy and the pool controller learn from the rounds they see."""
from __future__ import annotations


class Acceptance:
    """Per-token acceptance rate, as a moving average: a row that accepted m of its d drafts counts m successes
    and, if m < d, one failure (the geometric model's estimate), so a shift in the input shows within rounds.
    With `offered` (the k the round asked for), a row whose drafter proposed fewer than k tokens (an n-gram
    drafter that found no match) also counts its failure: the round paid for k positions and got m + 1 tokens."""

    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self.successes = self.trials = 0.0

    def observe(self, accepted: list[int], drafted: list[int], offered: int = 0) -> None:
        succ = sum(accepted)
        fail = sum(1 for a, d in zip(accepted, drafted) if a < max(d, offered))
        self.successes = self.decay * self.successes + succ
        self.trials = self.decay * self.trials + succ + fail

    @property
    def seen(self) -> bool:
        return self.trials > 0

    @property
    def rate(self) -> float:
        return self.successes / self.trials if self.trials else 0.0


class CostLine:
    """A cost as a function of x: a moving average per x seen, and between or beyond them a least-squares line
    through those averages (never falling with x; flat while only one x has been seen). Averages of x values the
    current plan no longer visits are kept, so the slope survives."""

    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self.bins: dict[float, float] = {}

    def add(self, x: float, y: float) -> None:
        old = self.bins.get(x)
        self.bins[x] = y if old is None else self.decay * old + (1 - self.decay) * y

    def __call__(self, x: float) -> float:
        if x in self.bins:
            return self.bins[x]
        if not self.bins:
            raise ValueError("no measurements yet")
        xs, ys = list(self.bins), list(self.bins.values())
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((v - mx) ** 2 for v in xs)
        slope = sum((v - mx) * (y - my) for v, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0
        line = my + max(0.0, slope) * (x - mx)
        low = min(xs)
        if x < low and low > 0:  # below the data a steep noisy line can reach 0; a cost v0 + v1 x with v0 >= 0 cannot
            line = max(line, self.bins[low] * x / low)  # fall faster than in proportion to x
        return max(1e-9, line)
