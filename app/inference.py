"""The request handler, TorchServe style: preprocess (request thread), inference (batcher thread), postprocess.

The pre- and post-processing layer of the service; app/service.py is the concurrency layer around it (deadlines,
batcher, readiness, the explain gate) and knows nothing of pixels or labels.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from app.config import ConfigError, Settings
from app.preflight import chosen_backends
from models.ensemble import Ensemble
from models.explain import OVERLAY_MAX_SIDE, grad_cam, overlay, png_bytes
from models.images import DecodeBudget, ImageError, decode_fitted, decode_image
from models.loader import load_predictor
from models.onnx_runtime import OnnxNetwork
from models.predictor import Output, Predictor, top_k
from models.runtime import DeviceError, precision_problem, resolve_device
from models.transforms import eval_transform, mirrored

log = logging.getLogger(__name__)


def serving_device(settings: Settings) -> torch.device:
    """DEVICE and PRECISION as a usable torch.device; ConfigError when the machine cannot honour them."""
    try:
        device = resolve_device(settings.device, mps=False)  # as DEVICE refuses mps, auto never picks it
    except DeviceError as error:
        raise ConfigError(f"DEVICE={settings.device} is not usable: {error}") from error
    problem = precision_problem(settings.precision, device)
    if problem:
        raise ConfigError(f"PRECISION={settings.precision} on {device}: {problem}")
    if settings.gpu_decode and device.type != "cuda":
        raise ConfigError(f"GPU_DECODE=true needs a CUDA device, and DEVICE={settings.device} is {device}")
    return device


def seconds_left(deadline: float | None) -> float | None:
    """Seconds before `deadline` (time.monotonic()), None without one; TimeoutError once it has passed."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the request's deadline has passed")
    return left


class Handler:
    """The served model (one bundle or an ensemble) on one device, with its transform and labels prepared once.

    `explainer` is the PyTorch float32 predictor /explain differentiates: the served one where that is PyTorch
    fp32, else the members' float32 networks (int8 networks and ONNX Runtime sessions have no gradients).
    """

    def __init__(
        self,
        predictor: Predictor,
        ensemble: Ensemble,
        max_pixels: int,
        explainer: Predictor | None = None,
        budget: DecodeBudget | None = None,
    ):
        self.predictor = predictor
        self.explainer = explainer or predictor
        self.runtime = predictor.runtime
        self.device = predictor.runtime.device
        self.version = ensemble.version
        self.class_names = tuple(ensemble.class_names)
        self.preprocess_config = ensemble.preprocess
        self.crop = ensemble.preprocess["crop"]
        self.min_size = ensemble.preprocess["resize"]
        self.max_pixels = max_pixels
        self.budget = budget  # decoded bytes all request threads may hold at once (DECODE_BUDGET_MB)
        self.transform = eval_transform(ensemble.preprocess)
        self.normalize = self.transform.normalize.to(self.device)  # a copy on the device the batch is stacked on
        self.decoder = None  # set by build_handler when GPU_DECODE is on
        self.members: tuple[dict, ...] = tuple({} for _ in ensemble.bundles)  # set by build_handler
        # ONNX Runtime takes contiguous NCHW; PyTorch's folded networks run channels-last.
        self.channels_last = self.runtime.channels_last
        self.onnx_only = all(isinstance(m.model, OnnxNetwork) for m in predictor.members)

    def preprocess(self, data: bytes, tta: str = "none", timeout: float | None = None) -> list[torch.Tensor]:
        """Untrusted bytes -> uint8 (3, crop, crop) pixels, one per view (the mirror too for tta 'flip').

        Runs in request threads: PIL and numpy only, no torch kernel, so no OpenMP team competes with the
        batcher's (or on the GPU with GPU_DECODE). Raises models.images.ImageError, or DecodeBusy when the
        worker's DECODE_BUDGET_MB stays spent for `timeout` seconds.
        """
        pixels = None if self.decoder is None else self.decoder(data)  # None: not a JPEG, PIL decodes it
        if pixels is None:
            image = decode_image(data, self.max_pixels, self.min_size, self.budget, timeout)
            pixels = self.transform.pixels(image)
        return [pixels] if tta == "none" else [pixels, mirrored(pixels)]

    def preprocess_all(
        self, images: list[bytes], tta: str = "none", deadline: float | None = None
    ) -> list[list[torch.Tensor]]:
        """Each image's views (`preprocess`); the ImageError of a batch names the image's position.

        `deadline` (time.monotonic()) bounds each decode's wait; TimeoutError once it has passed.
        """
        views = []
        for index, data in enumerate(images):
            try:
                views.append(self.preprocess(data, tta, seconds_left(deadline)))
            except ImageError as error:
                if len(images) == 1:
                    raise
                raise type(error)(f"image {index}: {error}") from error
        return views

    def collate(self, items: list[torch.Tensor]) -> torch.Tensor:
        """The batcher's items -> one normalised float batch on the device: uint8 pixels are normalised once per
        batch (in the batcher thread), float items (already normalised, e.g. /v2 pixels) are taken as they are."""
        items = [item.to(self.device) for item in items]  # no-ops on the CPU
        if all(item.dtype == torch.uint8 for item in items) and not self.channels_last:
            return self.normalize(torch.stack(items))
        if all(item.dtype == torch.uint8 for item in items):
            # Stacked as (B, H, W, 3): the batch is channels-last from the start, as the network runs it.
            return self.normalize(torch.stack([item.permute(1, 2, 0) for item in items]).permute(0, 3, 1, 2))
        return torch.stack([self.normalize(item) if item.dtype == torch.uint8 else item for item in items])

    def inference(self, batch: torch.Tensor) -> Output:
        """(B, 3, H, W) -> calibrated probabilities and OOD scores on the CPU: one forward pass per member."""
        return self.predictor(batch)

    def postprocess(self, output: Output, k: int, include_probabilities: bool = True) -> dict:
        """One image's Output (its views already averaged) -> the prediction document (PredictionSchema); the
        service counts predicted_class and unknown from it, so each is computed once."""
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

    def explain(self, data: bytes, class_name: str | None, k: int, deadline: float | None = None) -> tuple[bytes, dict]:
        """Untrusted bytes -> (PNG of the Grad-CAM heat over the image, fitted to OVERLAY_MAX_SIDE, the prediction
        document); TimeoutError between its steps once `deadline` (time.monotonic()) has passed."""
        # Exactly what /predict computes on.
        tensor = self.collate(self.preprocess(data, timeout=seconds_left(deadline)))[0]
        class_index = None if class_name is None else self.class_names.index(class_name)
        heat, output = grad_cam(self.explainer, tensor, class_index)
        # The picture is decoded again, at most OVERLAY_MAX_SIDE pixels long: never the full original.
        picture = decode_fitted(data, self.max_pixels, OVERLAY_MAX_SIDE, self.budget, seconds_left(deadline))
        result = self.postprocess(output, k)
        result["explained_class"] = class_name or result["predicted_class"]
        seconds_left(deadline)
        return png_bytes(overlay(picture, heat, self.preprocess_config)), result

    def warmup(self, batch_sizes: tuple[int, ...]) -> None:
        """Forward passes at the given batch sizes, so the first requests do not pay for lazy initialisation."""
        self.predictor.warmup(batch_sizes, self.crop)

    def member_info(self) -> list[dict]:
        """Per member, what serves it: backend, precision, graph (or int8 file), recorded agreement, and why; file
        names, not the server's paths."""
        return [_names_only(member) for member in self.members]


