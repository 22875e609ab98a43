"""The controller: how many target and drafter actors, and how many tokens to draft, for a device budget.

It learns three things from the rounds it is shown, and plans from them:
- verify cost: one target forward over a group of b rows scoring k+1 positions each, fitted as
  v0 + v1 * b * (k + 1) (actors/estimates.py: moving averages per b * (k + 1) seen, a line between; until rounds with different k have been seen,
  the cost is taken as flat, which on an accelerator it nearly is; a few rounds at other k, see `explore_k`,
  give the slope);
- draft cost: one drafter step over a group, d0 + d1 * b;
- acceptance: the per-token acceptance rate a, as a moving average that forgets quickly, so a new kind
  of input shows within a few dozen rounds.

The model of a plan (T targets, D drafters, k): every target keeps G groups of b rows in flight, and a
group's round is a draft (k steps, on any drafter) followed by a verify (on its target), so

    rounds/s = min(T / V,              targets busy all the time
                   D / (k * Dstep),    drafters busy all the time
                   T * G / (k * Dstep + V))   every group waiting only on itself
    tokens/s = rounds/s * b * (1 - a^(k+1)) / (1 - a)

against co-located actors (drafter and target on one device, one group of G*b rows, draft then verify):
devices / (k * Dstep(G*b) + V(G*b, k)) rounds/s. It enumerates every plan within the budget
(targets cost 1 device each, drafters `drafter_cost`, which may be fractional or 0 for CPU drafters), keeps
the best, and changes its plan only when the best beats the current one by `min_gain` (re-planning on noise
would thrash actors); every decision, with its reason, goes on the timeline.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from engine.estimates import Acceptance, CostLine


def explore_k(k: int, draw: float, max_k: int) -> int:
    """The k for one group's round: mostly the plan's, sometimes a neighbour, so the cost fit sees a slope."""
    if k == 0 or draw >= 0.1:
        return k
    return max(1, k - 2) if draw < 0.05 else min(max_k, k + 2)


@dataclass(frozen=True)
class Plan:
    mode: Literal["disaggregated", "colocated"]
    targets: int
    drafters: int
    k: int

    def devices(self, drafter_cost: float) -> float:
        return self.targets + (self.drafters * drafter_cost if self.mode == "disaggregated" else 0.0)


@dataclass
class Budget:
    devices: float
    drafter_cost: float = 0.25  # devices per drafter actor (a fractional GPU; 0 for a CPU-only drafter)
    max_drafters: int = 64
    max_k: int = 8


class Controller:
    def __init__(self, budget: Budget, group_rows: int, groups: int = 2, min_gain: float = 0.05,
                 decay: float = 0.9):
        self.budget = budget
        self.b = group_rows
        self.groups = groups
        self.min_gain = min_gain
        self.verify = CostLine(decay=0.8)
        self.draft = CostLine(decay=0.8)
        self.accept = Acceptance(decay)
        self.plan: Plan | None = None
        self.timeline: list[dict] = []
        self.measured: dict[Plan, tuple[float, float]] = {}  # plan -> (achieved tokens/s, acceptance then)
        self.previous: Plan | None = None  # the plan a change replaced, until the change is confirmed
        self.rejected: dict[Plan, float] = {}  # plans that measured worse than the one they replaced: acceptance then

    # ---- measurements ------------------------------------------------------------------------------

    def observe_verify(self, rows: int, k: int, seconds: float) -> None:
        self.verify.add(rows * (k + 1), seconds)

    def observe_draft_step(self, rows: int, seconds: float) -> None:
        self.draft.add(rows, seconds)

    def observe_acceptance(self, accepted: list[int], drafted: list[int]) -> None:
        self.accept.observe(accepted, drafted)

    @property
    def acceptance(self) -> float:
        return self.accept.rate

    # ---- the model ---------------------------------------------------------------------------------

    def throughput(self, plan: Plan) -> float:
        """Predicted output tokens per second of a plan, from the current measurements."""
        a = min(self.acceptance, 0.999)
        k = plan.k
        tokens = (1 - a ** (k + 1)) / (1 - a)
        if plan.mode == "colocated":
            rows = self.groups * self.b
            round_s = self.verify(rows * (k + 1)) + k * self.draft(rows)
            return plan.targets / round_s * rows * tokens
        v = self.verify(self.b * (k + 1))
        if k == 0 or plan.drafters == 0:
            return plan.targets / self.verify(self.b) * self.b
        step = self.draft(self.b)
        rounds = min(plan.targets / v, plan.drafters / (k * step), plan.targets * self.groups / (k * step + v))
        return rounds * self.b * tokens

    def candidates(self) -> list[Plan]:
        b = self.budget
        out = []
        for targets in range(1, int(b.devices) + 1):
            out.append(Plan("disaggregated", targets, 0, 0))
            left = b.devices - targets
            most = b.max_drafters if b.drafter_cost == 0 else min(b.max_drafters, int(left / b.drafter_cost + 1e-9))
            for drafters in range(1, most + 1):
                for k in range(1, b.max_k + 1):
                    out.append(Plan("disaggregated", targets, drafters, k))
        for k in range(0, b.max_k + 1):
            out.append(Plan("colocated", int(b.devices), 0, k))
        return out

    def observe_rate(self, tokens_per_s: float, acceptance_before: float) -> None:
        """The tokens/s the current plan achieved over a settled interval (all its actors up), and the
        acceptance estimate when that interval began: an interval over which the acceptance moved measures the
        input's change, not the plan, and is not kept."""
        a = self.acceptance
        if abs(a - acceptance_before) > 0.05:
            self.measured.pop(self.plan, None)
            return
        old = self.measured.get(self.plan)
        if old is not None and abs(old[1] - a) <= 0.05:
            tokens_per_s = 0.5 * old[0] + 0.5 * tokens_per_s
        self.measured[self.plan] = (tokens_per_s, a)

    def best(self, mode: str | None = None) -> tuple[Plan, float]:
        plans = [p for p in self.candidates() if (mode is None or p.mode == mode) and p not in self.rejected]
        scored = [(self.throughput(p), p) for p in plans]
        rate, plan = max(scored, key=lambda s: (s[0], -s[1].devices(self.budget.drafter_cost)))
        return plan, rate

    def explore_k(self, k: int, draw: float) -> int:
        return explore_k(k, draw, self.budget.max_k)

    def model(self) -> dict:
        """What the plans are predicted from, and the best plan of each kind (for the record)."""
        out = {"verify_s_by_row_positions": {str(int(x)): round(y, 5) for x, y in sorted(self.verify.bins.items())},
               "draft_step_s_by_rows": {str(int(x)): round(y, 5) for x, y in sorted(self.draft.bins.items())},
               "acceptance": round(self.acceptance, 4)}
        if self.verify.bins and self.draft.bins:
            for name, keep in (("best_disaggregated", lambda p: p.mode == "disaggregated" and p.k > 0),
                               ("best_colocated", lambda p: p.mode == "colocated" and p.k > 0),
                               ("best_plain", lambda p: p.k == 0)):
                rate, plan = max(((self.throughput(p), p) for p in self.candidates() if keep(p)),
                                 key=lambda s: s[0])
                out[name] = {**asdict(plan), "predicted_tokens_per_s": round(rate, 1)}
        return out

    def _record(self, now: float, plan: Plan, rate: float, reason: str) -> None:
        self.timeline.append({"t": round(now, 3), **asdict(plan), "predicted_tokens_per_s": round(rate, 1),
                              "acceptance": round(self.acceptance, 3), "reason": reason, "model": self.model()})

    def decide(self, now: float) -> Plan:
        """Re-plan from the current measurements; returns the plan to run (the current one unless beaten).

        Decided by the model, confirmed by measurement: where the achieved rates are reported (observe_rate), a
        change that turns out slower than the plan it replaced is reverted and that plan is set aside until the
        acceptance moves by more than 0.1 (the model's costs are fitted on one plan and can mislead on another:
        on a shared host, say, where a "device" is not independent of the others)."""
        a = self.acceptance
        self.rejected = {p: at for p, at in self.rejected.items() if abs(a - at) <= 0.1}
        if self.previous is not None:
            now_rate, before = self.measured.get(self.plan), self.measured.get(self.previous)
            if now_rate is None:
                return self.plan  # the change is not measured yet
            (now_rate, a_now), (before, a_before) = now_rate, before
            if abs(a_now - a_before) <= 0.05 and now_rate < before * (1 - self.min_gain):
                self.rejected[self.plan] = a
                self._record(now, self.previous, before, f"reverted: the new plan measured {now_rate:.1f} tokens/s, "
                                                         f"the one it replaced {before:.1f}")
                self.plan, self.previous = self.previous, None
                return self.plan
            self.previous = None
        plan, rate = self.best()
        current = self.throughput(self.plan) if self.plan is not None else 0.0
        if self.plan is None or rate > current * (1 + self.min_gain):
            reason = "first plan" if self.plan is None else f"predicted {rate / current:.2f}x the current plan"
            if self.plan in self.measured:
                self.previous = self.plan
            self.plan = plan
            self._record(now, plan, rate, reason)
        return self.plan
