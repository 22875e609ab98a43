"""What a prompt's embedding hands the decoder (engine/model.py's embed_prompts makes it, the decoder's prefill
takes it): the input embeddings and what the model's own forward adds for image tokens."""
from __future__ import annotations

from typing import NamedTuple

import torch


class PromptEmbeds(NamedTuple):
    embeds: torch.Tensor  # [n, width, hidden], right-padded
    lengths: list[int]  # tokens per row the decoder sees
    positions: torch.Tensor | None = None  # [n, width] or [n, width, 3] (M-RoPE): the model's own rotary positions
    offsets: list[int] | None = None  # per row: the next token's rotary position minus its cache index
    blocks: torch.Tensor | None = None  # [n, width]: spans attending bidirectionally (-1: none); see decoder.py
    deepstack: list[torch.Tensor] | None = None  # Qwen3-VL: [n, width, hidden] per early layer, 0 off the image


def prompt_positions(position_ids: torch.Tensor | None, n: int, width: int, device) -> torch.Tensor:
    """The rotary positions a model's forward gave its language model, as [n, width] or [n, width, 3] (M-RoPE);
    none given: 0..width-1, as the language model makes them itself."""
    if position_ids is None:
        return torch.arange(width, device=device)[None].expand(n, width)
    if position_ids.dim() == 3:  # [3, n, width] (or [4, ...]: text positions first, for packed masks)
        return position_ids[-3:].permute(1, 2, 0).expand(n, width, 3)
    return position_ids.expand(n, width)
