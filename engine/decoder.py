"""The decoder forward the engine owns, over a slot-indexed KV cache, for the text backbones of the families people
caption with: Llama / Mistral / Qwen2 (LLaVA-style VLMs), Qwen2-VL / Qwen2.5-VL / Qwen3-VL (multimodal RoPE, q/k
norm, DeepStack) and Gemma / Gemma 2 / Gemma 3 (PaliGemma, Gemma 3: scaled embeddings, (1 + w) norms, GeGLU,
sandwich norms, soft-capping, sliding and global layers with their own RoPE). What differs between them is read
once into a Backbone (engine/backbone.py).

Weights come from the loaded Hugging Face model (q/k/v and gate/up fused into one matmul each). A forward call
takes a KVCache (engine/kv_cache.py), `x` [n, T, hidden] for its slots first..first+n-1 and `starts` [n] (each
row's cached length), writes the new keys and values at starts[b] .. starts[b]+T-1 and attends causally within
each row. Rows may use fewer than T of their positions (ragged drafts, ragged prompts): the padding is written
past the row's length, masked, and later overwritten. The decoder holds weights only; every group of sequences
brings its own cache.

A prefill may bring what the model's own forward adds for image tokens: `positions` (1-D [n, T] or M-RoPE's
3-axis [n, T, 3]), `blocks` [n, T] (token spans that attend bidirectionally: each image's tokens in Gemma 3, the
whole prefix in PaliGemma; -1 elsewhere) and `deepstack` (Qwen3-VL: visual features added to the hidden states
after the first layers).

The generic fallback for other architectures is engine/hf_decoder.py.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from engine.attention import attend, attention_masks, in_float32
from engine.kv_cache import KVCache
from engine.backbone import read_backbone
from kernels.packed import PackedLinear, packs
from kernels.quant import QuantLinear, quantize


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x * rsqrt(mean(x^2) + eps) in float32, cast back, then times the weight: transformers' LlamaRMSNorm. F.rms_norm
    # computes it in float32 whatever x's dtype and rounds once: the same values bit for bit (checked in bf16 on a
    # CPU: tests/engine/test_decoder.py), in one kernel instead of five, and without the two casts around it
    return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)


def _gemma_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight` is 1 + w in float32, as GemmaRMSNorm computes it; the product is cast back at the end."""
    return (F.rms_norm(x.float(), (x.shape[-1],), eps=eps) * weight).to(x.dtype)


