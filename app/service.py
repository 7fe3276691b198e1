"""One worker's serving state: loads and warms the model in the background, owns the batcher, knows readiness."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time

import torch

from app.batching import BatcherStopped, DeadlineExceeded, MicroBatcher, QueueFull
from app.config import Settings
from app.errors import ApiError
from app.inference import Classifier, build_classifier
from app.metrics import Metrics
from app.schemas import PredictQuerySchema
from models.bundle import Bundle

log = logging.getLogger(__name__)
RETRY_AFTER = {"Retry-After": "1"}


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

    # Prediction

    def ready_classifier(self) -> Classifier:
        """The classifier when predictions can run, else a 503 ApiError."""
        # A draining worker still predicts: requests already on their way must be answered.
        batcher = self.batcher
        if not self.warmed.is_set() or batcher is None or not batcher.alive:
            raise ApiError(503, "not_ready", "; ".join(self.reasons()), headers=RETRY_AFTER)
        return self.classifier

    def _submit_all(self, batcher: MicroBatcher, tensors: list[torch.Tensor]) -> list[concurrent.futures.Future]:
        futures = []
        try:
            for tensor in tensors:
                futures.append(batcher.submit(tensor, self.settings.request_timeout_s))
        except (QueueFull, BatcherStopped) as error:
            for future in futures:
                future.cancel()
            code = "queue_full" if isinstance(error, QueueFull) else "not_ready"
            raise ApiError(503, code, str(error), headers=RETRY_AFTER) from error
        return futures

    def predict(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Probabilities for each tensor, computed by the batcher within REQUEST_TIMEOUT_S."""
        self.ready_classifier()
        futures = self._submit_all(self.batcher, tensors)
        deadline = time.monotonic() + self.settings.request_timeout_s
        try:
            return [future.result(timeout=max(0.0, deadline - time.monotonic())) for future in futures]
        except (concurrent.futures.TimeoutError, DeadlineExceeded) as error:
            raise ApiError(
                504, "timeout", f"no result within REQUEST_TIMEOUT_S={self.settings.request_timeout_s}s"
            ) from error
        except BatcherStopped as error:
            raise ApiError(503, "not_ready", str(error), headers=RETRY_AFTER) from error
        finally:
            for future in futures:
                future.cancel()  # no-op for finished ones; queued ones are skipped, not computed
