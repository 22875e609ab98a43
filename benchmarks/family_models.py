"""Tiny random-weight checkpoints of real transformers VLM families, built offline, for tests and benchmarks.

`build_family(family, path)` saves a checkpoint the way a real one is laid out: model.safetensors (float32),
config.json, generation_config.json, the tokenizer, and the processor (the family's own processor class with its
PIL image processor, and its chat template). Every model is a real transformers architecture at toy size:
hidden 64, 2 text layers, 1-2 vision layers, 16 image tokens for a 96x96 image (Qwen: 16 to 48 by image size;
LLaVA-NeXT and OneVision: 48-pixel tiles, 88 tokens; Idefics3, SmolVLM, InternVL, Aya Vision: 32-pixel tiles of 4
tokens plus a global view; Mistral3: Pixtral at the image's own size; Mllama: one, as its image goes in by
cross-attention), a vocabulary of ~530 tokens (PaliGemma: ~1,700 with its
location and segmentation tokens). The text vocabulary is padded to a multiple of 64 rows, as
real checkpoints pad theirs; the padding rows' output weights are zero, so greedy decoding never picks them.

Random init of a tiny model ignores its input (it repeats the last prompt token whatever it is shown); `_sharpen`
re-draws the weights at larger scales so that greedy outputs follow the image and the prompt.

`build_text_drafter(family, target_path, path, vocab=...)` saves a small text-only causal LM of the family's
text architecture with the target's tokenizer ("same"), the target's tokenizer minus its vision tokens and
fewer embedding rows ("prefix"), or a tokenizer that numbers the same tokens differently ("different").

mllama and florence2 only have to load (the engine refuses them); their models are not tuned to discriminate.
Processors with a video processor (Qwen, LLaVA-OneVision, SmolVLM, InternVL) are built and saved without it (it needs
torchvision; the pipeline is image-only), through engine.processor.image_only_processor_class, and its entry is
written into processor_config.json as a real checkpoint has it; Mistral3's Pixtral processor through
engine.processor.pil_processor_class.
"""
from __future__ import annotations

import json
import pathlib
import random

import torch
import transformers as tf
from PIL import Image, ImageDraw

from benchmarks.family_tokenizers import family_tokenizer, vision_token_ids
from engine.processor import image_only_processor_class

FAMILIES = ("llava", "llava_next", "llava_onevision", "idefics3", "smolvlm", "internvl", "aya_vision", "mistral3",
            "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "paligemma", "mllama", "florence2")
PAD_MULTIPLE = 64
TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 1024}
MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}  # head_dim 16: 8 = 2+3+3
QWEN_PIXELS = {14: {"shortest_edge": 16 * 28 * 28, "longest_edge": 48 * 28 * 28},  # 16..48 image tokens
               16: {"shortest_edge": 16 * 32 * 32, "longest_edge": 48 * 32 * 32}}
HALF = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
SIGLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
          "patch_size": 14}
