"""A loaded model as the engine uses it: tokenizer, prompt embedding (the model's own vision tower and projector for
a VLM), a decoder (the lean one for Llama-family backbones, the generic HF one otherwise), and the ids that
matter (EOS, the image token, padding), resolved here once. So are the device and dtype a config asks for
(`resolve_device`, `resolve_dtype`).

Compression is applied here: weight-only quantization of the lean decoder's linears (kernels/quant.py) and
visual-token pruning of the prompt embeddings (engine/visual_tokens.py). Once the lean decoder holds its own
copy of the weights, the Hugging Face decoder layers are dropped (only the vision tower, the projector and
the embedding are still run through the HF model), so a loaded model holds its decoder weights once.

Loading is safetensors-only; remote code runs only when the config asks for it.
"""
from __future__ import annotations

import copy
from typing import NamedTuple

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

from engine.config import Compression
from engine.decoder import LEAN_ARCHITECTURES, LeanDecoder
from engine.hf_decoder import HFDecoder
from engine.request import shape_key, stack_arrays
from engine.visual_tokens import VisualTokenPruner

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(gpus: float) -> str:
    """cuda when the host was given a GPU and torch sees one, else cpu."""
    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str, backend: str, device: str) -> torch.dtype:
    """`auto`: bf16 for the specray engine; for the hf reference bf16 on CUDA and float32 on CPU."""
    if name != "auto":
        return DTYPES[name]
    return torch.bfloat16 if backend == "specray" or device == "cuda" else torch.float32


def image_token_id(config) -> int | None:
    """The image placeholder token a VLM's config names (None for a text model)."""
    token = getattr(config, "image_token_id", None)
    return getattr(config, "image_token_index", None) if token is None else token


def eos_ids(generation_config, tokenizer) -> set[int]:
    """Every id that ends a row: the generation config's EOS ids and the tokenizer's."""
    eos = generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class PromptEmbeds(NamedTuple):
    embeds: torch.Tensor  # [n, width, hidden], right-padded
    lengths: list[int]  # tokens per row the decoder sees
    positions: torch.Tensor | None = None  # [n, width] rotary positions (pruned prompts only)
    offsets: list[int] | None = None  # per row: the prompt's length minus `lengths` (pruned image tokens)


MROPE_MODELS = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v"}


class _Captured(Exception):
    def __init__(self, embeds: torch.Tensor):
        self.embeds = embeds


