"""Decoding untrusted image bytes: every mode to RGB, orientation, frames, and clean refusals."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from models.images import (
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
