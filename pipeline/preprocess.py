"""Preprocessing one row: decode and validate the image, build the prompt, run the model's processor.

A failure of any step becomes the row's `error` (one line); the row still flows to the output.
A source row in, a preprocessed row out (actors/row_schemas.py): `input_ids` (int64 numpy) plus `model_inputs`, the processor's image
tensors (pixel_values and whatever else the model's processor returns: engine/processor.py loads it, on a machine
without torchvision too) as raw Arrow bytes with their name, dtype and shape, so any processor works without Ray
Data having to understand its tensor shapes. The prompt's columns are used up here; only output.columns
(`carried`) go on.
"""
from __future__ import annotations

import functools
import io
import string
from typing import Any

import fsspec
import numpy as np
from PIL import Image, ImageOps

from actors.generate_rows import tensor_entries
from actors.row_schemas import CARRIED
from engine.processor import encode, load_processor
from engine.request import one_line
from pipeline.rows import carried_values

# A 1x4000 strip passes the pixel bound, yet the processor resizes its short side up to the model's size and the
# long side with it (gigabytes per row); wider than this is refused. 200:1, as Qwen2-VL's processor does.
MAX_ASPECT_RATIO = 200


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """PIL image in RGB, EXIF orientation applied; refuses images over max_pixels, or of an aspect ratio over
    MAX_ASPECT_RATIO, before decoding them. Any failure to decode is an OSError naming the format."""
    if not data:
        raise ValueError("empty image data")
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our own bound below, checked on the header before any pixel is decoded
    try:
        try:
            image = Image.open(io.BytesIO(data))
        except Exception:  # noqa: BLE001 - PIL's message names a BytesIO address, not the problem
            raise OSError("image: cannot be decoded (not a known image format, or its header is cut short)") from None
        width, height = image.size
        if width * height > max_pixels:
            raise ValueError(f"image too large: {width}x{height} pixels over the limit of {max_pixels}")
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise ValueError(f"image aspect ratio too extreme: {width}x{height} pixels, over {MAX_ASPECT_RATIO}:1")
        try:
            image.seek(0)  # animated GIF, WebP or PNG: the first frame
            image.load()
        except Exception as e:  # noqa: BLE001 - truncated or corrupt data raises OSError, SyntaxError, zlib.error...
            why = " ".join(str(e).split()) or type(e).__name__
            raise OSError(f"image: cannot be decoded ({image.format}: {why})") from None
        image = ImageOps.exif_transpose(image)
        return _to_rgb(_to_8_bit(image))
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _to_8_bit(image: Image.Image) -> Image.Image:
    """16-bit grayscale (mode I;16, or I holding 16-bit values) scaled to 8 bits; a plain convert would clip
    every value over 255 to white."""
    if image.mode.startswith("I;16") or (image.mode == "I" and image.getextrema()[1] > 255):
        return image.point(lambda v: v / 256).convert("L")
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency shown over white as a viewer shows it: the colour stored under a transparent
    pixel (or a palette's transparent entry) is arbitrary and would otherwise become part of the image."""
    if not image.has_transparency_data:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def read_image_bytes(row: dict) -> bytes:
    if row.get("image") is not None:
        return row["image"]
    if row.get("image_path"):
        with fsspec.open(row["image_path"], "rb") as f:
            return f.read()
    raise ValueError("the row has no image (null or missing)")


class _Fields(dict):
    def __missing__(self, key: str) -> Any:
        raise KeyError(f"task.prompt names {{{key}}}, but the row has no column {key!r}")

    def __getitem__(self, key: str) -> Any:
        value = super().__getitem__(key)
        if value is None:  # a null, or text that was not UTF-8 (pipeline.read makes it None): not the prompt "None"
            raise KeyError(f"task.prompt names {{{key}}}, but the row's {key!r} is null or not UTF-8 text")
        return value


def build_prompt(template: str, fields: dict) -> str:
    try:
        return template.format_map(_Fields(fields))
    except KeyError as e:
        raise ValueError(e.args[0]) from None


def prompt_columns(template: str) -> set[str]:
    """The columns a prompt template names ({question}, {meta[lang]} and {meta.lang} name question and meta)."""
    names = (name for _, name, _, _ in string.Formatter().parse(template) if name)
    return {name.split(".", 1)[0].split("[", 1)[0] for name in names} - {""}


@functools.lru_cache(maxsize=4)
def processor_of(model_path: str, trust_remote_code: bool = False):
    """The model's processor, loaded once per worker process (loading it costs far more than one row)."""
    return load_processor(model_path, trust_remote_code)


def preprocess_row(row: dict, model_path: str, prompt_template: str, max_pixels: int,
                   trust_remote_code: bool = False, carry: list[str] | None = None) -> dict:
    """A source row's preprocessed row; `carry`: the fields it carries on (None: all of them)."""
    fields = row.get("fields") or {}
    out = {"shard": row["shard"], "key": row["key"], "input_ids": np.zeros(0, np.int64), "num_prompt_tokens": 0,
           "model_inputs": None, "error": None, CARRIED: carried_values(fields, carry)}
    try:
        if row.get("error"):  # pipeline.read found the input row itself broken
            raise ValueError(row["error"])
        prompt = build_prompt(prompt_template, fields)
        image = decode_image(read_image_bytes(row), max_pixels)
        ids, arrays = encode(processor_of(model_path, trust_remote_code), prompt, image)
        inputs = tensor_entries(arrays)
        out.update(input_ids=ids, num_prompt_tokens=len(ids), model_inputs=inputs)
    except Exception as e:  # noqa: BLE001 - any failure of one row becomes that row's error
        out["error"] = one_line(e)
    return out
