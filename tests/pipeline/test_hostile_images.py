"""Hostile images: each one decodes as a viewer would show it, reaches the model at its size, or becomes an error row
with a clear reason (the end-to-end run of all hostile input: test_hostile.py)."""
import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from actors.generate_rows import read_tensors
from pipeline.preprocess import decode_image, preprocess_row
from tests.pipeline.hostile_inputs import (
    encode, scene, png_16_bit_gray, png_16_bit_rgb, animated, solid, bad_crc_png, PNG, JPEG, NO_MODEL, _row)


# --- images ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("data, pixel", [
    (png_16_bit_gray(), None),  # I;16: the same tones as the 8-bit original
    (encode(Image.fromarray(np.full((8, 8), 40000, dtype=np.int32)), "TIFF"), (156, 156, 156)),  # mode I
    (png_16_bit_rgb(), (255, 128, 0)),
], ids=["png-I;16", "tiff-I", "png-48-bit"])
def test_16_bit_images_keep_their_tones(data, pixel):
    image = decode_image(data, 10**6)
    if pixel is None:
        expected = np.asarray(scene().convert("L"))
        assert np.abs(np.asarray(image.convert("L")).astype(int) - expected).max() <= 1
    else:
        assert image.getpixel((0, 0)) == pixel  # not clipped to white


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_images_decode_their_first_frame(fmt):
    data = animated(fmt)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    r, g, b = decode_image(data, 10**6).getpixel((8, 8))
    assert r > 200 and g < 50 and b < 50


def test_transparent_pixels_are_shown_over_white():
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([255, 0, 255, 0, 0, 255])  # entry 0 (magenta) is the transparent one
    palette.putpixel((1, 1), 1)
    rgba = Image.new("RGBA", (4, 4), (255, 0, 255, 0))
    rgba.putpixel((1, 1), (0, 0, 255, 255))
    la = Image.new("LA", (4, 4), (90, 0))
    la.putpixel((1, 1), (30, 255))
    for data, opaque in [(encode(palette, transparency=0), (0, 0, 255)), (encode(rgba), (0, 0, 255)),
                         (encode(la), (30, 30, 30))]:
        image = decode_image(data, 10**6)
        assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)
        assert image.getpixel((1, 1)) == opaque


@pytest.mark.parametrize("size", [(1, 1), (3, 3), (1, 200), (200, 1)])
def test_tiny_and_long_images_reach_the_model_at_its_size(tiny_model, size):
    out = preprocess_row(_row(solid(size)), str(tiny_model), "{question}", 10**7)
    assert out["error"] is None
    pixels = read_tensors(pa.array([out["model_inputs"]]))[0]["pixel_values"]
    assert pixels.shape == (1, 3, 96, 96) and pixels[0, 0].min() > 1.5  # red everywhere, normalised


@pytest.mark.parametrize("size", [(1, 4000), (4000, 1)])
def test_extreme_aspect_ratios_are_refused_before_the_processor(size):
    """Within the pixel bound, yet the processor would scale the short side up to its size and the long side
    with it: 1x40000 takes 4 GB at the tiny model's 96 pixels."""
    out = preprocess_row(_row(solid(size)), NO_MODEL, "{question}", 10**7)
    assert "image aspect ratio too extreme" in out["error"] and len(out["input_ids"]) == 0


@pytest.mark.parametrize("data, reason", [
    (b"<html>not an image</html>", "OSError: image: cannot be decoded (not a known image format"),
    (PNG[:33], "image: cannot be decoded (not a known image format, or its header is cut short)"),
    (PNG[: len(PNG) // 2], "image: cannot be decoded (PNG: image file is truncated"),
    (JPEG[: len(JPEG) // 2], "image: cannot be decoded (JPEG: image file is truncated"),
    (bad_crc_png(), "image: cannot be decoded (PNG: "),
], ids=["not-an-image", "header-cut", "truncated-png", "truncated-jpeg", "corrupt-png"])
def test_undecodable_images_get_a_clear_reason(data, reason):
    out = preprocess_row(_row(data), NO_MODEL, "{question}", 10**7)
    assert out["error"].startswith("OSError: ") and reason in out["error"] and "BytesIO" not in out["error"]
