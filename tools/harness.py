"""Run the real service from outside, as users do: start it with the canonical command, wait, load it.

Used by tools/benchmark.py, tools/soak.py and the tests; the service itself never imports this module.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
SERVER_COMMAND = ("-m", "gunicorn", "-c", "gunicorn.conf.py", "app:create_app()")


def free_port() -> int:
    """A currently free loopback TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_server(env: dict, log_file, command: tuple[str, ...] = SERVER_COMMAND) -> tuple[subprocess.Popen, str]:
    """Start `gunicorn -c gunicorn.conf.py 'app:create_app()'` (or `command`, where {bind} is the address) on a
    free loopback port; returns (process, url)."""
    port = free_port()
    bind = f"127.0.0.1:{port}"
    environ = {**os.environ, "PORT": str(port), "BIND": bind, **{k: str(v) for k, v in env.items()}}
    argv = [sys.executable, *(part.format(bind=bind) for part in command)]
    process = subprocess.Popen(argv, cwd=ROOT, env=environ, stdout=log_file, stderr=subprocess.STDOUT)
    return process, f"http://{bind}"


def ready_workers(url: str) -> int:
    """Live, warmed-up workers behind `url`: the petclf_model_info gauge summed over its label sets."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    return int(
        sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("petclf_model_info{"))
    )


def wait_ready(
    url: str,
    process: subprocess.Popen | None = None,
    workers: int = 1,
    timeout: float = 180,
    probe_timeout: float = 5.0,
) -> list[int]:
    """Poll until /readyz is 200 and `workers` workers have warmed up (0: /readyz alone, for servers without
    /metrics); returns every /readyz status seen; RuntimeError if the process exits, TimeoutError when time runs out.

    A probe waits up to `probe_timeout` for its answer: during warm-up the kernel accepts the connection and the
    worker answers once warm."""
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode}")
        try:
            seen.append(requests.get(f"{url}/readyz", timeout=probe_timeout).status_code)
            if seen[-1] == 200 and (not workers or ready_workers(url) >= workers):
                return seen
        except requests.RequestException:  # not listening yet, warming up, or too busy to answer in time
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url}: {workers} ready worker(s) not seen after {timeout}s; statuses {seen[-5:]}")


@contextmanager
def serving(
    env: dict,
    log_file,
    workers: int = 1,
    command: tuple[str, ...] = SERVER_COMMAND,
    timeout: float = 180,
):
    """(process, url) of a server started with the canonical command (or `command`) and `env`, logging to
    `log_file`, ready on entry, stopped (SIGTERM, then SIGKILL after 60 s) on exit; `workers`=0 waits for /readyz
    alone."""
    process, url = spawn_server({"WEB_CONCURRENCY": max(1, workers), **env}, log_file, command)
    try:
        wait_ready(url, process, workers, timeout)
        yield process, url
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(60)


@contextmanager
def spawned(
    env: dict,
    workers: int = 1,
    log_path: str | os.PathLike = os.devnull,
    command: tuple[str, ...] = SERVER_COMMAND,
    timeout: float = 180,
):
    """`serving`, logging to `log_path`."""
    with open(log_path, "wb") as log_file, serving(env, log_file, workers, command, timeout) as server:
        yield server
