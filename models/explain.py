"""Grad-CAM explanations: which part of the image drove a class's score, drawn over the image.

The network is split at a convolutional stage: the trunk runs without gradients, the rest runs with a
gradient to that stage's feature map only. No hooks are registered and no weights are copied or changed,
so the serving model can keep answering /predict from the batcher thread at the same time.
"""

from __future__ import annotations

import io
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from models.predictor import MemberOutput, Output, Predictor
from models.transforms import crop_box

FAMILIES = ("resnet", "mobilenet", "efficientnet", "convnext")  # what the split below knows
# The deepest stage whose map is at least this wide is explained: at 224 pixels that is the last stage (7x7),
# where Grad-CAM is usually shown; small inputs fall back to a wider stage. Measured on the 64-pixel demo model
# (its 27 correctly classified validation images; mean heat on the shape's box / elsewhere in the crop):
# 2x2 last stage: median 1.24, hotter on the shape for 78%; 4x4: 2.60, 96%; 8x8: 1.80, 78%.
MIN_MAP_SIZE = 4
HEAT_ALPHA = 0.6  # opacity of the hottest pixels over the image
# The overlay's long side at most: the picture is decoded fitted to this, never at its full size. The blend costs
# about 40 bytes a pixel (float32 planes): 40 MB at 1024x1024, where a 6324x6324 original cost 2.4 GB (issue 21).
OVERLAY_MAX_SIDE = 1024


class ExplainError(ValueError):
    """The model cannot be explained (an architecture this module does not know how to split)."""


@dataclass(frozen=True)
class Stages:
    """A PetClassifier as convolutional stages, then `finish` (pool, flatten, the backbone's remaining layers)."""

    stages: list[nn.Module]
    finish: Callable[[torch.Tensor], torch.Tensor]
    head: nn.Module


_STAGES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> Stages, built once per model


def stages_of(model: nn.Module) -> Stages:
    """The stages of a PetClassifier over a ResNet, MobileNet, EfficientNet or ConvNeXt backbone (cached)."""
    if model not in _STAGES:
        _STAGES[model] = _split(model)
    return _STAGES[model]


def _split(model: nn.Module) -> Stages:
    backbone = getattr(model, "backbone", None)
    if backbone is not None and hasattr(backbone, "layer4"):
        b = backbone
        stem = nn.Sequential(b.conv1, b.bn1, b.relu, b.maxpool, b.layer1)
        return Stages([stem, b.layer2, b.layer3, b.layer4], lambda x: b.fc(torch.flatten(b.avgpool(x), 1)), model.head)
    if backbone is not None and isinstance(getattr(backbone, "features", None), nn.Sequential):
        b = backbone
        # ConvNeXt's classifier starts with a LayerNorm2d on the pooled map and flattens itself.
        flattens = any(isinstance(m, nn.Flatten) for m in b.classifier.modules())
        pool = b.avgpool if hasattr(b, "avgpool") else nn.AdaptiveAvgPool2d(1)

        def finish(x: torch.Tensor) -> torch.Tensor:
            pooled = pool(x)
            return b.classifier(pooled if flattens else torch.flatten(pooled, 1))

        return Stages(list(b.features.children()), finish, model.head)
    arch = getattr(model, "arch", type(model).__name__)
    raise ExplainError(f"Grad-CAM does not support {arch}; supported families: {', '.join(FAMILIES)}")


def _target_stage(maps: list[torch.Tensor]) -> int:
    """The deepest stage with a spatial map at least MIN_MAP_SIZE wide (else the widest)."""
    wide = [i for i, m in enumerate(maps) if m.ndim == 4 and min(m.shape[-2:]) >= MIN_MAP_SIZE]
    if wide:
        return wide[-1]
    return max(range(len(maps)), key=lambda i: min(maps[i].shape[-2:]) if maps[i].ndim == 4 else 0)


@dataclass
class _Graph:
    """One member's forward pass from the explained stage on, with the gradient path kept."""

    activation: torch.Tensor
    logits: torch.Tensor
    features: torch.Tensor


