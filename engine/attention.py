"""Attention over a group's slot cache, as engine/decoder.py computes it: the masks of a forward (causal per row,
sliding windows, bidirectional blocks) and the attention itself, by SDPA or, on a CPU at short contexts, as
float32 matmuls and a softmax."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Longest context whose attention is computed as float32 matmuls on a CPU (in_float32): for a decode step (one
# query per row), a verify step (at most 16 queries per row), and a prefill
MATH_DECODE_KEYS, MATH_VERIFY_KEYS, MATH_PREFILL_KEYS = 160, 96, 64


def in_float32(device: str, softcap: float | None, t: int, length: int) -> bool:
    """Whether attention over `length` keys for T queries per row is computed as float32 matmuls and a softmax,
    rather than by SDPA. On a CPU SDPA's flash kernel pays a fixed cost per (row, head) that dominates at a short
    context. Measured on a 2-core Zen 4 (benchmarks/attention_paths.py), float32 matmuls over SDPA's time: 128
    rows of 1 query over 40 keys 0.4x (float32) and 0.6x (bf16), over 128 keys 0.55x and 0.8x, over 160 keys 0.64x
    and 0.89x; 5 queries over 100 keys 0.7x and 0.9x, over 128 keys 0.94x and 1.06x; a prefill of 33 tokens
    0.55-0.65x, of 60 tokens 0.66-0.96x, of 80 tokens 0.93-1.09x. Longer contexts go to SDPA. End to end on the
    shipped pair (Qwen's chat template: prompts of about 70 tokens), decode steps up to 160 keys rather than 96
    were 1.008-1.026x faster (bf16, 256 rows, 4 interleaved rounds, the same outputs). Float32 is at least as
    accurate as SDPA's bf16 kernel. CUDA keeps SDPA (flash / efficient kernels), and Gemma 2's soft-capped scores their own eager
    form."""
    if device != "cpu" or softcap is not None:
        return False
    return length <= (MATH_DECODE_KEYS if t == 1 else MATH_VERIFY_KEYS if t <= 16 else MATH_PREFILL_KEYS)


def attention_masks(qpos: torch.Tensor, length: int, windows: list, group: int, additive: bool,
                    qblocks: torch.Tensor | None = None, kblocks: torch.Tensor | None = None) -> dict:
    """Masks for queries at positions qpos [n, T] over keys 0..length-1, one per sliding window (None: none),
    for `group` query heads per kv head stacked along the query axis: [n, 1, group*T, L]. With blocks (a prefill:
    query and key blocks [n, T] and [n, length]), a query also sees every key of its own block, later ones
    included; the sliding window still applies (Gemma 3: AND(window, OR(causal, block))). Boolean (True: attended)
    for SDPA; `additive` (0 or -inf, float32) for the float32 path."""
    n, t = qpos.shape
    keys = torch.arange(length, device=qpos.device)
    allowed = keys[None, None, :] <= qpos[:, :, None]  # [n, T, L]
    if qblocks is not None:
        allowed = allowed | ((qblocks[:, :, None] == kblocks[:, None, :]) & (qblocks[:, :, None] >= 0))
    masks = {}
    for window in set(windows):
        m = allowed if window is None else allowed & (qpos[:, :, None] - keys[None, None, :] < window)
        if additive:
            m = torch.zeros(m.shape, device=qpos.device).masked_fill_(~m, float("-inf"))
        masks[window] = m[:, None, None].expand(n, 1, group, t, length).reshape(n, 1, group * t, length)
    return masks


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
           softcap: float | None) -> torch.Tensor:
    """q [n, kv_heads, group*T, d] over k, v [n, kv_heads, L, d] under `mask` (attention_masks')."""
    if mask.dtype == torch.float32:  # additive: the float32 path
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(scale).add_(mask)
        return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    # Gemma 2: soft-capped scores, which SDPA cannot do (as transformers' eager attention computes them)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
