"""Closed-loop load from outside the server, cheap per request, plus what the server says about itself.

Clients are threads holding one keep-alive http.client connection each: every client posts, waits for the
answer, posts again. The generator shares the cores with the server, so it measures its own CPU time too.
Used by tools/benchmark.py and scripts/benchmark.py; the service never imports it.
"""

from __future__ import annotations

import http.client
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

# Histograms whose _sum/_count the benchmark reads from /metrics (deltas over one measured window).
SERVER_HISTOGRAMS = (
    "petclf_batch_size",
    "petclf_forward_seconds",
    "petclf_queue_wait_seconds",
    "petclf_request_duration_seconds",
)


def _connect(url: str, timeout: float) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)


def get_text(url: str, path: str, timeout: float = 10) -> tuple[int, str]:
    """(status, body) of one GET."""
    connection = _connect(url, timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


@dataclass
class _Window:
    """The measured window: requests completing in [start, stop) count."""

    start: float
    stop: float
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _client(url: str, path: str, body: bytes, headers: dict, window: _Window, timeout: float) -> None:
    connection = _connect(url, timeout)
    while time.perf_counter() < window.stop:
        sent = time.perf_counter()
        try:
            connection.request("POST", path, body, headers)
            response = connection.getresponse()
            response.read()
            error = None if response.status == 200 else f"HTTP {response.status}"
        except (OSError, http.client.HTTPException) as exc:
            error = type(exc).__name__
            connection.close()
            connection = _connect(url, timeout)
        done = time.perf_counter()
        if window.start <= done < window.stop:  # list.append is atomic under the GIL
            (window.errors.append(error) if error else window.latencies.append(done - sent))
    connection.close()


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation; 0 for no values."""
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[min(98, max(0, round(q) - 1))]


def closed_loop(
    url: str,
    body: bytes,
    concurrency: int,
    seconds: float,
    warmup_s: float = 2.0,
    path: str = "/predict",
    content_type: str = "image/jpeg",
    timeout: float = 120,
    observe: bool = False,
    server_pids: tuple[int, ...] = (),
) -> dict:
    """`concurrency` clients posting `body` back to back for warmup_s + seconds; the last `seconds` are measured.
    `observe`: also read the service's /metrics at both ends of the window (batching as the server saw it);
    `server_pids`: the server's processes, whose CPU time is counted apart from the rest of the machine's."""
    begin = time.perf_counter()
    window = _Window(start=begin + warmup_s, stop=begin + warmup_s + seconds)
    headers = {"Content-Type": content_type}
    clients = [
        threading.Thread(target=_client, args=(url, path, body, headers, window, timeout), daemon=True)
        for _ in range(concurrency)
    ]
    for client in clients:
        client.start()
    time.sleep(max(0.0, window.start - time.perf_counter()))
    cpu_start, wall_start = cpu_seconds(server_pids), time.perf_counter()
    before, before_at = (server_totals(url) if observe else None), time.perf_counter()
    time.sleep(max(0.0, window.stop - time.perf_counter()))
    cpu_stop, wall = cpu_seconds(server_pids), time.perf_counter() - wall_start
    # A busy server answers /metrics late: the server's window runs from answer to answer.
    after, after_at = (server_totals(url) if observe else None), time.perf_counter()
    machine, server, cpu = (stop - start for stop, start in zip(cpu_stop, cpu_start))
    for client in clients:
        client.join(timeout)
    ok, milliseconds = len(window.latencies), [s * 1000 for s in window.latencies]
    answered = max(1, ok + len(window.errors))
    return {
        "concurrency": concurrency,
        "seconds": seconds,
        "requests": ok + len(window.errors),
        "errors": len(window.errors),
        "error_kinds": sorted(set(window.errors)),
        "throughput": round(ok / seconds, 2),
        "p50_ms": round(percentile(milliseconds, 50), 1),
        "p95_ms": round(percentile(milliseconds, 95), 1),
        "p99_ms": round(percentile(milliseconds, 99), 1),
        # The generator's own cost: CPU seconds this process used in the window, per answered request.
        "client_cpu_ms_per_request": round(cpu * 1000 / answered, 3),
        "client_cpu_share": round(cpu / wall, 4),
        # What bounds throughput on a few cores, robust to a shared machine: the server's CPU per request
        # (all its threads, OpenMP's included), and the cores everything else on the machine kept busy.
        "server_cpu_ms_per_request": round(server * 1000 / answered, 1) if server_pids else None,
        "other_busy_cores": round(max(0.0, machine - server - cpu) / wall, 2) if machine else None,
        "server": server_window(before, after, after_at - before_at) if observe else None,
    }


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime, every thread
    except OSError:
        return 0.0


def cpu_seconds(pids: tuple[int, ...] = ()) -> tuple[float, float, float]:
    """(busy CPU seconds of the whole machine, of `pids`, of this process) so far; 0 where /proc is missing."""
    machine = 0.0
    if os.path.exists("/proc/stat"):
        with open("/proc/stat") as stat:
            ticks = [int(v) for v in stat.readline().split()[1:9]]
        machine = (sum(ticks) - ticks[3] - ticks[4]) / _TICK  # minus idle and iowait
    return machine, sum(_proc_cpu(pid) for pid in pids), time.process_time()


def server_totals(url: str) -> dict[str, float] | None:
    """_sum and _count of the service's batch-size, forward and queue-wait histograms; None without /metrics."""
    try:
        status, text = get_text(url, "/metrics")
    except OSError:
        return None
    if status != 200:
        return None
    names = {f"{name}_{part}" for name in SERVER_HISTOGRAMS for part in ("sum", "count")}
    totals = {}
    for line in text.splitlines():
        labelled, _, value = line.rpartition(" ")
        name = labelled.split("{", 1)[0]
        if name in names:
            totals[name] = totals.get(name, 0.0) + float(value)
    return totals or None


def server_window(before: dict | None, after: dict | None, seconds: float) -> dict:
    """Batching seen by the server between two server_totals: mean batch, forward share of the time, waits."""
    if not before or not after:
        return {}

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    batches = delta("petclf_batch_size_count")
    dequeued = delta("petclf_queue_wait_seconds_count")
    requests = delta("petclf_request_duration_seconds_count")
    return {
        "mean_batch_size": round(delta("petclf_batch_size_sum") / batches, 2) if batches else None,
        # Share of the wall time the batcher spent in forward passes: 1.0 = no bubbles between batches.
        "batcher_busy": round(delta("petclf_forward_seconds_sum") / seconds, 3),
        "forward_ms": round(delta("petclf_forward_seconds_sum") * 1000 / batches, 1) if batches else None,
        "queue_wait_ms": round(delta("petclf_queue_wait_seconds_sum") * 1000 / dequeued, 1) if dequeued else None,
        # Time inside Flask per request (all routes); the client's latency minus this is HTTP, accept and queueing
        # in gunicorn before a request thread picks the request up.
        "in_app_ms": round(delta("petclf_request_duration_seconds_sum") * 1000 / requests, 1) if requests else None,
    }


def status_kib(pid: int, key: str) -> int:
    """A /proc/<pid>/status memory field in KiB, e.g. "VmRSS:" (0 when the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    """Live child processes of `pid` (gunicorn's workers), from /proc; empty where there is no /proc."""
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":  # a killed worker not yet reaped is not live
                found.append(int(entry))
    return sorted(found)


class RssSampler:
    """Samples the resident memory of a server's workers every `interval` seconds while it runs."""

    def __init__(self, master_pid: int, interval: float = 1.0):
        self.master_pid = master_pid
        self.interval = interval
        self.samples: list[tuple[float, float]] = []  # (seconds since start, MiB of the largest worker)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.started = time.perf_counter()

    def _workers(self) -> list[int]:
        return children(self.master_pid) or [self.master_pid]

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = max((status_kib(pid, "VmRSS:") for pid in self._workers()), default=0)
            self.samples.append((round(self.elapsed(), 1), round(rss / 1024, 1)))

    def elapsed(self) -> float:
        """Seconds since sampling started (the samples' clock)."""
        return time.perf_counter() - self.started

    def growth_mib(self, since: float) -> float | None:
        """Mean RSS of the last quarter of the samples after `since` minus that of the first quarter: ~0 = flat."""
        window = [mib for at, mib in self.samples if at >= since]
        if len(window) < 4:
            return None
        quarter = len(window) // 4
        return round(sum(window[-quarter:]) / quarter - sum(window[:quarter]) / quarter, 1)

    def __enter__(self) -> RssSampler:
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()

    def peak_mib(self) -> float:
        """Peak resident memory (VmHWM) of the largest worker so far."""
        return round(max((status_kib(pid, "VmHWM:") for pid in self._workers()), default=0) / 1024, 1)
