"""gunicorn settings for `gunicorn -c gunicorn.conf.py 'app:create_app()'`, from environment variables.

No preload_app: every worker imports the app and loads the model after fork, so CUDA is never
initialised in the master. prometheus_client is imported only after PROMETHEUS_MULTIPROC_DIR is set,
because it picks its (multiprocess) value class at import time. gunicorn executes this file again on
every reload (HUP), in the running master: nothing here may stop that master.
"""

import json
import os
import shutil
import sys
import tempfile

# Only the batcher thread runs torch kernels on the /predict path (request threads decode and resize with PIL), so
# one OpenMP team computes. Its helper threads spin briefly at each of a forward pass's ~650 barriers instead of
# sleeping (sleeping at every barrier, OMP_WAIT_POLICY=PASSIVE, makes each forward pass much slower), and sleep
# after ~GOMP_SPINCOUNT iterations, so an idle team does not starve other threads as libgomp's default spinning
# did. An explicit OMP_WAIT_POLICY or GOMP_SPINCOUNT wins. Must be set before torch is imported.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")


# prometheus_client picks its (multiprocess) value class at import time: choose the directory before anything
# imports it (the workers, through the app). The name carries the master's pid, so a reload (same pid) recognises
# the directory it chose and on_exit deletes only that one.
_own_metrics_dir = os.path.join(tempfile.gettempdir(), f"petclf-prometheus-{os.getpid()}")
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _own_metrics_dir

# The master imports no torch, Flask or app code (tests/test_server.py checks a running one): app.lifecycle and
# app.config import none, and the checks that need torch run in a child process (app/preflight.py).
from app import lifecycle, preflight  # noqa: E402
from app.config import (  # noqa: E402
    ConfigError,
    load_server_settings,
    load_settings,
    measures_backends,
    needs_machine_check,
)
from app.model_watch import ModelWatch, hup_self  # noqa: E402


def _settings():
    """Validate the settings in the master, so a bad value stops it before any fork; at reload, only report."""
    server = app = None
    try:
        server = load_server_settings()
        app = load_settings(machine=False)
        missing = [path for path in app.model_paths if not os.path.isfile(path)]
        if missing:
            # Workers would each fail with a traceback; one line from the master says it better.
            raise ConfigError(
                f"MODEL_PATH={missing[0]!r} is not a file; "
                "train a bundle first (make model, or python scripts/train.py --output PATH)"
            )
        os.environ.pop(preflight.BACKENDS_ENV, None)  # a reload measures again
        if app.backend != "torch" and not app.device.startswith("cuda"):
            # Each bundle's ONNX Runtime graph for PRECISION where one is there (or BACKEND=onnxruntime needs it),
            # opened by ONNX Runtime in a child: the master loads no onnxruntime either.
            preflight.run_child([sys.executable, "-m", "models.graphs", app.precision, app.backend, *app.model_paths])
        if needs_machine_check(app) or measures_backends(app):
            # The torch checks, and BACKEND=auto's trial of both runtimes, once, before any fork: every worker
            # serves the runtime it chose (app/preflight.py).
            choices = preflight.run_child([sys.executable, "-m", "app.preflight"])
            os.environ[preflight.BACKENDS_ENV] = json.dumps(preflight.parse_choices(choices))
    except ConfigError as error:
        if not lifecycle.is_reload() or server is None:  # the environment, hence the server settings, cannot change
            sys.exit(f"configuration error: {error}")
        # The new workers will fail on the same problem, record it, and the running ones keep serving.
        print(f"reload: configuration error: {error}; the running workers keep serving", file=sys.stderr)
    return server, app


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
# One line per request on stdout. Off (ACCESS_LOG=false), the request counts and latencies stay in /metrics and
# errors in the error log; each line costs the request thread a format and a locked write.
accesslog = "-" if _server.access_log else None
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


def when_ready(server):
    """Master, listening: with MODEL_WATCH_S, watch the model files and reload when one is replaced."""
    if _server.model_watch_s > 0 and _app is not None:
        ModelWatch(_app.model_paths, _server.model_watch_s, hup_self(server.log.info)).start()
        server.log.info("model watch: every %gs, %s", _server.model_watch_s, ", ".join(_app.model_paths))


def on_reload(server):
    """Master, on HUP, before forking the new workers: they are the next generation."""
    generation = lifecycle.next_generation()
    server.log.info("reload: starting generation %d; the running workers serve until it is ready", generation)


def worker_exit(server, worker):
    """Worker, after its last request: finish queued batches and stop the batcher thread."""
    from app.service import get_service  # in the worker, which has imported it already

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
