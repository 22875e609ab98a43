"""The engine's own forward of a Qwen2.5-VL vision tower, over the Hugging Face module's weights.

HF's tower packs every image's patches into one sequence and, without flash attention (a CPU), attends segment by
segment: one SDPA call per image (whole-image blocks) or per window (windowed blocks), per block. With 64 small
images that is hundreds of tiny calls a batch, and a third of the matmul peak. This forward computes the same
thing with the segments batched: segments of one length are attended in one SDPA call ([segments, heads, length,
head_dim]; a batch of same-sized images is one call per block). Also: the patch embedding (a Conv3d whose kernel
is its stride) as one matmul, q/k/v rotated in one pass, the gated MLP's gate and up in one matmul, and the
per-grid tables (window order, segments, rotary angles) computed once per image grid and kept.

It is the model's own computation, in the same cast order (norms and rotary in float32, as HF's): the parity check
at load compares the engine (this tower included) against the model's own `generate`. It is used while the engine
embeds prompts (`LoadedModel._language_model_inputs` puts it in the tower's place for that call only), so that
HF's `generate` (the reference) and training keep the module's own forward.

Pruning inside the tower (engine/tower_pruning.py) runs here too: before block `layer` the pruning picks the kept
tokens from the hidden states, and the later blocks run on their patches alone, over the segments it recounts.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def supports(tower) -> bool:
    """Whether this forward reproduces `tower`: Qwen2.5-VL's (RMSNorm, gated SiLU MLP, windowed blocks), from a
    transformers whose helpers it reads the tower's tables with (the window order, the segments, the rotary
    positions: transformers.vision_utils, and a rotary embedding called with positions). Else the tower's own
    forward runs, as on a transformers older than those helpers."""
    import inspect

    try:
        from transformers import vision_utils
    except ImportError:
        return False
    helpers = ("get_vision_attention_seqlens", "get_vision_position_ids", "get_vision_window_index")
    return (type(tower).__name__ == "Qwen2_5_VisionTransformerPretrainedModel"
            and all(hasattr(vision_utils, h) for h in helpers)
            and list(inspect.signature(tower.rotary_pos_emb.forward).parameters) == ["x", "position_ids"])


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2_5_VLRMSNorm: in float32 (F.rms_norm gives its values bit for bit), then weight x the cast back."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Segments:
    """Attention segments (cu_seqlens) as batches: for each length, the segments of that length as [count, length]
    patch indices (or, when every segment has one length and they tile the sequence, a plain reshape)."""

    def __init__(self, cu: torch.Tensor):
        bounds = cu.tolist()
        lengths = [b - a for a, b in zip(bounds, bounds[1:]) if b > a]
        starts = [a for a, b in zip(bounds, bounds[1:]) if b > a]
        self.total = bounds[-1]
        self.uniform = lengths[0] if len(set(lengths)) == 1 else None
        self.groups: list[torch.Tensor] = []
        if self.uniform is None:
            by_length: dict[int, list[int]] = {}
            for s, n in zip(starts, lengths):
                by_length.setdefault(n, []).append(s)
            for n, ss in by_length.items():
                self.groups.append(torch.tensor(ss, device=cu.device)[:, None] + torch.arange(n, device=cu.device))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q, k, v [S, heads, head_dim] -> attention within each segment, [S, heads, head_dim]."""
        s, h, d = q.shape
        if self.uniform is not None:
            shape = (s // self.uniform, self.uniform, h, d)
            out = F.scaled_dot_product_attention(*(t.reshape(shape).transpose(1, 2) for t in (q, k, v)), scale=scale)
            return out.transpose(1, 2).reshape(s, h, d)
        out = torch.empty_like(q)
        for idx in self.groups:  # [count, length]
            part = F.scaled_dot_product_attention(*(t[idx].transpose(1, 2) for t in (q, k, v)), scale=scale)
            out[idx] = part.transpose(1, 2)
        return out


CHUNK_PATCHES = 2048


class LeanTower:
    def __init__(self, tower):
        self.tower = tower
        self.merge = tower.spatial_merge_size
        self.unit = self.merge ** 2
        self.full_blocks = set(tower.fullatt_block_indexes)
        att = tower.blocks[0].attn
        self.heads, self.head_dim, self.scale = att.num_heads, att.head_dim, att.scaling
        self.eps = tower.blocks[0].norm1.variance_epsilon
        self.load()

    def load(self) -> None:
        """(Re)read the weights from the HF modules (they stay the source: training and HF generate use them)."""
        t = self.tower
        w = t.patch_embed.proj.weight
        self.patch_weight = w.detach().reshape(w.shape[0], -1)
        self.blocks = []
        for b in t.blocks:
            mlp = b.mlp
            self.blocks.append({
                "norm1": b.norm1.weight.detach(), "norm2": b.norm2.weight.detach(),
                "qkv": b.attn.qkv.weight.detach(), "qkv_bias": b.attn.qkv.bias.detach(),
                "proj": b.attn.proj.weight.detach(), "proj_bias": b.attn.proj.bias.detach(),
                "gate_up": torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
                "gate_up_bias": torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias]).detach(),
                "down": mlp.down_proj.weight.detach(), "down_bias": mlp.down_proj.bias.detach(),
                "act": mlp.act_fn,
            })
        m = t.merger
        self.merger_norm, self.merger_eps = m.ln_q.weight.detach(), m.ln_q.variance_epsilon
        self.merger_mlp = m.mlp

    @functools.lru_cache(maxsize=16)
    def _tables(self, grid: tuple[tuple[int, int, int], ...], device: str):
        """For an image grid: the window order of the tokens, its inverse, the whole-image and the window
        segments, and the rotary cos/sin [patches, head_dim] (float32) in window order. None of it depends on the
        weights, so new weights (load) keep them."""
        from transformers.vision_utils import (get_vision_attention_seqlens, get_vision_position_ids,
                                               get_vision_window_index)

        t = self.tower
        g = torch.tensor(grid, device=device)
        order, cu_window = get_vision_window_index(g, spatial_merge_size=self.merge, window_size=t.window_size,
                                                   patch_size=t.patch_size)
        cu_full, _ = get_vision_attention_seqlens(g, t.config)
        patches = int(cu_full[-1])
        probe = torch.empty(0, device=device)
        cos, sin = t.rotary_pos_emb(probe, get_vision_position_ids(g, self.merge))
        patch_order = (order[:, None] * self.unit + torch.arange(self.unit, device=device)).flatten()
        cos, sin = cos[patch_order].float(), sin[patch_order].float()
        return (order, torch.argsort(order), _Segments(cu_full), _Segments(cu_window), cos[:, None], sin[:, None],
                patches)

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, pruning=None) -> torch.Tensor:
        """pixel_values [patches, C*T*P*P] (the processor's flattening), grid_thw [images, 3] -> merged features
        [tokens, out_hidden] in row-major order (the tower's own output, pooler_output before the per-image split).
        With `pruning` (a TowerPruning), pruned tokens' rows are zeros, as its hooks make them.

        The images go through in chunks of about CHUNK_PATCHES patches (whole images; each attends over its own
        patches only, so nothing changes): a chunk's activations stay in the CPU's caches, where a batch's whole
        [patches, 4 x hidden] MLP activations would not (measured: 64 images of the shipped pair, 9,216 patches,
        1.3-1.5x faster in chunks of 8-16 images, bf16 and float32)."""
        chunks, size = [[]], 0  # image indices per chunk
        for i, n in enumerate(grid_thw.prod(-1).tolist()):
            if chunks[-1] and size + n > CHUNK_PATCHES:
                chunks.append([])
                size = 0
            chunks[-1].append(i)
            size += n
        outs, kept, start = [], [], 0
        for images in chunks:
            grid = grid_thw[images[0]:images[-1] + 1]
            n = int(grid.prod(-1).sum())
            outs.append(self._forward(pixel_values[start:start + n], grid, pruning))
            kept += pruning.kept if pruning is not None else []
            start += n
        if pruning is not None:
            pruning.kept = kept
        return torch.cat(outs)

    def _forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, pruning) -> torch.Tensor:
        grid = tuple(tuple(int(v) for v in row) for row in grid_thw.tolist())
        order, inverse, full, window, cos, sin, patches = self._tables(grid, str(pixel_values.device))
        x = F.linear(pixel_values.to(self.patch_weight.dtype), self.patch_weight)  # Conv3d, kernel == stride
        x = x.view(-1, self.unit, x.shape[-1])[order].reshape(patches, -1)  # window order
        layer = pruning.layer if pruning is not None else None
        if pruning is not None:
            pruning.start(grid_thw)
        for i, p in enumerate(self.blocks):
            if i == layer:
                kept = pruning.select(x)
                x, cos, sin = x[kept.patches], cos[kept.patches], sin[kept.patches]
                full, window = _Segments(kept.full), _Segments(kept.window)
            x = x + self._attention(x, p, cos, sin, full if i in self.full_blocks else window)
            gate, up = F.linear(_rms(x, p["norm2"], self.eps), p["gate_up"], p["gate_up_bias"]).chunk(2, dim=-1)
            x = x + F.linear(p["act"](gate) * up, p["down"], p["down_bias"])
        merged = self.merger_mlp(_rms(x, self.merger_norm, self.merger_eps).view(-1, self.unit * x.shape[-1]))
        if pruning is not None:
            merged = pruning.scatter(merged)
        return merged[inverse]

    def _attention(self, x: torch.Tensor, p: dict, cos: torch.Tensor, sin: torch.Tensor,
                   segments: _Segments) -> torch.Tensor:
        s = x.shape[0]
        qkv = F.linear(_rms(x, p["norm1"], self.eps), p["qkv"], p["qkv_bias"]).view(s, 3, self.heads, self.head_dim)
        qk = qkv[:, :2].float()  # q and k rotated together, in float32 as HF's apply_rotary_pos_emb_vision
        qk = (qk * cos[:, None] + _rotate_half(qk) * sin[:, None]).to(x.dtype)
        a = segments.attend(qk[:, 0], qk[:, 1], qkv[:, 2], self.scale)
        return F.linear(a.reshape(s, -1), p["proj"], p["proj_bias"])
