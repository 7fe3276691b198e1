"""Say where `make run` will listen, or stop with one line when that address is taken (before any install, training
or start-up trial): `python3 scripts/check_port.py HOST:PORT`. Standard library only: it runs before .venv exists."""

from __future__ import annotations

import socket
import sys


def problem(host: str, port: int) -> str | None:
    """Why gunicorn could not listen on host:port (taken, or not an address of this machine), else None."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))  # no SO_REUSEADDR, like a first listener: a server there makes this fail
        except OSError as error:
            return error.strerror or str(error)
    return None


def main(argv: list[str]) -> int:
    """Exit 0 with where it will listen, or 1 with what is wrong and what to do."""
    address = argv[0] if argv else "127.0.0.1:5000"
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    found = problem(host, int(port))
    if found:
        print(f"make run: cannot listen on {address} ({found}): stop what uses it, or pick another port, e.g. "
              f"make run PORT={int(port) + 1}", file=sys.stderr)  # fmt: skip
        return 1
    where = "this machine only" if host in ("127.0.0.1", "localhost", "::1") else "every machine that can reach it"
    print(f"make run: will serve http://{address} ({where}; BIND=0.0.0.0:{port} make run opens it to your network)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
