"""How many tokens to draft each round (`decoding.num_draft_tokens: auto`), from measured acceptance and cost.

With a per-token acceptance rate a, a round that drafts k tokens yields (1 - a^(k+1)) / (1 - a) tokens per row
on average; it costs k drafter steps plus one verify forward of k+1 positions. Both costs are measured
(moving averages per k; verify cost for unmeasured k by a least-squares line over the measured ones), and a
comes from the rounds themselves (both in engine/estimates.py). The chosen k maximises tokens per second;
k = 0 is plain decoding, chosen whenever speculation would not pay. A few rounds are spent exploring at the
start and now and then afterwards, so that a shift in acceptance (a new kind of input) or in cost (a smaller
batch) is noticed.

Rounds are not the whole bill: before a row can be drafted for, the drafter must prefill its prompt (a VLM
drafter runs its own vision tower and decoder over the whole prompt). `pays()` weighs that per-row cost
against what speculation saves over a row's whole answer:

    saved per row = L * (t_plain - t_spec(k*)),   t_plain = verify(0) / B,   t_spec(k) = (verify(k) + k d) / (B E(k))

(L: output tokens per row, B: rows per round, E(k): tokens per row per round, d: one drafter step; all
measured). L is a mean over the rows that finished, in which each row still decoding counts as long as its
answer may still grow (max_new_tokens): the first rows to finish are the short ones, and a mean over them alone
switched a drafter that paid off within the first rounds of a call. When the drafter's prefill costs more than
that, the engine stops admitting rows to the drafter and decodes plainly: speculation never makes a job slower
than plain decoding by more than the probing. While off, one `generate` call in `probe_every` speculates again,
so that estimates stay fresh.
"""
from __future__ import annotations

from engine.estimates import Acceptance, CostLine


ROW_WINDOW = 4096  # finished rows the output-length estimate weighs fully


class DraftPolicy:
    """What the engine asks of a draft-length policy: k for each round (`choose`) and each round's measurements
    (`record`). The rest are the call-level hooks, no-ops here: DraftLength, which also decides per `generate` call
    whether the engine's own drafter is used at all (`decides_drafter`), overrides them; a pool's target actor
    follows its manager's orders instead (actors/target_actor.py)."""
    max_k: int = 8
    decides_drafter = False

    def choose(self) -> int:
        raise NotImplementedError

    def record(self, k: int, verify_s: float, draft_s: float, accepted: list[int], num_drafts: list[int],
               rows: int = 0) -> None:
        raise NotImplementedError

    def record_prefill(self, rows: int, seconds: float) -> None:
        """The drafter's prefill of `rows` newly admitted rows took `seconds`."""

    def record_finished(self, tokens: list[int], live_rows: int = 0, limit: int = 0) -> None:
        """Output tokens of rows that just finished; `live_rows` rows still decode, each may reach `limit`."""

    def use_drafter(self) -> bool:
        """At the start of a `generate` call (with decides_drafter): speculate in it?"""
        return True

    def pays(self) -> bool:
        """Whether new rows should be admitted to the drafter (with decides_drafter)."""
        return True


class DraftLength(DraftPolicy):
    decides_drafter = True

    def __init__(self, fixed: int | None, max_k: int = 8, explore_every: int = 16, decay: float = 0.9,
                 probe_every: int = 8):
        self.fixed = fixed
        self.max_k = max_k if fixed is None else fixed
        self.explore_every = explore_every
        self.decay = decay
        self.verify_s = CostLine(decay)  # k -> one verify forward
        self.draft_step_s: float | None = None  # one drafter step
        self.accept = Acceptance(decay)
        self.rounds = 0
        self.history: list[int] = []
        self.prefill_row_s: float | None = None  # the drafter's prefill, per admitted row
        self.done_rows = 0.0  # rows finished (the last ROW_WINDOW or so) and their output tokens
        self.done_tokens = 0.0
        self.live_rows = 0  # rows still decoding at the last count, and the most tokens they may still reach
        self.live_limit = 0
        self.batch_rows: float | None = None  # rows per round
        self.probe_every = probe_every
        self.calls = 0
        self.stale = False  # the drafter's weights changed since its acceptance was last measured afresh

    def _avg(self, old: float | None, new: float) -> float:
        return new if old is None else self.decay * old + (1 - self.decay) * new

    def record_prefill(self, rows: int, seconds: float) -> None:
        if rows:
            self.prefill_row_s = self._avg(self.prefill_row_s, seconds / rows)

    def record_finished(self, tokens: list[int], live_rows: int = 0, limit: int = 0) -> None:
        self.done_rows += len(tokens)
        self.done_tokens += sum(tokens)
        if self.done_rows > ROW_WINDOW:  # a long job's answers may change: older rows weigh half
            self.done_rows, self.done_tokens = self.done_rows / 2, self.done_tokens / 2
        self.live_rows, self.live_limit = live_rows, limit

    @property
    def row_tokens(self) -> float | None:
        """Output tokens per row (None before a row finished): the finished rows' mean, with each live row counted
        at its limit, so that it errs long (keeps speculating) until the long rows have finished too."""
        if not self.done_rows:
            return None
        return (self.done_tokens + self.live_rows * self.live_limit) / (self.done_rows + self.live_rows)

    def saving_per_row(self) -> float | None:
        """Seconds that speculation at its best k saves over one row's answer, before the drafter's prefill (None
        until plain and speculative rounds, a finished row and a row count have been measured)."""
        if (self.row_tokens is None or self.batch_rows is None or not self.accept.seen or 0 not in self.verify_s.bins
                or self.draft_step_s is None):
            return None
        b = max(self.batch_rows, 1.0)
        t_plain = self.verify_s(0) / b
        best = max(range(1, self.max_k + 1), key=self.rate)
        t_spec = 1 / (self.rate(best) * b)
        return self.row_tokens * (t_plain - t_spec)

    def pays(self) -> bool:
        """Whether new rows should be admitted to the drafter: its prefill per row costs less than speculation
        saves per row (True while either is unmeasured, and always with a fixed k)."""
        if self.fixed is not None:
            return True
        saving = self.saving_per_row()
        if saving is None or self.prefill_row_s is None:
            return True
        return saving > self.prefill_row_s

    def use_drafter(self) -> bool:
        """At the start of a `generate` call: speculate in it? Yes when it pays, and one call in `probe_every` to
        probe. A probe after new drafter weights forgets the old weights' acceptance, so that the new ones are
        judged on their own rounds."""
        self.calls += 1
        if self.pays():
            return True
        if self.calls % self.probe_every:
            return False
        if self.stale:
            self.accept, self.stale = Acceptance(self.decay), False
        return True

    def drafter_changed(self) -> None:
        """New drafter weights (a drafter that learns during the job). Where speculation pays, it goes on and the
        acceptance estimate (a moving average) follows the new weights round by round. Where it does not, the
        new weights wait for the next probe: a trainer that publishes every few seconds must not make every call
        pay for the drafter's prefill."""
        self.stale = True

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
        if rows:
            self.batch_rows = self._avg(self.batch_rows, float(rows))
        if k == 0:
            return
        step = draft_s / k
        self.draft_step_s = step if self.draft_step_s is None else d * self.draft_step_s + (1 - d) * step
        self.accept.observe(accepted, num_drafts, offered=k)
