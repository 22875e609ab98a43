"""A loaded model as the engine uses it: tokenizer, prompt embedding (the model's own vision tower and projector for
a VLM), a decoder (the lean one for Llama-family backbones, the generic HF one otherwise), and the ids that
matter (EOS, the image token, padding), resolved here once (the device and dtype a config asks for:
engine/device.py).

Compression is applied here: weight-only quantization of the lean decoder's linears (kernels/quant.py) and
visual-token pruning of the prompt embeddings (engine/visual_tokens.py). Once the lean decoder holds its own
copy of the weights, the Hugging Face decoder layers are dropped (only the vision tower, the projector and
the embedding are still run through the HF model), so a loaded model holds its decoder weights once.

Loading is safetensors-only; remote code runs only when the config asks for it.
"""
from __future__ import annotations

import contextlib
import copy

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer
from transformers.modeling_outputs import BaseModelOutputWithPooling

from engine.config import Compression
from engine.decoder import LeanDecoder
from engine.hf_decoder import HFDecoder
from engine.parity import check
from engine.prompt_embeds import PromptEmbeds, prompt_positions
from engine.request import shape_key, stack_arrays
from engine.support import BLOCK_MASKS, HF_BACKEND, plan, refusal
from engine.vision_tower import LeanTower, supports as lean_tower_supports
from engine.visual_tokens import VisualTokenPruner

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


class _Captured(Exception):
    def __init__(self, kwargs: dict):
        self.kwargs = kwargs


