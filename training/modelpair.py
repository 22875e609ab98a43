"""Building the model pair from plain transformers configs: LLaVA (CLIP vision + Llama) VLMs and a Llama text LM.

Nothing here is specific to training: tests use `build_vlm`/`build_text_lm` with tiny sizes to get
random-weight models of exactly the shipped architecture.
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
)

from training import corpus
from training.tokenizer import IMAGE

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


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
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


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
