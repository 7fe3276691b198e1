"""The model handler, TorchServe style: preprocess (request thread), inference (batcher thread), postprocess."""

from __future__ import annotations

import logging

import torch

from app.config import ConfigError, Settings
from models.bundle import Bundle
from models.engine import Runtime
from models.images import decode_image
from models.transforms import eval_transform

log = logging.getLogger(__name__)


def resolve_device(settings: Settings) -> torch.device:
    """DEVICE and PRECISION as a usable torch.device; ConfigError when the machine cannot honour them."""
    name = settings.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"DEVICE={settings.device} but CUDA is not available here; use DEVICE=auto or cpu")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"DEVICE={settings.device} but only {torch.cuda.device_count()} CUDA device(s) exist")
    if settings.precision != "fp32" and device.type != "cuda":
        raise ConfigError(f"PRECISION={settings.precision} needs a CUDA device; the device is {device}")
    if settings.precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"PRECISION=bf16 is not supported by {torch.cuda.get_device_name(device)}")
    return device


class Classifier:
    """One bundle's model on one device, with its transform and labels prepared once."""

    def __init__(self, model: torch.nn.Module, bundle: Bundle, device: torch.device, precision: str, max_pixels: int):
        self.model = model
        self.device = device
        self.version = bundle.version
        self.class_names = tuple(bundle.class_names)
        self.crop = bundle.preprocess["crop"]
        self.min_size = bundle.preprocess["resize"]
        self.max_pixels = max_pixels
        self.transform = eval_transform(bundle.preprocess)
        # The training engine's runtime: same autocast and device placement as training and evaluation.
        amp = "none" if precision == "fp32" else precision
        self.runtime = Runtime(device, amp=amp, channels_last=device.type == "cuda")

    def preprocess(self, data: bytes) -> torch.Tensor:
        """Untrusted bytes -> normalised (3, crop, crop) float tensor; raises models.images.ImageError."""
        image = decode_image(data, self.max_pixels, min_size=self.min_size)
        return self.transform(image)

    def inference(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, classes) float32 probabilities on the CPU, in one forward pass."""
        with torch.inference_mode():
            with self.runtime.autocast():
                logits = self.model(self.runtime.to_device(batch))
            # Softmax in float32 whatever the autocast dtype, then one device->host copy per batch.
            return torch.softmax(logits.float(), dim=1).cpu()

    def postprocess(self, probs: torch.Tensor, top_k: int, include_probabilities: bool = True) -> dict:
        """One row of probabilities -> the prediction document."""
        values = probs.tolist()
        order = sorted(range(len(values)), key=values.__getitem__, reverse=True)
        best = order[0]
        result = {
            "predicted_class": self.class_names[best],
            "confidence": values[best],
            "top_k": [{"label": self.class_names[i], "probability": values[i]} for i in order[:top_k]],
            "model_version": self.version,
        }
        if include_probabilities:
            result["all_probabilities"] = dict(zip(self.class_names, values, strict=True))
        return result

    def warmup(self, batch_sizes: tuple[int, ...]) -> None:
        """Forward passes at the given batch sizes, so the first requests do not pay for lazy initialisation."""
        for size in batch_sizes:
            self.inference(torch.zeros(size, 3, self.crop, self.crop))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def build_classifier(settings: Settings, bundle: Bundle, device: torch.device) -> Classifier:
    """Size CPU threads and build the bundle's model on `device`: the slow part of start-up."""
    torch.set_num_threads(settings.torch_threads)
    model = bundle.build_model(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    # The model holds its own copy of the weights now; drop the bundle's to halve resident memory.
    bundle.state_dict = {}
    log.info("model %s (%s) on %s, precision %s", bundle.version, bundle.arch, device, settings.precision)
    return Classifier(model, bundle, device, settings.precision, settings.max_image_pixels)
