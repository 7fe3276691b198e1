"""gunicorn workers without failed requests: warm before accepting, hand over on reload, fail softly.

On HUP, gunicorn's master (Arbiter.reload) forks the new workers and SIGTERMs the old ones in the same breath,
and a gthread worker stops accepting on SIGTERM, so nobody would take connections until the new workers are
warm. ServingWorker is gunicorn's gthread worker plus a run directory shared with the master:

- it enters gunicorn's accept loop only after create_app returned, i.e. with its model loaded and warmed up;
- told to stop while a newer generation of workers is starting, it keeps serving until that generation is
  ready (at most TIMEOUT seconds), then drains; told to stop with nothing newer starting, it drains at once;
- when it cannot load the app while other workers serve (a bad bundle at reload, a replaced worker), it
  records why and exits with status 1 instead of gunicorn's boot-error status 3, which would halt the
  master; older workers see the failure and keep serving. At first start nobody serves yet, so a bad bundle
  still stops the server.

The master (gunicorn.conf.py's hooks) creates the run directory and numbers generations: 1 at start, +1 per
reload. Each worker has one JSON record there (`<age>.json`: generation, pid, state, reason), written by the
master when it creates the worker object (before the fork, so before it SIGTERMs the old workers) and updated
by the worker. The master loads this module as the worker class: it imports no torch, Flask or app code
(app/__init__.py loads nothing eagerly), which tests/test_server.py checks on a running master.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

from gunicorn import util
from gunicorn.workers.gthread import ThreadWorker

from app.connection import release_headers, set_arrival, watch_headers

RUN_DIR_ENV = "PETCLF_RUN_DIR"
GENERATION_ENV = "PETCLF_GENERATION"
MASTER_PID_ENV = "PETCLF_MASTER_PID"
BOOTING, READY, FAILED = "booting", "ready", "failed"
POLL_S = 0.1
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 64 << 20
# A replacement worker that cannot load waits this long before exiting, so gunicorn's immediate respawn does
# not turn into a tight crash loop while the other workers serve.
RETRY_DELAY_S = 5.0


@dataclass(frozen=True)
class Record:
    """One worker as the run directory knows it; pid is None between creation and fork."""

    age: int
    generation: int
    pid: int | None = None
    state: str = BOOTING
    reason: str = ""


class Decision(NamedTuple):
    """What a worker told to stop does: "exit" now, "wait" for a starting generation, or "stay" serving."""

    action: str
    generation: int = 0
    reason: str = ""


def pid_alive(pid: int | None) -> bool:
    """True while the process exists (a zombie too, until the master reaps it); None (not forked yet) counts."""
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunDir:
    """The directory a master and its workers share: one JSON record per worker, replaced atomically."""

    def __init__(self, path: str):
        self.path = path

    @classmethod
    def from_env(cls) -> RunDir | None:
        """The run directory of this process's master, or None outside gunicorn.conf.py's master."""
        path = os.environ.get(RUN_DIR_ENV)
        return cls(path) if path and os.path.isdir(path) else None

    def _file(self, age: int) -> str:
        return os.path.join(self.path, f"{age}.json")

    def write(self, record: Record) -> None:
        """Create or replace `record` (readers never see a half-written file)."""
        fd, temporary = tempfile.mkstemp(dir=self.path, suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(record), handle)
        os.replace(temporary, self._file(record.age))

    def read(self, age: int) -> Record | None:
        """The record of the worker of `age`, or None."""
        try:
            with open(self._file(age)) as handle:
                return Record(**json.load(handle))
        except (OSError, ValueError, TypeError):
            return None

    def records(self) -> list[Record]:
        """Every worker record (ones removed while listing are skipped)."""
        ages = [int(name[:-5]) for name in os.listdir(self.path) if name.endswith(".json") and name[:-5].isdigit()]
        return [record for record in map(self.read, ages) if record is not None]

    def remove(self, age: int) -> None:
        """Forget the worker of `age`."""
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._file(age))


# Master side (gunicorn.conf.py)


def start_run_dir() -> str:
    """Master, before the first fork: a fresh run directory, generation 1, in the environment workers inherit."""
    path = os.path.join(tempfile.gettempdir(), f"petclf-run-{os.getpid()}")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    os.environ.update({RUN_DIR_ENV: path, GENERATION_ENV: "1", MASTER_PID_ENV: str(os.getpid())})
    return path


def is_reload() -> bool:
    """True when gunicorn re-reads its config file in a running master (HUP), not at first start."""
    return os.environ.get(MASTER_PID_ENV) == str(os.getpid())


def current_generation() -> int:
    """The generation the master's next workers belong to."""
    return int(os.environ.get(GENERATION_ENV, "1"))


