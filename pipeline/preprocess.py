"""Preprocessing one row: decode and validate the image, build the prompt, run the model's processor.

A failure of any step becomes the row's `error` (one line); the row still flows to the output.
Model inputs travel to the generate stage as `input_ids` plus `model_inputs`, an .npz of the
processor's image tensors (pixel_values and whatever else the processor returns), so any processor
works without Ray Data having to understand its tensor shapes.
"""
from __future__ import annotations

import functools
import io
import json
from typing import Any

import fsspec
import numpy as np
from PIL import Image, ImageOps

from actors.request import one_line, pack_arrays

TEXT_KEYS = ("input_ids", "attention_mask")


@functools.lru_cache(maxsize=4)
def load_processor(model_path: str, trust_remote_code: bool = False):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code)


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """PIL image in RGB, EXIF orientation applied; refuses images over max_pixels before decoding them."""
    if not data:
        raise ValueError("empty image data")
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our own bound below, checked on the header before any pixel is decoded
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise ValueError(f"image too large: {width}x{height} pixels over the limit of {max_pixels}")
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode == "I;16" or image.mode.startswith("I;16"):
            image = image.point(lambda v: v / 256).convert("L")
        return image.convert("RGB")
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def read_image_bytes(row: dict) -> bytes:
    if row.get("image") is not None:
        return row["image"]
    if row.get("image_path"):
        with fsspec.open(row["image_path"], "rb") as f:
            return f.read()
    raise ValueError("the row has no image")


class _Fields(dict):
    def __missing__(self, key: str) -> Any:
        raise KeyError(f"task.prompt names {{{key}}}, but the row has no column {key!r}")


def build_prompt(template: str, fields: dict) -> str:
    try:
        return template.format_map(_Fields(fields))
    except KeyError as e:
        raise ValueError(e.args[0]) from None


def chat_text(processor, prompt: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{getattr(processor, 'image_token', '<image>')}\n{prompt}"


def preprocess_row(row: dict, model_path: str, prompt_template: str, max_pixels: int,
                   trust_remote_code: bool = False) -> dict:
    out = {"shard": row["shard"], "key": row["key"], "fields": row["fields"], "prompt": None,
           "input_ids": [], "model_inputs": b"", "num_prompt_tokens": 0, "error": None}
    try:
        fields = json.loads(row["fields"]) if row.get("fields") else {}
        prompt = build_prompt(prompt_template, fields)
        out["prompt"] = prompt
        image = decode_image(read_image_bytes(row), max_pixels)
        processor = load_processor(model_path, trust_remote_code)
        enc = processor(text=[chat_text(processor, prompt)], images=[image], return_tensors="np")
        ids = np.asarray(enc["input_ids"][0]).astype(np.int64).tolist()
        out["input_ids"] = ids
        out["num_prompt_tokens"] = len(ids)
        out["model_inputs"] = pack_arrays({k: np.asarray(v) for k, v in enc.items() if k not in TEXT_KEYS})
    except Exception as e:  # noqa: BLE001 - any failure of one row becomes that row's error
        out["error"] = one_line(e)
    return out
