"""GPU_DECODE=true: JPEGs decoded by nvJPEG on the serving GPU and resized there (CUDA only, off by default).

For GPU hosts whose CPUs cannot decode as fast as the GPU classifies. The geometry is the eval transform's
(models.transforms.resized_size, then torchvision's CenterCrop); the resampling is torch's antialiased resize, so
pixels may differ from the PIL path by a few intensity levels: not bit-equal to training's validation.
"""

from __future__ import annotations

import io

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from models.images import ImageTooLarge
from models.transforms import INTERPOLATIONS, resized_size

ORIENTATION = 0x0112  # EXIF tag; anything but 1 (upright) goes through PIL, which applies it


class GpuDecoder:
    """JPEG bytes -> uint8 (3, crop, crop) pixels on the GPU, or None for what the PIL path should take."""

    def __init__(self, preprocess: dict, device: torch.device, max_pixels: int):
        if device.type != "cuda":
            raise ValueError(f"GPU_DECODE needs a CUDA device, not {device}")
        self.preprocess, self.device, self.max_pixels = dict(preprocess), device, max_pixels
        self.interpolation = INTERPOLATIONS[preprocess["interpolation"]]

    def __call__(self, data: bytes) -> torch.Tensor | None:
        """None (PIL decodes it) for non-JPEGs, rotated, small, CMYK or progressive-refused ones; header read only."""
        try:
            with Image.open(io.BytesIO(data), formats=["JPEG"]) as header:  # parses the header, decodes nothing
                size, mode, orientation = header.size, header.mode, header.getexif().get(ORIENTATION, 1)
        except Exception:  # not a JPEG (or a broken one): the PIL path decides and reports
            return None
        if mode not in ("RGB", "L") or orientation != 1 or min(size) < self.preprocess["resize"]:
            return None
        if size[0] * size[1] > self.max_pixels:
            raise ImageTooLarge(f"{size[0]}x{size[1]} pixels exceed MAX_IMAGE_PIXELS={self.max_pixels}")
        try:
            encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            image = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return None  # nvJPEG refused it: PIL decodes it
        width, height = resized_size(*size, self.preprocess["resize"])
        image = F.resize(image, [height, width], interpolation=self.interpolation, antialias=True)
        return F.center_crop(image, [self.preprocess["crop"]] * 2)