def _linear(x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
    """A dense weight (F.linear), a PackedLinear or a QuantLinear."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, b)
    if isinstance(w, PackedLinear):
        return w(x, b)
    return w(x) if b is None else w(x) + b


def _dense(w) -> torch.Tensor:
    return w.dense() if isinstance(w, PackedLinear) else w


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LeanDecoder:
    def __init__(self, language_model: torch.nn.Module, lm_head: torch.nn.Module, config, device: str,
                 dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.hidden_size = config.hidden_size
        self.eps = config.rms_norm_eps
        self.group = self.num_heads // self.num_kv_heads
        self.backbone = bb = read_backbone(config, language_model, device)
        self.windows = bb.windows
        self.norm = _gemma_norm if bb.norm == "gemma" else _rms_norm
        self.act = language_model.layers[0].mlp.act_fn  # the model's own activation (SiLU, tanh-GELU)
        self.quantized: dict | None = None
        self.load(language_model, lm_head)

    def load(self, language_model: torch.nn.Module, lm_head: torch.nn.Module) -> None:
        """(Re)read every weight from the Hugging Face modules: at construction, and when a learning drafter's
        weights change (engine/drafter_learning.py). Quantized linears are quantized again."""
        device, dtype, bb = self.device, self.dtype, self.backbone

        def w(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device=device, dtype=dtype).contiguous()

        def nw(module) -> torch.Tensor:  # a norm's weight as this family's norm uses it
            return (1.0 + module.weight.detach().float()).to(device) if bb.norm == "gemma" else w(module.weight)

        self.embed_weight = w(language_model.embed_tokens.weight)
        self.embed_scale = (torch.tensor(bb.embed_scale, dtype=dtype, device=device)
                            if bb.embed_scale is not None else None)
        self.head_weight = w(lm_head.weight)
        self.final_norm = nw(language_model.norm)
        self.layers = []
        for layer in language_model.layers:
            att, mlp = layer.self_attn, layer.mlp
            qkv_bias = None
            if att.q_proj.bias is not None:
                qkv_bias = w(torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]))
            self.layers.append({
                "in_norm": nw(layer.input_layernorm),
                "qkv": w(torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight])),
                "qkv_bias": qkv_bias,
                "q_norm": nw(att.q_norm) if bb.qk_norm else None,
                "k_norm": nw(att.k_norm) if bb.qk_norm else None,
                "o": w(att.o_proj.weight),
                "o_bias": w(att.o_proj.bias) if att.o_proj.bias is not None else None,
                # Llama's post_attention_layernorm is the MLP's input norm; Gemma 2/3 norm the attention output
                # with it and have pre- and post-feedforward norms
                "attn_out_norm": nw(layer.post_attention_layernorm) if bb.sandwich else None,
                "mlp_norm": nw(layer.pre_feedforward_layernorm if bb.sandwich else layer.post_attention_layernorm),
                "mlp_out_norm": nw(layer.post_feedforward_layernorm) if bb.sandwich else None,
                "gate_up": w(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
                "down": w(mlp.down_proj.weight),
            })
        if self.quantized is not None:
            self.quantize(self.quantized["bits"], self.quantized["group_size"])
        self.pack()

    def pack(self) -> None:
        """Hold the dense linear weights (and an untied head) in the CPU's packed bf16 layout (kernels/packed.py),
        where that is faster; elsewhere, and for quantized weights, nothing changes."""
        if not packs(self.device, self.dtype) or getattr(self, "dense_only", False):
            return
        head = self.head_weight
        if isinstance(head, torch.Tensor) and head.data_ptr() != self.embed_weight.data_ptr():  # tied: stays shared
            self.head_weight = PackedLinear(head)
        for p in self.layers:
            for name in self.LINEARS:
                if isinstance(p[name], torch.Tensor):
                    p[name] = PackedLinear(p[name])

    def unpack(self) -> None:
        """Plain weights from here on (compiled steps, engine/captured_step.py: inductor cannot lower the packed
        layout; it lowers F.linear)."""
        self.dense_only = True
        self.head_weight = _dense(self.head_weight)
        for p in self.layers:
            for name in self.LINEARS:
                p[name] = _dense(p[name])

    LINEARS = ("qkv", "o", "gate_up", "down")

    def quantize(self, bits: int, group_size: int = 64) -> dict:
        """Hold every layer's linear weights quantized (weight-only: kernels/quant.py); the embedding, the head and
        the norms stay as they are. int4 groups that do not divide a layer's input channels are halved until they
        do. Returns what was done (bits, group sizes used, bytes before and after)."""
        before, groups = self.linear_bytes(), set()
        for p in self.layers:
            for name in self.LINEARS:
                w = _dense(p[name])
                g = group_size
                while bits == 4 and w.shape[1] % g:
                    g //= 2
                p[name] = QuantLinear(quantize(w, bits, g), self.device)
                groups.add(g if bits == 4 else w.shape[1])
        self.quantized = {"bits": bits, "group_size": group_size, "group_sizes": sorted(groups),
                          "linear_bytes_before": before,
                          "linear_bytes": self.linear_bytes()}
        return self.quantized

    def quantized_copy(self, bits: int, group_size: int = 64) -> "LeanDecoder":
        """Another decoder over the same embedding, head and norms with quantized linears:
        the drafter of self-speculation."""
        other = copy.copy(self)
        other.layers = [dict(p) for p in self.layers]
        other.quantize(bits, group_size)
        return other

    def linear_bytes(self) -> int:
        return sum(w.numel() * w.element_size() if isinstance(w, torch.Tensor) else w.nbytes
                   for p in self.layers for w in (p[n] for n in self.LINEARS))

    def dense_tensors(self) -> list[torch.Tensor]:
        """Every plain weight tensor (some are the HF model's own: the embedding, a tied head, the norm)."""
        out = [self.embed_weight, self.final_norm]
        out += [self.head_weight] if isinstance(self.head_weight, torch.Tensor) else []
        for p in self.layers:
            out += [t for t in p.values() if isinstance(t, torch.Tensor)]
        return out

    def quant_bytes(self) -> int:
        """Bytes of the weights held other than as plain tensors (quantized, or packed)."""
        held = [w for p in self.layers for w in p.values()] + [self.head_weight]
        return sum(w.nbytes for w in held if isinstance(w, (QuantLinear, PackedLinear)))

    def new_cache(self) -> KVCache:
        """An empty cache for a group of sequences (grown by its allocate)."""
        return KVCache(len(self.layers), self.num_kv_heads, self.head_dim, self.device, self.dtype)

    def _rope(self, rpos: torch.Tensor, table: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [n, T, 1, head_dim] of rotary positions rpos: [n, T], or [n, T, 3] (M-RoPE: each frequency
        takes the position of its own axis; a 1-D position is the same on every axis)."""
        inv = self.backbone.inv_freqs[table]
        axis = self.backbone.mrope_axis
        if rpos.dim() == 3 and axis is not None:
            freqs = rpos[..., axis].float() * inv
        else:
            freqs = rpos.float()[..., None] * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = self.backbone.rope_scales[table]
        return (emb.cos() * scale).to(self.dtype)[:, :, None], (emb.sin() * scale).to(self.dtype)[:, :, None]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids, self.embed_weight)
        return x if self.embed_scale is None else x * self.embed_scale

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = _linear(hidden, self.head_weight)
        cap = self.backbone.final_softcap
        return (out if cap is None else torch.tanh(out / cap) * cap).float()

    def _masks(self, qpos: torch.Tensor, length: int, qblocks: torch.Tensor | None = None,
               kblocks: torch.Tensor | None = None) -> dict:
        """engine/attention.py's masks for this decoder's windows and heads, in the form its path takes."""
        additive = in_float32(self.device, self.backbone.attn_softcap, qpos.shape[1], length)
        return attention_masks(qpos, length, self.windows, self.group, additive, qblocks, kblocks)

    def forward(self, cache: KVCache, x: torch.Tensor, starts: torch.Tensor, first: int = 0,
                last: torch.Tensor | None = None, kv_only: bool = False,
                positions: torch.Tensor | None = None, blocks: torch.Tensor | None = None,
                deepstack: list[torch.Tensor] | None = None, length: int | None = None) -> torch.Tensor | None:
        """x [n, T, hidden] (input embeddings, as the model's own embedding makes them) for the cache's slots
        first..first+n-1, starts [n] -> final-normed hidden states [n, T, hidden].

        `last` [n] (an index into T per row): only that position's hidden state is wanted ([n, 1, hidden]), so
        the final layer's attention and MLP run for it alone. `kv_only`: nothing is wanted but the cache (a
        drafter's prefill), so the final layer stops once its keys and values are written. `positions` [n, T]
        or [n, T, 3]: the tokens' rotary positions, when they are not their cache indices plus the slot's
        rope_offset (a prefill: the model's own positions; the caller sets rope_offset for the tokens that
        follow). `blocks` [n, T] and `deepstack` (a list of [n, T, hidden], one per early layer): a prefill's
        bidirectional spans and DeepStack features; both need starts == 0. `length`: max(starts) + T, from the
        caller's own bookkeeping; only when it is not given is it read from `starts` (a wait for the device).
        """
        n, t, _ = x.shape
        pos = starts[:, None] + torch.arange(t, device=self.device)[None, :]  # [n, T]
        if length is None:
            length = int(pos.max()) + 1
        if blocks is not None and length != t:
            raise ValueError("blocks need a prefill (every start 0)")
        masks = self._masks(pos, length, blocks, blocks)
        rpos = positions if positions is not None else pos + cache.rope_offset[first:first + n, None]
        ropes = {r: self._rope(rpos, r) for r in set(self.backbone.ropes)}  # cos, sin [n, T, 1, head_dim]
        rows = torch.arange(first, first + n, device=self.device)[:, None].expand(n, t)
        nq, nkv, hd = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.head_dim
        final = len(self.layers) - 1
        norm, eps = self.norm, self.eps
        h = x
        for i, p in enumerate(self.layers):
            cos, sin = ropes[self.backbone.ropes[i]]
            r = norm(h, p["in_norm"], eps)
            qkv = _linear(r, p["qkv"], p["qkv_bias"])
            joint = p["q_norm"] is None and not (i == final and (last is not None or kv_only))
            if joint:  # no q/k norm between the projection and the rotation: q and k rotated in one pass
                qk = qkv[..., :nq + nkv].view(n, t, self.num_heads + self.num_kv_heads, hd)
                q, k = (qk * cos + _rotate_half(qk) * sin).split([self.num_heads, self.num_kv_heads], dim=2)
            else:
                q, k = qkv[..., :nq].view(n, t, self.num_heads, hd), qkv[..., nq:nq + nkv].view(n, t, -1, hd)
                if p["k_norm"] is not None:
                    k = norm(k, p["k_norm"], eps)
                k = k * cos + _rotate_half(k) * sin
            cache.k[i][rows, :, pos] = k
            cache.v[i][rows, :, pos] = qkv[..., nq + nkv:].view(n, t, self.num_kv_heads, hd)
            if i == final and kv_only:
                return None
            if i == final and last is not None:  # from here on only one position per row is needed
                pick = torch.arange(n, device=self.device)
                q, h = q[pick, last][:, None], h[pick, last][:, None]
                cos, sin = cos[pick, last][:, None], sin[pick, last][:, None]
                qb = blocks[pick, last][:, None] if blocks is not None else None
                masks, t = self._masks(pos[pick, last][:, None], length, qb, blocks), 1
                if deepstack is not None:
                    deepstack = [d[pick, last][:, None] for d in deepstack]
            if not joint:
                if p["q_norm"] is not None:
                    q = norm(q, p["q_norm"], eps)
                q = q * cos + _rotate_half(q) * sin
            q = q.reshape(n, t, self.num_kv_heads, self.group, hd).permute(0, 2, 3, 1, 4)
            q = q.reshape(n, self.num_kv_heads, self.group * t, hd)
            a = attend(q, cache.k[i][first:first + n, :, :length], cache.v[i][first:first + n, :, :length],
                       masks[self.windows[i]], self.backbone.scale, self.backbone.attn_softcap)
            a = a.view(n, self.num_kv_heads, self.group, t, hd).permute(0, 3, 1, 2, 4).reshape(n, t, nq)
            a = _linear(a, p["o"], p["o_bias"])
            h = h + (a if p["attn_out_norm"] is None else norm(a, p["attn_out_norm"], eps))
            gate, up = _linear(norm(h, p["mlp_norm"], eps), p["gate_up"]).chunk(2, dim=-1)
            m = _linear(self.act(gate) * up, p["down"])
            h = h + (m if p["mlp_out_norm"] is None else norm(m, p["mlp_out_norm"], eps))
            if deepstack is not None and i < len(deepstack):
                h = h + deepstack[i]
        return norm(h, self.final_norm, eps)
