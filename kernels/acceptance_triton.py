"""The sampling acceptance rule of kernels.acceptance as one Triton kernel (GPU; CPU through TRITON_INTERPRET=1).

One program handles BLOCK_B rows: it walks the K drafts to find each row's accepted prefix, then sweeps the
vocabulary twice in BLOCK_V chunks (the residual's total, then its running CDF) to draw the extra token. No
[B, V] intermediate is written to memory, and the whole verdict is one launch per round.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["K"])  # one compiled kernel for every k the draft-length policy picks
def _rejection_kernel(target_ptr, draft_ptr, ids_ptr, num_ptr, u_ptr, ru_ptr, accepted_ptr, next_ptr, B, V, K,
                      HAS_Q: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    live = rows < B
    num = tl.load(num_ptr + rows, mask=live, other=0)
    accepted = tl.zeros([BLOCK_B], dtype=tl.int32)
    going = live
    for i in range(K):
        d = tl.load(ids_ptr + rows * K + i, mask=live, other=0)
        p = tl.load(target_ptr + (rows * (K + 1) + i) * V + d, mask=live, other=0.0)
        if HAS_Q:
            q = tl.load(draft_ptr + (rows * K + i) * V + d, mask=live, other=1.0)
        else:
            q = 1.0
        u = tl.load(u_ptr + rows * K + i, mask=live, other=1.0)
        going = going & (i < num) & (u * q <= p)
        accepted += going.to(tl.int32)

    rejected = accepted < num
    last = tl.minimum(accepted, K - 1)
    d_last = tl.load(ids_ptr + rows * K + last, mask=live, other=0)
    p_base = (rows * (K + 1) + accepted).to(tl.int64) * V
    q_base = (rows * K + last).to(tl.int64) * V

    total = tl.zeros([BLOCK_B], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        m2 = live[:, None] & (cols < V)[None, :]
        p = tl.load(target_ptr + p_base[:, None] + cols[None, :], mask=m2, other=0.0)
        if HAS_Q:
            q = tl.load(draft_ptr + q_base[:, None] + cols[None, :], mask=m2, other=0.0)
        else:
            q = (cols[None, :] == d_last[:, None]).to(tl.float32)
        r = tl.where(rejected[:, None], tl.maximum(p - q, 0.0), p)
        total += tl.sum(r, axis=1)
    use_p = (~rejected) | (total <= 0.0)

    threshold = tl.load(ru_ptr + rows, mask=live, other=0.0)
    running = tl.zeros([BLOCK_B], dtype=tl.float32)
    count = tl.zeros([BLOCK_B], dtype=tl.int32)
    grand = tl.zeros([BLOCK_B], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):  # the chosen residual's total (p's own where the residual is empty)
        cols = v0 + tl.arange(0, BLOCK_V)
        m2 = live[:, None] & (cols < V)[None, :]
        p = tl.load(target_ptr + p_base[:, None] + cols[None, :], mask=m2, other=0.0)
        grand += tl.sum(p, axis=1)
    grand = tl.where(use_p, grand, total)
    threshold = threshold * grand
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        in_vocab = (cols < V)[None, :]
        m2 = live[:, None] & in_vocab
        p = tl.load(target_ptr + p_base[:, None] + cols[None, :], mask=m2, other=0.0)
        if HAS_Q:
            q = tl.load(draft_ptr + q_base[:, None] + cols[None, :], mask=m2, other=0.0)
        else:
            q = (cols[None, :] == d_last[:, None]).to(tl.float32)
        r = tl.where(use_p[:, None], p, tl.maximum(p - q, 0.0))
        cdf = tl.cumsum(r, axis=1) + running[:, None]
        count += tl.sum(((cdf <= threshold[:, None]) & in_vocab).to(tl.int32), axis=1)
        running += tl.sum(r, axis=1)
    nxt = tl.minimum(count, V - 1)
    tl.store(accepted_ptr + rows, accepted, mask=live)
    tl.store(next_ptr + rows, nxt.to(tl.int64), mask=live)


def rejection_sample(draft_ids: torch.Tensor, draft_probs: torch.Tensor | None, target_probs: torch.Tensor,
                     num_drafts: torch.Tensor, uniforms: torch.Tensor, resample_uniforms: torch.Tensor,
                     block_b: int | None = None, block_v: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as kernels.acceptance.rejection_sample; probabilities in float32."""
    b, k = draft_ids.shape
    v = target_probs.shape[-1]
    has_q = draft_probs is not None
    target_probs = target_probs.float().contiguous()
    draft_probs = draft_probs.float().contiguous() if has_q else target_probs  # an unread placeholder
    accepted = torch.empty(b, dtype=torch.int32, device=draft_ids.device)
    nxt = torch.empty(b, dtype=torch.int64, device=draft_ids.device)
    block_v = block_v or min(1024, triton.next_power_of_2(v))
    block_b = block_b or 1
    grid = (triton.cdiv(b, block_b),)
    _rejection_kernel[grid](target_probs, draft_probs, draft_ids.contiguous(), num_drafts.to(torch.int32).contiguous(),
                            uniforms.float().contiguous(), resample_uniforms.float().contiguous(), accepted, nxt, b, v,
                            k, HAS_Q=has_q, BLOCK_B=block_b, BLOCK_V=block_v)
    return accepted, nxt
