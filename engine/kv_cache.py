"""The KV cache of a group of sequences: one key and one value tensor per layer, [slots, kv_heads, max_len, head_dim].

Every slot has its own length, which the engine keeps (the cache stores no lengths): a forward writes a row's
new keys and values at its length and attends up to it. Rolling back rejected drafts is free, the engine keeps
the shorter length; the stale tail is masked and later overwritten. Live sequences stay in slots 0..n-1: when
some finish, `move` copies the last live rows into the holes, so no step ever gathers the cache.

`rope_offset[slot]` is a row's rotary position minus its cache index: 0, except after pruned image tokens (the
kept tokens keep their original positions while the cache holds them contiguously).

Each group of sequences owns its cache; the weights (the decoder) are shared by all of them.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, device: str, dtype: torch.dtype):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.device, self.dtype = device, dtype
        self.slots = self.max_len = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.rope_offset = torch.zeros(0, dtype=torch.long, device=device)

    def allocate(self, slots: int, max_len: int) -> None:
        """Grow to at least `slots` x `max_len` (contents are dropped when it grows; never shrinks). The old
        tensors are released before the new ones are made, so growing never holds both (at 7B on a GPU, the old
        cache beside the new one is what runs out of memory)."""
        if slots <= self.slots and max_len <= self.max_len:
            return
        self.slots, self.max_len = max(slots, self.slots), max(max_len, self.max_len)
        self.k, self.v = [], []
        shape = (self.slots, self.num_kv_heads, self.max_len, self.head_dim)
        self.k = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.num_layers)]
        self.v = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.num_layers)]
        self.rope_offset = torch.zeros(self.slots, dtype=torch.long, device=self.device)

    @property
    def bytes_per_token(self) -> int:
        """A token's keys and values over every layer."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * torch.empty(0, dtype=self.dtype).element_size()

    def move(self, src: list[int], dst: list[int]) -> None:
        """Copy the rows of slots `src` into slots `dst` (compaction when sequences finish)."""
        if not src:
            return
        s = torch.tensor(src, device=self.device)
        d = torch.tensor(dst, device=self.device)
        for t in (*self.k, *self.v, self.rope_offset):
            t[d] = t[s]

    def set_offsets(self, first: int, offsets: list[int]) -> None:
        """Rotary position minus cache index of the rows just admitted at slots first.. (0: an unpruned prompt)."""
        self.rope_offset[first:first + len(offsets)] = torch.tensor(offsets, device=self.device)
