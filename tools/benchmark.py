"""One side-by-side benchmark run: the raw model limit, the real service at each concurrency, the same service with
MAX_BATCH_SIZE=1, and the seed pattern (tools/naive_server.py); reported as JSON, a markdown table and a plot.

Every system gets the same environment: one worker, the same TORCH_THREADS and THREADS, and the OpenMP policy that
gunicorn.conf.py gives the service (GOMP_SPINCOUNT=10000; --env OMP_WAIT_POLICY=PASSIVE measures the old one). The
raw limit runs in a child process with that environment, through the service's own preprocessing and inference
code. scripts/benchmark.py is the command line; the service never imports this module (tools/ is not packaged).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from app.config import load_server_settings
from tools.harness import ROOT, SERVER_COMMAND, spawned
from tools.loadgen import RssSampler, children, closed_loop, get_text

BASE_ENV = {"GOMP_SPINCOUNT": "10000", "WEB_CONCURRENCY": "1"}  # the spin bound as gunicorn.conf.py sets it
KINDS = {"raw": "raw model", "service": "service", "unbatched": "service MAX_BATCH_SIZE=1", "naive": "naive Flask"}
RAW_PROBE = """
import json, sys
from tools.benchmark import raw_limit
print(json.dumps(raw_limit(**json.loads(sys.argv[1]))))
"""
# The targets (issue 9), checked on every run: (name, goal, higher is better).
GOALS = {
    "service/raw throughput, most clients": (0.85, True),
    "1-client p50 / (1.15 x raw forward + 5 ms)": (1.0, False),
    "1-client p50 - raw batch-1 forward, ms": (10.0, False),
    "1-client p50 / naive p50": (1.0, False),
    "service/naive throughput, most clients": (2.5, True),
    "p99/p50, most clients": (2.5, False),
    # issue 22: a service against the same precision's BACKEND=torch service in the run.
    "service/PyTorch service throughput, most clients": (1.2, True),
}
RAW_BACKENDS = ("torch", "onnxruntime")  # the raw limit runs on every runtime that serves the precision


@dataclass(frozen=True)
class BenchmarkConfig:
    """What one run measures; None = the service's own default."""

    model: str
    image: str = str(ROOT / "tests" / "data" / "rocket.jpg")
    out: str = "reports/benchmark"
    concurrencies: tuple[int, ...] = (1, 8, 32)
    seconds: float = 20.0
    warmup_s: float = 3.0
    precisions: tuple[str, ...] = ("fp32",)
    max_batch_size: int = 16
    max_batch_wait_ms: float = 5.0
    threads: int | None = None
    torch_threads: int | None = None
    extra_env: dict = field(default_factory=dict)
    systems: tuple[str, ...] = tuple(KINDS)  # which of raw, service, unbatched, naive run
    backends: tuple[str, ...] = ("auto",)  # BACKEND of the services; auto: ONNX Runtime where a graph exists

    def env(self, **overrides) -> dict:
        """The environment every server (and the raw probe) of this run gets."""
        env = {**BASE_ENV, "MODEL_PATH": str(Path(self.model).resolve()), "LOG_LEVEL": "warning"}
        env.update(MAX_BATCH_SIZE=self.max_batch_size, MAX_BATCH_WAIT_MS=self.max_batch_wait_ms)
        env.update({k: v for k, v in (("THREADS", self.threads), ("TORCH_THREADS", self.torch_threads)) if v})
        return {k: str(v) for k, v in {**env, **self.extra_env, **overrides}.items()}


def _timed(step: Callable[[], object], seconds: float) -> list[float]:
    """Durations of `step`, run at least 3 times and for at least `seconds`."""
    durations: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(durations) < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        step()
        durations.append(time.perf_counter() - start)
    return durations


