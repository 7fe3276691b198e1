"""One worker's serving state: loads and warms the model before the worker takes requests, owns the batcher."""

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
        self.draining = threading.Event()

    def start(self) -> Service:
        """Build the model, warm it up and start the batcher, synchronously; raises when any of it fails.

        Synchronous on purpose: create_app returns only when this worker can predict, so gunicorn's worker
        enters its accept loop warm, and a reload or a replaced worker never hands a request to a cold model.
        """
        settings = self.settings
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
        return self

    def reasons(self) -> list[str]:
        """Why this worker is not ready; empty when it is."""
        reasons = []
        if self.batcher is None:
            reasons.append("model not loaded")
        elif not self.batcher.alive:
            reasons.append("batcher thread is not running")
        if self.draining.is_set():
            reasons.append("worker is draining (shutting down)")
        return reasons

    def drain(self) -> None:
        """Stop reporting ready and leave petclf_model_info; in-flight and queued requests still finish."""
        if not self.draining.is_set():
            log.info("draining: /readyz answers 503 from now on; in-flight requests finish")
            if self.classifier is not None:
                self.metrics.set_model(self.bundle.version, self.bundle.arch, str(self.classifier.device), live=False)
        self.draining.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Drain, finish queued work and end the batcher thread."""
        self.drain()
        if self.batcher is not None:
            self.batcher.stop(timeout)

    # Prediction: preprocess -> batch -> postprocess -> metrics

    def predict(
        self, images: list[bytes], top_k: int, include_probabilities: bool = True, arrived: float | None = None
    ) -> list[dict]:
        """Image bytes -> prediction documents, in order; raises ApiError (not ready, full, timeout) or ImageError.

        `arrived` is when the server took the request (time.monotonic(); default now): REQUEST_TIMEOUT_S counts
        from then, so time spent waiting for a request thread under overload counts too.
        """
        rows = self.probabilities(images, arrived)
        return [self.classifier.postprocess(probs, top_k, include_probabilities) for probs in rows]

    def probabilities(self, images: list[bytes], arrived: float | None = None) -> torch.Tensor:
        """Image bytes -> (N, classes) probabilities in order, counted as predictions; raises ApiError or ImageError."""
        deadline = self._deadline(arrived)
        classifier, batcher = self._ready()
        self._check_deadline(deadline)  # it waited for a thread past its deadline: answer at once, compute nothing
        return self._counted(self._compute(batcher, self._preprocess(classifier, images), deadline))

    def pixel_probabilities(self, pixels: torch.Tensor, arrived: float | None = None) -> torch.Tensor:
        """Preprocessed (N, 3, crop, crop) float32 pixels -> (N, classes) probabilities, counted; raises ApiError."""
        deadline = self._deadline(arrived)
        _, batcher = self._ready()
        self._check_pixels(pixels)
        return self._counted(self._compute(batcher, list(pixels), deadline))

    def _deadline(self, arrived: float | None) -> float:
        return (time.monotonic() if arrived is None else arrived) + self.settings.request_timeout_s

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
        if classifier is None or batcher is None or not batcher.alive:
            raise ApiError("not_ready", "; ".join(self.reasons()) or "the batcher stopped")
        return classifier, batcher

    def _check_deadline(self, deadline: float) -> float:
        """Seconds left before `deadline`; raises ApiError("timeout") when none are."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            limit = self.settings.request_timeout_s
            raise ApiError("timeout", f"no result within REQUEST_TIMEOUT_S={limit}s")
        return remaining

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

    def _submit_all(
        self, batcher: MicroBatcher, tensors: list[torch.Tensor], deadline: float
    ) -> list[concurrent.futures.Future]:
        remaining = self._check_deadline(deadline)  # preprocessing may have used the rest
        futures = []
        try:
            for tensor in tensors:
                futures.append(batcher.submit(tensor, remaining))
        except (QueueFull, BatcherStopped) as error:
            for future in futures:
                future.cancel()
            raise ApiError("queue_full" if isinstance(error, QueueFull) else "not_ready", str(error)) from error
        return futures

    def _compute(self, batcher: MicroBatcher, tensors: list[torch.Tensor], deadline: float) -> list[torch.Tensor]:
        """Probabilities for each tensor, computed by the batcher before `deadline`."""
        futures = self._submit_all(batcher, tensors, deadline)
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