class LoadedModel:
    def __init__(self, path: str, device: str, dtype: torch.dtype, trust_remote_code: bool = False,
                 lean: bool = True, compression: Compression | None = None, self_draft_bits: int | None = None,
                 check_parity: bool = False, learning: bool = False):
        """`learning`: the model's weights may be replaced while it serves (a drafter that learns during the job:
        load_weights), so the Hugging Face decoder layers are kept for the decoder to re-read."""
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        why = refusal(config)
        if why:  # before any weights are read
            raise ValueError(f"{path}: {why}; {HF_BACKEND}")
        text_config = config.get_text_config()
        self.plan = plan(config, lean)
        self.family = config.model_type
        self.is_vlm = hasattr(config, "vision_config")
        auto = AutoModelForImageTextToText if self.is_vlm else AutoModelForCausalLM
        self.model = auto.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                          use_safetensors=True).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.path, self.device, self.dtype = path, device, dtype
        self.image_token_id = image_token_id(config)
        self.language_model = self.model.get_decoder()
        head = self.model.get_output_embeddings()
        self.lean = self.plan.kind == "lean"
        self.decoder = (LeanDecoder if self.lean else HFDecoder)(self.language_model, head, text_config, device, dtype)
        self.compression = compression = compression or Compression()
        if (compression.bits or self_draft_bits) and not self.lean:
            raise ValueError(f"compression.weights: quantization needs the lean decoder (decoding.decoder: lean and a "
                             f"backbone it runs); {path} has {text_config.model_type}")
        self.pruner = None
        tower = getattr(self.model.model, "visual", None) if self.is_vlm else None
        # the engine's own tower forward (engine/vision_tower.py) where it reproduces the model's
        self.lean_tower = LeanTower(tower) if self.lean and tower is not None and lean_tower_supports(tower) else None
        self.max_positions = getattr(text_config, "max_position_embeddings", None)
        self.eos_ids = eos_ids(self.model.generation_config, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.parity = check(self) if check_parity else None  # the dense decoder against the model's own generate
        # self-speculation: a quantized copy of the dense decoder, made before the target's own is quantized
        self.self_decoder = self.decoder.quantized_copy(self_draft_bits, compression.group_size) if self_draft_bits else None
        if compression.bits:
            self.decoder.quantize(compression.bits, compression.group_size)
        self.learning = learning
        if self.lean and not learning:  # the lean decoder has its own copy of every decoder weight
            self.language_model.layers = torch.nn.ModuleList()
        if compression.visual_keep < 1:
            if not self.is_vlm:
                raise ValueError(f"compression.visual_tokens: {path} is not a vision-language model")
            self.pruner = VisualTokenPruner(self.model, config, compression.visual_keep, compression.visual_method,
                                            compression.visual_merge, compression.visual_tower_layer)

    @torch.no_grad()
    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Replace this model's weights with `state` (its own state dict's names, any dtype): the Hugging Face
        modules are overwritten in place (the tower, projector and embeddings, which the visual-token pruner and
        prompt embedding use), then the decoder re-reads its copies. Only for a model loaded with `learning`."""
        if not self.learning:
            raise RuntimeError(f"{self.path}: loaded without learning=True, its decoder layers are gone")
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{self.path}: new weights do not match the model: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        if self.lean:
            self.decoder.load(self.language_model, self.model.get_output_embeddings())
        if self.lean_tower is not None:
            self.lean_tower.load()

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
        """Right-padded input embeddings [n, max_len, hidden] of prompts, with everything else the model's own
        forward gives its language model for them (for a VLM: the image features merged in, the rotary positions,
        bidirectional spans, DeepStack features); with visual-token pruning, only the kept tokens, each with its
        original position."""
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        ids = ids.to(self.device)
        lengths = [len(p) for p in prompts]
        if not self.is_vlm:
            return PromptEmbeds(self.decoder.embed(ids), lengths, offsets=[0] * len(prompts))
        out = torch.empty(len(prompts), width, self.decoder.hidden_size, device=self.device, dtype=self.dtype)
        positions = blocks = deepstack = None
        groups: dict[tuple, list[int]] = {}
        for i, a in enumerate(arrays):
            groups.setdefault(shape_key(a or {}), []).append(i)
        keep = torch.ones_like(ids, dtype=torch.bool)  # the tokens the decoder sees (visual-token pruning)
        for idx in groups.values():
            inputs = stack_arrays([arrays[i] or {} for i in idx], self.dtype, self.device, width)
            kw = self._language_model_inputs(ids[idx], inputs)
            out[idx] = kw["inputs_embeds"]
            if self.pruner is not None:  # the tower's attention just captured belongs to this group
                keep[idx] = self._kept(out, ids, idx)
            pos = prompt_positions(kw.get("position_ids"), len(idx), width, self.device)
            if positions is None:
                positions = torch.zeros(len(prompts), *pos.shape[1:], dtype=torch.long, device=self.device)
            positions[idx] = pos
            b = self._blocks(inputs, [lengths[i] for i in idx])
            if b is not None:
                if blocks is None:
                    blocks = torch.full((len(prompts), width), -1, dtype=torch.long, device=self.device)
                blocks[idx] = b
            if kw.get("deepstack_visual_embeds") is not None:  # Qwen3-VL: features for the image positions
                mask = kw["visual_pos_masks"]
                if deepstack is None:
                    deepstack = [torch.zeros_like(out) for _ in kw["deepstack_visual_embeds"]]
                for d, feats in zip(deepstack, kw["deepstack_visual_embeds"]):
                    part = torch.zeros_like(out[idx])
                    part[mask] = feats.to(self.dtype)
                    d[idx] = part
        pe = PromptEmbeds(out, lengths, positions, None, blocks, deepstack)
        if self.pruner is not None:
            pe = self._prune(pe, keep)
        # the next token's position: one past the prompt's largest (every axis), read in one transfer
        n = torch.tensor(pe.lengths, device=self.device)
        pos = pe.positions if pe.positions.dim() == 3 else pe.positions[..., None]
        past = torch.arange(pos.shape[1], device=self.device)[None, :, None] >= n[:, None, None]
        following = pos.masked_fill(past, -1).amax((1, 2)) + 1
        return pe._replace(offsets=(following - n).tolist())

    def _blocks(self, inputs: dict, lengths: list[int]) -> torch.Tensor | None:
        """Bidirectional spans as the model's own mask makes them from its token type ids: each image's tokens
        (Gemma 3), the whole prefix (PaliGemma); never the padding past a row's length. None: causal only."""
        types = inputs.get("token_type_ids")
        if types is None or self.family not in BLOCK_MASKS:
            return None
        if BLOCK_MASKS[self.family] == "prefix":
            blocks = torch.where(types == 0, 0, -1)
        else:
            image = types == 1
            starts = image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]
            blocks = torch.where(image, starts.long().cumsum(1) - 1, -1)
        ends = torch.tensor(lengths, device=types.device)[:, None]
        return blocks.masked_fill(torch.arange(types.shape[1], device=types.device)[None] >= ends, -1)

    def _kept(self, out: torch.Tensor, ids: torch.Tensor, idx: list[int]) -> torch.Tensor:
        """Which tokens of rows idx the pruner keeps [g, width]: every text token and the selected image tokens
        (with merging, the pruned ones are folded into the kept ones in `out`). Rows whose images have as many
        tokens are selected together; dynamic-resolution images (Qwen-VL) one row at a time."""
        is_image = ids[idx] == self.image_token_id  # [g, width]
        counts = is_image.sum(1)
        if int(counts.min()) == 0:
            raise ValueError("compression.visual_tokens: every prompt needs image tokens to prune")
        keep = ~is_image  # text tokens stay...
        together = bool((counts == counts[0]).all())
        for part in ([list(range(len(idx)))] if together else [[j] for j in range(len(idx))]):
            if not together and not self.pruner.per_image:
                raise ValueError("compression.visual_tokens.method: attention needs images of one size in a "
                                 "batch with this vision tower; use diversity")
            p = torch.tensor(part, device=self.device)
            image_at = is_image[p].nonzero()[:, 1].view(len(part), int(counts[part[0]]))  # [g, m]
            rows = torch.tensor([idx[j] for j in part], device=self.device)
            kept = self.pruner.select(out[rows[:, None], image_at], images=part)  # [g, n]
            if self.pruner.merge_pruned:
                out[rows[:, None], image_at.gather(1, kept)] = self.pruner.merge(out[rows[:, None], image_at], kept)
            keep[p[:, None], image_at.gather(1, kept)] = True  # ...and so do the kept image tokens
        return keep

    @staticmethod
    def _prune(pe: PromptEmbeds, keep: torch.Tensor) -> PromptEmbeds:
        """The prompt without its pruned tokens: kept tokens move left with their positions (all three axes
        under M-RoPE), spans and DeepStack features; lengths shrink."""
        lengths = list(pe.lengths)
        tensors = [pe.embeds, pe.positions, pe.blocks, *(pe.deepstack or [])]
        for i in range(len(lengths)):
            at = keep[i, :lengths[i]].nonzero().squeeze(1)
            for t in tensors:
                if t is not None:
                    t[i, :len(at)] = t[i, at].clone()
            lengths[i] = len(at)
        w = max(lengths)
        return PromptEmbeds(pe.embeds[:, :w], lengths, pe.positions[:, :w], None,
                            None if pe.blocks is None else pe.blocks[:, :w],
                            None if pe.deepstack is None else [d[:, :w] for d in pe.deepstack])

    def prefill(self, cache, pe: PromptEmbeds, first: int = 0, last: torch.Tensor | None = None,
                kv_only: bool = False) -> torch.Tensor | None:
        """Prompts embedded by embed_prompts into slots first.. of `cache`: the decoder's prefill."""
        cache.set_offsets(first, pe.offsets or [0] * len(pe.lengths))
        extra = {k: v for k, v in (("blocks", pe.blocks), ("deepstack", pe.deepstack)) if v is not None}
        starts = torch.zeros(len(pe.lengths), dtype=torch.long, device=self.device)
        return self.decoder.forward(cache, pe.embeds, starts, first=first, last=last, kv_only=kv_only,
                                    positions=pe.positions, length=pe.embeds.shape[1], **extra)

    def _language_model_inputs(self, ids: torch.Tensor, inputs: dict[str, torch.Tensor]) -> dict:
        """What the model's own forward passes its language model (vision tower, projector, placeholder scatter,
        rotary positions, DeepStack features...), captured at the decoder's door: the HF model is run, not
        re-implemented, whatever the architecture."""
        def stop(_module, args, kwargs):
            if args:
                kwargs = dict(kwargs, inputs_embeds=args[0])
            raise _Captured(kwargs)

        handle = self.language_model.register_forward_pre_hook(stop, with_kwargs=True)
        try:
            with self._tower():
                self.model.model(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs)
        except _Captured as c:
            if c.kwargs.get("inputs_embeds") is None:
                raise ValueError(f"{self.family} passes token ids, not embeddings, to its language model; "
                                 f"the specray engine cannot run it; {HF_BACKEND}") from None
            return c.kwargs
        finally:
            handle.remove()
        raise ValueError(f"{self.family} never called its language model; {HF_BACKEND}")

    @contextlib.contextmanager
    def _tower(self):
        """For one forward of the model: the engine's own tower in the HF tower's place where it has one (with
        in-tower pruning passed to it), else the pruner's hooks on HF's tower (attention ranking needs them)."""
        pruning = self.pruner.in_tower if self.pruner is not None else None
        if self.lean_tower is None or (self.pruner is not None and pruning is None):
            handle = self.pruner.hook() if self.pruner is not None else None
            try:
                yield
            finally:
                if handle is not None:
                    handle.remove()
            return
        visual, lean = self.model.model.visual, self.lean_tower

        def forward(pixel_values, grid_thw=None, **_):
            return BaseModelOutputWithPooling(pooler_output=lean(pixel_values, grid_thw, pruning))

        visual.forward = forward
        try:
            yield
        finally:
            del visual.forward