def raw_limit(model: str, image: str, precision: str, batch_size: int, seconds: float, backend: str = "auto") -> dict:
    """The service's preprocessing and forward pass in this process, without HTTP, queue or threads around them."""
    import torch

    from app.config import ConfigError, load_settings
    from app.inference import build_handler, serving_device
    from models.ensemble import load_ensemble
    from models.graphs import GraphError
    from models.quantize import QuantizationError

    try:
        settings = load_settings(overrides={"MODEL_PATH": model, "PRECISION": precision, "BACKEND": backend})
        ensemble = load_ensemble(settings.model_paths)
        handler = build_handler(settings, ensemble, serving_device(settings))
        # One thread does everything here; under ONNX Runtime its own pool computes (as in the batcher).
        torch.set_num_threads(1 if handler.onnx_only else settings.torch_threads)
    except (ConfigError, QuantizationError, GraphError) as error:
        return {"skipped": str(error)}
    data = Path(image).read_bytes()
    preprocess = _timed(lambda: handler.preprocess(data), min(seconds, 3.0))
    pixels = handler.preprocess(data)
    one, full = handler.collate(pixels), handler.collate(pixels * batch_size)
    handler.warmup((1, batch_size))
    # CPU time of every thread of this process (OpenMP's too): what bounds throughput on a few shared cores.
    cpu_single = time.process_time()
    single = _timed(lambda: handler.inference(one), seconds / 2)
    cpu_single, cpu = time.process_time() - cpu_single, time.process_time()
    batched = _timed(lambda: handler.inference(full), seconds / 2)
    cpu = time.process_time() - cpu
    forward_ms = statistics.median(single) * 1000
    return {
        "device": str(handler.device),
        "backend": handler.member_info()[0]["backend"],
        "torch_threads": settings.torch_threads,
        "preprocess_ms": round(statistics.median(preprocess) * 1000, 2),
        "forward_ms_b1": round(forward_ms, 1),
        "throughput_b1": round(1000 / forward_ms, 2),
        "cpu_ms_b1": round(cpu_single * 1000 / len(single), 1),
        "forward_ms_batch": round(statistics.median(batched) * 1000, 1),
        "throughput": round(batch_size * len(batched) / sum(batched), 2),
        "cpu_ms_per_image": round(cpu * 1000 / (batch_size * len(batched)), 1),
        "batch_size": batch_size,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def run_raw(config: BenchmarkConfig, precision: str, backend: str = "torch") -> dict:
    """raw_limit in a child process with the servers' environment (threads and OpenMP settings as theirs)."""
    args = {"model": str(Path(config.model).resolve()), "image": str(config.image), "precision": precision}
    args["backend"] = backend
    args.update(batch_size=config.max_batch_size, seconds=config.seconds)
    env = {**os.environ, **config.env(PRECISION=precision, BACKEND=backend)}
    result = subprocess.run(
        [sys.executable, "-c", RAW_PROBE, json.dumps(args)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    system = _system("raw", precision, backend)
    if result.returncode:
        return {**system, "error": result.stderr.strip().splitlines()[-5:]}
    return {**system, **json.loads(result.stdout.splitlines()[-1])}


def naive_command(threads: int) -> tuple[str, ...]:
    """gunicorn running tools/naive_server.py like the service runs: one gthread worker, `threads` threads."""
    return (
        # -c /dev/null: no config file; gunicorn would otherwise load the service's ./gunicorn.conf.py.
        *("-m", "gunicorn", "-c", os.devnull, "--bind", "{bind}", "--workers", "1", "--worker-class", "gthread"),
        *("--threads", str(threads), "--pythonpath", str(ROOT), "tools.naive_server:create_app()"),
    )


def why_it_failed(log_path: Path) -> str:
    """The server log's last exception or configuration-error line, else its last line."""
    lines = log_path.read_text(errors="replace").strip().splitlines() or [""]
    reasons = [line for line in lines if "Error: " in line or "configuration error" in line]
    return (reasons or lines)[-1].strip()


def run_server(config: BenchmarkConfig, system: dict, env: dict, command=SERVER_COMMAND) -> dict:
    """Start one server, load it at every concurrency, sample its workers' memory; errors are reported, not raised."""
    body = Path(config.image).read_bytes()
    logs = Path(config.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{system['system'].replace(' ', '_').replace('/', '_')}.log"
    workers = 1 if command == SERVER_COMMAND else 0  # 0: the naive app has no /metrics
    points = []
    try:
        with spawned(env, workers, log_path, command) as (process, url), RssSampler(process.pid) as rss:
            served = _served(url) if workers else None
            for concurrency in config.concurrencies:
                pids = (*children(process.pid), process.pid)
                measured_from = rss.elapsed() + config.warmup_s
                point = closed_loop(
                    url, body, concurrency, config.seconds, config.warmup_s, observe=workers > 0, server_pids=pids
                )
                points.append({**point, "rss_mib": rss.samples[-1][1] if rss.samples else None})
                # Memory flatness: RSS growth over the measured seconds (last quarter minus first quarter).
                points[-1].update(peak_rss_mib=rss.peak_mib(), rss_growth_mib=rss.growth_mib(measured_from))
    except (RuntimeError, TimeoutError) as error:
        return {**system, "error": [str(error), why_it_failed(log_path)], "points": points}
    return {**system, "served": served, "env": env, "points": points, "rss_series": rss.samples}


def _served(url: str) -> list[dict]:
    """Per member, the runtime that serves it and why (BACKEND=auto's choice, with its start-up timing)."""
    status, text = get_text(url, "/model")
    members = json.loads(text)["members"] if status == 200 else []
    return [{key: member.get(key) for key in ("backend", "reason", "measured")} for member in members]


def _system(kind: str, precision: str, backend: str = "auto") -> dict:
    label = precision if backend == "auto" else f"{precision}, {backend}"
    return {"system": f"{KINDS[kind]} ({label})", "kind": kind, "precision": precision, "backend": backend}


def run(config: BenchmarkConfig, progress: Callable[[str], None] = print) -> dict:
    """Every system of the run, one after the other; returns the report (also written under config.out)."""
    report = {"config": asdict(config), "machine": machine(), "agreement": stored_agreement(config.model)}
    systems = report["systems"] = []

    def record(result: dict) -> None:
        systems.append(result)
        progress(json.dumps({k: v for k, v in result.items() if k not in ("env", "rss_series")})[:600])

    wanted = set(config.systems)
    for precision in config.precisions if "raw" in wanted else ():
        for backend in RAW_BACKENDS:
            record(run_raw(config, precision, backend))
    for precision in config.precisions if "service" in wanted else ():
        for backend in config.backends:
            env = config.env(PRECISION=precision, BACKEND=backend)
            record(run_server(config, _system("service", precision, backend), env))
    first = config.precisions[0]
    if "unbatched" in wanted:
        record(run_server(config, _system("unbatched", first), config.env(PRECISION=first, MAX_BATCH_SIZE=1)))
    if "naive" in wanted:
        threads = config.threads or load_server_settings().threads
        record(run_server(config, _system("naive", "fp32"), config.env(), naive_command(threads)))
    report["machine"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    report["targets"] = targets(report)
    write_report(report, Path(config.out))
    return report


def stored_agreement(model: str) -> dict | None:
    """Each precision's top-1 agreement with fp32, as scripts/quantize.py stored it with the int8 network."""
    from models.bundle import BundleError, load_bundle
    from models.quantize import QuantizationError, read_int8

    try:
        return read_int8(load_bundle(model))["info"].get("agreement")
    except (BundleError, QuantizationError):
        return None


def machine() -> dict:
    """Where the run happened: CPU, cores, torch, native bf16, load average."""
    import torch

    from models.runtime import cpu_bf16_problem, cpu_features

    features = cpu_features()
    return {
        "cpu": features.get("cpu_name") or platform.processor() or platform.machine(),
        "held_to": os.environ.get("PETCLF_CPUID_PROFILE") or None,  # tools/cpu_isa.py: the CPU the libraries saw
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_native": cpu_bf16_problem() is None,
        "cpu_flags": sorted(name for name, on in features.items() if on is True and name != "cpu_name"),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def _point(system: dict | None, concurrency: int) -> dict | None:
    points = (system or {}).get("points") or []
    return next((p for p in points if p["concurrency"] == concurrency), None)


def fastest_raw(report: dict, precision: str) -> dict:
    """The raw limit of `precision` on its fastest runtime in this run ({} when none ran)."""
    raws = [s for s in report["systems"] if s["kind"] == "raw" and s["precision"] == precision and "throughput" in s]
    return max(raws, key=lambda s: s["throughput"], default={})


def goals(precision: str, machine: dict) -> dict[str, tuple[float, bool]]:
    """(goal, higher is better) per target name for `precision` on `machine` (its CPU flags set int8's naive goal)."""
    if precision != "int8":
        return GOALS
    # issue 22's int8 goals: 0.80 of the fastest raw int8 limit, 4x the naive pattern with VNNI (3x without).
    vnni = any("vnni" in flag for flag in machine.get("cpu_flags", ()))
    return {
        **GOALS,
        "service/raw throughput, most clients": (0.80, True),
        "service/naive throughput, most clients": (4.0 if vnni else 3.0, True),
    }


def _ratios(served_most: dict | None, served_one: dict | None, raw: dict, naive: tuple, torch_most: dict | None):
    """Target name -> value for one service's points against the run's fastest raw limit and the naive pattern."""
    values, (naive_most, naive_one) = {}, naive
    if served_most and raw.get("throughput"):
        values["service/raw throughput, most clients"] = served_most["throughput"] / raw["throughput"]
    if served_one and raw.get("forward_ms_b1"):
        values["1-client p50 / (1.15 x raw forward + 5 ms)"] = served_one["p50_ms"] / (1.15 * raw["forward_ms_b1"] + 5)
        values["1-client p50 - raw batch-1 forward, ms"] = served_one["p50_ms"] - raw["forward_ms_b1"]
    if served_one and naive_one:
        values["1-client p50 / naive p50"] = served_one["p50_ms"] / naive_one["p50_ms"]
    if served_most and naive_most and naive_most["throughput"]:
        values["service/naive throughput, most clients"] = served_most["throughput"] / naive_most["throughput"]
    if served_most and torch_most and torch_most["throughput"]:
        ratio = served_most["throughput"] / torch_most["throughput"]
        values["service/PyTorch service throughput, most clients"] = ratio
    if served_most and served_most["p50_ms"]:
        values["p99/p50, most clients"] = served_most["p99_ms"] / served_most["p50_ms"]
    return values


def targets(report: dict) -> list[dict]:
    """The issues' targets as ratios from this run, per precision and per service (every BACKEND that ran); raw
    limits are the fastest runtime's of the precision, the naive pattern's is its fp32 service."""
    naive = next((s for s in report["systems"] if s["kind"] == "naive"), None)
    most, one = max(report["config"]["concurrencies"]), min(report["config"]["concurrencies"])
    naive_points = (_point(naive, most), _point(naive, 1) if one == 1 else None)
    rows = []
    for precision in report["config"]["precisions"]:
        raw = fastest_raw(report, precision)
        services = [s for s in report["systems"] if s["kind"] == "service" and s["precision"] == precision]
        torch_service = next((s for s in services if s.get("backend") == "torch"), None)
        precision_goals = goals(precision, report.get("machine", {}))
        for service in services:
            torch_most = None if service is torch_service else _point(torch_service, most)
            one_point = _point(service, one) if one == 1 else None
            values = _ratios(_point(service, most), one_point, raw, naive_points, torch_most)
            for name, value in values.items():
                goal, higher = precision_goals[name]
                met = value >= goal if higher else value <= goal
                rows.append({"precision": precision, "system": service.get("system", precision), "target": name,
                             "value": round(value, 3), "goal": goal, "met": met})  # fmt: skip
    return rows


def _cell(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(report: dict) -> str:
    """The run as markdown: one row per system and concurrency, then the targets."""
    lines = [
        "| system | clients | img/s | p50 ms | p95 ms | p99 ms | errors | mean batch | batcher busy "
        "| server CPU ms/img | other load (cores) | peak RSS MiB | RSS growth MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for system in report["systems"]:
        name = system["system"]
        if system["kind"] == "raw":
            if "throughput" not in system:
                lines.append(f"| {name} | - | skipped: {system.get('skipped') or system.get('error')} ||||||||||| ")
                continue
            lines.append(
                f"| {name}, batch 1 / {system['batch_size']} | in-process | {system['throughput_b1']:.1f} / "
                f"{system['throughput']:.1f} | {system['forward_ms_b1']:.0f} (forward) | | | | | | "
                f"{system['cpu_ms_per_image']:.0f} | | {system['peak_rss_mib']:.0f} | |"
            )
            continue
        if system.get("backend") == "auto" and system.get("served"):  # what auto chose
            name += f" = {'+'.join(member['backend'] for member in system['served'])}"
        if "error" in system and not system.get("points"):
            lines.append(f"| {name} | - | did not run: {' / '.join(system['error'])[:200]} ||||||||||| ")
        for p in system.get("points", []):
            server = p.get("server") or {}
            lines.append(
                f"| {name} | {p['concurrency']} | {p['throughput']:.1f} | {p['p50_ms']:.0f} | {p['p95_ms']:.0f} | "
                f"{p['p99_ms']:.0f} | {p['errors']} | {_cell(server.get('mean_batch_size'), 2)} | "
                f"{_cell(server.get('batcher_busy'), 2)} | {_cell(p.get('server_cpu_ms_per_request'), 0)} | "
                f"{_cell(p.get('other_busy_cores'), 2)} | {_cell(p.get('peak_rss_mib'), 0)} | "
                f"{_cell(p.get('rss_growth_mib'), 0)} |"
            )
    lines += ["", "| service | target | value | goal | met |", "| --- | --- | --- | --- | --- |"]
    for row in report["targets"]:
        met = "yes" if row["met"] else "no"
        lines.append(f"| {row['system']} | {row['target']} | {row['value']:.2f} | {row['goal']} | {met} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Throughput and p99 against concurrency, one line per system; the raw limits as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for system in report["systems"]:
        if system["kind"] == "raw":
            if "throughput" in system:
                left.axhline(system["throughput"], linestyle="--", color="grey", linewidth=1)
                left.annotate(system["system"], (min(report["config"]["concurrencies"]), system["throughput"]))
            continue
        points = system.get("points") or []
        if points:
            clients = [p["concurrency"] for p in points]
            left.plot(clients, [p["throughput"] for p in points], marker="o", label=system["system"])
            right.plot(clients, [p["p99_ms"] for p in points], marker="o", label=system["system"])
    concurrencies = list(report["config"]["concurrencies"])
    for axis, label in ((left, "images/s"), (right, "p99 latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(concurrencies, [str(c) for c in concurrencies])
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize=8)
    machine = report["machine"]
    held = f", held to {machine['held_to']}" if machine.get("held_to") else ""
    title = f"{Path(report['config']['model']).name} on {machine['cores']} cores ({machine['cpu']}{held})"
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(report: dict, out: Path) -> None:
    """benchmark.json, benchmark.md and benchmark.png under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(report, indent=2))
    (out / "benchmark.md").write_text(markdown(report))
    plot(report, out / "benchmark.png")


def untrained_bundle(
    arch: str, path: str | os.PathLike, image: str, int8: bool = False, image_size: int = 224, classes: int = 37,
    graphs: bool = True,
) -> str:
    """An untrained `arch` PetClassifier bundle (seeded; default_preprocess(image_size)), with `int8` its PyTorch int8
    network, with `graphs` its ONNX Runtime graphs (fp32, and int8 with `int8`), int8 calibrated on `image` alone:
    for timing only, their predictions mean nothing. Written once, reused."""
    import torch

    from models.bundle import add_runtimes, load_model, save_bundle
    from models.images import load_image
    from models.pet_classifier import PetClassifier
    from models.quantize import ENTRY, int8_entry, quantize
    from models.transforms import default_preprocess, eval_transform

    if not Path(path).is_file():
        torch.manual_seed(0)
        model = PetClassifier(classes, arch=arch, weights="none").eval()
        names = [f"class_{index:02d}" for index in range(classes)]
        save_bundle(path, model, names, default_preprocess(image_size), training={"untrained": True})
    model, bundle = load_model(path)
    if int8 and ENTRY not in bundle.runtimes:
        tensor = eval_transform(bundle.preprocess)(load_image(image, min_size=bundle.preprocess["resize"]))
        quantized = quantize(model, [torch.stack([tensor] * 4)], bundle.preprocess["crop"])
        info = {"calibration": {"images": 1, "data": f"{image} only: for timing, not for accuracy"}}
        add_runtimes(path, bundle.content_hash, {ENTRY: int8_entry(quantized, bundle, info)})
    if graphs:
        _untrained_graphs(path, image, ("fp32", "int8") if int8 else ("fp32",))
    return str(path)


def _untrained_graphs(path: str | os.PathLike, image: str, precisions: tuple[str, ...]) -> None:
    import torch

    from models.bundle import add_runtimes
    from models.graphs import carries
    from models.images import load_image
    from models.loader import load_predictor
    from models.training.export import make_graphs
    from models.transforms import eval_transform

    missing = tuple(p for p in precisions if not carries(path, p))
    if missing:
        loaded = load_predictor(path, "cpu", "fp32", "torch")
        bundle = loaded.ensemble.bundles[0]
        tensor = eval_transform(bundle.preprocess)(load_image(image, min_size=bundle.preprocess["resize"]))
        batch = torch.stack([tensor, tensor.flip(-1)] * 2)
        entries = make_graphs(bundle, loaded.floats, missing, [batch], source=f"{image} only: for timing, not accuracy")
        add_runtimes(path, bundle.content_hash, entries)
