"""Top-k and top-p without sorting the vocabulary (engine/sampling.py) keep the tokens transformers' warpers keep,
on peaked and flat distributions, with and without top-k, and on rows whose likeliest candidates hold less than
top_p (the full-sort fallback). The one difference allowed is float rounding at the boundary: the cumulative sums
are taken in opposite orders, so a token whose sum lands within rounding of 1 - top_p can fall on either side (one
token of one row in about 600 here); the engine's own rounds all use the one rule, so speculation stays lossless."""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from engine.request import SamplingParams
from engine.sampling import TOP_P_CANDIDATES, warp


def hf_warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    scores = TemperatureLogitsWarper(params.temperature)(None, logits)
    if params.top_k > 0:
        scores = TopKLogitsWarper(params.top_k)(None, scores)
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p)(None, scores)
    return scores.softmax(-1)


@pytest.mark.parametrize("spread", [0.5, 3.0, 8.0])  # nearly flat, typical, peaked
@pytest.mark.parametrize("top_k", [0, 20])
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_the_same_tokens_as_transformers(spread, top_k, top_p):
    g = torch.Generator().manual_seed(int(spread * 10) + top_k)
    logits = torch.randn(64, 3, 3000, generator=g) * spread
    params = SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p)
    ours, theirs = warp(logits, params) > 0, hf_warp(logits.view(-1, 3000), params).view_as(logits) > 0
    differ = (ours != theirs).any(-1)
    assert differ.sum() <= 2, differ.sum()
    assert ((ours.sum(-1) - theirs.sum(-1)).abs()[differ] == 1).all()  # one token, at the boundary
    assert (ours != theirs).sum() == differ.sum()


def test_flat_rows_take_the_full_sort():
    """Rows whose TOP_P_CANDIDATES likeliest tokens hold less than top_p keep more than that many tokens."""
    logits = torch.zeros(4, 3 * TOP_P_CANDIDATES)
    logits[0, 0] = 20.0  # one peaked row beside flat ones
    params = SamplingParams(temperature=1.0, top_p=0.9)
    kept = (warp(logits, params) > 0).sum(-1)
    assert kept[0] == 1 and (kept[1:] > TOP_P_CANDIDATES).all()
    assert torch.equal(warp(logits, params) > 0, hf_warp(logits, params) > 0)
