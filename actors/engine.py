"""The `specray` backend: a continuous-batching speculative decoding engine.

    requests ──► queue ──admit (prefill: vision tower + projector + decoder)──► slots 0..n-1
                          each round, for all n rows at once:
                            draft   k tokens per row              (drafters.py; k from draft_length.py)
                            verify  k+1 positions per row, ONE target forward (decoder.py)
                            accept  greedy or rejection sampling (kernels/acceptance*.py)
                            commit  each cache keeps its row's accepted prefix (a length, nothing moves)
                          finished rows leave, the last rows move into their slots, the queue refills them

Invariant per row: the target's cache holds the prompt and every generated token but the last, which is fed
at the start of the next round. Rows accept different numbers of tokens and simply carry different lengths.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from actors.checkpoint import SELF_DRAFTERS, Checkpoint, resolve_compression
from actors.draft_length import DraftLength
from actors.drafters import make_drafter
from actors.request import Request, Result, SamplingParams, error_result, finish_text
from actors.sampling import warp
from kernels.acceptance import greedy_accept
from kernels.acceptance import rejection_sample as rejection_sample_torch


@dataclass
class _Seq:
    index: int  # position in the caller's request list
    request: Request
    prompt_len: int
    generated: list[int] = field(default_factory=list)
    drafted: int = 0
    accepted: int = 0
    finish: str | None = None


@dataclass
class _Lane:
    """A group of sequences with its own slots, target cache and drafter (verified one group at a time)."""
    index: int
    slots: int
    drafter: object | None
    active: list[_Seq] = field(default_factory=list)
    cache: dict | None = None  # the target's cache while another lane's is in the decoder
    pending: tuple | None = None  # (k, handle): the draft in flight


@dataclass
class EngineStats:
    """Where the time goes (seconds), and the speculation counters, accumulated over the engine's life."""
    prefill_s: float = 0.0
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


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class SpecEngine:
    def __init__(self, target: str, drafter: str | None = None, device: str = "cpu",
                 dtype: torch.dtype = torch.bfloat16, max_batch: int = 32, num_draft_tokens: int | str = 4,
                 trust_remote_code: bool = False, lean: bool = True, compression: dict | None = None):
        self.device, self.dtype = device, dtype
        self.max_batch = max_batch
        self.compression_section = compression
        self.compression, drafter_compression = resolve_compression(compression, drafter)
        self_bits = drafter_compression.bits if drafter in SELF_DRAFTERS else None
        self.target = Checkpoint(target, device, dtype, trust_remote_code=trust_remote_code, lean=lean,
                                 compression=self.compression, self_draft_bits=self_bits)
        self.tokenizer = self.target.tokenizer
        self.drafter = self._drafter(drafter, trust_remote_code, lean)
        fixed = None if num_draft_tokens == "auto" else int(num_draft_tokens)
        self.max_k = 8 if fixed is None else fixed
        self.policy = DraftLength(fixed, max_k=self.max_k)
        self.stats = EngineStats()
        self.use_triton = device == "cuda"
        self._current: _Lane | None = None  # the lane whose cache is in the target's decoder
        self._lane_caches: dict[int, dict | None] = {}

    def _drafter(self, spec: str | None, trust_remote_code: bool, lean: bool):
        if spec is None:
            return None
        _, compression = resolve_compression(self.compression_section, spec)
        return make_drafter(spec, self.tokenizer, self.target.image_token_id, self.device, self.dtype,
                            trust_remote_code=trust_remote_code, lean=lean, compression=compression,
                            target=self.target)

    # ---- the loop ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, requests: list[Request], params: SamplingParams, drafters: list | None = None,
                 policy=None) -> list[Result]:
        """Results in request order. By default one group of up to max_batch rows with the engine's own drafter.

        `drafters`: one drafter per group instead (remote channels, actors/remote_drafter.py; None for a group
        without speculation); the slots are split between the groups, and while one group is being verified
        the next group's draft is in flight. `policy` picks k per round and learns from the rounds
        (default: the engine's DraftLength).
        """
        results: list[Result | None] = [None] * len(requests)
        limit = self.target.max_positions
        queue = []
        for i, r in enumerate(requests):
            if not r.input_ids:
                results[i] = error_result("empty prompt")
            elif limit and len(r.input_ids) + params.max_new_tokens > limit:
                results[i] = error_result(f"prompt ({len(r.input_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                                    f"exceeds the model's {limit} positions")
            else:
                queue.append(_Seq(i, r, len(r.input_ids)))
        if not queue:
            return results  # type: ignore[return-value]
        queue.reverse()  # pop() from the end admits in request order
        policy = policy or self.policy
        drafters = [self.drafter] if drafters is None else drafters
        slots = min(self.max_batch, len(queue))
        per_lane = -(-slots // len(drafters))
        lanes = [_Lane(i, min(per_lane, slots - i * per_lane), d) for i, d in enumerate(drafters)
                 if slots - i * per_lane > 0]
        max_k = max(self.max_k, getattr(policy, "max_k", 0))
        max_len = max(s.prompt_len for s in queue) + params.max_new_tokens + max_k + 2
        self.rng = torch.Generator(device=self.device).manual_seed(params.seed)
        for lane in lanes:
            lane.cache = self._lane_caches.get(lane.index)
            self._enter(lane)
            self.target.decoder.allocate(lane.slots, max_len)
            if lane.drafter is not None:
                lane.drafter.allocate(lane.slots, max_len)
                lane.drafter.seed(params.seed + lane.index)
        try:
            while queue or any(lane.active for lane in lanes):
                for lane in lanes:
                    if lane.pending is not None:
                        self._finish(lane, policy, params)
                        self._retire(lane, results, params)
                    free = lane.slots - len(lane.active)
                    # prefill in groups: a call per freed slot would pay the vision tower's and the decoder's fixed
                    # costs per row; waiting until a quarter of the slots are free costs a few rounds instead
                    if queue and free and (not lane.active or free >= min(max(1, lane.slots // 4), len(queue))):
                        self._admit(lane, [queue.pop() for _ in range(min(free, len(queue)))], params)
                        self._retire(lane, results, params)
                    if lane.active:
                        self._start(lane, policy, params)
        finally:  # lane 0's cache goes back in the decoder; all are kept for the next call (allocate only grows)
            self._enter(lanes[0])
            for lane in lanes[1:]:
                self._lane_caches[lane.index] = lane.cache
            self._current = None
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def agreement(self, requests: list[Request], references: list[list[int]], batch: int = 16) -> list[int]:
        """Per row, how many of a reference output's tokens this engine's target picks greedily when fed the
        reference's own prefix: teacher-forced token agreement, free of the cascade that one early difference
        causes in free-running output (where the outputs end is left to exact-match agreement). Uses the
        decoder's cache (call between generates)."""
        dec, out = self.target.decoder, [0] * len(requests)
        for j in range(0, len(requests), batch):
            reqs, refs = requests[j:j + batch], [list(r) + [0] for r in references[j:j + batch]]  # + a dummy feed
            pe = self.target.embed_prompts([r.input_ids for r in reqs], [r.model_inputs for r in reqs])
            n, width = len(reqs), max(a + len(b) for a, b in zip(pe.lengths, refs))
            x = torch.zeros(n, width, dec.hidden_size, device=self.device, dtype=self.dtype)
            positions = torch.zeros(n, width, dtype=torch.long, device=self.device)
            offsets = pe.offsets or [0] * n
            for i, (length, ref) in enumerate(zip(pe.lengths, refs)):
                x[i, :length] = pe.embeds[i, :length]
                x[i, length:length + len(ref) - 1] = dec.embed(torch.tensor(ref[:-1], device=self.device))
                positions[i, :length] = (pe.positions[i, :length] if pe.positions is not None
                                         else torch.arange(length, device=self.device))
                positions[i, length:] = torch.arange(length, width, device=self.device) + offsets[i]
            dec.allocate(n, width + 1)
            dec.set_offsets(0, offsets)
            picks = dec.logits(dec.forward(x, torch.zeros(n, dtype=torch.long, device=self.device),
                                           positions=positions)).argmax(-1)
            for i, (length, ref) in enumerate(zip(pe.lengths, refs)):
                got = picks[i, length - 1:length - 2 + len(ref)]
                out[j + i] = int((got == torch.tensor(ref[:-1], device=self.device)).sum())
        return out

    def _enter(self, lane: "_Lane") -> None:
        """Put the lane's target cache in the decoder (one set of weights, one cache per group)."""
        if self._current is lane:
            return
        old = self.target.decoder.swap_cache(lane.cache) if self._current is not None or lane.index else None
        if self._current is not None:
            self._current.cache = old
        lane.cache = None
        self._current = lane

    def _admit(self, lane: "_Lane", new: list[_Seq], params: SamplingParams) -> None:
        self._enter(lane)
        _sync(self.device)
        t0 = time.perf_counter()
        first = len(lane.active)
        prompts = [s.request.input_ids for s in new]
        arrays = [s.request.model_inputs for s in new]
        pe = self.target.embed_prompts(prompts, arrays)  # shorter rows when visual tokens are pruned
        for s, n in zip(new, pe.lengths):
            s.prompt_len = n
        lengths = torch.tensor(pe.lengths, device=self.device)
        self.target.decoder.set_offsets(first, pe.offsets or [0] * len(new))
        hidden = self.target.decoder.forward(pe.embeds, torch.zeros_like(lengths), first=first, last=lengths - 1,
                                             positions=pe.positions)
        tokens = self._pick(self.target.decoder.logits(hidden[:, 0]), params).tolist()
        if lane.drafter is not None:
            lane.drafter.admit(first, prompts, arrays)
        for s, t in zip(new, tokens):
            self._extend(s, [t], params)
        lane.active.extend(new)
        _sync(self.device)
        self.stats.prefill_s += time.perf_counter() - t0

    def _pick(self, logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        if params.temperature == 0:
            return logits.argmax(-1)
        return torch.multinomial(warp(logits, params), 1, generator=self.rng).squeeze(1)

    def _start(self, lane: "_Lane", policy, params: SamplingParams) -> None:
        """Choose k and send the lane's draft request (a local drafter drafts right away)."""
        k = policy.choose() if lane.drafter is not None else 0
        handle = lane.drafter.submit([s.generated for s in lane.active], k, params) if k > 0 else None
        lane.pending = (k, handle)

    def _finish(self, lane: "_Lane", policy, params: SamplingParams) -> None:
        """Collect the lane's drafts, verify them in one target forward, accept, commit."""
        active, n = lane.active, len(lane.active)
        (k, handle), lane.pending = lane.pending, None
        t0 = time.perf_counter()
        draft_s = 0.0
        if handle is not None:
            drafts, num, q, draft_s = lane.drafter.collect(handle)
            k = drafts.shape[1]  # 0 when a remote drafter was lost and none could take over
            if not lane.drafter.remote:
                t0 -= draft_s  # a local drafter drafted in _start: nothing of it was hidden
        if handle is None or k == 0:
            drafts = torch.zeros(n, 0, dtype=torch.long, device=self.device)
            num, q = torch.zeros(n, dtype=torch.long, device=self.device), None
        wait_s = time.perf_counter() - t0
        self._enter(lane)
        _sync(self.device)
        t1 = time.perf_counter()
        last = torch.tensor([s.generated[-1] for s in active], device=self.device)
        tokens = torch.cat([last[:, None], drafts], 1)
        starts = torch.tensor([s.prompt_len + len(s.generated) - 1 for s in active], device=self.device)
        dec = self.target.decoder
        logits = dec.logits(dec.forward(dec.embed(tokens), starts))  # [n, k+1, V]
        _sync(self.device)
        t2 = time.perf_counter()
        if params.temperature == 0:
            accepted, nxt = greedy_accept(drafts, num, logits.argmax(-1))
        else:
            p = warp(logits, params)
            if k == 0:
                accepted = torch.zeros(n, dtype=torch.int32, device=self.device)
                nxt = torch.multinomial(p[:, 0], 1, generator=self.rng).squeeze(1)
            else:
                u = torch.rand(n, k, generator=self.rng, device=self.device)
                ru = torch.rand(n, generator=self.rng, device=self.device)
                accepted, nxt = self._rejection_sample(drafts, q, p, num, u, ru)
        accepted_l, nxt_l, num_l, drafts_l = accepted.tolist(), nxt.tolist(), num.tolist(), drafts.tolist()
        for s, a, t, d, m in zip(active, accepted_l, nxt_l, drafts_l, num_l):
            s.drafted += m
            s.accepted += a
            self._extend(s, d[:a] + [t], params)
        if k > 0:
            lane.drafter.commit(accepted_l)
        t3 = time.perf_counter()
        if lane.drafter is not None:
            policy.record(k, t2 - t1, draft_s, accepted_l, num_l, rows=n)
        st = self.stats
        st.draft_s += draft_s
        st.wait_s += wait_s
        st.verify_s += t2 - t1
        st.accept_s += t3 - t2
        st.rounds += 1
        st.row_rounds += n
        st.drafted += sum(num_l)
        st.accepted += sum(accepted_l)

    def _rejection_sample(self, drafts, q, p, num, u, ru):
        if self.use_triton:
            from kernels.acceptance_triton import rejection_sample
            return rejection_sample(drafts, q, p, num, u, ru)
        return rejection_sample_torch(drafts, q, p, num, u, ru)

    def _extend(self, s: _Seq, new: list[int], params: SamplingParams) -> None:
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

    def _retire(self, lane: "_Lane", results: list[Result | None], params: SamplingParams) -> None:
        """Finished rows leave; the last live rows move into their slots so live rows stay in 0..n-1."""
        active = lane.active
        if all(s.finish is None for s in active):
            return
        for s in active:
            if s.finish is not None:
                text, _ = finish_text(self.tokenizer, s.generated, params.stop)
                results[s.index] = Result(text=text, finish_reason=s.finish, num_output_tokens=len(s.generated),
                                          num_drafted_tokens=s.drafted, num_accepted_tokens=s.accepted,
                                          token_ids=list(s.generated))
        keep = [i for i, s in enumerate(active) if s.finish is None]
        n = len(keep)
        holes = [i for i in range(n) if active[i].finish is not None]
        movers = [i for i in keep if i >= n]
        self._enter(lane)
        self.target.decoder.move(movers, holes)
        if lane.drafter is not None:
            lane.drafter.move(movers, holes)
        new = list(active[:n])
        for src, dst in zip(movers, holes):
            new[dst] = active[src]
        lane.active = new
