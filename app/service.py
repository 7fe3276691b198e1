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
from app.schemas import ExplainQuerySchema, PredictQuerySchema
from models.ensemble import Ensemble
from models.explain import ExplainError
from models.images import ImageError
from models.predictor import Output, average

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
        self.draining = threading.Event()

    def start(self) -> Service:
        """Build the model, warm it up and start the batcher, synchronously; raises when any of it fails.

        Synchronous on purpose: create_app returns only when this worker can predict, so gunicorn's worker
        enters its accept loop warm, and a reload or a replaced worker never hands a request to a cold model.
        """
        settings = self.settings
        # Only the batcher thread may own a multi-threaded OpenMP team: this thread builds the model on one thread,
        # the batcher sizes its own and warms up there. With a second team (this thread's, left by a warm-up here)
        # libgomp counts more threads than cores and stops spinning at barriers: a ResNet-50 forward in the
        # batcher thread took a median 138-143 ms instead of 100-127 ms (2 cores, GOMP_SPINCOUNT=10000).
        torch.set_num_threads(1)
        classifier = build_classifier(settings, self.bundle, self.device)

        def warm_up() -> None:
            # Under ONNX Runtime alone its own pool (TORCH_THREADS intra-op threads) computes; torch only normalises
            # and takes the softmax, on this one thread, so the two pools never spin against each other.
            torch.set_num_threads(1 if classifier.onnx_only else settings.torch_threads)
            started = time.perf_counter()
            classifier.warmup(tuple(sorted({1, settings.max_batch_size})))
            log.info("warm-up done in %.2fs", time.perf_counter() - started)

        self.batcher = MicroBatcher(
            classifier.inference,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_batch_wait_ms / 1000,
            max_queue=settings.max_queue,
            observer=self.metrics,
            collate=classifier.collate,
        ).start(setup=warm_up)
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
        self,
        images: list[bytes],
        top_k: int,
        include_probabilities: bool = True,
        tta: str = "none",
        arrived: float | None = None,
    ) -> list[dict]:
        """Image bytes -> prediction documents, in order; raises ApiError (not ready, full, timeout) or ImageError.

        With tta='flip' every image is two batch items (itself and its mirror), averaged after the batcher.
        `arrived` is when the server took the request (time.monotonic(); default now): REQUEST_TIMEOUT_S counts
        from then, so time spent waiting for a request thread under overload counts too.
        """
        outputs = self.outputs(images, tta, arrived)
        return [self.classifier.postprocess(output, top_k, include_probabilities) for output in outputs]

    def outputs(self, images: list[bytes], tta: str = "none", arrived: float | None = None) -> list[Output]:
        """Image bytes -> one Output per image (its views averaged), counted as predictions; ApiError/ImageError."""
        deadline = self._deadline(arrived)
        classifier, batcher = self._ready()
        self._check_deadline(deadline)  # it waited for a thread past its deadline: answer at once, compute nothing
        # Announced before decoding: a batch forming meanwhile waits for these items (up to MAX_BATCH_WAIT_MS).
        with batcher.preparing(len(images) * (1 if tta == "none" else 2)):  # flip: two views per image
            views = self._preprocess(classifier, images, tta)
            rows = self._submit_all(batcher, [view for image_views in views for view in image_views], deadline)
        rows = iter(self._results(rows, deadline))
        return self._counted([average([next(rows) for _ in image_views]) for image_views in views])

    def probabilities(self, images: list[bytes], arrived: float | None = None) -> torch.Tensor:
        """Image bytes -> (N, classes) calibrated probabilities in order, counted; raises ApiError or ImageError."""
        return torch.cat([output.probs for output in self.outputs(images, arrived=arrived)])

    def pixel_probabilities(self, pixels: torch.Tensor, arrived: float | None = None) -> torch.Tensor:
        """Preprocessed (N, 3, crop, crop) float32 pixels -> (N, classes) probabilities, counted; raises ApiError."""
        deadline = self._deadline(arrived)
        _, batcher = self._ready()
        self._check_pixels(pixels)
        with batcher.preparing(len(pixels)):
            futures = self._submit_all(batcher, list(pixels), deadline)
        outputs = self._counted(self._results(futures, deadline))
        return torch.cat([output.probs for output in outputs])

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

    def _counted(self, outputs: list[Output]) -> list[Output]:
        """Count each image's top class (the first maximum, as top_k ranks ties) and unknown flag."""
        predictor = self.classifier.predictor
        for output in outputs:
            score = None if output.ood_scores is None else output.ood_scores[0].item()
            label = self.bundle.class_names[int(output.probs[0].argmax())]
            self.metrics.predicted(label, predictor.is_unknown(score))
        return outputs

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
    def _preprocess(classifier: Classifier, images: list[bytes], tta: str) -> list[list[torch.Tensor]]:
        """Each image's views as uint8 pixels; ImageError names the image's position in a batch."""
        if len(images) == 1:
            return [classifier.preprocess(images[0], tta)]
        views = []
        for index, data in enumerate(images):
            try:
                views.append(classifier.preprocess(data, tta))
            except ImageError as error:
                raise type(error)(f"image {index}: {error}") from error
        return views

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

    def _results(self, futures: list[concurrent.futures.Future], deadline: float) -> list[Output]:
        """The Output row of each submitted tensor, computed by the batcher before `deadline`."""
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

    def _member_info(self) -> list[dict]:
        if self.classifier is None:
            return [{} for _ in self.bundle.bundles]
        return self.classifier.member_info()

    def model_info(self) -> dict:
        """The served model and the serving settings (GET /model)."""
        settings, bundle = self.settings, self.bundle
        return {
            "name": settings.model_name,
            "version": bundle.version,
            "arch": bundle.arch,
            "head": bundle.head,
            "class_names": bundle.class_names,
            "num_classes": len(bundle.class_names),
            "preprocess": bundle.preprocess,
            "metrics": bundle.metrics,
            "calibration": bundle.calibration(),
            "ood": bundle.ood(),
            "members": [{**one, **extra} for one, extra in zip(bundle.members(), self._member_info(), strict=True)],
            "device": str(self.device),
            "precision": settings.precision,
            "backend": settings.backend,
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
