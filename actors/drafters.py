"""Drafters: what proposes tokens for the target to verify. All share one interface with the engine:

    admit(first, prompts, arrays)    new sequences enter slots first.. (prefill)
    propose(histories, k, params)   -> drafts [n, k], num_drafts [n], draft_probs [n, k, V] or None
    submit(...) / collect(handle)    the same, split so that a remote drafter (actors/remote_drafter.py) drafts
                                     while the target verifies another group; collect adds the draft seconds
    commit(accepted)                 the verdict: roll each row back to its accepted prefix (rounds without
                                     drafting need no call: a model drafter catches up on its next proposal)
    move(src, dst)                   compaction when sequences leave
    swap_state(state)                put another set of sequences in place (None: empty); returns the old set,
                                     so one drafter serves several groups (a drafter server's channels)

- ModelDrafter: a small model with its own KV cache, run by the same lean decoder as the target. A VLM
  drafter sees the image through its own tower; a text-only drafter sees the prompt without image tokens.
- NgramDrafter: model-free prompt lookup: the continuation of the latest earlier occurrence of the
  sequence's last n tokens (n = 3, 2, 1), found in the prompt's text and the output so far.

No drafter ever proposes an image placeholder token: a model drafter's logits ban it, and the n-gram drafter
never looks at image tokens.
"""
from __future__ import annotations

import array
import time

import numpy as np
import torch

from actors.checkpoint import SELF_DRAFTERS, WEIGHT_BITS, Checkpoint, Compression
from actors.request import SamplingParams
from actors.sampling import warp


def make_drafter(spec: str, tokenizer, image_token_id: int | None, device: str, dtype: torch.dtype,
                 trust_remote_code: bool = False, lean: bool = True, compression: Compression | None = None,
                 target: Checkpoint | str | None = None):
    """The drafter `model.drafter` names, checked against the target's tokenizer and image token.

    `self-int8` / `self-int4`: the target drafts for itself with quantized weights. Given the target's
    Checkpoint (built with self_draft_bits), the drafter shares its tower, embedding and head and adds only
    the quantized linears; given the target's path (a drafter server), it loads the target quantized."""
    if spec == "ngram":
        return NgramDrafter(image_token_id, device=device)
    if spec in SELF_DRAFTERS:
        if isinstance(target, Checkpoint):
            if target.self_decoder is None:  # asked for after the target was loaded (a target actor's plan)
                if target.decoder.quantized is not None:
                    raise ValueError(f"model.drafter: {spec} needs the target's dense weights, and "
                                     "compression.weights already quantized them")
                target.self_decoder = target.decoder.quantized_copy(WEIGHT_BITS[SELF_DRAFTERS[spec]],
                                                                    target.compression.group_size)
            ck = target.with_decoder(target.self_decoder)
        elif isinstance(target, str):
            ck = Checkpoint(target, device, dtype, trust_remote_code=trust_remote_code, lean=lean,
                            compression=compression or Compression(SELF_DRAFTERS[spec]))
        else:
            raise ValueError(f"model.drafter: {spec} needs the target model")
        return ModelDrafter(ck, {image_token_id} - {None}, image_token_id)
    ck = Checkpoint(spec, device, dtype, trust_remote_code=trust_remote_code, lean=lean, compression=compression)
    if ck.tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"model.drafter: {spec} does not share the target's tokenizer")
    if ck.is_vlm and ck.image_token_id != image_token_id:
        raise ValueError(f"model.drafter: {spec} uses a different image token than the target")
    banned = {t for t in (image_token_id, ck.image_token_id) if t is not None}
    return ModelDrafter(ck, banned, image_token_id)


class LocalDrafter:
    """submit/collect for a drafter in the engine's own process: it drafts at once (nothing overlaps)."""
    remote = False

    def submit(self, histories: list[list[int]], k: int, params: SamplingParams):
        t0 = time.perf_counter()
        drafts, num, probs = self.propose(histories, k, params)
        if drafts.device.type == "cuda":
            torch.cuda.synchronize()
        return drafts, num, probs, time.perf_counter() - t0

    def collect(self, handle):
        return handle


