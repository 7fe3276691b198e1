"""A newcomer's `make run`: the loopback interface by default, where it listens said first, a taken port one clear
line before any install, training or start-up trial."""

from __future__ import annotations

import socket
import subprocess
import sys

from tests.helpers import REPO_ROOT


def _listening() -> socket.socket:
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    return held


def test_make_run_stops_at_once_when_the_port_is_taken(tmp_path):
    with _listening() as held:
        port = held.getsockname()[1]
        # MODEL_PATH to nowhere: were the check not first, make would install and train.
        result = subprocess.run(
            ["make", "--no-print-directory", "run", f"PORT={port}", f"MODEL_PATH={tmp_path}/none.pt"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode != 0
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("make run:")]
    assert f"cannot listen on 127.0.0.1:{port}" in line and f"make run PORT={port + 1}" in line
    assert "training" not in result.stdout and not (tmp_path / "none.pt").exists()


def test_the_address_check_says_where_it_will_listen():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run([sys.executable, "scripts/check_port.py", f"127.0.0.1:{port}"], cwd=REPO_ROOT,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0 and f"will serve http://127.0.0.1:{port} (this machine only" in result.stdout


def test_make_serves_the_loopback_interface_unless_bind_says_otherwise():
    def serve_line(*args: str) -> str:
        shown = subprocess.run(["make", "-n", "--no-print-directory", "serve", *args], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=60).stdout  # fmt: skip
        return next(line for line in shown.splitlines() if "gunicorn" in line)

    assert serve_line("PORT=5123").startswith("BIND=127.0.0.1:5123 ")
    assert serve_line("BIND=0.0.0.0:5000").startswith("BIND=0.0.0.0:5000 ")