def _forward_with_graph(model: nn.Module, image: torch.Tensor) -> _Graph:
    """Trunk without gradients, then the rest with a gradient path back to the explained stage's map only."""
    parts = stages_of(model)
    maps, x = [], image
    with torch.no_grad():
        for stage in parts.stages:
            x = stage(x)
            maps.append(x)
    target = _target_stage(maps)
    activation = maps[target].detach().float().requires_grad_(True)
    with torch.enable_grad():
        x = activation
        for stage in parts.stages[target + 1 :]:
            x = stage(x)
        features = parts.finish(x)
        return _Graph(activation, parts.head(features).float(), features)


def _cam(graph: _Graph, class_index: int, temperature: float, size: tuple[int, int]) -> torch.Tensor:
    """Grad-CAM of one member for the class, upsampled to `size` and scaled to [0, 1]."""
    with torch.enable_grad():
        (gradient,) = torch.autograd.grad(graph.logits[0, class_index] / temperature, graph.activation)
    weights = gradient.mean(dim=(2, 3), keepdim=True)  # Grad-CAM: a channel's weight is its mean gradient
    cam = torch.relu((weights * graph.activation.detach()).sum(dim=1, keepdim=True))
    heat = nn.functional.interpolate(cam, size=size, mode="bilinear", align_corners=False)[0, 0].clamp(min=0).cpu()
    peak = heat.max()
    return heat / peak if peak > 0 else heat


def grad_cam(predictor: Predictor, image: torch.Tensor, class_index: int | None = None) -> tuple[np.ndarray, Output]:
    """(3, H, W) normalised image -> (heat (H, W) in [0, 1], the prediction); class None = the predicted class.

    One forward pass per member. The prediction is the predictor's own combination (calibrated, averaged,
    with the OOD score) of those passes; an ensemble's heat is the mean of its members' [0, 1] maps.
    """
    batch = predictor.runtime.to_device(image[None])
    graphs = [_forward_with_graph(member.model, batch) for member in predictor.members]
    prediction = predictor.combine([MemberOutput(g.logits.detach(), g.features.detach().float()) for g in graphs])
    if class_index is None:
        class_index = int(prediction.probs[0].argmax())
    heats = [
        _cam(graph, class_index, member.temperature, tuple(image.shape[-2:]))
        for graph, member in zip(graphs, predictor.members, strict=True)
    ]
    return torch.stack(heats).mean(dim=0).numpy(), prediction


def colormap(heat: np.ndarray) -> np.ndarray:
    """[0, 1] heat -> RGB floats in [0, 1], blue (cold) through green and yellow to red (hot), like 'jet'."""
    h = np.clip(heat, 0.0, 1.0)[..., None]
    red = np.clip(1.5 - np.abs(4 * h - 3), 0, 1)
    green = np.clip(1.5 - np.abs(4 * h - 2), 0, 1)
    blue = np.clip(1.5 - np.abs(4 * h - 1), 0, 1)
    return np.concatenate([red, green, blue], axis=-1)


def full_heat(heat: np.ndarray, size: tuple[int, int], box: tuple[float, float, float, float]) -> np.ndarray:
    """The crop's heat placed over an image of `size` (width, height); zero outside the crop."""
    width, height = size
    left, top, right, bottom = (round(v) for v in box)
    out = np.zeros((height, width), dtype=np.float32)
    if right <= left or bottom <= top:
        return out
    patch = Image.fromarray(heat.astype(np.float32)).resize((right - left, bottom - top), Image.BILINEAR)
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(right, width), min(bottom, height)
    out[y0:y1, x0:x1] = np.asarray(patch)[y0 - top : y1 - top, x0 - left : x1 - left]
    return out


def overlay(image: Image.Image, heat: np.ndarray, preprocess: dict) -> Image.Image:
    """The image (RGB, its own size) with the crop's heat blended over it: hot = opaque colour, cold = the image."""
    full = full_heat(heat, image.size, crop_box(image.size, preprocess))
    alpha = (HEAT_ALPHA * full)[..., None]
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    blended = pixels * (1 - alpha) + colormap(full) * alpha
    return Image.fromarray((blended * 255).round().astype(np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    """The image as PNG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
