"""Hostile inputs the tests build: images in awkward modes and formats, broken files, decompression bombs."""
import io
import struct
import zlib

import numpy as np
from PIL import Image

from scenes import corpus

SEED = corpus.SPLIT_SEEDS["test"]
NO_MODEL = "unused"  # rows that fail before the processor never load a model


def encode(image: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def scene(i: int = 0) -> Image.Image:
    return corpus.sample(SEED, i).image


PNG = encode(scene())
JPEG = encode(scene(), "JPEG")


def png_16_bit_gray() -> bytes:
    return encode(Image.fromarray(np.asarray(scene().convert("L")).astype(np.uint16) * 257))  # mode I;16


def png_16_bit_rgb(rgb=(65535, 32768, 0), size=4) -> bytes:
    """PIL cannot write one: a 48-bit PNG by hand."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"".join(b"\x00" + struct.pack(">HHH", *rgb) * size for _ in range(size))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def palette_with_transparency() -> bytes:
    image = scene().convert("P")
    return encode(image, transparency=image.getpixel((0, 0)))  # the background colour is transparent


def animated(fmt: str) -> bytes:
    """Two frames, red then blue."""
    frames = [Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    return encode(scene().resize((96, 48)), "JPEG", exif=exif)


def solid(size: tuple[int, int]) -> bytes:
    return encode(Image.new("RGB", size, (255, 0, 0)))


def bomb() -> bytes:
    return encode(Image.new("L", (7000, 7000)))  # ~50 KB of PNG, 49M pixels: over the default 40M bound


def bad_crc_png() -> bytes:
    i = PNG.index(b"IDAT") + 10
    return PNG[:i] + bytes([PNG[i] ^ 0xFF]) + PNG[i + 1:]


def _row(image: bytes | None, fields: dict | None = None) -> dict:
    return {"shard": "s", "key": "k", "image": image, "image_path": None,
            "fields": {"question": "What is it?"} if fields is None else fields}
