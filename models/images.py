"""Decode untrusted image bytes into RGB PIL images, the same way for training, evaluation and serving."""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import threading
import time
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000  # a 40-megapixel photo; anything larger is refused before decoding
ALLOWED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"})
_FORMATS = sorted(ALLOWED_FORMATS - {"MPO"})  # MPO files are opened by the JPEG plugin
Image.init()  # register every plugin now, so `formats=` below can name them all

_HIGH_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_REDUCIBLE = frozenset({"L", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "I", "F"})  # Image.reduce's
_STORAGE = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}  # bytes a pixel; others 4
_STRIP_BYTES = 1 << 20  # converted a strip of about this many decoded bytes at a time
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}  # fmt: skip


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


class DecodeBusy(Exception):  # not an OSError: decode_image reports those as corrupt images
    """The decode budget stayed spent by other decodes for longer than the caller would wait."""


class DecodeBudget:
    """Bytes of decoded pixels that the decodes of one process may hold at once (a counting semaphore in bytes)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._free = threading.Condition()

    @contextlib.contextmanager
    def hold(self, size: int, timeout: float | None = None) -> Iterator[None]:
        """Hold `size` bytes while the block runs; wait for them at most `timeout` s (DecodeBusy past that).

        A decode larger than the whole budget runs alone rather than never.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._free:
            while self.used and self.used + size > self.limit:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise DecodeBusy(f"{self.used} of {self.limit} decode bytes held by other requests")
                self._free.wait(left)
            self.used += size
        try:
            yield
        finally:
            if size >= TRIM_BYTES:
                release_freed_memory()  # before the next decode takes the bytes this one gave back
            with self._free:
                self.used -= size
                self._free.notify_all()


# glibc keeps the blocks a thread frees in that thread's malloc arena (up to 8 per core), where other threads'
# decodes cannot reuse them, so decodes that take turns under the budget would each add their own memory
# (docs/security.md has the measurement). Pillow allocates images in 16 MB blocks, below the worker's 64 MB mmap
# threshold, so they land in those arenas; malloc_trim returns the free pages of every arena.
TRIM_BYTES = 16 << 20
try:
    _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):  # not glibc: nothing to trim
    _malloc_trim = None


