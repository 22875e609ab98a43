"""Turning logits into the distribution a row samples from: temperature, then top-k, then top-p (the order and
tie rules of transformers' warpers, so `temperature/top_k/top_p` mean what they mean in `model.generate`).

Neither filter sorts the vocabulary. Top-k is a `topk` and a threshold. Top-p (transformers: sort ascending, drop
the tokens whose cumulative probability is at most 1 - top_p, never the likeliest) is the same rule read from the
top: a token is dropped when the tokens likelier than it already hold top_p. So only the likeliest tokens need an
order: top_k's (the rest are already dropped), or else the TOP_P_CANDIDATES likeliest, which settle every row
whose candidates hold top_p; a row whose candidates hold less (a nearly flat distribution) takes the full sort,
and finding out whether one does is the only read of the device this adds (none with top_k set). On a GPU a full
sort of [rows x (k+1), 152k] costs a few ms a round; the candidates' `topk` a fraction of that.
"""
from __future__ import annotations

import torch

from engine.request import SamplingParams

TOP_P_CANDIDATES = 1024


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [..., V] (float32) -> probabilities [..., V]."""
    scores = logits / params.temperature
    width = scores.shape[-1]
    if params.top_k > 0:
        kth = torch.topk(scores, min(params.top_k, width), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        scores = _top_p(scores, params.top_p, min(width, params.top_k if params.top_k > 0 else TOP_P_CANDIDATES))
    return scores.softmax(-1)


def _top_p(scores: torch.Tensor, top_p: float, candidates: int) -> torch.Tensor:
    probs = scores.softmax(-1)
    values, order = torch.topk(probs, candidates, dim=-1)  # likeliest first
    held = values.cumsum(-1)
    drop = held - values >= top_p  # what is likelier than the token already holds top_p
    drop[..., 0] = False
    if candidates < scores.shape[-1] and bool((held[..., -1] < top_p).any()):
        return _top_p_sorted(scores, top_p)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, ~drop)
    return scores.masked_fill(~keep, float("-inf"))


def _top_p_sorted(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """transformers' TopPLogitsWarper: the whole vocabulary sorted."""
    sorted_scores, order = torch.sort(scores, dim=-1)
    remove = sorted_scores.softmax(-1).cumsum(-1) <= 1 - top_p
    remove[..., -1] = False
    return scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