class LoadedModel:
    def __init__(self, path: str, device: str, dtype: torch.dtype, trust_remote_code: bool = False,
                 lean: bool = True, compression: Compression | None = None, self_draft_bits: int | None = None):
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        text_config = config.get_text_config()
        rope = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
        if "mrope_section" in rope or config.model_type in MROPE_MODELS:
            # positions are not 0..n-1 (multimodal RoPE, e.g. Qwen2-VL): neither decoder knows them
            raise ValueError(f"{path}: multimodal RoPE models are not supported by the specray backend; "
                             "use decoding.backend: hf")
        self.is_vlm = hasattr(config, "vision_config")
        auto = AutoModelForImageTextToText if self.is_vlm else AutoModelForCausalLM
        self.model = auto.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                          use_safetensors=True).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.device, self.dtype = device, dtype
        self.image_token_id = image_token_id(config)
        self.language_model = self.model.get_decoder()
        head = self.model.get_output_embeddings()
        self.lean = lean and text_config.model_type in LEAN_ARCHITECTURES
        self.decoder = (LeanDecoder if self.lean else HFDecoder)(self.language_model, head, text_config, device, dtype)
        self.compression = compression = compression or Compression()
        if (compression.bits or self_draft_bits) and not self.lean:
            raise ValueError(f"compression.weights: quantization needs the lean decoder (decoding.decoder: lean and a "
                             f"Llama-family model); {path} has {text_config.model_type}")
        # self-speculation: a quantized copy of the dense decoder, made before the target's own is quantized
        self.self_decoder = self.decoder.quantized_copy(self_draft_bits, compression.group_size) if self_draft_bits else None
        if compression.bits:
            self.decoder.quantize(compression.bits, compression.group_size)
        if self.lean:  # the lean decoder has its own copy of every decoder weight
            self.language_model.layers = torch.nn.ModuleList()
        self.pruner = None
        if compression.visual_keep < 1:
            if not self.is_vlm:
                raise ValueError(f"compression.visual_tokens: {path} is not a vision-language model")
            self.pruner = VisualTokenPruner(self.model, config, compression.visual_keep, compression.visual_method,
                                            compression.visual_merge)
        self.max_positions = getattr(text_config, "max_position_embeddings", None)
        self.eos_ids = eos_ids(self.model.generation_config, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def with_decoder(self, decoder) -> "LoadedModel":
        """The same model (tokenizer, tower, prompt embedding) over another decoder: self-speculation's drafter."""
        other = copy.copy(self)
        other.decoder = decoder
        return other

    def weight_bytes(self) -> int:
        """Bytes of the weights this model holds (the decoder's, the tower's, the projector's; shared tensors
        counted once)."""
        dense = [*self.model.parameters(), *getattr(self.decoder, "dense_tensors", list)()]
        seen = {(t.data_ptr(), t.numel()): t.numel() * t.element_size() for t in dense}
        return sum(seen.values()) + getattr(self.decoder, "quant_bytes", int)()

    @torch.inference_mode()
    def embed_prompts(self, prompts: list[list[int]], arrays: list[dict[str, np.ndarray]]) -> PromptEmbeds:
        """Right-padded input embeddings [n, max_len, hidden] of prompts (with their images, for a VLM); with
        visual-token pruning, only the kept tokens, at their original rotary positions."""
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        ids = ids.to(self.device)
        lengths = [len(p) for p in prompts]
        if not self.is_vlm or not arrays or not arrays[0]:
            return PromptEmbeds(self.decoder.embed(ids), lengths)
        out = torch.empty(len(prompts), width, self.decoder.hidden_size, device=self.device, dtype=self.dtype)
        positions, pruned = torch.zeros_like(ids), list(lengths)
        groups: dict[tuple, list[int]] = {}
        for i, a in enumerate(arrays):
            groups.setdefault(shape_key(a), []).append(i)
        for idx in groups.values():
            inputs = stack_arrays([arrays[i] for i in idx], self.dtype, self.device)
            handle = self.pruner.hook() if self.pruner is not None else None
            try:
                out[idx] = self._vlm_embeds(ids[idx], inputs)
            finally:
                if handle is not None:
                    handle.remove()
            if self.pruner is not None:  # the encoder's attention just captured belongs to this group
                self._prune(out, ids, idx, pruned, positions)
        if self.pruner is None:
            return PromptEmbeds(out, lengths)
        width = max(pruned)
        return PromptEmbeds(out[:, :width], pruned, positions[:, :width], [a - b for a, b in zip(lengths, pruned)])

    def _prune(self, out: torch.Tensor, ids: torch.Tensor, idx: list[int], lengths: list[int],
               positions: torch.Tensor) -> None:
        """Drop the pruned image tokens of rows idx in place: kept tokens move left (their original positions go in
        `positions`), lengths shrink."""
        is_image = ids[idx] == self.image_token_id  # [g, width]
        counts = is_image.sum(1)
        if not bool((counts == counts[0]).all()) or int(counts[0]) == 0:
            raise ValueError("compression.visual_tokens: every prompt needs one image's tokens to prune")
        m = int(counts[0])
        image_at = is_image.nonzero()[:, 1].view(len(idx), m)  # [g, m]
        rows = torch.tensor(idx, device=self.device)
        kept = self.pruner.select(out[rows[:, None], image_at])  # [g, n]
        if self.pruner.merge_pruned:
            merged = self.pruner.merge(out[rows[:, None], image_at], kept)
            out[rows[:, None], image_at.gather(1, kept)] = merged
        keep = ~is_image  # text tokens stay...
        keep.scatter_(1, image_at.gather(1, kept), True)  # ...and so do the kept image tokens
        for j, i in enumerate(idx):
            keep_pos = keep[j][:lengths[i]].nonzero().squeeze(1)
            n = len(keep_pos)
            out[i, :n] = out[i, keep_pos]
            positions[i, :n] = keep_pos
            lengths[i] = n

    def _vlm_embeds(self, ids: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's own multimodal merge (vision tower, projector, placeholder scatter), stopped at the decoder's
        door: the embeddings the HF model would feed its language model, whatever the architecture."""
        def stop(_module, args, kwargs):
            raise _Captured(kwargs.get("inputs_embeds", args[0] if args else None))

        handle = self.language_model.register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.model.model(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs)
        except _Captured as c:
            return c.embeds
        finally:
            handle.remove()
        raise RuntimeError("the model never called its language model")