def next_generation() -> int:
    """Master, on reload: the workers forked from now on are one generation newer."""
    generation = current_generation() + 1
    os.environ[GENERATION_ENV] = str(generation)
    return generation


def forget(age: int) -> None:
    """Master, after reaping a worker: drop its record, unless it records a failure that older workers read."""
    run_dir = RunDir.from_env()
    if run_dir is not None:
        record = run_dir.read(age)
        if record is not None and record.state != FAILED:
            run_dir.remove(age)


def remove_run_dir() -> None:
    """Master, at exit: delete the run directory it created."""
    path = os.environ.get(RUN_DIR_ENV)
    if path and is_reload():  # i.e. this process is the master that created it
        shutil.rmtree(path, ignore_errors=True)


# The decision


def handover(generation: int, records: list[Record], rejected: int = 0) -> Decision:
    """What a worker of `generation`, told to stop, does, given the records (generations <= rejected ignored)."""
    newer = [record for record in records if record.generation > max(generation, rejected)]
    if not newer:
        return Decision("exit")  # a shutdown: nothing newer is coming
    newest = max(record.generation for record in newer)
    members = [record for record in newer if record.generation == newest]
    failed = [record for record in members if record.state == FAILED]
    live = [record for record in members if record.state != FAILED and pid_alive(record.pid)]
    if any(record.state == BOOTING for record in live) or any(pid_alive(record.pid) for record in failed):
        return Decision("wait", newest)  # still starting, or a failure the master has not reaped yet
    if live:
        return Decision("exit", newest)  # every live worker of the newest generation is ready
    if failed:
        return Decision("stay", newest, failed[-1].reason)
    return Decision("exit", newest)  # it started and stopped again: a shutdown


# gunicorn's own refusals (a bad request line or header, too long a URI or header block) as the service's codes.
GUNICORN_CODES = {400: "bad_request", 403: "forbidden", 414: "uri_too_long", 417: "expectation_failed",
                  431: "headers_too_large", 500: "internal_error", 501: "not_implemented"}  # fmt: skip


def write_json_error(sock, status: int, reason: str, message: str) -> None:
    """gunicorn's util.write_error, answering in the service's JSON error shape instead of an HTML page."""
    code = GUNICORN_CODES.get(status, reason.lower().replace(" ", "_"))
    body = json.dumps({"error": {"code": code, "message": message or reason}}).encode()
    head = f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
    util.write_nonblock(sock, f"{head}Content-Length: {len(body)}\r\n\r\n".encode("latin-1") + body)


