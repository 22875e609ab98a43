"""The generic fallback decoder: any architecture, by re-running the Hugging Face language model over each row's
whole sequence every call. Quadratic and slower than the lean decoder, but it is the model's own forward.

Its "cache" is a HiddenStore: each row's input embeddings, kept so the next call can re-run them.
"""
from __future__ import annotations

import torch


class HiddenStore:
    """The fallback's per-group state: input embeddings [slots, max_len, hidden], with KVCache's interface."""

    def __init__(self, hidden_size: int, device: str, dtype: torch.dtype):
        self.hidden_size, self.device, self.dtype = hidden_size, device, dtype
        self.slots = self.max_len = 0
        self.store = torch.zeros(0, 0, hidden_size, device=device, dtype=dtype)

    def allocate(self, slots: int, max_len: int) -> None:
        if slots <= self.slots and max_len <= self.max_len:
            return
        self.slots, self.max_len = max(slots, self.slots), max(max_len, self.max_len)
        self.store = torch.zeros(self.slots, self.max_len, self.hidden_size, device=self.device, dtype=self.dtype)

    def move(self, src: list[int], dst: list[int]) -> None:
        if src:
            self.store[torch.tensor(dst, device=self.device)] = self.store[torch.tensor(src, device=self.device)]

    def set_offsets(self, first: int, offsets: list[int]) -> None:
        if any(offsets):
            raise ValueError("compression.visual_tokens: pruning needs the lean decoder (decoding.decoder: lean)")


class HFDecoder:
    def __init__(self, language_model: torch.nn.Module, lm_head: torch.nn.Module, config, device: str,
                 dtype: torch.dtype):
        self.lm, self.head = language_model, lm_head
        self.device, self.dtype = device, dtype
        self.hidden_size = config.hidden_size
        self.quantized = None

    def new_cache(self) -> HiddenStore:
        return HiddenStore(self.hidden_size, self.device, self.dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.embed_tokens(ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden).float()

    def forward(self, cache: HiddenStore, x: torch.Tensor, starts: torch.Tensor, first: int = 0,
                last: torch.Tensor | None = None, kv_only: bool = False,
                positions: torch.Tensor | None = None) -> torch.Tensor | None:
        n, t, _ = x.shape
        pos = starts[:, None] + torch.arange(t, device=self.device)[None, :]
        rows = torch.arange(first, first + n, device=self.device)[:, None].expand(n, t)
        cache.store[rows, pos] = x
        if kv_only:
            return None
        length = int(pos.max()) + 1
        # right padding: every row's own positions are 0..len-1, so plain causal attention is exact for them
        mask = (torch.arange(length, device=self.device)[None, :] < (starts + t)[:, None]).long()
        out = self.lm(inputs_embeds=cache.store[first:first + n, :length], attention_mask=mask,
                      use_cache=False).last_hidden_state
        out = out[rows - first, pos]
        return out if last is None else out[torch.arange(n, device=self.device), last][:, None]
