"""The tokenizer shared by the target and every drafter: byte-level BPE trained on the corpus, in one of two styles.

- `llava` (configs/modelpair.yaml): <pad> <s> </s> <unk> <image> and a USER: / ASSISTANT: template.
- `qwen` (the shipped Qwen2.5-VL pair): Qwen2.5-VL's own special tokens (<|endoftext|> pads, <|im_end|> ends a
  turn, <|vision_start|><|image_pad|><|vision_end|> holds an image, <|video_pad|> a video) and Qwen2.5-VL's chat
  template (<|im_start|>role ... <|im_end|>, the default system prompt), so an engine that runs a Qwen2.5-VL
  fine-tune runs the pair with nothing changed.

Special tokens are whole tokens: BPE can never split them and no merge can produce one.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from scenes import corpus

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, IMAGE]

# Qwen2.5-VL's special tokens, in its own order (its ids 151643-151656)
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                       "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                       "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_PAD, QWEN_EOS, QWEN_IMAGE, QWEN_VIDEO = "<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>"
QWEN_SYSTEM = "You are a helpful assistant."

def chat_template(question_first: bool = False) -> str:
    """One user turn, then the assistant's answer ending with </s>. The user turn has the image first, then the
    question; or, `question_first`, the question then the image, whatever order the message lists them in (the
    pair's own prompt format: a caller builds the message as for any VLM, the template lays it out). With the
    question first, the decoder's causal attention lets every image token see what is asked."""
    part = ("{% if part['type'] == 'image' %}<image>{{ '\\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}"
            "{% endif %}")
    if question_first:
        user = ("{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
                "{{ '\\n' }}{% for part in message['content'] if part['type'] == 'image' %}<image>{{ '\\n' }}"
                "{% endfor %}")
    else:
        user = "{% for part in message['content'] %}" + part + "{% endfor %}"
    return (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}USER: "
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}" + user + "{% endif %}{{ '\\n' }}"
        "{% elif message['role'] == 'assistant' %}ASSISTANT: "
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
        "{% endif %}{{ eos_token }}{{ '\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )


CHAT_TEMPLATE = chat_template()


def is_qwen_style(tokenizer) -> bool:
    """Whether a tokenizer has Qwen2.5-VL's tokens (train_tokenizer's qwen style)."""
    return tokenizer.eos_token == QWEN_EOS


def answer_text(tokenizer, answer: str) -> str:
    """An answer as the assistant's turn holds it: Qwen's starts a line (after "assistant\n"), LLaVA's follows
    "ASSISTANT:" after a space."""
    return answer if is_qwen_style(tokenizer) else " " + answer


def qwen_chat_template(question_first: bool = False) -> str:
    """Qwen2.5-VL's chat template: the default system prompt unless the first message is one, each turn
    <|im_start|>role\n ... <|im_end|>\n, each image <|vision_start|><|image_pad|><|vision_end|> (each video
    <|video_pad|>), parts in the message's order. `question_first` (the shipped pair's prompt format): a turn's
    text parts come before its images and videos, whatever order the message lists them in, so that under causal
    attention every image token sees what is asked."""
    vision = ("{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
              "<|vision_start|><|image_pad|><|vision_end|>"
              "{% elif part['type'] == 'video' or 'video' in part %}<|vision_start|><|video_pad|><|vision_end|>"
              "{% elif 'text' in part %}{{ part['text'] }}{% endif %}")
    if question_first:
        parts = ("{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
                 "{% for part in message['content'] if part['type'] != 'text' %}" + vision + "{% endfor %}")
    else:
        parts = "{% for part in message['content'] %}" + vision + "{% endfor %}"
    return (
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n" + QWEN_SYSTEM + "<|im_end|>\n"
        "{% endif %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
        "{% else %}" + parts + "<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def train_tokenizer(vocab_size: int = 1024, num_texts: int = 20_000, seed: int = corpus.SPLIT_SEEDS["train"],
                    question_first: bool = False, style: str = "llava") -> PreTrainedTokenizerFast:
    """`style`: llava or qwen (the module's docstring)."""
    if style not in ("llava", "qwen"):
        raise ValueError(f"style: {style!r} is neither llava nor qwen")
    qwen = style == "qwen"
    texts = corpus.vocabulary_text() + ([f"system\n{QWEN_SYSTEM}\nuser\nassistant\n"] if qwen else [])
    for i in range(num_texts):
        s = corpus.sample(seed, i)
        texts += [f"user\n{s.question}\nassistant\n{s.answer}\n" if qwen else f"USER: {s.question}\nASSISTANT: {s.answer}"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN_SPECIAL_TOKENS if qwen else SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if qwen:  # as Qwen2.5-VL's tokenizer: no BOS or UNK token, <|endoftext|> pads, <|im_end|> ends the answer
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token=QWEN_PAD, eos_token=QWEN_EOS,
            extra_special_tokens={"image_token": QWEN_IMAGE, "video_token": QWEN_VIDEO},
            padding_side="left", chat_template=qwen_chat_template(question_first))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="left",
        chat_template=chat_template(question_first),
    )
    return fast
