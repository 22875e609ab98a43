"""A checkpoint as the engine uses it: tokenizer, prompt embedding (the model's own vision tower and projector for
a VLM), and a decoder (the lean one for Llama-family backbones, the generic HF one otherwise).

Loading is safetensors-only; remote code runs only when the config asks for it.
"""
from __future__ import annotations

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

from actors.decoder import LEAN_ARCHITECTURES, HFDecoder, LeanDecoder
from actors.request import shape_key, stack_arrays


MROPE_MODELS = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v"}


class _Captured(Exception):
    def __init__(self, embeds: torch.Tensor):
        self.embeds = embeds


class Checkpoint:
    def __init__(self, path: str, device: str, dtype: torch.dtype, trust_remote_code: bool = False,
                 lean: bool = True):
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
        self.image_token_id = getattr(config, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = getattr(config, "image_token_index", None)
        self.language_model = self.model.get_decoder()
        head = self.model.get_output_embeddings()
        self.lean = lean and text_config.model_type in LEAN_ARCHITECTURES
        self.decoder = (LeanDecoder if self.lean else HFDecoder)(self.language_model, head, text_config, device, dtype)
        self.max_positions = getattr(text_config, "max_position_embeddings", None)
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @torch.inference_mode()
    def embed_prompts(self, prompts: list[list[int]], arrays: list[dict[str, np.ndarray]]) -> torch.Tensor:
        """Right-padded input embeddings [n, max_len, hidden] of prompts (with their images, for a VLM)."""
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        ids = ids.to(self.device)
        if not self.is_vlm or not arrays or not arrays[0]:
            return self.decoder.embed(ids)
        out = torch.empty(len(prompts), width, self.decoder.hidden_size, device=self.device, dtype=self.dtype)
        groups: dict[tuple, list[int]] = {}
        for i, a in enumerate(arrays):
            groups.setdefault(shape_key(a), []).append(i)
        for idx in groups.values():
            inputs = stack_arrays([arrays[i] for i in idx], self.dtype, self.device)
            out[idx] = self._vlm_embeds(ids[idx], inputs)
        return out

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
