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

from actors.checkpoint import Checkpoint
from actors.draft_length import DraftLength
from actors.drafters import ModelDrafter, NgramDrafter
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
class EngineStats:
    """Where the time goes (seconds), and the speculation counters, accumulated over the engine's life."""
    prefill_s: float = 0.0
    draft_s: float = 0.0
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
        return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class SpecEngine:
    def __init__(self, target: str, drafter: str | None = None, device: str = "cpu",
                 dtype: torch.dtype = torch.bfloat16, max_batch: int = 32, num_draft_tokens: int | str = 4,
                 trust_remote_code: bool = False, lean: bool = True):
        self.device, self.dtype = device, dtype
        self.max_batch = max_batch
        self.target = Checkpoint(target, device, dtype, trust_remote_code=trust_remote_code, lean=lean)
        self.tokenizer = self.target.tokenizer
        self.drafter = self._drafter(drafter, trust_remote_code, lean)
        fixed = None if num_draft_tokens == "auto" else int(num_draft_tokens)
        self.max_k = 8 if fixed is None else fixed
        self.policy = DraftLength(fixed, max_k=self.max_k)
        self.stats = EngineStats()
        self.use_triton = device == "cuda"

    def _drafter(self, spec: str | None, trust_remote_code: bool, lean: bool):
        image = self.target.image_token_id
        if spec is None:
            return None
        if spec == "ngram":
            return NgramDrafter(image, device=self.device)
        ck = Checkpoint(spec, self.device, self.dtype, trust_remote_code=trust_remote_code, lean=lean)
        if ck.tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise ValueError(f"model.drafter: {spec} does not share the target's tokenizer")
        if ck.is_vlm and ck.image_token_id != image:
            raise ValueError(f"model.drafter: {spec} uses a different image token than the target")
        banned = {t for t in (image, ck.image_token_id) if t is not None}
        return ModelDrafter(ck, banned, image)

    # ---- the loop ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, requests: list[Request], params: SamplingParams) -> list[Result]:
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
        slots = min(self.max_batch, len(queue))
        max_len = max(s.prompt_len for s in queue) + params.max_new_tokens + self.max_k + 2
        self.target.decoder.allocate(slots, max_len)
        if self.drafter is not None:
            self.drafter.allocate(slots, max_len)
            self.drafter.seed(params.seed)
        self.rng = torch.Generator(device=self.device).manual_seed(params.seed)
        active: list[_Seq] = []
        # prefill in groups: a call per freed slot would pay the vision tower's and the decoder's fixed costs per
        # row; waiting until a quarter of the slots are free costs a few rounds at 3/4 occupancy instead
        min_admit = max(1, slots // 4)
        while queue or active:
            free = slots - len(active)
            if queue and free and (not active or free >= min(min_admit, len(queue))):
                take = [queue.pop() for _ in range(min(slots - len(active), len(queue)))]
                self._admit(active, take, params)
                active = self._retire(active, results, params)
            if active:
                self._round(active, params)
                active = self._retire(active, results, params)
        return results  # type: ignore[return-value]

    def _admit(self, active: list[_Seq], new: list[_Seq], params: SamplingParams) -> None:
        _sync(self.device)
        t0 = time.perf_counter()
        first = len(active)
        prompts = [s.request.input_ids for s in new]
        arrays = [s.request.model_inputs for s in new]
        embeds = self.target.embed_prompts(prompts, arrays)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        hidden = self.target.decoder.forward(embeds, torch.zeros_like(lengths), first=first, last=lengths - 1)
        tokens = self._pick(self.target.decoder.logits(hidden[:, 0]), params).tolist()
        if self.drafter is not None:
            self.drafter.admit(first, prompts, arrays)
        for s, t in zip(new, tokens):
            self._extend(s, [t], params)
        active.extend(new)
        _sync(self.device)
        self.stats.prefill_s += time.perf_counter() - t0

    def _pick(self, logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        if params.temperature == 0:
            return logits.argmax(-1)
        return torch.multinomial(warp(logits, params), 1, generator=self.rng).squeeze(1)

    def _round(self, active: list[_Seq], params: SamplingParams) -> None:
        n = len(active)
        k = self.policy.choose() if self.drafter is not None else 0
        histories = [s.generated for s in active]
        _sync(self.device)
        t0 = time.perf_counter()
        if k > 0:
            drafts, num, q = self.drafter.propose(histories, k, params)
        else:
            drafts = torch.zeros(n, 0, dtype=torch.long, device=self.device)
            num, q = torch.zeros(n, dtype=torch.long, device=self.device), None
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
            self.drafter.commit(accepted_l)
        t3 = time.perf_counter()
        if self.drafter is not None:
            self.policy.record(k, t2 - t1, t1 - t0, accepted_l, num_l)
        st = self.stats
        st.draft_s += t1 - t0
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

    def _retire(self, active: list[_Seq], results: list[Result | None], params: SamplingParams) -> list[_Seq]:
        """Finished rows leave; the last live rows move into their slots so live rows stay in 0..n-1."""
        if all(s.finish is None for s in active):
            return active
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
        self.target.decoder.move(movers, holes)
        if self.drafter is not None:
            self.drafter.move(movers, holes)
        new = list(active[:n])
        for src, dst in zip(movers, holes):
            new[dst] = active[src]
        return new
