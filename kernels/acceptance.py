"""Batched verification of drafted tokens: the torch reference, used on CPU and as the oracle for the Triton kernel.

Every row of a batch carries up to K drafted tokens (`num_drafts[b]` of them; rows differ) and the target's
K+1 next-token distributions (after the last accepted token and after each draft). Each row keeps the
longest accepted prefix of its drafts plus one more token, so a round always yields 1..K+1 tokens.

- greedy: a draft is accepted while it equals the target's argmax; the extra token is the target's argmax
  after the accepted prefix (a correction, or the bonus when every draft was accepted).
- sampling (Leviathan et al. 2023; Chen et al. 2023): draft x ~ q is accepted with probability
  min(1, p(x) / q(x)); at the first rejection the extra token is drawn from norm(max(0, p - q)); after a
  full acceptance it is drawn from p. The emitted tokens are then distributed exactly as the target's own
  samples. A deterministic drafter (n-gram lookup, or greedy drafting) is the case q = one-hot(x).

Randomness comes in as tensors (`uniforms`, `resample_uniforms`), so the reference and the kernel can be
compared draw for draw.
"""
from __future__ import annotations

import torch


def greedy_accept(draft_ids: torch.Tensor, num_drafts: torch.Tensor,
                  target_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """draft_ids [B, K], num_drafts [B], target_ids [B, K+1] (the target's argmax) -> (accepted [B], next [B])."""
    k = draft_ids.shape[1]
    valid = torch.arange(k, device=draft_ids.device)[None, :] < num_drafts[:, None]
    match = (draft_ids == target_ids[:, :k]) & valid
    accepted = match.to(torch.int32).cumprod(1).sum(1)
    return accepted, target_ids.gather(1, accepted[:, None].long()).squeeze(1)


def rejection_sample(draft_ids: torch.Tensor, draft_probs: torch.Tensor | None, target_probs: torch.Tensor,
                     num_drafts: torch.Tensor, uniforms: torch.Tensor,
                     resample_uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling rule for a batch.

    draft_ids [B, K]; draft_probs [B, K, V] (q; None for a deterministic drafter); target_probs [B, K+1, V] (p);
    num_drafts [B]; uniforms [B, K] and resample_uniforms [B] in [0, 1). Returns (accepted [B], next [B]).
    """
    b, k = draft_ids.shape
    rows = torch.arange(b, device=draft_ids.device)
    p_draft = target_probs[:, :k].gather(2, draft_ids[..., None]).squeeze(2)
    q_draft = draft_probs.gather(2, draft_ids[..., None]).squeeze(2) if draft_probs is not None else 1.0
    valid = torch.arange(k, device=draft_ids.device)[None, :] < num_drafts[:, None]
    accept = (uniforms * q_draft <= p_draft) & valid
    accepted = accept.to(torch.int32).cumprod(1).sum(1)

    p = target_probs[rows, accepted]
    last = accepted.clamp(max=k - 1)
    if draft_probs is not None:
        q = draft_probs[rows, last]
    else:
        q = torch.nn.functional.one_hot(draft_ids[rows, last], p.shape[1]).to(p.dtype)
    rejected = accepted < num_drafts
    residual = torch.where(rejected[:, None], (p - q).clamp(min=0), p)
    residual = torch.where(residual.sum(1, keepdim=True) > 0, residual, p)  # p == q there: rejection impossible
    cdf = residual.cumsum(1)
    threshold = resample_uniforms * cdf[:, -1]
    nxt = (cdf <= threshold[:, None]).sum(1).clamp(max=p.shape[1] - 1)
    return accepted, nxt
