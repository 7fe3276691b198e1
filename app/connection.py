"""What the gunicorn worker knows of a connection, for the app: when the server took the request (the routes
count REQUEST_TIMEOUT_S from it) and deadlines for blocking socket reads (a thread that shuts a socket for reading
when its read is overdue).

Stdlib only: gunicorn's master imports app.lifecycle, which sets both per connection; app.body uses the
watchdog for request bodies, the routes read the arrival time.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import threading
import time


class Watchdog:
    """One thread per worker that shuts the reading side of a socket whose read passed its deadline.

    A socket timeout alone bounds each recv, not a read: gunicorn gathers a read of n bytes from as many recvs
    as it takes, so a client sending one byte just inside each timeout could hold a thread for n timeouts.
    After the shutdown the blocked recv returns at once, and the read raises BodyTimeout.
    """

    def __init__(self):
        self._due: list[tuple[float, int, socket.socket]] = []  # a heap of (deadline, ticket, socket)
        self._fired: set[int] = set()
        self._tickets = itertools.count()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, deadline: float, sock: socket.socket) -> int:
        """Shut `sock` for reading at `deadline` unless release(ticket) comes first."""
        with self._changed:
            if self._thread is None:  # started in the worker (after gunicorn's fork), on the first body read
                self._thread = threading.Thread(target=self._run, name="body-watchdog", daemon=True)
                self._thread.start()
            ticket = next(self._tickets)
            heapq.heappush(self._due, (deadline, ticket, sock))
            self._changed.notify()
        return ticket

    def release(self, ticket: int) -> bool:
        """Stop watching `ticket`'s read; True when its deadline had already shut the socket."""
        with self._changed:
            self._due = [entry for entry in self._due if entry[1] != ticket]
            heapq.heapify(self._due)
            fired = ticket in self._fired
            self._fired.discard(ticket)
        return fired

    def _run(self) -> None:
        with self._changed:
            while True:
                while self._due and self._due[0][0] <= time.monotonic():
                    _, ticket, sock = heapq.heappop(self._due)
                    self._fired.add(ticket)
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RD)
                self._changed.wait(self._due[0][0] - time.monotonic() if self._due else None)


WATCHDOG = Watchdog()
_headers = threading.local()  # the request thread's ticket while gunicorn parses a request's headers


def watch_headers(deadline: float, sock: socket.socket) -> None:
    """Shut `sock` for reading at `deadline` unless the request reaches the app first (release_headers)."""
    _headers.ticket = WATCHDOG.watch(deadline, sock)


def release_headers() -> None:
    """The request's headers arrived (or the connection is done): stop their deadline, if one is set."""
    ticket = getattr(_headers, "ticket", None)
    if ticket is not None:
        _headers.ticket = None
        WATCHDOG.release(ticket)


_arrival = threading.local()


def set_arrival(value: float | None) -> None:
    """The worker, as a request thread takes a connection: when it was accepted (time.monotonic()), or None."""
    _arrival.value = value


def arrival_time() -> float | None:
    """When the server took the current request (time.monotonic()), under ServingWorker; None elsewhere."""
    return getattr(_arrival, "value", None)
