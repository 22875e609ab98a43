"""What the lean decoder must know about a text backbone to run it exactly, read from its Hugging Face config and
modules: one `Backbone` per model. Everything here is a fact about the family's forward in transformers (the
installed source is the reference); engine/decoder.py only follows it.

    norm          "llama": weight * x_normed.to(dtype);  "gemma": (x_normed * (1 + weight)).to(dtype), in float32
    sandwich      Gemma 2/3: the attention and the MLP outputs are normed too (post-attention, pre/post-feedforward)
    qk_norm       Qwen3, Gemma 3: an RMSNorm over each head's queries and keys, before RoPE
    scale         the attention score scale (Gemma 2/3: query_pre_attn_scalar ** -0.5)
    attn_softcap  Gemma 2: scores -> cap * tanh(scores / cap);  final_softcap: the same on the logits
    embed_scale   Gemma: token embeddings times sqrt(hidden) (the embedding module's own scale)
    windows       per layer: the sliding window, or None for global attention
    ropes         per layer: the index of its RoPE table (Gemma 3: sliding layers have their own base)
    mrope_axis    M-RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): for each rotary frequency, which position axis
                  (temporal, height, width) drives it; None for 1-D RoPE

`unsupported(text_config)` says why a backbone cannot run on the lean decoder (None when it can).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen2_vl_text", "qwen2_5_vl_text"}
QWEN3_LIKE = {"qwen3", "qwen3_vl_text"}
GEMMA_LIKE = {"gemma", "gemma2", "gemma3_text"}
LEAN_ARCHITECTURES = LLAMA_LIKE | QWEN3_LIKE | GEMMA_LIKE
# rotary tables fixed at load (dynamic NTK and longrope change with the length: refused)
SUPPORTED_ROPE = {"default", "linear", "llama3"}


@dataclass(frozen=True)
class Backbone:
    family: str
    norm: str
    sandwich: bool
    qk_norm: bool
    scale: float
    attn_softcap: float | None
    final_softcap: float | None
    embed_scale: float | None
    windows: tuple
    ropes: tuple
    inv_freqs: tuple  # one float32 tensor per RoPE table
    rope_scales: tuple
    mrope_axis: torch.Tensor | None


def _rope_types(config) -> set[str]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    nested = [p for p in params.values() if isinstance(p, dict)]
    return {p.get("rope_type", "default") for p in (nested or [params])}


def unsupported(config, standalone: bool = True) -> str | None:
    """Why the lean decoder cannot run this text config exactly, or None. `standalone`: a text model, which builds
    its own attention mask (a VLM's language model is handed the mask its VLM builds: engine/support.py)."""
    if config.model_type not in LEAN_ARCHITECTURES:
        return f"text backbone {config.model_type!r} is not one the lean decoder implements"
    if standalone and getattr(config, "use_bidirectional_attention", False):
        return "bidirectional attention over the whole sequence (an encoder, not a generator)"
    other = _rope_types(config) - SUPPORTED_ROPE
    if other:
        return f"rope type {sorted(other)[0]!r} (its rotary table changes with the sequence length)"
    return None


def _windows(config) -> tuple:
    window = getattr(config, "sliding_window", None)
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return (None,) * n
    if types:
        return tuple(window if t == "sliding_attention" else None for t in types)
    return (window,) * n


def _mrope_axis(rotary, half: int) -> torch.Tensor | None:
    """Per rotary frequency (head_dim / 2 of them), the position axis (0 t, 1 h, 2 w) that drives it, read off the
    model's own rotary module: its recomposition of per-axis frequencies (consecutive sections in Qwen2-VL and
    Qwen2.5-VL, interleaved in Qwen3-VL) is applied to frequencies that equal their axis."""
    recompose = getattr(rotary, "recomposition_frequencies", None)
    if recompose is None:
        return None
    probe = torch.arange(3, dtype=torch.float32)[:, None, None, None].expand(3, 1, 1, half).clone()
    axis = recompose(probe)[0, 0, :half].round().long()
    if axis.shape != (half,) or not bool(((axis >= 0) & (axis <= 2)).all()):
        raise ValueError("multimodal RoPE: the rotary module's layout is not one the lean decoder knows")
    return axis


def read_backbone(config, language_model: torch.nn.Module, device: str) -> Backbone:
    """The Backbone of a loaded text model (its config and modules)."""
    family = config.model_type
    gemma = family in GEMMA_LIKE
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rotary = language_model.rotary_emb
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    if hasattr(rotary, "layer_types"):  # Gemma 3: a table per layer type
        names = sorted(set(types))
        tables = [(getattr(rotary, f"{t}_inv_freq"), getattr(rotary, f"{t}_attention_scaling")) for t in names]
        ropes = tuple(names.index(t) for t in types)
    else:
        tables = [(rotary.inv_freq, getattr(rotary, "attention_scaling", 1.0))]
        ropes = (0,) * config.num_hidden_layers
    embed_scale = getattr(language_model.embed_tokens, "scalar_embed_scale", None)
    scalar = getattr(config, "query_pre_attn_scalar", None) if gemma and family != "gemma" else None
    axis = _mrope_axis(rotary, head_dim // 2)
    return Backbone(
        family=family,
        norm="gemma" if gemma else "llama",
        sandwich=family in {"gemma2", "gemma3_text"},
        qk_norm=family in QWEN3_LIKE or family == "gemma3_text",
        scale=(scalar if scalar else head_dim) ** -0.5,
        attn_softcap=getattr(config, "attn_logit_softcapping", None),
        final_softcap=getattr(config, "final_logit_softcapping", None),
        embed_scale=float(embed_scale) if embed_scale not in (None, 1.0) else None,
        windows=_windows(config),
        ropes=ropes,
        inv_freqs=tuple(f.detach().float().to(device) for f, _ in tables),
        rope_scales=tuple(float(s) for _, s in tables),
        mrope_axis=axis.to(device) if axis is not None else None,
    )
