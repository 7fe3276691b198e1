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
from app.schemas import ExplainQuerySchema, PredictQuerySchema
from models.ensemble import Ensemble
from models.explain import ExplainError
from models.images import ImageError
from models.predictor import Output, average, tta_views

log = logging.getLogger(__name__)
EXTENSION = "petclf"  # the Service's key in app.extensions


def get_service(app: Flask) -> Service:
    """The Service of an app built by create_app (routes, gunicorn hooks and tests use it)."""
    return app.extensions[EXTENSION]


class Service:
    """Model, batcher and health of one worker process."""

    def __init__(self, settings: Settings, bundle: Ensemble, device: torch.device, metrics: Metrics):
        self.settings = settings
        self.bundle = bundle  # one bundle or several (MODEL_PATH=a.pt,b.pt); reads like a models.bundle.Bundle
        self.device = device
        self.metrics = metrics
        self.query_schema = PredictQuerySchema(num_classes=len(bundle.class_names))
        self.explain_schema = ExplainQuerySchema(num_classes=len(bundle.class_names), class_names=bundle.class_names)
        # /explain runs in the request thread, outside the batcher; this bounds how many run at once.
        self._explain_slots = threading.BoundedSemaphore(settings.explain_concurrency)
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

    def predict(
        self, images: list[bytes], top_k: int, include_probabilities: bool = True, tta: str = "none"
    ) -> list[dict]:
        """Image bytes -> prediction documents, in order; raises ApiError (not ready, full, timeout) or ImageError.

        With tta='flip' every image is two batch items (itself and its mirror), averaged after the batcher.
        """
        classifier, batcher = self._ready()
        views = [tta_views(tensor, tta) for tensor in self._preprocess(classifier, images)]
        rows = iter(self._compute(batcher, [view for image_views in views for view in image_views]))
        merged = [average([next(rows) for _ in image_views]) for image_views in views]
        results = [classifier.postprocess(output, top_k, include_probabilities) for output in merged]
        for result in results:
            self.metrics.predicted(result["predicted_class"], result["unknown"])
        return results

    def explain(self, image: bytes, class_name: str | None = None, top_k: int = 5) -> tuple[bytes, dict]:
        """Grad-CAM of one image: (PNG of the heat over the image, the prediction); ApiError when busy.

        Runs in the calling thread, never in the batcher, at most EXPLAIN_CONCURRENCY at a time per worker.
        """
        classifier, _ = self._ready()
        if not self._explain_slots.acquire(blocking=False):
            limit = self.settings.explain_concurrency
            raise ApiError("explain_busy", f"{limit} explanation(s) already running (EXPLAIN_CONCURRENCY={limit})")
        try:
            png, result = classifier.explain(image, class_name, top_k)
        except ExplainError as error:
            raise ApiError("explain_unsupported", str(error)) from error
        finally:
            self._explain_slots.release()
        return png, result

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

    def _compute(self, batcher: MicroBatcher, tensors: list[torch.Tensor]) -> list[Output]:
        """The Output row of each tensor, computed by the batcher within REQUEST_TIMEOUT_S."""
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
            "calibration": bundle.calibration(),
            "ood": bundle.ood(),
            "members": bundle.members(),
            "device": str(self.device),
            "precision": settings.precision,
            "ready": not self.reasons(),
            "explain_concurrency": settings.explain_concurrency,
            "batching": {
                "max_batch_size": settings.max_batch_size,
                "max_batch_wait_ms": settings.max_batch_wait_ms,
                "max_queue": settings.max_queue,
                "request_timeout_s": settings.request_timeout_s,
                "max_batch_files": settings.max_batch_files,
            },
        }
