"""The `specray` backend: a continuous-batching speculative decoding engine.

    requests ──► queue ──admit (prefill: vision tower + projector + decoder)──► a group's slots 0..n-1
                          each round, for all rows of a group at once (engine/speculative.py):
                            draft   k tokens per row              (a drafter: engine/drafter.py; k: draft_length.py)
                            verify  k+1 positions per row, ONE target forward (engine/decoder.py)
                            accept  greedy or rejection sampling (kernels/acceptance*.py)
                            commit  each cache keeps its row's accepted prefix (a length, nothing moves)
                          finished rows leave, the last rows move into their slots, the queue refills them

By default the engine decodes one group with its own drafter. Given one drafter per group (channels to drafter
servers, actors/drafter_channel.py), it keeps several groups in flight: while one group is verified, the next
group's drafts are computed elsewhere. Each group has its own target cache over the one set of weights.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from engine.config import SELF_DRAFTERS, EngineConfig
from engine.draft_length import DraftLength
from engine.drafter import make_drafter
from engine.model import LoadedModel, resolve_device, resolve_dtype
from engine.request import Request, Result, SamplingParams, error_result, finish_text
from engine.sampling import warp
from engine.sequence import Sequence, SequenceGroup
from engine.speculative import RoundRecord, request_drafts, speculative_round


PROBE_ROUNDS = 8  # a call that probes a drafter which did not pay speculates at least this many rounds
PREFILL_TOKENS = 4096  # prompt tokens per prefill forward: rows admitted together are prefilled in such chunks


def prefill_chunks(rows: list[Sequence]) -> list[list[Sequence]]:
    """Rows to admit, in chunks of at most PREFILL_TOKENS prompt tokens (a row longer than that alone): a prefill's
    activations ([tokens, intermediate] per layer) then stay in a CPU's caches, so a group of many slots is filled
    as fast per row as a small one (on the shipped pair, bf16, 256 rows in one forward prefilled 1.5x slower than
    in chunks of 64)."""
    chunks, tokens = [[]], 0
    for s in rows:
        if chunks[-1] and tokens + s.prompt_len > PREFILL_TOKENS:
            chunks.append([])
            tokens = 0
        chunks[-1].append(s)
        tokens += s.prompt_len
    return chunks


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

    def as_dict(self) -> dict:
        out = dict(vars(self))
        out["mean_batch"] = self.row_rounds / self.rounds if self.rounds else 0.0
        out["tokens_per_row_round"] = self.tokens / self.row_rounds if self.row_rounds else 0.0
        out["overlap"] = max(0.0, 1 - self.wait_s / self.draft_s) if self.draft_s else None
        return out


class SpecEngine:
    def __init__(self, config: EngineConfig, device: str | None = None):
        self.config = config
        self.device = device or resolve_device(config.gpus)
        self.dtype = resolve_dtype(config.dtype, "specray", self.device)
        self.max_batch = config.max_batch_size
        self.compression, _ = config.compression.for_models(config.drafter)
        _, self_draft = config.compression.for_models(config.drafter)
        self.target = LoadedModel(config.target, self.device, self.dtype, trust_remote_code=config.trust_remote_code,
                                  lean=config.lean, compression=self.compression, check_parity=config.parity_check,
                                  self_draft_bits=self_draft.bits if config.drafter in SELF_DRAFTERS else None)
        self.tokenizer = self.target.tokenizer
        self.drafter = self.load_drafter(config.drafter)
        self.drafter_version = 0  # bumped by each update_drafter (a drafter that learns during the job)
        self.capture_topk = config.capture_topk
        fixed = None if config.num_draft_tokens == "auto" else int(config.num_draft_tokens)
        self.max_k = 8 if fixed is None else fixed
        self.policy = DraftLength(fixed, max_k=self.max_k)
        self.stats = EngineStats()
        self.rng = torch.Generator(device=self.device)
        self._caches: dict[int, object] = {}  # a target cache per group index, kept across calls (they only grow)

    def load_drafter(self, spec: str | None):
        """The drafter `spec` names for this engine's target (None: no drafter)."""
        if spec is None:
            return None
        _, compression = self.config.compression.for_models(spec)
        return make_drafter(spec, self.tokenizer, self.target.image_token_id, self.device, self.dtype,
                            trust_remote_code=self.config.trust_remote_code, lean=self.config.lean,
                            compression=compression, target=self.target, learning=self.config.drafter_learns)

    def update_drafter(self, state: dict[str, torch.Tensor], version: int) -> None:
        """New weights for the engine's drafter (engine/drafter_learning.py), between generate calls: every cache
        is refilled by the next call's prefill, so no row drafts from a mix of old and new weights. Output is
        unchanged by construction (the target verifies every token); only acceptance moves."""
        if self.drafter is None or not hasattr(self.drafter, "ck"):
            raise ValueError("update_drafter: the engine has no model drafter")
        self.drafter.ck.load_weights(state)
        self.drafter_version = version
        self.policy.drafter_changed()

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    # ---- the loop ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, requests: list[Request], params: SamplingParams, drafters: list | None = None,
                 policy=None, between_rounds: Callable[[], None] | None = None) -> list[Result]:
        """Results in request order. By default one group of up to max_batch rows with the engine's own drafter.

        `drafters`: one drafter per group instead (None for a group without speculation); the slots are split
        between the groups. `policy` picks k per round and learns from the rounds (default: the engine's
        DraftLength). `between_rounds` is called between rounds, never inside one: the place where a host
        applies new orders (k, which drafters) to the policy and the drafters.
        """
        results: list[Result | None] = [None] * len(requests)
        queue = self._queue(requests, params, results)
        if not queue:
            return results  # type: ignore[return-value]
        policy = policy or self.policy
        own = drafters is None and self.drafter is not None and hasattr(policy, "use_drafter")
        probing = 0  # speculating although it did not pay, to measure it again: rounds kept before it may stop
        if own:
            if not policy.use_drafter():  # the drafter's prefill costs more than it saves (draft_length.py)
                drafters = [None]
            elif not policy.pays():
                probing = PROBE_ROUNDS
        groups = self._groups(drafters, min(self.max_batch, len(queue)))
        max_k = max(self.max_k, getattr(policy, "max_k", 0))
        max_len = max(s.prompt_len for s in queue) + params.max_new_tokens + max_k + 2
        self.rng.manual_seed(params.seed)
        for g in groups:
            g.cache.allocate(g.slots, max_len)
            if g.drafter is not None:
                g.drafter.allocate(g.slots, max_len)
                g.drafter.seed(params.seed + g.index)
        while queue or any(g.active for g in groups):
            if between_rounds is not None:
                between_rounds()
            for g in groups:
                if g.pending is not None:
                    rows = len(g.active)
                    self._record(policy if g.drafter is not None else None, speculative_round(self, g, params), rows)
                    probing -= probing > 0
                    self._retire(g, results, params, policy)
                if own and probing == 0 and g.drafter is not None and g.pending is None and not policy.pays():
                    g.drafter = None  # from here on this call decodes plainly; rows need no drafter prefill
                free = g.slots - len(g.active)
                # prefill in groups: a call per freed slot would pay the vision tower's and the decoder's fixed
                # costs per row; waiting until a quarter of the slots are free costs a few rounds instead
                if queue and free and (not g.active or free >= min(max(1, g.slots // 4), len(queue))):
                    for chunk in prefill_chunks([queue.pop() for _ in range(min(free, len(queue)))]):
                        self._admit(g, chunk, params, policy)
                    self._retire(g, results, params, policy)
                if g.active:
                    request_drafts(g, policy.choose() if g.drafter is not None else 0, params)
        return results  # type: ignore[return-value]

    def _queue(self, requests: list[Request], params: SamplingParams, results: list) -> list[Sequence]:
        """The requests to decode, last first (pop() admits in request order); the others get error results."""
        limit, queue = self.target.max_positions, []
        for i, r in enumerate(requests):
            if not r.input_ids:
                results[i] = error_result("empty prompt")
            elif limit and len(r.input_ids) + params.max_new_tokens > limit:
                results[i] = error_result(f"prompt ({len(r.input_ids)} tokens) + max_new_tokens "
                                          f"({params.max_new_tokens}) exceeds the model's {limit} positions")
            else:
                queue.append(Sequence(i, r, len(r.input_ids)))
        return queue[::-1]

    def _groups(self, drafters: list | None, slots: int) -> list[SequenceGroup]:
        drafters = [self.drafter] if drafters is None else drafters
        per_group = -(-slots // len(drafters))
        groups = []
        for i, d in enumerate(drafters):
            if slots - i * per_group <= 0:
                break
            if i not in self._caches:
                self._caches[i] = self.target.decoder.new_cache()
            groups.append(SequenceGroup(i, min(per_group, slots - i * per_group), self._caches[i], d))
        return groups

    def _record(self, policy, r: RoundRecord, rows: int) -> None:
        """A round's measurements into the policy (when the group speculates) and the engine's stats."""
        if policy is not None:
            policy.record(r.k, r.verify_s, r.draft_s, r.accepted, r.num_drafts, rows=rows)
        st = self.stats
        st.draft_s += r.draft_s
        st.wait_s += r.wait_s
        st.verify_s += r.verify_s
        st.accept_s += r.accept_s
        st.rounds += 1
        st.row_rounds += rows
        st.drafted += sum(r.num_drafts)
        st.accepted += sum(r.accepted)

    @torch.inference_mode()
    def agreement(self, requests: list[Request], references: list[list[int]], batch: int = 16) -> list[int]:
        """Per row, how many of a reference output's tokens this engine's target picks greedily when fed the
        reference's own prefix: teacher-forced token agreement, free of the cascade that one early difference
        causes in free-running output (where the outputs end is left to exact-match agreement). Runs on a
        cache of its own."""
        dec, out = self.target.decoder, [0] * len(requests)
        for j in range(0, len(requests), batch):
            reqs, refs = requests[j:j + batch], [list(r) for r in references[j:j + batch]]
            pe = self.target.embed_prompts([r.input_ids for r in reqs], [r.model_inputs for r in reqs])
            n = len(reqs)
            lengths = torch.tensor(pe.lengths, device=self.device)
            cache = dec.new_cache()
            cache.allocate(n, max(pe.lengths) + max(map(len, refs)) + 1)
            first = dec.logits(self.target.prefill(cache, pe, last=lengths - 1)[:, 0]).argmax(-1)  # [n]
            width = max(1, max(map(len, refs)) - 1)
            feed = torch.zeros(n, width, dtype=torch.long, device=self.device)
            for i, ref in enumerate(refs):  # the reference's own tokens, fed back (the last is never fed)
                feed[i, :max(0, len(ref) - 1)] = torch.tensor(ref[:-1], dtype=torch.long)
            picks = dec.logits(dec.forward(cache, dec.embed(feed), lengths)).argmax(-1)  # [n, width]
            for i, ref in enumerate(refs):
                got = torch.cat([first[i:i + 1], picks[i, :len(ref) - 1]])[:len(ref)]
                out[j + i] = int((got == torch.tensor(ref, dtype=torch.long, device=self.device)).sum())
        return out

    def _admit(self, group: SequenceGroup, new: list[Sequence], params: SamplingParams, policy=None) -> None:
        self.sync()
        t0 = time.perf_counter()
        first = len(group.active)
        prompts = [s.request.input_ids for s in new]
        arrays = [s.request.model_inputs for s in new]
        pe = self.target.embed_prompts(prompts, arrays)  # shorter rows when visual tokens are pruned
        for s, n in zip(new, pe.lengths):
            s.prompt_len = n
        lengths = torch.tensor(pe.lengths, device=self.device)
        hidden = self.target.prefill(group.cache, pe, first=first, last=lengths - 1)
        logits = self.target.decoder.logits(hidden[:, 0])
        tokens = self._pick(logits, params).tolist()
        if self.capture_topk:
            self.keep_topk(new, logits[:, None], [1] * len(new))
        if group.drafter is not None:  # timed apart: the whole-job cost model weighs it (draft_length.py)
            self.sync()
            t1 = time.perf_counter()
            group.drafter.admit(first, prompts, arrays)
            self.sync()
            dt = time.perf_counter() - t1
            self.stats.drafter_prefill_s += dt
            if hasattr(policy, "record_prefill"):
                policy.record_prefill(len(new), dt)
        for s, t in zip(new, tokens):
            self.extend(s, [t], params)
        group.active.extend(new)
        self.sync()
        self.stats.prefill_s += time.perf_counter() - t0

    def keep_topk(self, seqs: list[Sequence], logits: torch.Tensor, counts: list[int]) -> None:
        """With capture_topk: each row's first counts[i] positions of logits [n, T, V], as top-k (logits, ids)."""
        values, ids = logits.float().topk(min(self.capture_topk, logits.shape[-1]), dim=-1)
        values, ids = values.cpu().numpy(), ids.cpu().numpy().astype(np.int32)
        for i, (s, c) in enumerate(zip(seqs, counts)):
            s.topk.extend(zip(values[i, :c], ids[i, :c]))

    def _pick(self, logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        if params.temperature == 0:
            return logits.argmax(-1)
        return torch.multinomial(warp(logits, params), 1, generator=self.rng).squeeze(1)

    def extend(self, s: Sequence, new: list[int], params: SamplingParams) -> None:
        """Append a round's tokens to a row, applying EOS, max_new_tokens and stop strings."""
        before = len(s.generated)
        for t in new:
            if t in self.target.eos_ids:
                s.finish = "stop"
                break
            s.generated.append(t)
            if len(s.generated) >= params.max_new_tokens:
                s.finish = "length"
                break
        if params.stop and finish_text(self.tokenizer, s.generated, params.stop)[1]:
            # keep the shortest prefix that shows a stop string, as if the row had stopped right there
            end = next(j for j in range(before + 1, len(s.generated) + 1)
                       if finish_text(self.tokenizer, s.generated[:j], params.stop)[1])
            del s.generated[end:]
            s.finish = "stop"
        self.stats.tokens += len(s.generated) - before

    def _retire(self, group: SequenceGroup, results: list[Result | None], params: SamplingParams,
                policy=None) -> None:
        """Finished rows leave; the last live rows move into their slots so live rows stay in 0..n-1."""
        active = group.active
        if all(s.finish is None for s in active):
            return
        if hasattr(policy, "record_finished"):
            policy.record_finished([len(s.generated) for s in active if s.finish is not None],
                                   sum(s.finish is None for s in active), params.max_new_tokens)
        for s in active:
            if s.finish is not None:
                text, _ = finish_text(self.tokenizer, s.generated, params.stop)
                topk = None
                if s.topk:  # one position per generated token, plus the EOS's where the row stopped on it
                    kept = s.topk[:len(s.generated) + 1]
                    topk = (np.stack([v for v, _ in kept]), np.stack([i for _, i in kept]))
                results[s.index] = Result(text=text, finish_reason=s.finish, num_output_tokens=len(s.generated),
                                          num_drafted_tokens=s.drafted, num_accepted_tokens=s.accepted,
                                          token_ids=list(s.generated), topk=topk)
        keep = [i for i, s in enumerate(active) if s.finish is None]
        n = len(keep)
        holes = [i for i in range(n) if active[i].finish is not None]
        movers = [i for i in keep if i >= n]
        group.cache.move(movers, holes)
        if group.drafter is not None:
            group.drafter.move(movers, holes)
        new = list(active[:n])
        for src, dst in zip(movers, holes):
            new[dst] = active[src]
        group.active = new
