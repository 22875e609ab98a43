"""A model's own processor (tokenizer + image processor + chat template), as the pipeline and the parity check use
it: loaded from the model's folder, and a prompt turned into token ids and image tensors."""
from __future__ import annotations

import functools

import numpy as np

TEXT_KEYS = ("input_ids", "attention_mask")


@functools.lru_cache(maxsize=4)
def load_processor(model_path: str, trust_remote_code: bool = False):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code)


def chat_text(processor, prompt: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{getattr(processor, 'image_token', '<image>')}\n{prompt}"


def encode(processor, prompt: str, image) -> tuple[list[int], dict[str, np.ndarray]]:
    """A one-image prompt's token ids and the processor's other outputs (image tensors, token types)."""
    enc = processor(text=[chat_text(processor, prompt)], images=[image], return_tensors="np")
    ids = np.asarray(enc["input_ids"][0]).astype(np.int64).tolist()
    return ids, {k: np.asarray(v) for k, v in enc.items() if k not in TEXT_KEYS}
