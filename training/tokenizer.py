"""The tokenizer shared by the target and every drafter: byte-level BPE trained on the corpus.

The image placeholder `<image>` is a special token, so BPE can never split it and no merge can produce it.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from scenes import corpus

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, IMAGE]

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


def train_tokenizer(vocab_size: int = 1024, num_texts: int = 20_000, seed: int = corpus.SPLIT_SEEDS["train"],
                    question_first: bool = False) -> PreTrainedTokenizerFast:
    texts = corpus.vocabulary_text()
    for i in range(num_texts):
        s = corpus.sample(seed, i)
        texts += [f"USER: {s.question}\nASSISTANT: {s.answer}"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="left",
        chat_template=chat_template(question_first),
    )
    return fast
