"""Decoding untrusted image bytes: every mode to RGB, orientation, frames, and clean refusals."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from models.images import (
    DecodeBudget,
    DecodeBusy,
    ImageTooLarge,
    InvalidImage,
    UnsupportedImageFormat,
    decode_image,
    load_image,
)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def test_real_jpeg_decodes_to_rgb(cat_jpeg):
    image = decode_image(cat_jpeg)
    assert (image.mode, image.size) == ("RGB", (451, 300))


def test_reduced_scale_decoding_keeps_the_short_side(cat_jpeg):
    image = decode_image(cat_jpeg, min_size=73)
    assert image.mode == "RGB"
    assert min(image.size) >= 73
    assert image.size < (451, 300)


@pytest.mark.parametrize(
    ("image", "fmt", "expected"),
    [
        (Image.new("L", (8, 8), 100), "PNG", (100, 100, 100)),
        (Image.new("1", (8, 8), 1), "PNG", (255, 255, 255)),
        (Image.new("I;16", (8, 8), 65535), "PNG", (255, 255, 255)),
        (Image.new("I;16", (8, 8), 32896), "TIFF", (128, 128, 128)),
        (Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "PNG", (255, 255, 255)),
        (Image.new("RGBA", (8, 8), (10, 20, 30, 255)), "WEBP", (10, 20, 30)),
        (Image.new("LA", (8, 8), (0, 0)), "PNG", (255, 255, 255)),
        (Image.new("CMYK", (8, 8), (0, 255, 0, 0)), "JPEG", (255, 0, 255)),
        (Image.new("RGB", (8, 8), (200, 10, 10)), "BMP", (200, 10, 10)),
    ],
)
def test_every_mode_becomes_rgb(image, fmt, expected):
    decoded = decode_image(encode(image, fmt, **({"lossless": True} if fmt == "WEBP" else {})))
    assert decoded.mode == "RGB"
    assert decoded.getpixel((4, 4)) == pytest.approx(expected, abs=3)


def test_palette_with_transparency_is_composited_on_white():
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    decoded = decode_image(encode(palette, "PNG", transparency=0))
    assert decoded.getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    wide = Image.new("RGB", (40, 20), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    decoded = decode_image(encode(wide, "JPEG", exif=exif.tobytes()))
    assert decoded.size == (20, 40)


def test_animated_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(data).getpixel((4, 4)) == pytest.approx((255, 0, 0), abs=3)


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (b"", InvalidImage, "empty"),
        (b"just some text", InvalidImage, "cannot identify an image"),
        (encode(Image.new("RGB", (8, 8)), "ICO"), UnsupportedImageFormat, "ICO is not supported; accepted: BMP"),
        (encode(Image.new("RGB", (8, 8)), "TGA"), UnsupportedImageFormat, "TGA is not supported"),
    ],
)
def test_bad_bytes_are_refused(data, error, message):
    with pytest.raises(error, match=message):
        decode_image(data)


def test_truncated_jpeg_is_refused(cat_jpeg):
    with pytest.raises(InvalidImage, match="truncated or corrupt") as info:
        decode_image(cat_jpeg[: len(cat_jpeg) // 2])
    assert info.value.code == "invalid_image"  # app.errors maps it to 400


def test_too_many_pixels_is_refused_before_decoding(cat_jpeg):
    with pytest.raises(ImageTooLarge, match="451x300 = 135300 pixels; the limit is 100000") as info:
        decode_image(cat_jpeg, max_pixels=100_000)
    assert info.value.code == "image_too_large"  # app.errors maps it to 413


def test_decompression_bomb_is_refused_quickly():
    bomb = encode(Image.new("L", (20_000, 20_000)), "PNG")  # 400 Mpx in a few hundred KB
    assert len(bomb) < 1_000_000
    with pytest.raises(ImageTooLarge):
        decode_image(bomb)


def test_load_image_names_the_file(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"nope")
    with pytest.raises(InvalidImage, match="broken.jpg: cannot identify"):
        load_image(path)


def test_a_spent_decode_budget_makes_a_decode_wait_then_give_up(cat_jpeg):
    budget = DecodeBudget(1000)
    with budget.hold(1000), pytest.raises(DecodeBusy):  # not InvalidImage: the service answers 504, not 400
        decode_image(cat_jpeg, budget=budget, timeout=0.05)
    assert decode_image(cat_jpeg, budget=budget, timeout=0.05).size == (451, 300)  # alone, larger than the budget
    assert budget.used == 0


@pytest.mark.parametrize(("mode", "fmt", "top"), [("I;16", "PNG", 65535.0), ("F", "TIFF", 255.0), ("1", "PNG", 1.0)])
def test_strip_conversion_equals_converting_the_whole_image(mode, fmt, top):
    # 16-bit and float rows are scaled strip by strip; the result must equal scaling the whole image, then reducing.
    rows = np.linspace(0, top if mode != "F" else 200.0, 700 * 300).reshape(700, 300)
    source = Image.fromarray(rows.astype({"I;16": np.uint16, "F": np.float32, "1": bool}[mode]))
    data = encode(source if mode != "I;16" else source.convert("I;16"), fmt)
    decoded = decode_image(data, min_size=64)
    scale = 255.0 / (65535.0 if mode == "I;16" else 255.0)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("L") if mode == "1" else Image.open(io.BytesIO(data)))
    whole = Image.fromarray(
        np.clip(full.astype(np.float64) * (1 if mode == "1" else scale), 0, 255).round().astype(np.uint8)
    )
    expected = whole.reduce(min(whole.size) // 64).convert("RGB")
    assert decoded.size == expected.size and np.array_equal(np.asarray(decoded), np.asarray(expected))