class ModelDrafter(LocalDrafter):
    def __init__(self, checkpoint: Checkpoint, banned: set[int], image_token_id: int | None):
        self.ck = checkpoint
        self.dec = checkpoint.decoder
        self.device = checkpoint.device
        self.banned = torch.tensor(sorted(banned), dtype=torch.long, device=self.device)
        self.target_image_token = image_token_id  # dropped from the prompt of a text-only drafter
        self.prompt_len: list[int] = []  # per slot, in the drafter's own positions
        self.cached: list[int] = []  # per slot: how many generated tokens the drafter's cache holds
        self.generator = torch.Generator(device=self.device)

    def allocate(self, slots: int, max_len: int) -> None:
        self.dec.allocate(slots, max_len)
        self.prompt_len, self.cached = [0] * slots, [0] * slots

    def seed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    @torch.inference_mode()
    def admit(self, first: int, prompts: list[list[int]], arrays: list[dict[str, np.ndarray]]) -> None:
        if not self.ck.is_vlm:
            prompts = [[t for t in p if t != self.target_image_token] for p in prompts]
        pe = self.ck.embed_prompts(prompts, arrays)
        self.dec.set_offsets(first, pe.offsets or [0] * len(prompts))
        self.dec.forward(pe.embeds, torch.zeros(len(prompts), dtype=torch.long, device=self.device), first=first,
                         kv_only=True, positions=pe.positions)
        for i, n in enumerate(pe.lengths):
            self.prompt_len[first + i], self.cached[first + i] = n, 0

    def _next(self, logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits[:, self.banned] = float("-inf")
        if params.temperature == 0:
            return logits.argmax(-1), None
        probs = warp(logits, params)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1), probs

    @torch.inference_mode()
    def propose(self, histories: list[list[int]], k: int, params: SamplingParams):
        n = len(histories)
        pending = [h[c:] for h, c in zip(histories, self.cached[:n])]
        width = max(map(len, pending))
        ids = torch.zeros(n, width, dtype=torch.long)
        for i, p in enumerate(pending):
            ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        counts = torch.tensor([len(p) for p in pending], device=self.device)
        starts = torch.tensor([pl + c for pl, c in zip(self.prompt_len, self.cached[:n])], device=self.device)
        hidden = self.dec.forward(self.dec.embed(ids.to(self.device)), starts, last=counts - 1)
        drafts, probs = [], []
        tok, q = self._next(self.dec.logits(hidden[:, 0]), params)
        for step in range(k):
            drafts.append(tok)
            probs.append(q)
            if step == k - 1:
                break
            starts = starts + (counts if step == 0 else 1)
            hidden = self.dec.forward(self.dec.embed(tok[:, None]), starts)
            tok, q = self._next(self.dec.logits(hidden[:, 0]), params)
        self._round = [len(h) for h in histories], k
        draft_ids = torch.stack(drafts, 1)
        draft_probs = torch.stack(probs, 1) if params.temperature > 0 else None
        return draft_ids, torch.full((n,), k, device=self.device), draft_probs

    def commit(self, accepted: list[int]) -> None:
        lengths, k = self._round
        for i, (length, a) in enumerate(zip(lengths, accepted)):
            self.cached[i] = length + min(a, k - 1)  # the last draft was proposed but never fed back

    def swap_state(self, state: dict | None) -> dict:
        old = {"cache": self.dec.swap_cache(None if state is None else state["cache"]),
               "prompt_len": self.prompt_len, "cached": self.cached, "round": getattr(self, "_round", None)}
        state = state or {}
        self.prompt_len, self.cached = state.get("prompt_len", []), state.get("cached", [])
        self._round = state.get("round")
        return old

    def move(self, src: list[int], dst: list[int]) -> None:
        self.dec.move(src, dst)
        for s, d in zip(src, dst):
            self.prompt_len[d], self.cached[d] = self.prompt_len[s], self.cached[s]


class NgramDrafter(LocalDrafter):
    def __init__(self, image_token_id: int | None, max_ngram: int = 3, device: str = "cpu"):
        self.image_token_id = image_token_id
        self.max_ngram = max_ngram
        self.device = device
        self.prompts: list[list[int]] = []

    def allocate(self, slots: int, max_len: int) -> None:
        self.prompts = [[] for _ in range(slots)]

    def seed(self, seed: int) -> None:
        pass

    def admit(self, first: int, prompts: list[list[int]], arrays) -> None:
        for i, p in enumerate(prompts):
            self.prompts[first + i] = [t for t in p if t != self.image_token_id]

    def _lookup(self, tokens: list[int], k: int) -> list[int]:
        data = array.array("I", tokens).tobytes()
        for n in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            pattern = data[-4 * n:]
            end = len(data) - 4  # the match must start before the trailing n-gram itself
            while True:
                at = data.rfind(pattern, 0, end)
                if at < 0:
                    break
                if at % 4 == 0:
                    start = at // 4 + n
                    return tokens[start:start + k]
                end = at + len(pattern) - 1
        return []

    def propose(self, histories: list[list[int]], k: int, params: SamplingParams):
        n = len(histories)
        drafts = torch.zeros(n, k, dtype=torch.long)
        num = torch.zeros(n, dtype=torch.long)
        for i, h in enumerate(histories):
            found = self._lookup(self.prompts[i] + h, k)
            if self.image_token_id in found:
                found = found[:found.index(self.image_token_id)]
            drafts[i, :len(found)] = torch.tensor(found, dtype=torch.long)
            num[i] = len(found)
        return drafts.to(self.device), num.to(self.device), None

    def commit(self, accepted: list[int]) -> None:
        pass

    def swap_state(self, state: dict | None) -> dict:
        old = {"prompts": self.prompts}
        self.prompts = (state or {}).get("prompts", [])
        return old

    def move(self, src: list[int], dst: list[int]) -> None:
        for s, d in zip(src, dst):
            self.prompts[d] = self.prompts[s]