def return_big_buffers() -> None:
    """glibc: allocations over MMAP_THRESHOLD_BYTES are mapped, and unmapped when freed, always.

    By default glibc raises that threshold to the size of each block freed (up to 32 MB), so a decoded image's
    blocks stayed in the heap: a worker kept 1.0-1.15 GB resident after one 40-megapixel request (issue 21).
    Not lower than 64 MB: at 1 MB every activation of a forward pass was mapped and unmapped again, which halved
    PyTorch's fp32 ResNet-50 service (13.0 against 25.1 img/s at one client); its largest, at batch 16, is 51 MB.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


class ServingWorker(ThreadWorker):
    """gunicorn's gthread worker that accepts only when warm, hands over on reload and fails softly."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.generation = current_generation()
        self.run_dir = RunDir.from_env()
        self._rejected = 0  # the newest generation seen failing: later SIGTERMs ignore it
        self._handover: threading.Thread | None = None
        self._header_timeout_s: float | None = None  # BODY_TIMEOUT_S, read from the app once it is loaded
        self._record(BOOTING)  # in the master, before the fork

    def _record(self, state: str, reason: str = "") -> None:
        if self.run_dir is not None:
            pid = self.pid if isinstance(self.pid, int) else None
            self.run_dir.write(Record(self.age, self.generation, pid, state, reason))

    # Start: load, warm, then accept

    def init_process(self):
        self._record(BOOTING)  # in the child: now with its pid
        # The worker's handle_error writes through util.write_error; this process is ours (after the fork).
        util.write_error = write_json_error
        return_big_buffers()
        super().init_process()

    def load_wsgi(self):
        """create_app: loads and warms the model; a failure while other workers serve is recorded, not fatal."""
        try:
            super().load_wsgi()
        except Exception as error:
            if not self._others_ready(0):
                raise  # first start: gunicorn reports a boot error and stops the server
            self._fail(f"{type(error).__name__}: {error}")

    def _others_ready(self, min_generation: int) -> list[Record]:
        records = self.run_dir.records() if self.run_dir is not None else []
        return [
            r for r in records
            if r.state == READY and r.pid != self.pid and r.generation >= min_generation and pid_alive(r.pid)
        ]  # fmt: skip

    def _fail(self, reason: str) -> None:
        self.log.exception(
            "worker %s (generation %d) could not load the app; the workers already serving carry on: %s",
            self.pid, self.generation, reason,
        )  # fmt: skip
        for record in self.run_dir.records():  # earlier failed tries of this generation: keep only the latest
            if record.state == FAILED and record.generation == self.generation and not pid_alive(record.pid):
                self.run_dir.remove(record.age)
        self._record(FAILED, reason)
        if self._others_ready(self.generation):  # a replacement: gunicorn forks the next try at once
            deadline = time.monotonic() + RETRY_DELAY_S
            while self.alive and time.monotonic() < deadline:
                time.sleep(POLL_S)
        # Status 1, not gunicorn's boot-error 3 (which halts the master). os._exit skips the interpreter's final
        # garbage collection of the half-built app, which can take many seconds while the old workers wait.
        os._exit(1)

    def run(self):
        wsgi = getattr(self, "wsgi", None)
        if wsgi is not None:
            from app.service import get_service  # the app is loaded: no import cost left

            self._header_timeout_s = get_service(wsgi).settings.body_timeout_s
        if self.alive:
            self._record(READY)
            self.log.info("worker %s ready (generation %d): accepting connections", self.pid, self.generation)
        super().run()

    # Requests: when did the server take this one?

    def enqueue_req(self, conn):
        conn.petclf_arrived = time.monotonic()
        super().enqueue_req(conn)

    def handle(self, conn):
        set_arrival(getattr(conn, "petclf_arrived", None))
        if self._header_timeout_s:
            # gunicorn waits at most 5 s for a request's first byte, but then reads its headers without a deadline:
            # a client that stops mid-headers held the thread until it hung up. BODY_TIMEOUT_S bounds them too.
            watch_headers(time.monotonic() + self._header_timeout_s, conn.sock)
        try:
            return super().handle(conn)
        finally:
            release_headers()

    # Stop: drain at once, or after the newer generation is ready

    def handle_exit(self, sig, frame):
        """SIGTERM: drain now, or once the newer generation that is starting is ready (see the module doc)."""
        if self._handover is not None and self._handover.is_alive():
            return  # already waiting; the master repeats SIGTERM while it has more workers than it wants
        if self._decide().action == "exit":
            self._stop(sig)
            return
        self._handover = threading.Thread(target=self._stop_when_replaced, args=(sig,), name="handover", daemon=True)
        self._handover.start()

    def _decide(self) -> Decision:
        if self.run_dir is None:
            return Decision("exit")
        return handover(self.generation, self.run_dir.records(), self._rejected)

    def _stop_when_replaced(self, sig: int) -> None:
        deadline = time.monotonic() + self.cfg.timeout
        announced = 0
        while (decision := self._decide()).action != "exit":
            if decision.action == "stay":
                self._rejected = decision.generation
                self.log.error(
                    "generation %d failed to start (%s); worker %s keeps serving generation %d",
                    decision.generation, decision.reason, self.pid, self.generation,
                )  # fmt: skip
                return
            if time.monotonic() > deadline:
                self.log.warning("generation %d not ready after TIMEOUT=%ss; stopping anyway", decision.generation,
                                 self.cfg.timeout)  # fmt: skip
                break
            if decision.generation != announced:
                announced = decision.generation
                self.log.info("generation %d is starting; worker %s serves until it is ready", announced, self.pid)
            time.sleep(POLL_S)
        if announced:
            self.log.info("generation %d is ready; worker %s stops taking requests and drains", announced, self.pid)
        self._stop(sig)

    def _stop(self, sig: int) -> None:
        """Mark the service draining (/readyz 503), then gunicorn's graceful stop: in-flight requests finish."""
        wsgi = getattr(self, "wsgi", None)  # set once create_app returned
        if wsgi is not None:
            from app.service import get_service  # imported by create_app already: no import inside a signal handler

            get_service(wsgi).drain()
        super().handle_exit(sig, None)