def _names_only(value):
    """`value` with every absolute path's folder dropped (GET /model shows names, not the server's layout)."""
    if isinstance(value, dict):
        return {key: _names_only(item) for key, item in value.items()}
    if isinstance(value, str) and "/" in value:
        return " ".join(_file_name(word) for word in value.split(" "))
    return value


def _file_name(word: str) -> str:
    """'/srv/models/pet.pt:onnxruntime/int8' -> 'pet.pt:onnxruntime/int8'; an entry name ('onnxruntime/fp32') stays."""
    path, colon, entry = word.partition(":")
    if "/" in path and (path.startswith("/") or "." in path.rsplit("/", 1)[1]):
        path = os.path.basename(path)
    return f"{path}{colon}{entry}"


def build_handler(settings: Settings, ensemble: Ensemble, device: torch.device) -> Handler:
    """Build every member's model on `device` through the one loader (the slow part of start-up); ONNX Runtime
    sessions open in the batcher thread at warm-up with TORCH_THREADS intra-op threads."""
    chosen = chosen_backends(settings)  # BACKEND=auto's runtimes, measured once before gunicorn forked this worker
    loaded = load_predictor(ensemble, device, settings.precision, settings.backend, settings.torch_threads, chosen)
    for bundle in ensemble.bundles:
        # The models hold their own copy of the weights now; drop the bundles' to halve resident memory.
        bundle.state_dict = {}
    runtimes = [f"{b.path} by {m['backend']} {m['precision']} ({m['reason']})" for b, m in
                zip(ensemble.bundles, loaded.members, strict=True)]  # fmt: skip
    log.info("model %s (%s) on %s, BACKEND=%s: %s", ensemble.version, ensemble.arch, device, settings.backend,
             "; ".join(runtimes))  # fmt: skip
    budget = DecodeBudget(settings.decode_budget_bytes)
    handler = Handler(loaded.predictor, ensemble, settings.max_image_pixels, loaded.floats, budget)
    handler.members = loaded.members
    if settings.gpu_decode:
        from app.gpu_decode import GpuDecoder

        handler.decoder = GpuDecoder(ensemble.preprocess, device, settings.max_image_pixels)
    return handler
