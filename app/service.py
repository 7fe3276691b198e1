"""One worker's serving state: loads and warms the model in the background, owns the batcher, knows readiness."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time

import torch
from flask import Flask

from app.batching import BatcherStopped, DeadlineExceeded, MicroBatcher, QueueFull
from app.config import Settings
from app.errors import ApiError
from app.inference import Classifier, build_classifier
from app.metrics import Metrics
from app.schemas import PredictQuerySchema
from models.bundle import Bundle
from models.images import ImageError

log = logging.getLogger(__name__)
EXTENSION = "petclf"  # the Service's key in app.extensions


def get_service(app: Flask) -> Service:
    """The Service of an app built by create_app (routes, gunicorn hooks and tests use it)."""
    return app.extensions[EXTENSION]


class Service:
    """Model, batcher and health of one worker process."""

    def __init__(self, settings: Settings, bundle: Bundle, device: torch.device, metrics: Metrics):
        self.settings = settings
        self.bundle = bundle
        self.device = device
        self.metrics = metrics
        self.query_schema = PredictQuerySchema(num_classes=len(bundle.class_names))
        self.classifier: Classifier | None = None
        self.batcher: MicroBatcher | None = None
        self.load_error: str | None = None
        self.warmed = threading.Event()
        self.draining = threading.Event()
        self._loader = threading.Thread(target=self._load, name="model-loader", daemon=True)

    def start(self) -> Service:
        """Load and warm up in the background: the worker answers /livez and /readyz meanwhile."""
        self._loader.start()
        return self

    def _load(self) -> None:
        settings = self.settings
        try:
            classifier = build_classifier(settings, self.bundle, self.device)
            started = time.perf_counter()
            classifier.warmup(tuple(sorted({1, settings.max_batch_size})))
            log.info("warm-up done in %.2fs", time.perf_counter() - started)
            self.batcher = MicroBatcher(
                classifier.inference,
                max_batch_size=settings.max_batch_size,
                max_wait_s=settings.max_batch_wait_ms / 1000,
                max_queue=settings.max_queue,
                observer=self.metrics,
            ).start()
            self.classifier = classifier
            self.metrics.set_model(self.bundle.version, self.bundle.arch, str(classifier.device))
            self.warmed.set()
        except Exception as error:  # reported by /readyz; the worker stays alive to say why
            log.exception("loading the model failed")
            self.load_error = f"{type(error).__name__}: {error}"

    def wait_ready(self, timeout: float) -> bool:
        """Block until loaded and warmed up (tests and tools); False on timeout or load failure."""
        self._loader.join(timeout)
        return not self.reasons()

    def reasons(self) -> list[str]:
        """Why this worker is not ready; empty when it is."""
        reasons = []
        if self.load_error:
            reasons.append(f"model failed to load: {self.load_error}")
        elif not self.warmed.is_set():
            reasons.append("model loading and warming up")
        elif self.batcher is None or not self.batcher.alive:
            reasons.append("batcher thread is not running")
        if self.draining.is_set():
            reasons.append("worker is draining (shutting down)")
        return reasons

    def drain(self) -> None:
        """Stop reporting ready; in-flight and queued requests still finish."""
        if not self.draining.is_set():
            log.info("draining: /readyz answers 503 from now on; in-flight requests finish")
        self.draining.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Drain, wait for the loader, finish queued work and end the batcher thread."""
        self.drain()
        self._loader.join(timeout)
        if self.batcher is not None:
            self.batcher.stop(timeout)

    # Prediction: preprocess -> batch -> postprocess -> metrics

    def predict(self, images: list[bytes], top_k: int, include_probabilities: bool = True) -> list[dict]:
        """Image bytes -> prediction documents, in order; raises ApiError (not ready, full, timeout) or ImageError."""
        rows = self.probabilities(images)
        return [self.classifier.postprocess(probs, top_k, include_probabilities) for probs in rows]

    def probabilities(self, images: list[bytes]) -> torch.Tensor:
        """Image bytes -> (N, classes) probabilities in order, counted as predictions; raises ApiError or ImageError."""
        classifier, batcher = self._ready()
        return self._counted(self._compute(batcher, self._preprocess(classifier, images)))

    def pixel_probabilities(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed (N, 3, crop, crop) float32 pixels -> (N, classes) probabilities, counted; raises ApiError."""
        _, batcher = self._ready()
        self._check_pixels(pixels)
        return self._counted(self._compute(batcher, list(pixels)))

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        crop = self.bundle.preprocess["crop"]
        expected = [3, crop, crop]
        if pixels.dtype != torch.float32:
            raise ApiError("invalid_tensor", f"pixels must be float32, got {str(pixels.dtype).removeprefix('torch.')}")
        if pixels.dim() != 4 or list(pixels.shape[1:]) != expected or not len(pixels):
            raise ApiError(
                "invalid_tensor",
                f"pixels must have shape [N, 3, {crop}, {crop}] with N >= 1 (the bundle's preprocess: "
                f"resize {self.bundle.preprocess['resize']}, centre crop {crop}, normalised), got {list(pixels.shape)}",
            )
        if not torch.isfinite(pixels).all():
            raise ApiError("invalid_tensor", "pixels must be finite numbers (no NaN or infinity)")

    def _counted(self, rows: list[torch.Tensor]) -> torch.Tensor:
        probs = torch.stack(rows)
        for index in probs.argmax(dim=1).tolist():  # the first maximum, as top_k's ranking breaks ties
            self.metrics.predicted(self.bundle.class_names[index])
        return probs

    def _ready(self) -> tuple[Classifier, MicroBatcher]:
        # A draining worker still predicts: requests already on their way must be answered.
        classifier, batcher = self.classifier, self.batcher
        if not self.warmed.is_set() or classifier is None or batcher is None or not batcher.alive:
            raise ApiError("not_ready", "; ".join(self.reasons()) or "the batcher stopped")
        return classifier, batcher

    @staticmethod
    def _preprocess(classifier: Classifier, images: list[bytes]) -> list[torch.Tensor]:
        if len(images) == 1:
            return [classifier.preprocess(images[0])]
        tensors = []
        for index, data in enumerate(images):
            try:
                tensors.append(classifier.preprocess(data))
            except ImageError as error:
                raise type(error)(f"image {index}: {error}") from error
        return tensors

    def _submit_all(self, batcher: MicroBatcher, tensors: list[torch.Tensor]) -> list[concurrent.futures.Future]:
        futures = []
        try:
            for tensor in tensors:
                futures.append(batcher.submit(tensor, self.settings.request_timeout_s))
        except (QueueFull, BatcherStopped) as error:
            for future in futures:
                future.cancel()
            raise ApiError("queue_full" if isinstance(error, QueueFull) else "not_ready", str(error)) from error
        return futures

    def _compute(self, batcher: MicroBatcher, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Probabilities for each tensor, computed by the batcher within REQUEST_TIMEOUT_S."""
        futures = self._submit_all(batcher, tensors)
        deadline = time.monotonic() + self.settings.request_timeout_s
        try:
            return [future.result(timeout=max(0.0, deadline - time.monotonic())) for future in futures]
        except (concurrent.futures.TimeoutError, DeadlineExceeded) as error:
            limit = self.settings.request_timeout_s
            raise ApiError("timeout", f"no result within REQUEST_TIMEOUT_S={limit}s") from error
        except BatcherStopped as error:
            raise ApiError("not_ready", str(error)) from error
        finally:
            for future in futures:
                future.cancel()  # no-op for finished ones; queued ones are skipped, not computed

    def model_info(self) -> dict:
        """The served model and the serving settings (GET /model)."""
        settings, bundle = self.settings, self.bundle
        return {
            "version": bundle.version,
            "arch": bundle.arch,
            "head": bundle.head,
            "class_names": bundle.class_names,
            "num_classes": len(bundle.class_names),
            "preprocess": bundle.preprocess,
            "metrics": bundle.metrics,
            "device": str(self.device),
            "precision": settings.precision,
            "ready": not self.reasons(),
            "batching": {
                "max_batch_size": settings.max_batch_size,
                "max_batch_wait_ms": settings.max_batch_wait_ms,
                "max_queue": settings.max_queue,
                "request_timeout_s": settings.request_timeout_s,
                "max_batch_files": settings.max_batch_files,
            },
        }
