"""gunicorn settings for `gunicorn -c gunicorn.conf.py 'app:create_app()'`, from environment variables.

No preload_app: every worker imports the app and loads the model after fork, so CUDA is never
initialised in the master. prometheus_client is imported only after PROMETHEUS_MULTIPROC_DIR is set,
because it picks its (multiprocess) value class at import time. gunicorn executes this file again on
every reload (HUP), in the running master: nothing here may stop that master.
"""

import os
import shutil
import sys
import tempfile

# Only the batcher thread runs torch kernels on the /predict path (request threads decode and resize with PIL), so
# one OpenMP team computes. Its helper threads spin briefly at each of a forward pass's ~650 barriers instead of
# sleeping (OMP_WAIT_POLICY=PASSIVE cost 35-60 ms per ResNet-50 forward on a quiet 2-core VM, measured), and sleep
# after ~GOMP_SPINCOUNT iterations, so an idle team does not starve other threads as libgomp's default spinning
# did. An explicit OMP_WAIT_POLICY or GOMP_SPINCOUNT wins. Must be set before torch is imported.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")


# prometheus_client picks its (multiprocess) value class at import time, and importing the app package
# imports it: choose the directory before the first `from app...` below. The name carries the master's pid,
# so a reload (same pid) recognises the directory it chose and on_exit deletes only that one.
_own_metrics_dir = os.path.join(tempfile.gettempdir(), f"petclf-prometheus-{os.getpid()}")
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _own_metrics_dir

from app import lifecycle  # noqa: E402  (after the metrics directory; imports no torch)


def _settings():
    """Validate the settings in the master, so a bad value stops it before any fork; at reload, only report."""
    from app.config import ConfigError, load_server_settings, load_settings

    server = app = None
    try:
        server = load_server_settings()
        app = load_settings()
        missing = [path for path in app.model_paths if not os.path.isfile(path)]
        if missing:
            # Workers would each fail with a traceback; one line from the master says it better.
            raise ConfigError(
                f"MODEL_PATH={missing[0]!r} is not a file; "
                "train a bundle first (make model, or python scripts/train.py --output PATH)"
            )
        _runtime_check(app, ConfigError)
    except ConfigError as error:
        if not lifecycle.is_reload() or server is None:  # the environment, hence the server settings, cannot change
            sys.exit(f"configuration error: {error}")
        # The new workers will fail on the same problem, record it, and the running ones keep serving.
        print(f"reload: configuration error: {error}; the running workers keep serving", file=sys.stderr)
    return server, app


def _runtime_check(app, error_type):
    """Each member's ONNX graph where ONNX Runtime will serve it, else PyTorch's int8 file under int8."""
    from models.graphs import graph_path, graph_problem

    on_cpu = not app.device.startswith("cuda")
    for path in app.model_paths:
        problem = graph_problem(path, app.precision, app.backend) if on_cpu else None
        if problem:
            raise error_type(f"BACKEND={app.backend} PRECISION={app.precision}: {problem}")
        torch_serves = app.backend == "torch" or not graph_path(path, app.precision).exists() or not on_cpu
        if app.precision == "int8" and torch_serves:
            from models.quantize import int8_problem

            problem = int8_problem(path)
            if problem:
                raise error_type(f"PRECISION=int8: {problem} (or serve ONNX Runtime's int8: python scripts/export.py)")


_server, _app = _settings()
bind = _server.address
# gthread, plus: accept only once warm, keep serving through a reload until the new workers are warm,
# and a worker that cannot load while others serve fails alone (app/lifecycle.py).
worker_class = "app.lifecycle.ServingWorker"
workers = _server.web_concurrency  # one per GPU; on CPU, one per few cores (TORCH_THREADS splits them)
threads = _server.threads  # concurrent requests per worker: what the batcher can group
timeout = _server.timeout
graceful_timeout = _server.graceful_timeout
keepalive = _server.keepalive
max_requests = _server.max_requests  # recycling: the other workers serve while the replacement warms up
max_requests_jitter = _server.max_requests_jitter
preload_app = False
accesslog = "-"
errorlog = "-"
# Several servers may share a host (replicas, tests); gunicorn's default control socket path would clash.
control_socket_disable = True
loglevel = _app.log_level if _app else os.environ.get("LOG_LEVEL", "info")


def on_starting(server):
    """Master, before any fork: an empty multiprocess metrics directory (stale files would add old counts)."""
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    server.log.info("prometheus multiprocess directory: %s", path)
    server.log.info("worker run directory: %s", lifecycle.start_run_dir())


def on_reload(server):
    """Master, on HUP, before forking the new workers: they are the next generation."""
    generation = lifecycle.next_generation()
    server.log.info("reload: starting generation %d; the running workers serve until it is ready", generation)


def worker_exit(server, worker):
    """Worker, after its last request: finish queued batches and stop the batcher thread."""
    from app import get_service

    wsgi = getattr(worker, "wsgi", None)
    if wsgi is not None:
        get_service(wsgi).stop(timeout=graceful_timeout)


def child_exit(server, worker):
    """Master: drop the dead worker's live gauges (queue depth, model info) and its run-directory record."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
    lifecycle.forget(worker.age)


def on_exit(server):
    """Master, at shutdown: remove the run directory, and the metrics directory if this file chose it."""
    lifecycle.remove_run_dir()
    if os.environ["PROMETHEUS_MULTIPROC_DIR"] == _own_metrics_dir:
        shutil.rmtree(_own_metrics_dir, ignore_errors=True)
