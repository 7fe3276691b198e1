"""The concurrency layer of one worker: readiness, deadlines, the batcher and the explain gate around the handler.

Loads and warms the model before the worker takes requests. Pre- and post-processing are the handler's
(app/inference.py); HTTP (query schemas, documents, status codes) is the routes'.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable

import torch
from flask import Flask

from app.batching import BatcherStopped, DeadlineExceeded, MicroBatcher, QueueFull
from app.config import Settings
from app.errors import ApiError
from app.inference import Handler, build_handler, seconds_left
from app.metrics import Metrics
from models.ensemble import Ensemble
from models.explain import ExplainError
from models.images import DecodeBusy
from models.predictor import Output, average

log = logging.getLogger(__name__)
# (handler, deadline as time.monotonic()) -> each image's views; TimeoutError once the deadline has passed
Prepare = Callable[[Handler, float], list[list[torch.Tensor]]]
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
        # /explain runs in the request thread, outside the batcher; this bounds how many run at once.
        self._explain_slots = threading.BoundedSemaphore(settings.explain_concurrency)
        self.handler: Handler | None = None
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
        # libgomp counts more threads than cores and stops spinning at barriers, which slows every forward pass.
        torch.set_num_threads(1)
        handler = build_handler(settings, self.bundle, self.device)

        def warm_up() -> None:
            # Under ONNX Runtime alone its own pool (TORCH_THREADS intra-op threads) computes; torch only normalises
            # and takes the softmax, on this one thread, so the two pools never run side by side.
            torch.set_num_threads(1 if handler.onnx_only else settings.torch_threads)
            started = time.perf_counter()
            handler.warmup(tuple(sorted({1, settings.max_batch_size})))
            log.info("warm-up done in %.2fs", time.perf_counter() - started)

        self.batcher = MicroBatcher(
            handler.inference,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_batch_wait_ms / 1000,
            max_queue=settings.max_queue,
            observer=self.metrics,
            collate=handler.collate,
        ).start(setup=warm_up)
        self.handler = handler
        self.metrics.set_baselines(settings.max_queue, self.bundle.ood(), self.bundle.class_mix())
        self.metrics.set_model(self.bundle.version, self.bundle.arch, str(handler.device))
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
            if self.handler is not None:
                self.metrics.set_model(self.bundle.version, self.bundle.arch, str(self.handler.device), live=False)
        self.draining.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Drain, finish queued work and end the batcher thread."""
        self.drain()
        if self.batcher is not None:
            self.batcher.stop(timeout)

    # Prediction: preprocess (handler) -> batch -> postprocess (handler) -> metrics

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
        views = 1 if tta == "none" else 2  # flip: two views per image
        prepare: Prepare = lambda handler, deadline: handler.preprocess_all(images, tta, deadline)  # noqa: E731
        outputs = self._run(len(images) * views, prepare, arrived)
        return self._counted([self.handler.postprocess(output, top_k, include_probabilities) for output in outputs])

    def probabilities(self, images: list[bytes], arrived: float | None = None) -> torch.Tensor:
        """Image bytes -> (N, classes) calibrated probabilities in order, counted; raises ApiError or ImageError."""
        prepare: Prepare = lambda handler, deadline: handler.preprocess_all(images, "none", deadline)  # noqa: E731
        return self._probabilities(self._run(len(images), prepare, arrived))

    def pixel_probabilities(self, pixels: torch.Tensor, arrived: float | None = None) -> torch.Tensor:
        """Preprocessed (N, 3, crop, crop) float32 pixels (checked by the v2 codec) -> (N, classes) probabilities,
        counted; raises ApiError."""
        return self._probabilities(self._run(len(pixels), lambda _, __: [[row] for row in pixels], arrived))

    def _run(self, items: int, prepare: Prepare, arrived: float | None) -> list[Output]:
        """One Output per image (its views averaged): `prepare` gives each image's views, the batcher computes them.

        `prepare` gets the handler and the deadline; its TimeoutError (or DecodeBusy) is answered 504.
        """
        deadline = self._deadline(arrived)
        handler, batcher = self._ready()
        self._check_deadline(deadline)  # it waited for a thread past its deadline: answer at once, compute nothing
        # Announced before preparing: a batch forming meanwhile waits for these items (up to MAX_BATCH_WAIT_MS).
        with batcher.preparing(items):
            try:
                views = prepare(handler, deadline)
            except (DecodeBusy, TimeoutError) as error:  # the deadline passed, or no decode room freed up before it
                raise self._timeout() from error
            futures = self._submit_all(batcher, [view for image_views in views for view in image_views], deadline)
        rows = iter(self._results(futures, deadline))
        return [average([next(rows) for _ in image_views]) for image_views in views]

    def _probabilities(self, outputs: list[Output]) -> torch.Tensor:
        self._counted([self.handler.postprocess(output, 1, include_probabilities=False) for output in outputs])
        return torch.cat([output.probs for output in outputs])

    def _deadline(self, arrived: float | None) -> float:
        return (time.monotonic() if arrived is None else arrived) + self.settings.request_timeout_s

    def _counted(self, documents: list[dict]) -> list[dict]:
        """Count each prediction document's class and unknown flag (as postprocess computed them)."""
        for document in documents:
            self.metrics.predicted(document["predicted_class"], document["unknown"])
        return documents

    def explain(
        self, image: bytes, class_name: str | None = None, top_k: int = 5, arrived: float | None = None
    ) -> tuple[bytes, dict]:
        """Grad-CAM of one image: (PNG of the heat over the image, the prediction); ApiError when busy or late.

        Runs in the calling thread, never in the batcher, at most EXPLAIN_CONCURRENCY at a time per worker;
        REQUEST_TIMEOUT_S (from `arrived`) is checked between its steps (decode, Grad-CAM, overlay): 504 past it.
        """
        deadline = self._deadline(arrived)
        handler, _ = self._ready()
        if not self._explain_slots.acquire(blocking=False):
            limit = self.settings.explain_concurrency
            raise ApiError("explain_busy", f"{limit} explanation(s) already running (EXPLAIN_CONCURRENCY={limit})")
        try:
            png, result = handler.explain(image, class_name, top_k, deadline)
        except ExplainError as error:
            raise ApiError("explain_unsupported", str(error)) from error
        except (DecodeBusy, TimeoutError) as error:
            raise self._timeout() from error
        finally:
            self._explain_slots.release()
        return png, result

    def _ready(self) -> tuple[Handler, MicroBatcher]:
        # A draining worker still predicts: requests already on their way must be answered.
        handler, batcher = self.handler, self.batcher
        if handler is None or batcher is None or not batcher.alive:
            raise ApiError("not_ready", "; ".join(self.reasons()) or "the batcher stopped")
        return handler, batcher

    def _check_deadline(self, deadline: float) -> float:
        """Seconds left before `deadline`; raises ApiError("timeout") when none are."""
        try:
            return seconds_left(deadline)
        except TimeoutError as error:
            raise self._timeout() from error

    def _timeout(self) -> ApiError:
        return ApiError("timeout", f"no result within REQUEST_TIMEOUT_S={self.settings.request_timeout_s}s")

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
            raise self._timeout() from error
        except BatcherStopped as error:
            raise ApiError("not_ready", str(error)) from error
        finally:
            for future in futures:
                future.cancel()  # no-op for finished ones; queued ones are skipped, not computed

    def member_info(self) -> list[dict]:
        """Per member, what serves it (the int8 file under PRECISION=int8), once the model is built."""
        return self.handler.member_info() if self.handler is not None else [{} for _ in self.bundle.bundles]