GEMMA3_IMAGE, GEMMA3_TOKENS = 112, 16  # 8x8 patches pooled 2x2 into 16 image tokens
PALIGEMMA_IMAGE = 56  # 4x4 patches: 16 image tokens
CLIP_MEAN = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
PINPOINTS = [[48, 48], [48, 96], [96, 48], [96, 96]]  # LLaVA-NeXT/OneVision: 48-pixel tiles, up to 2x2
TILE = 32  # Idefics3, SmolVLM, InternVL, Aya Vision: 32-pixel tiles of 8-pixel patches, 2x2 merged: 4 tokens each
LLAMA, QWEN2 = (tf.LlamaConfig, tf.LlamaForCausalLM), (tf.Qwen2Config, tf.Qwen2ForCausalLM)
DRAFTERS = {"llava": LLAMA, "llava_next": LLAMA, "idefics3": LLAMA, "smolvlm": LLAMA, "llava_onevision": QWEN2,
            "internvl": QWEN2, "mistral3": (tf.MistralConfig, tf.MistralForCausalLM),
            "aya_vision": (tf.Cohere2Config, tf.Cohere2ForCausalLM), "qwen2_vl": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
            "qwen2_5_vl": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "qwen3_vl": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
            "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM), "paligemma": (tf.GemmaConfig, tf.GemmaForCausalLM)}


def padded(n: int) -> int:
    return -(-n // PAD_MULTIPLE) * PAD_MULTIPLE


def _ids(tok, *names: str) -> dict:
    """bos/eos/pad ids for a config, only those the tokenizer has."""
    return {f"{n}_token_id": getattr(tok, f"{n}_token_id") for n in names if getattr(tok, f"{n}_token_id") is not None}


def _text(family: str, tok, vocab_size: int) -> dict:
    """The family's text-model config fields."""
    ids = _ids(tok, "bos", "eos", "pad")
    if family.startswith("qwen"):  # as Qwen's configs: <|endoftext|> is the bos (the tokenizer adds none)
        ids["bos_token_id"] = tok.convert_tokens_to_ids("<|endoftext|>")
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return {**TEXT, "vocab_size": vocab_size, "rope_parameters": dict(MROPE), **ids}
    if family == "qwen3_vl":
        return {**TEXT, "vocab_size": vocab_size, "head_dim": 16,
                "rope_parameters": {**MROPE, "mrope_interleaved": True}, **ids}
    if family == "gemma3":  # one sliding layer with a window of 8 (prompts are 40-80 tokens), one full layer
        return {**TEXT, "vocab_size": vocab_size, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
                "layer_types": ["sliding_attention", "full_attention"], **ids}
    if family == "paligemma":
        return {**TEXT, "vocab_size": vocab_size, "head_dim": 16, **ids}
    if family in ("llava_onevision", "internvl"):  # Qwen2 text, <|endoftext|> the bos as Qwen's configs
        ids["bos_token_id"] = tok.convert_tokens_to_ids("<|endoftext|>")
        return {"model_type": "qwen2", **TEXT, "vocab_size": vocab_size, **ids}
    if family == "aya_vision":  # Cohere2: sliding and global layers, parallel attention and MLP
        return {"model_type": "cohere2", **TEXT, "vocab_size": vocab_size, "sliding_window": 8,
                "layer_types": ["sliding_attention", "full_attention"], "logit_scale": 1.0, **ids}
    if family == "mistral3":
        return {"model_type": "mistral", **TEXT, "vocab_size": vocab_size, "head_dim": 16, **ids}
    if family in ("idefics3", "smolvlm", "llava_next"):
        return {"model_type": "llama", **TEXT, "vocab_size": vocab_size, **ids}
    return {**TEXT, "vocab_size": vocab_size, "tie_word_embeddings": True, **ids}  # llava, mllama (Llama text)


def _qwen(family: str, tok):
    """Qwen2-VL, Qwen2.5-VL or Qwen3-VL with its processor (no video processor: it needs torchvision)."""
    text = _text(family, tok, padded(len(tok)))
    vision_ids = {"image_token_id": tok.image_token_id, "video_token_id": tok.video_token_id,
                  "vision_start_token_id": tok.vision_start_token_id, "vision_end_token_id": tok.vision_end_token_id}
    patch = 16 if family == "qwen3_vl" else 14
    if family == "qwen2_vl":
        config = tf.Qwen2VLConfig(text_config=text, vision_config={
            "depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2}, **vision_ids)
        model, processor_class = tf.Qwen2VLForConditionalGeneration(config), tf.Qwen2VLProcessor
    elif family == "qwen2_5_vl":
        config = tf.Qwen2_5_VLConfig(text_config=text, vision_config={
            "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
            "fullatt_block_indexes": [1], "window_size": 56}, **vision_ids)
        model, processor_class = tf.Qwen2_5_VLForConditionalGeneration(config), tf.Qwen2_5_VLProcessor
    else:
        config = tf.Qwen3VLConfig(text_config=text, vision_config={
            "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
            "num_position_embeddings": 64, "deepstack_visual_indexes": [0]}, **vision_ids)
        model, processor_class = tf.Qwen3VLForConditionalGeneration(config), tf.Qwen3VLProcessor
    image_processor = tf.Qwen2VLImageProcessorPil(size=QWEN_PIXELS[patch], patch_size=patch, merge_size=2,
                                                  temporal_patch_size=2, **(HALF if patch == 16 else {}))
    processor = image_only_processor_class(processor_class)(image_processor=image_processor, tokenizer=tok,
                                                             chat_template=tok.chat_template)
    return model, processor


def _gemma3(tok):
    config = tf.Gemma3Config(
        text_config=_text("gemma3", tok, padded(len(tok))),
        vision_config={**SIGLIP, "image_size": GEMMA3_IMAGE, "vision_use_head": False},
        mm_tokens_per_image=GEMMA3_TOKENS, boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
        image_token_index=tok.image_token_id)
    image_processor = tf.Gemma3ImageProcessorPil(size={"height": GEMMA3_IMAGE, "width": GEMMA3_IMAGE},
                                                 do_pan_and_scan=False, **HALF)
    processor = tf.Gemma3Processor(image_processor=image_processor, tokenizer=tok, chat_template=tok.chat_template,
                                   image_seq_length=GEMMA3_TOKENS)
    return tf.Gemma3ForConditionalGeneration(config), processor


def _paligemma(tok):
    vocab = padded(len(tok))
    config = tf.PaliGemmaConfig(
        text_config={"model_type": "gemma", **_text("paligemma", tok, vocab)},
        vision_config={"model_type": "siglip_vision_model", **SIGLIP, "image_size": PALIGEMMA_IMAGE,
                       "projection_dim": 64},
        image_token_index=tok.image_token_id, vocab_size=vocab, projection_dim=64, hidden_size=64)
    image_processor = tf.SiglipImageProcessorPil(size={"height": PALIGEMMA_IMAGE, "width": PALIGEMMA_IMAGE},
                                                 image_seq_length=(PALIGEMMA_IMAGE // 14) ** 2, **HALF)
    return tf.PaliGemmaForConditionalGeneration(config), tf.PaliGemmaProcessor(image_processor=image_processor,
                                                                               tokenizer=tok)


def _llava(tok):
    from training.modelpair import build_processor, build_vlm

    spec = {"vision": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
            "text": {k: v for k, v in TEXT.items() if k != "max_position_embeddings"}}
    model = build_vlm(spec, tok, image_size=48, patch_size=12, max_positions=1024)  # 4x4 = 16 image tokens
    model.resize_token_embeddings(padded(len(tok)), mean_resizing=False)
    return model, build_processor(tok, image_size=48, patch_size=12)


def _mllama(tok):
    vision = {"hidden_size": 32, "num_hidden_layers": 1, "num_global_layers": 1, "attention_heads": 2,
              "intermediate_size": 64, "vision_output_dim": 64, "image_size": 28, "patch_size": 14,
              "max_num_tiles": 1, "intermediate_layers_indices": [0], "supported_aspect_ratios": [[1, 1]]}
    text = {**_text("mllama", tok, padded(len(tok))), "cross_attention_layers": [1]}
    config = tf.MllamaConfig(vision_config=vision, text_config=text, image_token_index=tok.image_token_id)
    image_processor = tf.MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=1)
    return tf.MllamaForConditionalGeneration(config), tf.MllamaProcessor(image_processor, tok, tok.chat_template)


def _florence2(tok):
    text = {"model_type": "bart", "vocab_size": padded(len(tok)), "d_model": 64, "encoder_layers": 1,
            "decoder_layers": 1, "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 128,
            "decoder_ffn_dim": 128, "max_position_embeddings": 256, **_ids(tok, "bos", "eos", "pad"),
            "decoder_start_token_id": tok.eos_token_id, "forced_eos_token_id": tok.eos_token_id}  # as BART's
    vision = {"depths": [1, 1], "patch_size": [7, 3], "patch_stride": [4, 2], "patch_padding": [3, 1],
              "patch_prenorm": [False, True], "embed_dim": [16, 32], "num_heads": [1, 2], "num_groups": [1, 2],
              "window_size": 2, "projection_dim": 64}
    config = tf.Florence2Config(text_config=text, vision_config=vision, image_token_id=tok.image_token_id)
    image_processor = tf.CLIPImageProcessorPil(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32},
                                               image_seq_length=17)  # 4x4 patches + 1 pooled
    return tf.Florence2ForConditionalGeneration(config), tf.Florence2Processor(image_processor, tok)


def _llava_next(tok):
    vision = {"model_type": "clip_vision_model", **TOWER, "image_size": 48, "patch_size": 12}
    config = tf.LlavaNextConfig(vision_config=vision, text_config=_text("llava_next", tok, padded(len(tok))),
                                image_token_index=tok.image_token_id, image_grid_pinpoints=PINPOINTS,
                                vision_feature_select_strategy="default", vision_feature_layer=-1)
    image_processor = tf.LlavaNextImageProcessorPil(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48},
                                                    image_grid_pinpoints=PINPOINTS, **CLIP_MEAN)
    processor = tf.LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=12,
                                      vision_feature_select_strategy="default", chat_template=tok.chat_template,
                                      num_additional_image_tokens=1)  # CLIP's class token
    return tf.LlavaNextForConditionalGeneration(config), processor


def _llava_onevision(tok):
    vision = {"model_type": "siglip_vision_model", **TOWER, "image_size": 48, "patch_size": 12}
    config = tf.LlavaOnevisionConfig(vision_config=vision, text_config=_text("llava_onevision", tok, padded(len(tok))),
                                     image_token_index=tok.image_token_id, video_token_index=tok.video_token_id,
                                     image_grid_pinpoints=PINPOINTS, vision_feature_select_strategy="full",
                                     vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9")
    image_processor = tf.LlavaOnevisionImageProcessorPil(size={"height": 48, "width": 48},
                                                         image_grid_pinpoints=PINPOINTS, **HALF)
    processor = image_only_processor_class(tf.LlavaOnevisionProcessor)(
        image_processor=image_processor, tokenizer=tok, num_image_tokens=16, vision_feature_select_strategy="full",
        chat_template=tok.chat_template, vision_aspect_ratio="anyres_max_9")
    return tf.LlavaOnevisionForConditionalGeneration(config), processor


def _idefics3(family: str, tok):
    """Idefics3 or SmolVLM: each image split into TILE-pixel tiles plus a global view, 4 tokens per tile."""
    vision = {**TOWER, "image_size": TILE, "patch_size": 8}
    kwargs = dict(vision_config=vision, text_config=_text(family, tok, padded(len(tok))), scale_factor=2,
                  image_token_id=tok.image_token_id)
    sizes = dict(size={"longest_edge": 2 * TILE}, max_image_size={"longest_edge": TILE}, do_image_splitting=True,
                 **HALF)
    if family == "idefics3":
        model = tf.Idefics3ForConditionalGeneration(tf.Idefics3Config(**kwargs))
        processor = tf.Idefics3Processor(tf.Idefics3ImageProcessorPil(**sizes), tok, image_seq_len=4,
                                         chat_template=tok.chat_template)
    else:
        model = tf.SmolVLMForConditionalGeneration(tf.SmolVLMConfig(**kwargs))
        processor = image_only_processor_class(tf.SmolVLMProcessor)(
            image_processor=tf.SmolVLMImageProcessorPil(**sizes), tokenizer=tok, video_processor=None, image_seq_len=4,
            chat_template=tok.chat_template)
    return model, processor


def _internvl(tok):
    vision = {**TOWER, "image_size": [TILE, TILE], "patch_size": [8, 8]}
    config = tf.InternVLConfig(vision_config=vision, text_config=_text("internvl", tok, padded(len(tok))),
                               image_token_id=tok.context_image_token_id, downsample_ratio=0.5)
    image_processor = tf.GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE}, crop_to_patches=True,
                                                  min_patches=1, max_patches=4, **HALF)
    processor = image_only_processor_class(tf.InternVLProcessor)(
        image_processor=image_processor, tokenizer=tok, image_seq_length=4, chat_template=tok.chat_template)
    return tf.InternVLForConditionalGeneration(config), processor


def _aya_vision(tok):
    vision = {"model_type": "siglip_vision_model", **TOWER, "image_size": TILE, "patch_size": 8}
    config = tf.AyaVisionConfig(vision_config=vision, text_config=_text("aya_vision", tok, padded(len(tok))),
                                downsample_factor=2, image_token_index=tok.convert_tokens_to_ids("<|IMG_PATCH|>"),
                                vision_feature_select_strategy="full", vision_feature_layer=-1)
    image_processor = tf.GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE}, crop_to_patches=True,
                                                  min_patches=1, max_patches=4, **HALF)
    processor = tf.AyaVisionProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8, img_size=TILE,
                                      downsample_factor=2, chat_template=tok.chat_template)
    return tf.AyaVisionForConditionalGeneration(config), processor


