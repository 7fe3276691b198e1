"""The model handler, TorchServe style: preprocess (request thread), inference (batcher thread), postprocess."""

from __future__ import annotations

import logging

import torch

from app.config import ConfigError, Settings
from models.ensemble import Ensemble
from models.explain import grad_cam, overlay, png_bytes
from models.images import decode_image
from models.predictor import Output, Predictor
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
    """The served model (one bundle or an ensemble) on one device, with its transform and labels prepared once."""

    def __init__(self, predictor: Predictor, ensemble: Ensemble, max_pixels: int):
        self.predictor = predictor
        self.runtime = predictor.runtime
        self.device = predictor.runtime.device
        self.version = ensemble.version
        self.class_names = tuple(ensemble.class_names)
        self.preprocess_config = ensemble.preprocess
        self.crop = ensemble.preprocess["crop"]
        self.min_size = ensemble.preprocess["resize"]
        self.max_pixels = max_pixels
        self.transform = eval_transform(ensemble.preprocess)

    def preprocess(self, data: bytes) -> torch.Tensor:
        """Untrusted bytes -> normalised (3, crop, crop) float tensor; raises models.images.ImageError."""
        image = decode_image(data, self.max_pixels, min_size=self.min_size)
        return self.transform(image)

    def inference(self, batch: torch.Tensor) -> Output:
        """(B, 3, H, W) -> calibrated probabilities and OOD scores on the CPU: one forward pass per member."""
        return self.predictor(batch)

    def postprocess(self, output: Output, k: int, include_probabilities: bool = True) -> dict:
        """One image's Output (its views already averaged) -> the prediction document."""
        values = output.probs[0].tolist()
        ranked = top_k(values, self.class_names, k)
        score = None if output.ood_scores is None else output.ood_scores[0].item()
        result = {
            "predicted_class": ranked[0]["label"],
            "confidence": ranked[0]["probability"],
            "top_k": ranked,
            "unknown": self.predictor.is_unknown(score),
            "ood_score": score,
            "model_version": self.version,
        }
        if include_probabilities:
            result["all_probabilities"] = dict(zip(self.class_names, values, strict=True))
        return result

    def explain(self, data: bytes, class_name: str | None, k: int) -> tuple[bytes, dict]:
        """Untrusted bytes -> (PNG of the Grad-CAM heat over the image at its own size, the prediction document)."""
        tensor = self.preprocess(data)  # exactly what /predict computes on
        picture = decode_image(data, self.max_pixels)  # full resolution, for the overlay
        class_index = None if class_name is None else self.class_names.index(class_name)
        heat, output = grad_cam(self.predictor, tensor, class_index)
        result = self.postprocess(output, k)
        result["explained_class"] = class_name or result["predicted_class"]
        return png_bytes(overlay(picture, heat, self.preprocess_config)), result

    def warmup(self, batch_sizes: tuple[int, ...]) -> None:
        """Forward passes at the given batch sizes, so the first requests do not pay for lazy initialisation."""
        self.predictor.warmup(batch_sizes, self.crop)


def build_classifier(settings: Settings, ensemble: Ensemble, device: torch.device) -> Classifier:
    """Size CPU threads and build every member's model on `device`: the slow part of start-up."""
    torch.set_num_threads(settings.torch_threads)
    amp = "none" if settings.precision == "fp32" else settings.precision
    runtime = Runtime(device, amp=amp, channels_last=device.type == "cuda")
    predictor = Predictor.from_ensemble(ensemble, runtime)
    for bundle in ensemble.bundles:
        # The model holds its own copy of the weights now; drop the bundle's to halve resident memory.
        bundle.state_dict = {}
    log.info("model %s (%s) on %s, precision %s", ensemble.version, ensemble.arch, device, settings.precision)
    return Classifier(predictor, ensemble, settings.max_image_pixels)
