"""A drafter that is a small model (or the target itself, quantized): its own KV cache per group of sequences, run
by the same decoder code as the target. A VLM drafter sees the image through its own tower; a text-only drafter
sees the prompt without image tokens. Its logits ban the image placeholder, so it never proposes one."""
from __future__ import annotations

import numpy as np
import torch

from engine.drafter import LocalDrafter
from engine.model import LoadedModel
from engine.request import SamplingParams
from engine.sampling import warp


class ModelDrafter(LocalDrafter):
    def __init__(self, model: LoadedModel, banned: set[int], image_token_id: int | None):
        self.ck = model
        self.dec = model.decoder
        self.device = model.device
        self.banned = torch.tensor(sorted(banned), dtype=torch.long, device=self.device)
        self.target_image_token = image_token_id  # dropped from the prompt of a text-only drafter
        self.cache = self.dec.new_cache()
        self.prompt_len: list[int] = []  # per slot, in the drafter's own positions
        self.cached: list[int] = []  # per slot: how many generated tokens the drafter's cache holds
        self.generator = torch.Generator(device=self.device)

    def fork(self) -> "ModelDrafter":
        return ModelDrafter(self.ck, set(self.banned.tolist()), self.target_image_token)

    def allocate(self, slots: int, max_len: int) -> None:
        self.cache.allocate(slots, max_len)
        self.prompt_len, self.cached = [0] * slots, [0] * slots

    def seed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    @torch.inference_mode()
    def admit(self, first: int, prompts: list[list[int]], arrays: list[dict[str, np.ndarray]]) -> None:
        if not self.ck.is_vlm:
            prompts = [[t for t in p if t != self.target_image_token] for p in prompts]
        pe = self.ck.embed_prompts(prompts, arrays)
        self.cache.set_offsets(first, pe.offsets or [0] * len(prompts))
        self.dec.forward(self.cache, pe.embeds, torch.zeros(len(prompts), dtype=torch.long, device=self.device), first=first,
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
        hidden = self.dec.forward(self.cache, self.dec.embed(ids.to(self.device)), starts, last=counts - 1)
        drafts, probs = [], []
        tok, q = self._next(self.dec.logits(hidden[:, 0]), params)
        for step in range(k):
            drafts.append(tok)
            probs.append(q)
            if step == k - 1:
                break
            starts = starts + (counts if step == 0 else 1)
            hidden = self.dec.forward(self.cache, self.dec.embed(tok[:, None]), starts)
            tok, q = self._next(self.dec.logits(hidden[:, 0]), params)
        self._round = [len(h) for h in histories], k
        draft_ids = torch.stack(drafts, 1)
        draft_probs = torch.stack(probs, 1) if params.temperature > 0 else None
        return draft_ids, torch.full((n,), k, device=self.device), draft_probs

    def commit(self, accepted: list[int]) -> None:
        lengths, k = self._round
        for i, (length, a) in enumerate(zip(lengths, accepted)):
            self.cached[i] = length + min(a, k - 1)  # the last draft was proposed but never fed back

    def move(self, src: list[int], dst: list[int]) -> None:
        self.cache.move(src, dst)
        for s, d in zip(src, dst):
            self.prompt_len[d], self.cached[d] = self.prompt_len[s], self.cached[s]