def release_freed_memory() -> None:
    """Give the pages malloc holds free in any arena back to the system (glibc; a no-op elsewhere)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


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


def storage_bytes(image: Image.Image) -> int:
    """Bytes Pillow holds for `image` decoded at its current size: 1 a pixel for 1/L/P, 2 for I;16, else 4."""
    width, height = image.size
    return width * height * _STORAGE.get(image.mode, 4)


def _scale_to_l(strip: Image.Image, top: float) -> Image.Image:
    """16/32-bit integer or float greyscale rows to 8-bit 'L', scaled from [0, top] (PIL's convert would clip)."""
    array = np.asarray(strip, dtype=np.float64)  # one strip, never the whole image; scaled in place
    array *= 255.0 / top
    np.clip(array, 0, 255, out=array)
    return Image.fromarray(np.round(array, out=array).astype(np.uint8), mode="L")


def _reducible(strip: Image.Image, top: float) -> Image.Image:
    """A strip in a mode Image.reduce takes, as few bytes a pixel as its content allows."""
    if strip.mode in _HIGH_BIT_MODES:
        return _scale_to_l(strip, top)
    if strip.mode == "1":
        return strip.convert("L")
    if strip.mode in ("P", "PA"):
        return strip.convert("RGBA" if strip.mode == "PA" or "transparency" in strip.info else "RGB")
    return strip if strip.mode in _REDUCIBLE else strip.convert("RGB")


def _shrink(image: Image.Image, factor: int) -> Image.Image:
    """`image` box-reduced by `factor` (1 = kept), high-bit modes scaled to 8 bits, without a full-size copy.

    Modes Image.reduce cannot take are converted strip by strip (strips are whole multiples of `factor` high,
    so the result equals reducing the whole converted image): the peak stays at the decoded image plus a
    few MB, where converting first cost 4-8 bytes a pixel more (a 16-bit 6324x6324 PNG: +0.9 GB, issue 21).
    """
    if image.mode in _REDUCIBLE and image.mode not in _HIGH_BIT_MODES:
        return image.reduce(factor) if factor > 1 else image
    top = 255.0
    if image.mode in _HIGH_BIT_MODES:
        top = 255.0 if (image.getextrema()[1] or 0) <= 255 else 65535.0  # getextrema reads in place, no copy
    width, height = image.size
    rows = max(1, _STRIP_BYTES // max(1, storage_bytes(image) // height) // factor) * factor
    out = None
    for y in range(0, height, rows):
        strip = _reducible(image.crop((0, y, width, min(y + rows, height))), top)
        strip = strip.reduce(factor) if factor > 1 else strip
        if out is None:
            out = Image.new(strip.mode, (-(-width // factor), -(-height // factor)))
        out.paste(strip, (0, y // factor))
    return out


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: high-bit greyscale is scaled, transparency is composited on white."""
    if image.mode in _HIGH_BIT_MODES or image.mode == "PA":
        image = _shrink(image, 1)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # a malformed EXIF block must not lose an otherwise good image
        return 1


def _orient(image: Image.Image, orientation: int) -> Image.Image:
    """The EXIF orientation (read from the source file) applied to `image`, as ImageOps.exif_transpose does."""
    method = _TRANSPOSE.get(orientation)
    return image if method is None else image.transpose(method)


def reduction(size: tuple[int, int], min_size: int | None) -> int:
    """The integer factor decoding divides a `size` image by: its short side stays >= min_size (1 = none)."""
    return max(1, min(size) // min_size) if min_size else 1


def decode_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int | None = None,
    budget: DecodeBudget | None = None,
    timeout: float | None = None,
) -> Image.Image:
    """Bytes -> RGB image: first frame, EXIF orientation applied; raise an ImageError subclass on bad input.

    With `min_size`, the image comes back box-reduced by an integer factor that keeps its short side >= min_size
    (JPEGs by reduced-scale DCT decoding), converted to RGB only at that size. Memory: the decoded file at its
    own mode (storage_bytes: at most 4 bytes a pixel) plus a few MB, held under `budget` when given (waiting at
    most `timeout` seconds for it; DecodeBusy past that).
    """
    # No close(): the source is an in-memory buffer, and closing would invalidate the returned image.
    image = _open(data)
    try:
        _check_pixels(image, max_pixels)
        if min_size and image.format in ("JPEG", "MPO"):
            # Reduced-scale DCT decoding: much faster for large photos, short side stays >= min_size.
            image.draft("RGB", (min_size, min_size))
        with budget.hold(storage_bytes(image), timeout) if budget else contextlib.nullcontext():
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image.load()
            orientation = _orientation(image)
            image = _shrink(image, reduction(image.size, min_size)) if min_size else image
        return to_rgb(_orient(image, orientation))
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageTooLarge(str(error)) from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise InvalidImage(f"the image is truncated or corrupt: {error}") from error


def fitted(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """`size` scaled down (never up) so that its long side is at most `max_side`, aspect kept."""
    width, height = size
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def decode_fitted(
    data: bytes, max_pixels: int, max_side: int, budget: DecodeBudget | None = None, timeout: float | None = None
) -> Image.Image:
    """Bytes -> RGB image of the file's size scaled down to fit `max_side` (for pictures shown back to people)."""
    image = _open(data)
    _check_pixels(image, max_pixels)
    width, height = fitted(_oriented_size(image), max_side)
    decoded = decode_image(data, max_pixels, min_size=min(width, height), budget=budget, timeout=timeout)
    return decoded if decoded.size == (width, height) else decoded.resize((width, height), Image.BILINEAR)


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    width, height = image.size
    return (height, width) if _orientation(image) in (5, 6, 7, 8) else (width, height)


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int | None = None):
    """Read a file and decode it like `decode_image`; the error message names the file."""
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        return decode_image(data, max_pixels=max_pixels, min_size=min_size)
    except ImageError as error:
        raise type(error)(f"{path}: {error}") from error