def _mistral3(tok):
    from engine.processor import pil_processor_class

    vision = {"model_type": "pixtral", **TOWER, "head_dim": 16, "image_size": 64, "patch_size": 8}
    config = tf.Mistral3Config(vision_config=vision, text_config=_text("mistral3", tok, padded(len(tok))),
                               image_token_index=tok.image_token_id, spatial_merge_size=2, vision_feature_layer=-1)
    image_processor = tf.PixtralImageProcessorPil(size={"longest_edge": 64}, patch_size=8, **CLIP_MEAN)
    processor = pil_processor_class("PixtralProcessor")(
        image_processor=image_processor, tokenizer=tok, patch_size=8, spatial_merge_size=2,
        chat_template=tok.chat_template)
    return tf.Mistral3ForConditionalGeneration(config), processor


BUILDERS = {"llava_next": _llava_next, "llava_onevision": _llava_onevision,
            "idefics3": lambda t: _idefics3("idefics3", t), "smolvlm": lambda t: _idefics3("smolvlm", t),
            "internvl": _internvl, "aya_vision": _aya_vision, "mistral3": _mistral3,"qwen2_vl": lambda t: _qwen("qwen2_vl", t), "qwen2_5_vl": lambda t: _qwen("qwen2_5_vl", t),
            "qwen3_vl": lambda t: _qwen("qwen3_vl", t), "gemma3": _gemma3, "paligemma": _paligemma, "llava": _llava,
            "mllama": _mllama, "florence2": _florence2}


