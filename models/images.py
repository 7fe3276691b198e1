"""Decode untrusted image bytes into RGB PIL images, the same way for training, evaluation and serving."""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000  # a 40-megapixel photo; anything larger is refused before decoding
ALLOWED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"})
_FORMATS = sorted(ALLOWED_FORMATS - {"MPO"})  # MPO files are opened by the JPEG plugin
Image.init()  # register every plugin now, so `formats=` below can name them all

_HIGH_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageError(ValueError):
    """An input that is not a usable image; `code` says which kind (the service maps it to a status)."""

    code = "invalid_image"


class InvalidImage(ImageError):
    """Not an image, an empty input, or a truncated or corrupt file."""


class ImageTooLarge(ImageError):
    """More pixels than allowed (a decompression bomb, or simply too large)."""

    code = "image_too_large"


class UnsupportedImageFormat(ImageError):
    """A real image, but in a format the service does not accept."""

    code = "unsupported_format"


def _identify(data: bytes) -> str | None:
    """The PIL format name of `data` when Pillow recognises it at all (reads the header only)."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            return probe.format
    except Exception:  # any parse failure means "not recognisable"
        return None


def _open(data: bytes) -> Image.Image:
    if not data:
        raise InvalidImage("the image is empty (0 bytes)")
    try:
        # Only allowed formats are parsed; e.g. EPS would otherwise shell out to Ghostscript.
        return Image.open(io.BytesIO(data), formats=_FORMATS)
    except Image.DecompressionBombError as error:
        raise ImageTooLarge(str(error)) from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        found = _identify(data)
        if found:
            raise UnsupportedImageFormat(
                f"image format {found} is not supported; accepted: {', '.join(sorted(ALLOWED_FORMATS))}"
            ) from error
        raise InvalidImage(f"cannot identify an image in the {len(data)} bytes received") from error


def _check_pixels(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    if width < 1 or height < 1:
        raise InvalidImage(f"image has no pixels ({width}x{height})")


def _high_bit_to_l(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale to 8-bit 'L' (PIL's own convert would clip, not scale)."""
    array = np.asarray(image, dtype=np.float64)
    top = 255.0 if array.max(initial=0.0) <= 255.0 else 65535.0
    return Image.fromarray(np.clip(array * (255.0 / top), 0, 255).round().astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: high-bit greyscale is scaled, transparency is composited on white."""
    if image.mode in _HIGH_BIT_MODES:
        image = _high_bit_to_l(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _orient(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block must not lose an otherwise good image
        return image


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int | None = None) -> Image.Image:
    """Bytes -> RGB image: first frame, EXIF orientation applied; raise an ImageError subclass on bad input."""
    # No close(): the source is an in-memory buffer, and closing would invalidate the returned image.
    image = _open(data)
    try:
        _check_pixels(image, max_pixels)
        if min_size and image.format in ("JPEG", "MPO"):
            # Reduced-scale DCT decoding: much faster for large photos, short side stays >= min_size.
            image.draft("RGB", (min_size, min_size))
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
        return to_rgb(_orient(image))
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageTooLarge(str(error)) from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise InvalidImage(f"the image is truncated or corrupt: {error}") from error


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int | None = None):
    """Read a file and decode it like `decode_image`; the error message names the file."""
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        return decode_image(data, max_pixels=max_pixels, min_size=min_size)
    except ImageError as error:
        raise type(error)(f"{path}: {error}") from error
