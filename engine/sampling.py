"""Turning logits into the distribution a row samples from: temperature, then top-k, then top-p (the order and
tie rules of transformers' warpers, so `temperature/top_k/top_p` mean what they mean in `model.generate`)."""
from __future__ import annotations

import torch

from engine.request import SamplingParams


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [..., V] (float32) -> probabilities [..., V]."""
    scores = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(scores, min(params.top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1)
        remove = sorted_scores.softmax(-1).cumsum(-1) <= 1 - params.top_p
        remove[..., -1] = False
        scores = scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return scores.softmax(-1)
