"""When the server took the current request: set by the gunicorn worker (app.lifecycle), read by the routes."""

from __future__ import annotations

import threading

_arrival = threading.local()


def set_arrival(value: float | None) -> None:
    """The worker, as a request thread takes a connection: when it was accepted (time.monotonic()), or None."""
    _arrival.value = value


def arrival_time() -> float | None:
    """When the server took the current request (time.monotonic()), under ServingWorker; None elsewhere."""
    return getattr(_arrival, "value", None)
