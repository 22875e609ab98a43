"""The `specray` backend: a continuous-batching speculative decoding engine.

    requests ──► queue ──admit (engine/scheduler.py; prefill: vision tower + projector + decoder)──► slots 0..n-1
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
from typing import Callable

import numpy as np
import torch

from engine.captured_step import CapturedStep, compile_stats, compiles
from engine.config import SELF_DRAFTERS, EngineConfig
from engine.device_io import Clock
from engine.draft_length import DraftLength, DraftPolicy
from engine.drafter import make_drafter
from engine.device import resolve_device, resolve_dtype
from engine.model import LoadedModel
from engine.model_drafter import ModelDrafter
from engine.request import Request, Result, SamplingParams, finish_text
from engine.sampling import warp
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceGroup
from engine.speculative import RoundRecord, request_drafts, speculative_round
from engine.stats import EngineStats


PROBE_ROUNDS = 8  # a call that probes a drafter which did not pay speculates at least this many rounds


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
        self.compiled = compiles(config.compile, self.device)
        if self.compiled and not self.target.lean:
            raise ValueError(f"decoding.compile: compiled steps need the lean decoder; {config.target} runs on the "
                             f"generic HF forward")
        self.target_step = CapturedStep(self.target.decoder, self.device, self.compiled)  # the verify step
        self.drafter = self.load_drafter(config.drafter)
        self.drafter_version = 0  # bumped by each update_drafter (a drafter that learns during the job)
        self.capture_topk = config.capture_topk
        fixed = None if config.num_draft_tokens == "auto" else int(config.num_draft_tokens)
        self.max_k = 8 if fixed is None else fixed
        self.policy = DraftLength(fixed, max_k=self.max_k)
        self.stats = EngineStats()
        self.rng = torch.Generator(device=self.device)
        self.clock = Clock(self.device)  # times a round's phases without waiting for the device
        self._caches: dict[int, object] = {}  # a target cache per group index, kept across calls (they only grow)
        self._cache_len: int | None = None  # positions a row of a cache sized once (0: sized by each call)

    def load_drafter(self, spec: str | None):
        """The drafter `spec` names for this engine's target (None: no drafter)."""
        if spec is None:
            return None
        _, compression = self.config.compression.for_models(spec)
        drafter = make_drafter(spec, self.tokenizer, self.target.image_token_id, self.device, self.dtype,
                               trust_remote_code=self.config.trust_remote_code, lean=self.config.lean,
                               compression=compression, target=self.target, learning=self.config.drafter_learns)
        if isinstance(drafter, ModelDrafter) and self.compiled and drafter.ck.lean:  # its forks share its steps
            drafter.step = CapturedStep(drafter.dec, self.device, True)
        return drafter

    def update_drafter(self, state: dict[str, torch.Tensor], version: int) -> None:
        """New weights for the engine's drafter (engine/drafter_learning.py), between generate calls: every cache
        is refilled by the next call's prefill, so no row drafts from a mix of old and new weights. Output is
        unchanged by construction (the target verifies every token); only acceptance moves."""
        if not isinstance(self.drafter, ModelDrafter):
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
                 policy: DraftPolicy | None = None, between_rounds: Callable[[], None] | None = None) -> list[Result]:
        """Results in request order. By default one group of up to max_batch rows with the engine's own drafter.

        `drafters`: one drafter per group instead (None for a group without speculation); the slots are split
        between the groups. `policy` picks k per round and learns from the rounds (default: the engine's
        DraftLength). `between_rounds` is called between rounds, never inside one: the place where a host
        applies new orders (k, which drafters) to the policy and the drafters.
        """
        results: list[Result | None] = [None] * len(requests)
        policy = policy or self.policy
        headroom = max(self.max_k, policy.max_k) + 2
        cache_len = self._cache_positions()
        schedule = Scheduler(requests, params, self.target.max_positions, results, cache_len, headroom)
        if not schedule.waiting:
            return results  # type: ignore[return-value]
        own = drafters is None and self.drafter is not None and policy.decides_drafter
        probing = 0  # speculating although it did not pay, to measure it again: rounds kept before it may stop
        if own:
            if not policy.use_drafter():  # the drafter's prefill costs more than it saves (draft_length.py)
                drafters = [None]
            elif not policy.pays():
                probing = PROBE_ROUNDS
        groups = self._groups(drafters, min(self.max_batch, schedule.waiting))
        max_len = schedule.longest_prompt() + params.max_new_tokens + headroom
        self.rng.manual_seed(params.seed)
        for g in groups:
            # sized once (each group's share of max_batch_size slots, cache_len positions), or by this call's rows
            g.cache.allocate(*((-(-self.max_batch // len(groups)), cache_len) if cache_len else (g.slots, max_len)))
            if g.drafter is not None:
                g.drafter.allocate(g.slots, max_len)
                g.drafter.seed(params.seed + g.index)
        while schedule.waiting or any(g.active for g in groups):
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
                admitted = schedule.admissions(g)  # engine/scheduler.py: who enters the free slots
                for chunk in admitted:
                    self._admit(g, chunk, params, policy)
                if admitted:
                    self._retire(g, results, params, policy)
                if g.active:
                    request_drafts(g, policy.choose() if g.drafter is not None else 0, params)
        own = self.drafter.step if isinstance(self.drafter, ModelDrafter) else None  # compiles: once a call
        compiled = compile_stats([self.target_step, own])
        self.stats.compile_buckets, self.stats.compile_s = compiled["compile_buckets"], compiled["compile_s"]
        return results  # type: ignore[return-value]

    def _cache_positions(self) -> int | None:
        """Positions a row of a KV cache sized once (EngineConfig.kv_cache_gb; by default on CUDA, 85% of the
        memory free after the weights), the same for every slot of every group: computed at the first call, then
        kept, so a cache is allocated once and never grown. None: each call sizes its caches by its rows."""
        if self._cache_len is None:
            budget = self.config.kv_cache_gb * 1e9
            if budget <= 0 and self.device == "cuda":
                budget = 0.85 * torch.cuda.mem_get_info()[0]
            if budget <= 0:
                self._cache_len = 0
            else:
                per_token = self.target.decoder.new_cache().bytes_per_token
                positions = int(budget // (self.max_batch * per_token))
                self._cache_len = min(positions, self.target.max_positions or positions)
                if self._cache_len < 64:
                    raise ValueError(f"decoding.kv_cache_gb: {budget / 1e9:.2f} GB holds {positions} positions a row "
                                     f"for {self.max_batch} rows; give it more, or lower max_batch_size")
        return self._cache_len or None

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

    def _admit(self, group: SequenceGroup, new: list[Sequence], params: SamplingParams, policy: DraftPolicy) -> None:
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
                policy: DraftPolicy) -> None:
        """Finished rows leave; the last live rows move into their slots so live rows stay in 0..n-1."""
        active = group.active
        if all(s.finish is None for s in active):
            return
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
