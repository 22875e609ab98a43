"""The decoder forward the engine owns: Llama / Qwen2 / Mistral text backbones over a slot-indexed KV cache.

Weights come from the loaded Hugging Face model (q/k/v and gate/up fused into one matmul each). A forward call
takes a KVCache (engine/kv_cache.py), `x` [n, T, hidden] for its slots first..first+n-1 and `starts` [n] (each
row's cached length), writes the new keys and values at starts[b] .. starts[b]+T-1 and attends causally within
each row. Rows may use fewer than T of their positions (ragged drafts, ragged prompts): the padding is written
past the row's length, masked, and later overwritten. The decoder holds weights only; every group of sequences
brings its own cache.

The generic fallback for other architectures is engine/hf_decoder.py.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from engine.kv_cache import KVCache
from kernels.quant import QuantLinear, quantize

LEAN_ARCHITECTURES = {"llama", "mistral", "qwen2"}


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)  # the same cast order as transformers' LlamaRMSNorm


def _linear(x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
    """A dense weight (F.linear) or a QuantLinear."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, b)
    return w(x) if b is None else w(x) + b


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
        self.windows = self._windows(config)

        def w(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device=device, dtype=dtype).contiguous()

        self.embed_weight = w(language_model.embed_tokens.weight)
        self.head_weight = w(lm_head.weight)
        self.final_norm = w(language_model.norm.weight)
        self.layers = []
        for layer in language_model.layers:
            att, mlp = layer.self_attn, layer.mlp
            qkv_bias = None
            if att.q_proj.bias is not None:
                qkv_bias = w(torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]))
            self.layers.append({
                "in_norm": w(layer.input_layernorm.weight),
                "qkv": w(torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight])),
                "qkv_bias": qkv_bias,
                "o": w(att.o_proj.weight),
                "o_bias": w(att.o_proj.bias) if att.o_proj.bias is not None else None,
                "post_norm": w(layer.post_attention_layernorm.weight),
                "gate_up": w(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
                "down": w(mlp.down_proj.weight),
            })
        rotary = language_model.rotary_emb
        self.inv_freq = rotary.inv_freq.detach().float().to(device)
        self.rope_scale = float(getattr(rotary, "attention_scaling", 1.0))
        self.quantized: dict | None = None

    LINEARS = ("qkv", "o", "gate_up", "down")

    def quantize(self, bits: int, group_size: int = 64) -> dict:
        """Hold every layer's linear weights quantized (weight-only: kernels/quant.py); the embedding, the head and
        the norms stay as they are. int4 groups that do not divide a layer's input channels are halved until they
        do. Returns what was done (bits, group sizes used, bytes before and after)."""
        before, groups = self.linear_bytes(), set()
        for p in self.layers:
            for name in self.LINEARS:
                w = p[name]
                g = group_size
                while bits == 4 and w.shape[1] % g:
                    g //= 2
                p[name] = QuantLinear(quantize(w, bits, g), self.device)
                groups.add(g if bits == 4 else w.shape[1])
        self.quantized = {"bits": bits, "group_sizes": sorted(groups), "linear_bytes_before": before,
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
        return sum(w.nbytes if isinstance(w, QuantLinear) else w.numel() * w.element_size()
                   for p in self.layers for w in (p[n] for n in self.LINEARS))

    def dense_tensors(self) -> list[torch.Tensor]:
        """Every unquantized weight tensor (some are the HF model's own: the embedding, a tied head, the norm)."""
        out = [self.embed_weight, self.head_weight, self.final_norm]
        for p in self.layers:
            out += [t for t in p.values() if isinstance(t, torch.Tensor)]
        return out

    def quant_bytes(self) -> int:
        return sum(w.nbytes for p in self.layers for w in p.values() if isinstance(w, QuantLinear))

    @staticmethod
    def _windows(config) -> list[int | None]:
        window = getattr(config, "sliding_window", None)
        n = config.num_hidden_layers
        types = getattr(config, "layer_types", None)
        if window is None or (config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False)):
            return [None] * n
        if types:
            return [window if t == "sliding_attention" else None for t in types]
        return [window] * n

    def new_cache(self) -> KVCache:
        """An empty cache for a group of sequences (grown by its allocate)."""
        return KVCache(len(self.layers), self.num_kv_heads, self.head_dim, self.device, self.dtype)

    def _rope(self, rpos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [n, T, 1, head_dim] of rotary positions rpos [n, T]."""
        freqs = rpos.float()[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scale).to(self.dtype)
        sin = (emb.sin() * self.rope_scale).to(self.dtype)
        return cos[:, :, None], sin[:, :, None]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed_weight)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.head_weight).float()

    def _masks(self, qpos: torch.Tensor, length: int) -> dict:
        """Attention masks for queries at positions qpos [n, T] over keys 0..length-1, per sliding window."""
        n, t = qpos.shape
        keys = torch.arange(length, device=self.device)
        causal = keys[None, None, :] <= qpos[:, :, None]  # [n, T, L]
        masks = {}
        for window in set(self.windows):
            m = causal if window is None else causal & (qpos[:, :, None] - keys[None, None, :] < window)
            # query heads sharing a kv head are stacked along the query axis: [n, 1, group*T, L]
            masks[window] = m[:, None, None].expand(n, 1, self.group, t, length).reshape(n, 1, self.group * t, length)
        return masks

    def forward(self, cache: KVCache, x: torch.Tensor, starts: torch.Tensor, first: int = 0,
                last: torch.Tensor | None = None, kv_only: bool = False,
                positions: torch.Tensor | None = None) -> torch.Tensor | None:
        """x [n, T, hidden] for the cache's slots first..first+n-1, starts [n] -> final-normed hidden states
        [n, T, hidden].

        `last` [n] (an index into T per row): only that position's hidden state is wanted ([n, 1, hidden]), so
        the final layer's attention and MLP run for it alone. `kv_only`: nothing is wanted but the cache (a
        drafter's prefill), so the final layer stops once its keys and values are written. `positions` [n, T]:
        the tokens' rotary positions, when they are not their cache indices (a prefill of a pruned prompt; the
        caller then sets the cache's rope_offset for the tokens that follow).
        """
        n, t, _ = x.shape
        pos = starts[:, None] + torch.arange(t, device=self.device)[None, :]  # [n, T]
        length = int(pos.max()) + 1
        masks = self._masks(pos, length)
        rpos = positions if positions is not None else pos + cache.rope_offset[first:first + n, None]
        cos, sin = self._rope(rpos)  # [n, T, 1, head_dim]
        rows = torch.arange(first, first + n, device=self.device)[:, None].expand(n, t)
        nq, nkv, hd = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.head_dim
        final = len(self.layers) - 1
        h = x
        for i, p in enumerate(self.layers):
            r = _rms_norm(h, p["in_norm"], self.eps)
            q, k, v = _linear(r, p["qkv"], p["qkv_bias"]).split([nq, nkv, nkv], dim=-1)
            k = k.view(n, t, self.num_kv_heads, hd)
            cache.k[i][rows, :, pos] = k * cos + _rotate_half(k) * sin
            cache.v[i][rows, :, pos] = v.view(n, t, self.num_kv_heads, hd)
            if i == final and kv_only:
                return None
            q = q.view(n, t, self.num_heads, hd)
            if i == final and last is not None:  # from here on only one position per row is needed
                pick = torch.arange(n, device=self.device)
                q, h = q[pick, last][:, None], h[pick, last][:, None]
                c, s = cos[pick, last][:, None], sin[pick, last][:, None]
                masks, t = self._masks(pos[pick, last][:, None], length), 1
            else:
                c, s = cos, sin
            q = q * c + _rotate_half(q) * s
            q = q.view(n, t, self.num_kv_heads, self.group, hd).permute(0, 2, 3, 1, 4)
            q = q.reshape(n, self.num_kv_heads, self.group * t, hd)
            a = F.scaled_dot_product_attention(q, cache.k[i][first:first + n, :, :length],
                                               cache.v[i][first:first + n, :, :length],
                                               attn_mask=masks[self.windows[i]])
            a = a.view(n, self.num_kv_heads, self.group, t, hd).permute(0, 3, 1, 2, 4).reshape(n, t, nq)
            h = h + _linear(a, p["o"], p["o_bias"])
            r = _rms_norm(h, p["post_norm"], self.eps)
            gate, up = _linear(r, p["gate_up"]).chunk(2, dim=-1)
            h = h + _linear(F.silu(gate) * up, p["down"])
        return _rms_norm(h, self.final_norm, self.eps)
