"""Tiny offline tokenizers for benchmarks/family_models.py, one per VLM family.

Every family shares one byte-level BPE trained here on the synthetic corpus (scenes/corpus.py); each adds its
own special tokens, in its real order, and a chat template in its own style. The vision tokens (image
placeholders, vision start/end, PaliGemma's location/segmentation tokens) are added last, so a text drafter's
tokenizer without them (`vision=False`) has ids that are a strict prefix of the target's.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.paligemma.processing_paligemma import EXTRA_TOKENS as PALIGEMMA_LOC_SEG

from scenes import corpus
from training.tokenizer import CHAT_TEMPLATE as LLAVA_TEMPLATE

BPE_SIZE = 1000
BPE_TEXTS = 300

def _im_template(image: str, system: bool = True) -> str:
    """A ChatML (<|im_start|>role ... <|im_end|>) template, each image written as `image`."""
    return (
        "{% for message in messages %}"
        + ("{% if loop.first and message['role'] != 'system' %}"
           "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}" if system else "")
        + "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}" + image +
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


ONEVISION_TEMPLATE = _im_template("<image>\n")
INTERNVL_TEMPLATE = _im_template("<IMG_CONTEXT>\n")
IDEFICS3_TEMPLATE = (  # Idefics3 / SmolVLM: "User:<image>prompt<end_of_utterance>\nAssistant:"
    "<|im_start|>{% for message in messages %}"
    "{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
AYA_TEMPLATE = (  # Cohere's turns
    "{{ bos_token }}{% for message in messages %}"
    "<|START_OF_TURN_TOKEN|>{{ '<|CHATBOT_TOKEN|>' if message['role'] == 'assistant' else '<|USER_TOKEN|>' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|END_OF_TURN_TOKEN|>"
    "{% endfor %}{% if add_generation_prompt %}<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>{% endif %}"
)
MISTRAL3_TEMPLATE = (  # [INST]...[/INST], the image as one [IMG] the processor expands
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST]{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}[IMG]{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %}[/INST]{% else %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)
ROW_COL = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
MLLAMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|image|>{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@dataclass(frozen=True)
class Spec:
    text: list[str]  # special tokens every tokenizer of the family has, in id order after the BPE vocab
    vision: list[str]  # special tokens only the VLM's tokenizer has, added last
    roles: dict[str, str | None]  # bos/eos/pad/unk
    extra: dict[str, str] = field(default_factory=dict)  # named special tokens (image_token, boi_token...)
    template: str | None = None
    plain: list[str] = field(default_factory=list)  # non-special vision tokens added before `vision`


SPECS = {
    "qwen": Spec(
        text=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        vision=["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
        roles={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        extra={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
               "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
        template=QWEN_TEMPLATE,
    ),
    "gemma3": Spec(
        text=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        vision=["<start_of_image>", "<end_of_image>", "<image_soft_token>"],
        roles={"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"},
        extra={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
        template=GEMMA3_TEMPLATE,
    ),
    "paligemma": Spec(
        text=["<pad>", "<eos>", "<bos>", "<unk>"],
        plain=PALIGEMMA_LOC_SEG,
        vision=["<image>"],
        roles={"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"},
        extra={"image_token": "<image>"},
    ),
    "llava": Spec(
        text=["<pad>", "<s>", "</s>", "<unk>"],
        vision=["<image>"],
        roles={"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"},
        extra={"image_token": "<image>"},
        template=LLAVA_TEMPLATE,
    ),
    "mllama": Spec(
        text=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
              "<|python_tag|>", "<|finetune_right_pad_id|>"],
        vision=["<|image|>"],
        roles={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|finetune_right_pad_id|>"},
        extra={"image_token": "<|image|>"},
        template=MLLAMA_TEMPLATE,
    ),
    "florence2": Spec(
        text=["<pad>", "<s>", "</s>", "<unk>"],
        vision=["<image>"],
        roles={"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"},
        extra={"image_token": "<image>"},
    ),
    "llava_onevision": Spec(
        text=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        vision=["<image>", "<video>"],
        roles={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        extra={"image_token": "<image>", "video_token": "<video>"},
        template=ONEVISION_TEMPLATE,
    ),
    "internvl": Spec(
        text=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        vision=["<img>", "</img>", "<IMG_CONTEXT>", "<video>"],
        roles={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        extra={"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
               "video_token": "<video>"},
        template=INTERNVL_TEMPLATE,
    ),
    "idefics3": Spec(
        text=["<|im_start|>", "<end_of_utterance>", "<|endoftext|>", "<unk>"],
        vision=["<fake_token_around_image>", "<image>", "<global-img>", *ROW_COL],
        roles={"bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>", "pad_token": "<|endoftext|>",
               "unk_token": "<unk>"},
        extra={"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
               "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"},
        template=IDEFICS3_TEMPLATE,
    ),
    "aya_vision": Spec(
        text=["<PAD>", "<UNK>", "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>",
              "<|CHATBOT_TOKEN|>"],
        vision=["<image>", "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>"],
        roles={"bos_token": "<BOS_TOKEN>", "eos_token": "<|END_OF_TURN_TOKEN|>", "pad_token": "<PAD>",
               "unk_token": "<UNK>"},
        extra={"image_token": "<image>"},
        template=AYA_TEMPLATE,
    ),
    "mistral3": Spec(
        text=["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<pad>"],
        vision=["[IMG]", "[IMG_BREAK]", "[IMG_END]"],
        roles={"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"},
        extra={"image_token": "[IMG]"},
        template=MISTRAL3_TEMPLATE,
    ),
}
FAMILY_SPEC = {"qwen2_vl": "qwen", "qwen2_5_vl": "qwen", "qwen3_vl": "qwen", "llava_next": "llava",
               "smolvlm": "idefics3"}


@functools.lru_cache(maxsize=2)
def _bpe_json(permuted: bool) -> str:
    """The shared byte-level BPE (no special tokens); `permuted`: the same merges with every id reversed."""
    texts = corpus.vocabulary_text()
    for i in range(BPE_TEXTS):
        s = corpus.sample(corpus.SPLIT_SEEDS["train"], i)
        texts.append(f"{s.question} {s.answer}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    if not permuted:
        return tok.to_str()
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    last = len(vocab) - 1
    data["model"]["vocab"] = {token: last - i for token, i in vocab.items()}
    return json.dumps(data)


def family_tokenizer(family: str, vision: bool = True, permuted: bool = False) -> PreTrainedTokenizerFast:
    """The family's tokenizer; vision=False leaves out the vision tokens (a text drafter's), permuted=True gives
    every BPE token another id (a tokenizer that must be refused as different)."""
    spec = SPECS[FAMILY_SPEC.get(family, family)]
    tok = Tokenizer.from_str(_bpe_json(permuted))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec.text])
    if vision:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec.plain])
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec.vision])
    extra = {k: v for k, v in spec.extra.items() if vision or v not in spec.vision}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        extra_special_tokens=extra,
        chat_template=spec.template,
        padding_side="left",
        **{k: v for k, v in spec.roles.items() if v is not None},
    )


def vision_token_ids(family: str, tok) -> list[int]:
    """The ids of the family's vision special tokens (placeholders, image start/end) that `tok` has."""
    vocab = tok.get_vocab()
    return [vocab[t] for t in SPECS[FAMILY_SPEC.get(family, family)].vision if t in vocab]