GAIN = 2.0  # linear weights' std is GAIN/sqrt(fan_in) (see _sharpen)
POST_NORM = 8.0  # Gemma3's norms on each layer's output scale it by this (see _sharpen)


@torch.no_grad()
def _sharpen(model, num_tokens: int, never: list[int] = ()) -> None:
    """Make a random model's greedy output depend on its input. At the default init (std 0.02) every layer adds
    next to nothing to the residual stream, so the output is the last input token's own embedding, whatever
    came before. Linear and patch-embedding weights get std GAIN/sqrt(fan_in), the text embeddings std 1 (after
    Gemma3's own scaling), and Gemma3's norms on each layer's output a weight of POST_NORM, so the layers
    outweigh the token's own embedding. The output rows past the tokenizer (padding) and of `never` (vision
    tokens: a real model does not write them) are zeroed, so greedy decoding does not pick them."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)):  # layers and patch embeddings
            torch.nn.init.normal_(module.weight, std=GAIN / module.weight[0].numel() ** 0.5)
    embeddings = model.get_input_embeddings()  # Gemma3 scales its own by sqrt(hidden)
    torch.nn.init.normal_(embeddings.weight, std=1.0 / float(getattr(embeddings, "embed_scale", 1.0)))
    for name, p in model.named_parameters():
        if name.endswith("mm_input_projection_weight"):  # Gemma3's projector: a bare (vision, text) matrix
            torch.nn.init.normal_(p, std=GAIN / p.shape[0] ** 0.5)
        if name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")) and not p.any():
            p.fill_(POST_NORM - 1)  # Gemma3 normalises each layer's output (x (1 + weight)) before adding it
    outputs = model.get_output_embeddings()
    outputs = embeddings if outputs is None else outputs
    outputs.weight[num_tokens:] = 0
    outputs.weight[list(never)] = 0


def _save_model(model, tok, path: pathlib.Path, eos: list[int] | None = None) -> None:
    model.generation_config = tf.GenerationConfig(
        bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
        eos_token_id=eos if eos and len(eos) > 1 else tok.eos_token_id, do_sample=False)
    model.to(torch.float32).save_pretrained(path, safe_serialization=True)


def _eos_ids(family: str, tok) -> list[int]:
    """The end-of-turn ids a chat model stops on, as the real generation_config.json lists them."""
    extra = {"qwen": ["<|im_end|>", "<|endoftext|>"], "gemma3": ["<eos>", "<end_of_turn>"],
             "llava_onevision": ["<|im_end|>", "<|endoftext|>"], "internvl": ["<|im_end|>", "<|endoftext|>"]}
    names = extra.get("qwen" if family.startswith("qwen") else family)
    return [tok.convert_tokens_to_ids(n) for n in names] if names else [tok.eos_token_id]


def build_family(family: str, path, seed: int = 0) -> pathlib.Path:
    """Save a tiny random checkpoint of `family` (one of FAMILIES), with its processor, at `path`."""
    path = pathlib.Path(path)
    tok = family_tokenizer(family)
    torch.manual_seed(seed)
    model, processor = BUILDERS[family](tok)
    model.eval()
    if family not in ("mllama", "florence2"):
        _sharpen(model, len(tok), vision_token_ids(family, tok))
    _save_model(model, tok, path, _eos_ids(family, tok))
    processor.save_pretrained(path)
    if family in VIDEO_PROCESSORS:
        _add_video_processor(path, VIDEO_PROCESSORS[family])
    return path


VIDEO_PROCESSORS = {"qwen2_vl": "Qwen2VLVideoProcessor", "qwen2_5_vl": "Qwen2VLVideoProcessor",
                    "qwen3_vl": "Qwen3VLVideoProcessor", "llava_onevision": "LlavaOnevisionVideoProcessor",
                    "smolvlm": "SmolVLMVideoProcessor", "internvl": "InternVLVideoProcessor"}


def _add_video_processor(path: pathlib.Path, video_processor_type: str) -> None:
    """Write the video processor's entry a real checkpoint's processor_config.json has (the processor was
    built without it: it needs torchvision), with the image processor's settings."""
    config_file = path / "processor_config.json"
    config = json.loads(config_file.read_text())
    video = {k: v for k, v in config["image_processor"].items() if k != "image_processor_type"}
    config["video_processor"] = {**video, "video_processor_type": video_processor_type}
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def build_text_drafter(family: str, target_path, path, seed: int = 1, vocab: str = "same") -> pathlib.Path:
    """Save a small text-only causal LM of `family`'s text architecture at `path`. vocab: "same" (the target's
    tokenizer and text vocab size), "prefix" (the target's tokenizer without its vision tokens, and fewer
    embedding rows: its ids a strict prefix of the target's) or "different" (another id for every BPE token)."""
    if family not in DRAFTERS:
        raise ValueError(f"no text drafter for {family!r}: one of {sorted(DRAFTERS)}")
    path = pathlib.Path(path)
    target_config = tf.AutoConfig.from_pretrained(target_path)
    target_vocab = target_config.get_text_config().vocab_size
    if vocab == "same":
        tok = tf.AutoTokenizer.from_pretrained(target_path)
        vocab_size = target_vocab
    elif vocab == "prefix":
        tok = family_tokenizer(family, vision=False)
        target_ids = tf.AutoTokenizer.from_pretrained(target_path).get_vocab()
        vocab_size = len(tok)
        if vocab_size >= target_vocab or any(target_ids.get(t) != i for t, i in tok.get_vocab().items()):
            raise RuntimeError(f"{family}: the drafter's ids are not a strict prefix of the target's")
    elif vocab == "different":
        tok, vocab_size = family_tokenizer(family, permuted=True), target_vocab
    else:
        raise ValueError(f"vocab must be 'same', 'prefix' or 'different', not {vocab!r}")
    config_class, model_class = DRAFTERS[family]
    fields = {k: v for k, v in _text(family, tok, vocab_size).items() if k != "model_type"}
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        fields["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
        fields["tie_word_embeddings"] = True
    torch.manual_seed(seed)
    model = model_class(config_class(**fields)).eval()
    _sharpen(model, len(tok), vision_token_ids(family, tok))
    _save_model(model, tok, path, _eos_ids(family, tok))
    tok.save_pretrained(path)
    return path


def sample_images(n: int, seed: int = 0) -> list[Image.Image]:
    """n small RGB images (64x64 to 96x96), each with its own background, shapes and colours."""
    rng = random.Random(seed)
    images = []
    for _ in range(n):
        w, h = rng.choice((64, 80, 96)), rng.choice((64, 80, 96))
        image = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(2, 5)):
            x0, y0 = rng.randrange(w - 16), rng.randrange(h - 16)
            box = (x0, y0, x0 + rng.randint(12, w // 2), y0 + rng.randint(12, h // 2))
            fill = tuple(rng.randrange(256) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        images.append(image)
    return images
