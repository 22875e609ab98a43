"""The generic fallback decoder: any architecture, by re-running the Hugging Face language model over each row's
whole sequence every call. Quadratic and slower than the lean decoder, but it is the model's own forward.

Its "cache" is a HiddenStore: each row's input embeddings and rotary positions (the model's own: 3-axis under
M-RoPE), kept so the next call can re-run them. What it cannot give the model is a prefill's bidirectional spans
or DeepStack features: it refuses those (and the parity check at load refuses the model).
"""
from __future__ import annotations

import torch


class HiddenStore:
    """The fallback's per-group state: input embeddings [slots, max_len, hidden], with KVCache's interface."""

    def __init__(self, hidden_size: int, device: str, dtype: torch.dtype):
        self.hidden_size, self.device, self.dtype = hidden_size, device, dtype
        self.slots = self.max_len = 0
        self.store = torch.zeros(0, 0, hidden_size, device=device, dtype=dtype)
        self.pos = torch.zeros(0, 0, 3, dtype=torch.long, device=device)
        self.rope_offset = torch.zeros(0, dtype=torch.long, device=device)

    @property
    def bytes_per_token(self) -> int:
        return self.hidden_size * torch.empty(0, dtype=self.dtype).element_size() + 3 * 8

    def allocate(self, slots: int, max_len: int) -> None:
        if slots <= self.slots and max_len <= self.max_len:
            return
        self.slots, self.max_len = max(slots, self.slots), max(max_len, self.max_len)
        self.store = self.pos = None  # released before the new ones are made: never both at once
        self.store = torch.zeros(self.slots, self.max_len, self.hidden_size, device=self.device, dtype=self.dtype)
        self.pos = torch.zeros(self.slots, self.max_len, 3, dtype=torch.long, device=self.device)
        self.rope_offset = torch.zeros(self.slots, dtype=torch.long, device=self.device)

    def move(self, src: list[int], dst: list[int]) -> None:
        if src:
            s, d = torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device)
            for t in (self.store, self.pos, self.rope_offset):
                t[d] = t[s]

    def set_offsets(self, first: int, offsets: list[int]) -> None:
        self.rope_offset[first:first + len(offsets)] = torch.tensor(offsets, device=self.device)


class HFDecoder:
    def __init__(self, language_model: torch.nn.Module, lm_head: torch.nn.Module, config, device: str,
                 dtype: torch.dtype):
        self.lm, self.head = language_model, lm_head
        self.device, self.dtype = device, dtype
        self.hidden_size = config.hidden_size
        self.final_softcap = getattr(config, "final_logit_softcapping", None)
        self.mrope = hasattr(getattr(language_model, "rotary_emb", None), "recomposition_frequencies")
        self.quantized = None

    def new_cache(self) -> HiddenStore:
        return HiddenStore(self.hidden_size, self.device, self.dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.embed_tokens(ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out, cap = self.head(hidden), self.final_softcap
        return (out if cap is None else torch.tanh(out / cap) * cap).float()

    def forward(self, cache: HiddenStore, x: torch.Tensor, starts: torch.Tensor, first: int = 0,
                last: torch.Tensor | None = None, kv_only: bool = False,
                positions: torch.Tensor | None = None, blocks: torch.Tensor | None = None,
                deepstack: list[torch.Tensor] | None = None, length: int | None = None) -> torch.Tensor | None:
        if blocks is not None and bool((blocks >= 0).any()):
            raise ValueError("the generic decoder cannot apply the model's bidirectional attention over its prompt")
        if deepstack is not None:
            raise ValueError("the generic decoder cannot add DeepStack visual features to the language model")
        n, t, _ = x.shape
        pos = starts[:, None] + torch.arange(t, device=self.device)[None, :]
        rows = torch.arange(first, first + n, device=self.device)[:, None].expand(n, t)
        cache.store[rows, pos] = x
        rpos = positions if positions is not None else pos + cache.rope_offset[first:first + n, None]
        cache.pos[rows, pos] = rpos if rpos.dim() == 3 else rpos[..., None]
        if kv_only:
            return None
        if length is None:
            length = int(pos.max()) + 1
        # right padding: every row's own positions are 0..len-1, so plain causal attention is exact for them
        mask = (torch.arange(length, device=self.device)[None, :] < (starts + t)[:, None]).long()
        stored = cache.pos[first:first + n, :length]
        position_ids = stored.permute(2, 0, 1) if self.mrope else stored[..., 0]
        out = self.lm(inputs_embeds=cache.store[first:first + n, :length], attention_mask=mask,
                      position_ids=position_ids, use_cache=False).last_hidden_state
        out = out[rows - first, pos]
        return out if last is None else out[torch.arange(n, device=self.device), last][:, None]
