"""The model handler, TorchServe style: preprocess (request thread), inference (batcher thread), postprocess."""

from __future__ import annotations

import logging

import torch

from app.config import ConfigError, Settings
from models.bundle import Bundle
from models.images import decode_image
from models.runtime import DeviceError, Runtime, precision_problem, resolve_device, top_k
from models.transforms import eval_transform

log = logging.getLogger(__name__)


def serving_device(settings: Settings) -> torch.device:
    """DEVICE and PRECISION as a usable torch.device; ConfigError when the machine cannot honour them."""
    try:
        device = resolve_device(settings.device)
    except DeviceError as error:
        raise ConfigError(f"DEVICE={settings.device} is not usable: {error}") from error
    problem = precision_problem(settings.precision, device)
    if problem:
        raise ConfigError(f"PRECISION={settings.precision} on {device}: {problem}")
    return device


class Classifier:
    """One bundle's model on one device, with its transform and labels prepared once."""

    def __init__(self, model: torch.nn.Module, bundle: Bundle, runtime: Runtime, max_pixels: int):
        self.model = model
        self.runtime = runtime
        self.device = runtime.device
        self.version = bundle.version
        self.class_names = tuple(bundle.class_names)
        self.crop = bundle.preprocess["crop"]
        self.min_size = bundle.preprocess["resize"]
        self.max_pixels = max_pixels
        self.transform = eval_transform(bundle.preprocess)

    def preprocess(self, data: bytes) -> torch.Tensor:
        """Untrusted bytes -> normalised (3, crop, crop) float tensor; raises models.images.ImageError."""
        image = decode_image(data, self.max_pixels, min_size=self.min_size)
        return self.transform(image)

    def inference(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, classes) float32 probabilities on the CPU, in one forward pass."""
        return self.runtime.probabilities(self.model, batch)

    def postprocess(self, probs: torch.Tensor, k: int, include_probabilities: bool = True) -> dict:
        """One row of probabilities -> the prediction document."""
        values = probs.tolist()
        ranked = top_k(values, self.class_names, k)
        result = {
            "predicted_class": ranked[0]["label"],
            "confidence": ranked[0]["probability"],
            "top_k": ranked,
            "model_version": self.version,
        }
        if include_probabilities:
            result["all_probabilities"] = dict(zip(self.class_names, values, strict=True))
        return result

    def warmup(self, batch_sizes: tuple[int, ...]) -> None:
        """Forward passes at the given batch sizes, so the first requests do not pay for lazy initialisation."""
        for size in batch_sizes:
            self.inference(torch.zeros(size, 3, self.crop, self.crop))
        self.runtime.synchronize()


def build_classifier(settings: Settings, bundle: Bundle, device: torch.device) -> Classifier:
    """Size CPU threads and build the bundle's model on `device`: the slow part of start-up."""
    torch.set_num_threads(settings.torch_threads)
    amp = "none" if settings.precision == "fp32" else settings.precision
    runtime = Runtime(device, amp=amp, channels_last=device.type == "cuda")
    model = runtime.place(bundle.build_model(device))
    # The model holds its own copy of the weights now; drop the bundle's to halve resident memory.
    bundle.state_dict = {}
    log.info("model %s (%s) on %s, precision %s", bundle.version, bundle.arch, device, settings.precision)
    return Classifier(model, bundle, runtime, settings.max_image_pixels)
