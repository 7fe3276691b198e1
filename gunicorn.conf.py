"""gunicorn settings for `gunicorn -c gunicorn.conf.py 'app:create_app()'`, from environment variables.

No preload_app: every worker imports the app and loads the model after fork, so CUDA is never
initialised in the master. prometheus_client is imported only after PROMETHEUS_MULTIPROC_DIR is set,
because it picks its (multiprocess) value class at import time.
"""

import os
import shutil
import signal
import sys
import tempfile

# Request threads (preprocessing) and the batcher thread each run an OpenMP team; spinning idle teams
# starve the busy one (measured: 7 vs 54 req/s on 2 shared cores). Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# prometheus_client picks its (multiprocess) value class at import time, and importing the app package
# imports it: choose the directory before the first `from app...` below.
_own_metrics_dir = None  # set when this file chose the directory, so on_exit may delete it
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _own_metrics_dir = os.path.join(tempfile.gettempdir(), f"petclf-prometheus-{os.getpid()}")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _own_metrics_dir


def _settings():
    """Validate the server's and the app's settings in the master, so a bad value stops it before any fork."""
    from app.config import ConfigError, load_server_settings, load_settings

    try:
        server, app = load_server_settings(), load_settings()
    except ConfigError as error:
        sys.exit(f"configuration error: {error}")
    missing = [path for path in app.model_paths if not os.path.isfile(path)]
    if missing:
        # Workers would each fail with a traceback; one line from the master says it better.
        sys.exit(
            f"configuration error: MODEL_PATH={missing[0]!r} is not a file; "
            "train a bundle first (make model, or python scripts/train.py --output PATH)"
        )
    return server, app


_server, _app = _settings()
bind = _server.address
worker_class = "gthread"
workers = _server.web_concurrency  # one per GPU; on CPU, one per few cores (TORCH_THREADS splits them)
threads = _server.threads  # concurrent requests per worker: what the batcher can group
timeout = _server.timeout
graceful_timeout = _server.graceful_timeout
keepalive = _server.keepalive
preload_app = False
accesslog = "-"
errorlog = "-"
# Several servers may share a host (replicas, tests); gunicorn's default control socket path would clash.
control_socket_disable = True
loglevel = _app.log_level


def on_starting(server):
    """Master, before any fork: an empty multiprocess metrics directory (stale files would add old counts)."""
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    server.log.info("prometheus multiprocess directory: %s", path)


def post_worker_init(worker):
    """Worker: on SIGTERM, first mark the app draining (/readyz -> 503), then let gunicorn stop gracefully."""
    from app import get_service

    service = get_service(worker.wsgi)
    graceful_exit = worker.handle_exit

    def drain_then_exit(signum, frame):
        service.drain()
        graceful_exit(signum, frame)

    signal.signal(signal.SIGTERM, drain_then_exit)


def worker_exit(server, worker):
    """Worker, after its last request: finish queued batches and stop the batcher thread."""
    from app import get_service

    wsgi = getattr(worker, "wsgi", None)
    if wsgi is not None:
        get_service(wsgi).stop(timeout=graceful_timeout)


def child_exit(server, worker):
    """Master: drop the dead worker's live gauges (queue depth, model info) from the aggregate."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """Master, at shutdown: remove the metrics directory if this file created it."""
    if _own_metrics_dir:
        shutil.rmtree(_own_metrics_dir, ignore_errors=True)
