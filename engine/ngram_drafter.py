"""A model-free drafter: prompt lookup. It proposes the continuation of the latest earlier occurrence of the
sequence's last n tokens (n = 3, 2, 1), found in the prompt's text and the output so far. Image placeholder
tokens are never looked at, and a proposal stops at the first banned id (engine/drafter.py: placeholders, the
target's special tokens but EOS, ids no token has, ids from `limit` on), so none is ever proposed."""
from __future__ import annotations

import array

import torch

from engine.local_drafter import LocalDrafter
from engine.request import SamplingParams


class NgramDrafter(LocalDrafter):
    def __init__(self, banned: set[int] = frozenset(), max_ngram: int = 3, device: str = "cpu", *,
                 image_token_id: int | None = None, limit: int | None = None):
        """`banned`: ids never proposed; `image_token_id` (banned too) is dropped from prompts; `limit`: ids from
        it on (past the target's tokenizer) are never proposed either."""
        self.image_token_id = image_token_id
        self.banned = frozenset(banned) | ({image_token_id} - {None})
        self.limit = limit
        self.max_ngram = max_ngram
        self.device = device
        self.prompts: list[list[int]] = []

    def fork(self) -> "NgramDrafter":
        return NgramDrafter(self.banned, self.max_ngram, self.device, image_token_id=self.image_token_id,
                            limit=self.limit)

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
        limit = float("inf") if self.limit is None else self.limit
        for i, h in enumerate(histories):
            found = self._lookup(self.prompts[i] + h, k)
            stop = next((j for j, t in enumerate(found) if t in self.banned or t >= limit), None)
            if stop is not None:
                found = found[:stop]
            drafts[i, :len(found)] = torch.tensor(found, dtype=torch.long)
            num[i] = len(found)
        return drafts.to(self.device), num.to(self.device), None

    def commit(self, accepted: list[int]) -> None:
        pass

    def move(self, src: list[int], dst: list[int]) -> None:
        for s, d in zip(src, dst):
            self.prompts[d] = self.prompts[s]
