"""Building the model pair from plain transformers configs: LLaVA (CLIP vision + Llama) VLMs and a Llama text LM,
and the same in the Qwen2.5-VL architecture (its vision tower with window attention and the 2x2 patch merger, a
Qwen2 decoder with multimodal RoPE) with a Qwen2 text LM.

Nothing here is specific to training: tests use these builders with tiny sizes to get random-weight models of
exactly the shipped architectures.
"""
from __future__ import annotations

from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLImageProcessorPil,
)

from scenes import corpus
from training.tokenizer import IMAGE, is_qwen_style

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def with_token_ids(model, tokenizer: PreTrainedTokenizerFast):
    """The model, its generation config naming the tokenizer's pad, EOS and BOS ids (Qwen-style tokens: as
    Qwen2.5-VL's, <|im_end|> and <|endoftext|> both end a row and <|endoftext|> is the BOS id)."""
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if is_qwen_style(tokenizer):
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]
        model.generation_config.bos_token_id = tokenizer.pad_token_id
    else:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def num_image_tokens(image_size: int, patch_size: int) -> int:
    return (image_size // patch_size) ** 2  # CLIP's [CLS] is dropped ("default" feature strategy)


def _text_config(spec: dict, tokenizer: PreTrainedTokenizerFast, max_positions: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **spec,
    )


def build_vlm(spec: dict, tokenizer: PreTrainedTokenizerFast, image_size: int = corpus.IMAGE_SIZE,
              patch_size: int = 12, max_positions: int = 256) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, **spec["vision"])
    config = LlavaConfig(
        vision_config=vision,
        text_config=_text_config(spec["text"], tokenizer, max_positions),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=num_image_tokens(image_size, patch_size),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=True,
    )
    model = LlavaForConditionalGeneration(config)
    return with_token_ids(model, tokenizer)


def build_text_lm(spec: dict, tokenizer: PreTrainedTokenizerFast, max_positions: int = 256) -> LlamaForCausalLM:
    model = LlamaForCausalLM(_text_config(spec["text"], tokenizer, max_positions))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build_processor(tokenizer: PreTrainedTokenizerFast, image_size: int = corpus.IMAGE_SIZE,
                    patch_size: int = 12) -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE,
        chat_template=tokenizer.chat_template,
    )


def user_prompt(processor: LlavaProcessor, question: str, with_image: bool = True) -> str:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


# Qwen2.5-VL: patches merged 2x2 (min = max pixels: one fixed grid, as the corpus's images are all one size). The
# shipped pair uses 8-pixel patches: a 96x96 image is 12x12 patches and 6x6 image tokens, each token a 16-pixel
# square, so every grid cell of the corpus is exactly 2x2 tokens
QWEN_PATCH, QWEN_MERGE = 12, 2


def _qwen_text(spec: dict, tokenizer: PreTrainedTokenizerFast, max_positions: int) -> dict:
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id  # Qwen's: <|endoftext|>
    return dict(vocab_size=len(tokenizer), max_position_embeddings=max_positions, tie_word_embeddings=True,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=bos, eos_token_id=tokenizer.eos_token_id, **spec)


def _qwen_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict:
    """The config's image, video and vision span ids: Qwen2.5-VL's own tokens where the tokenizer has them (the
    shipped pair's), else (a LLaVA-style tokenizer) <image>, with <unk>, <s> and </s> standing in."""
    ids = lambda name: tokenizer.convert_tokens_to_ids(name)  # noqa: E731
    if is_qwen_style(tokenizer):
        return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                    vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    return dict(image_token_id=ids(IMAGE), video_token_id=tokenizer.unk_token_id,
                vision_start_token_id=tokenizer.bos_token_id, vision_end_token_id=tokenizer.eos_token_id)


def build_qwen_vlm(spec: dict, tokenizer: PreTrainedTokenizerFast, max_positions: int = 256,
                   patch_size: int = QWEN_PATCH):
    """A Qwen2.5-VL: spec["vision"] (depth, hidden_size, num_heads, intermediate_size) and spec["text"] (a
    Qwen2 decoder; head_dim 2 * sum(mrope_section))."""
    text = _qwen_text(spec["text"], tokenizer, max_positions)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    half = head_dim // 2  # the rotary frequencies, split t / h / w as Qwen2.5-VL splits its 64 (16 / 24 / 24)
    section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
    vision = dict(spec["vision"], patch_size=patch_size, spatial_merge_size=QWEN_MERGE, temporal_patch_size=2,
                  out_hidden_size=text["hidden_size"],
                  window_size=spec["vision"].get("window_size", 4 * patch_size * QWEN_MERGE),
                  fullatt_block_indexes=[spec["vision"]["depth"] - 1])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                              **_qwen_token_ids(tokenizer))
    model = Qwen2_5_VLForConditionalGeneration(config)
    return with_token_ids(model, tokenizer)


def build_qwen_text_lm(spec: dict, tokenizer: PreTrainedTokenizerFast, max_positions: int = 256) -> Qwen2ForCausalLM:
    model = Qwen2ForCausalLM(Qwen2Config(**_qwen_text(spec["text"], tokenizer, max_positions)))
    return with_token_ids(model, tokenizer)


def build_qwen_processor(tokenizer: PreTrainedTokenizerFast, image_size: int = corpus.IMAGE_SIZE,
                         patch_size: int = QWEN_PATCH):
    """Qwen2.5-VL's processor with its PIL image processor, without the video processor (it needs torchvision;
    saved under Qwen2_5_VLProcessor, it loads as a real checkpoint's does)."""
    from engine.processor import image_only_processor_class

    pixels = {"shortest_edge": image_size * image_size, "longest_edge": image_size * image_size}
    image_processor = Qwen2VLImageProcessorPil(size=pixels, patch_size=patch_size, merge_size=QWEN_MERGE,
                                               temporal_patch_size=2, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    return image_only_processor_class(Qwen2_5_VLProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                                           chat_template=tokenizer.chat_template)
