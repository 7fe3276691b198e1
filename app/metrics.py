"""Prometheus metrics (names are part of the API), correct across gunicorn worker processes."""

from __future__ import annotations

import os
import time

from flask import Flask, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from app.batching import BatchObserver

PREFIX = "petclf"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def multiprocess_dir() -> str | None:
    """The prometheus multiprocess directory when running under gunicorn.conf.py, else None."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics(BatchObserver):
    """All service metrics, registered on a private registry (so several apps can live in one test process)."""

    def __init__(self, class_names: list[str]):
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests", ["route", "status"], registry=reg)
        self.latency = Histogram(
            f"{PREFIX}_request_duration_seconds", "HTTP request latency", ["route", "status"],
            buckets=LATENCY_BUCKETS, registry=reg,
        )  # fmt: skip
        self.queue_wait = Histogram(
            f"{PREFIX}_queue_wait_seconds", "Time an image waited for its forward pass", buckets=WAIT_BUCKETS,
            registry=reg,
        )  # fmt: skip
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size", "Images per forward pass", buckets=BATCH_BUCKETS, registry=reg
        )
        self.forward = Histogram(
            f"{PREFIX}_forward_seconds", "Forward-pass time per batch", buckets=LATENCY_BUCKETS, registry=reg
        )
        self.depth = Gauge(
            f"{PREFIX}_queue_depth", "Images waiting for a forward pass", multiprocess_mode="livesum", registry=reg
        )
        self.body_timeouts = Counter(
            f"{PREFIX}_body_timeouts", "Request bodies cut off for arriving too slowly (BODY_MIN_RATE_KBPS)",
            ["route"], registry=reg,
        )  # fmt: skip
        self.rejected = Counter(f"{PREFIX}_rejected_requests", "Refused requests", ["reason"], registry=reg)
        self.predictions = Counter(f"{PREFIX}_predictions", "Predictions by top class", ["class"], registry=reg)
        self.unknown = Counter(f"{PREFIX}_unknown", "Predictions flagged unknown (out of distribution)", registry=reg)
        self.model_info = Gauge(
            f"{PREFIX}_model_info", "Live workers serving this model", ["version", "arch", "device"],
            multiprocess_mode="livesum", registry=reg,
        )  # fmt: skip
        # What the alert rules (deploy/prometheus/rules.yml) compare against; set once the model is warm.
        self.queue_capacity = Gauge(
            f"{PREFIX}_queue_capacity", "Images the live workers' queues can hold (MAX_QUEUE each)",
            multiprocess_mode="livesum", registry=reg,
        )  # fmt: skip
        self.expected_unknown = Gauge(
            f"{PREFIX}_ood_expected_unknown_ratio",
            "Share of in-distribution images the model's detector flags unknown (1 - keep, fitted on validation)",
            ["score"], multiprocess_mode="livemax", registry=reg,
        )  # fmt: skip
        self.class_baseline = Gauge(
            f"{PREFIX}_class_baseline_ratio", "Each class's share of the model's validation images", ["class"],
            multiprocess_mode="livemax", registry=reg,
        )  # fmt: skip
        # Label children created once, so the hot path does no label lookups.
        self._by_class = {name: self.predictions.labels(name) for name in class_names}
        self._by_route: dict[tuple[str, str], tuple] = {}

    # HTTP side

    def observe_requests(self, app: Flask) -> None:
        """Time and count every request of `app` (route, status), and the rejections' error codes."""

        @app.before_request
        def _start_timer():
            g.started = time.perf_counter()

        @app.after_request
        def _observe(response):
            route = request.url_rule.rule if request.url_rule else "unmatched"
            self.observe_request(
                route, response.status_code, time.perf_counter() - g.get("started", time.perf_counter())
            )
            if "error_code" in g:
                self.reject(g.error_code)
            return response

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        """Count one answered request and its latency."""
        key = (route, str(status))
        children = self._by_route.get(key)
        if children is None:
            children = self._by_route[key] = (self.requests.labels(*key), self.latency.labels(*key))
        children[0].inc()
        children[1].observe(seconds)

    def reject(self, reason: str) -> None:
        """Count a refused request by reason (the error code)."""
        self.rejected.labels(reason).inc()

    def body_timeout(self, route: str) -> None:
        """Count a request whose body was cut off for arriving too slowly (answered 408, connection closed)."""
        self.body_timeouts.labels(route).inc()

    def predicted(self, label: str, unknown: bool = False) -> None:
        """Count one prediction of `label`, and whether it was flagged unknown."""
        self._by_class[label].inc()
        if unknown:
            self.unknown.inc()

    def set_model(self, version: str, arch: str, device: str, live: bool = True) -> None:
        """Publish the model-info gauge once the model is warm (1), or leave it when the worker drains (0)."""
        self.model_info.labels(version, arch, device).set(1 if live else 0)

    def set_baselines(self, max_queue: int, ood: dict | None, class_mix: dict[str, float] | None) -> None:
        """Publish MAX_QUEUE, the detector's fitted unknown rate (when it has a `keep`) and the validation class mix."""
        self.queue_capacity.set(max_queue)
        if ood and "keep" in ood:
            self.expected_unknown.labels(ood["score"]).set(round(1.0 - float(ood["keep"]), 9))
        for name, share in (class_mix or {}).items():
            self.class_baseline.labels(name).set(share)

    # Batcher side (BatchObserver)

    def queue_depth(self, depth: int) -> None:
        self.depth.set(depth)

    def dequeued(self, waited_s: float) -> None:
        self.queue_wait.observe(waited_s)

    def batch_done(self, size: int, forward_s: float) -> None:
        self.batch_size.observe(size)
        self.forward.observe(forward_s)

    # Exposition

    def render(self) -> tuple[bytes, str]:
        """The text exposition: every worker's samples in multiprocess mode, this process's otherwise."""
        path = multiprocess_dir()
        if path is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=path)
        return generate_latest(registry), CONTENT_TYPE_LATEST
