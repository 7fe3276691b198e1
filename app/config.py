"""Service settings: defaults, then environment variables, then overrides; read once and validated.

Imports no torch (gunicorn's master reads these settings); only the machine check, which workers run, loads it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from models.graphs import carries
from models.images import DEFAULT_MAX_PIXELS
from models.paths import DEFAULT_BUNDLE_PATH, PATH_SEPARATOR, parse_paths
from models.settings import (
    SettingError,
    between,
    declared,
    flag,
    from_environment,
    one_of,
    parsers,
    setting,
    text,
    variables,
)

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
AMP_ONLY = ("fp16", "bf16")  # precisions only PyTorch serves
BACKENDS = ("auto", "torch", "onnxruntime")  # models.loader.BACKENDS
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# A model name must be one URL path segment that Kubernetes, KServe and Triton clients accept unquoted.
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MIN_KEY_LENGTH = 16
API_KEY_PATTERN = re.compile(r"^[!-+\--~]+$")  # printable ASCII without space and comma
PATH_PREFIXES = ("/", "./", "../", "~")  # API_KEYS names a file


ConfigError = SettingError  # a setting has a bad value; the message names the variable and what is valid


def _device(name: str, raw: object) -> str:
    value = str(raw).strip().lower()
    if not DEVICE_PATTERN.match(value):
        hint = " (the service runs on CPU or CUDA; mps is for training)" if value == "mps" else ""
        raise ConfigError(f"{name}={raw!r} is invalid: valid choices are auto, cpu, cuda, cuda:N{hint}")
    return value


def _model_name(name: str, raw: object) -> str:
    value = str(raw).strip()
    if not MODEL_NAME_PATTERN.match(value):
        raise ConfigError(
            f"{name}={raw!r} is invalid: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return value


def _paths(name: str, raw: object) -> str:
    value = str(raw).strip()
    if not value:
        raise ConfigError(f"{name} is empty: set it to the path of a model bundle")
    try:
        return PATH_SEPARATOR.join(parse_paths(value))
    except ValueError as error:
        raise ConfigError(f"{name}={raw!r} is invalid: {error}") from error


def _key_list(content: str) -> list[str]:
    """Keys separated by commas or newlines; blank entries and `#` comment lines are skipped."""
    lines = [line for line in content.splitlines() if not line.lstrip().startswith("#")]
    return [key.strip() for line in lines for key in line.split(",") if key.strip()]


def _api_keys(name: str, raw: object) -> tuple[str, ...]:
    """Comma-separated keys, or the path of a file of keys; the messages never repeat a key."""
    if isinstance(raw, (list, tuple)):
        keys = [str(key).strip() for key in raw]
    elif str(raw).strip().startswith(PATH_PREFIXES):
        path = os.path.expanduser(str(raw).strip())
        try:
            with open(path, encoding="utf-8") as handle:
                keys = _key_list(handle.read())
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror or error
            raise ConfigError(f"{name} names the file {path!r}, which cannot be read: {reason}") from None
        if not keys:
            raise ConfigError(f"{name} names the file {path!r}, which holds no keys")
    else:
        keys = _key_list(str(raw))
    for position, key in enumerate(keys, 1):
        if len(key) < MIN_KEY_LENGTH or not API_KEY_PATTERN.match(key):
            raise ConfigError(
                f"{name}: key {position} of {len(keys)} is invalid: a key has at least {MIN_KEY_LENGTH} "
                "printable ASCII characters, no spaces or commas, and does not start with / ./ ../ or ~ "
                "(e.g. `openssl rand -hex 32`)"
            )
    return tuple(keys)


@declared
@dataclass(frozen=True)
class Settings:
    """The service's settings: type, default, what is valid, and the environment variable, one line each."""

    model_path: str = setting(DEFAULT_BUNDLE_PATH, _paths, env="MODEL_PATH")  # several, comma-separated: an ensemble
    device: str = setting("auto", _device, env="DEVICE")
    precision: str = setting("fp32", one_of(*PRECISIONS), env="PRECISION")
    # auto: on the CPU the faster of ONNX Runtime and PyTorch, timed at start-up, where the bundle's graph for PRECISION
    # exists (scripts/export.py) and PyTorch serves it too; else whichever can; PyTorch on CUDA
    backend: str = setting("auto", one_of(*BACKENDS), env="BACKEND")
    max_batch_size: int = setting(16, between(int, 1, 1024), env="MAX_BATCH_SIZE")
    max_batch_wait_ms: float = setting(5.0, between(float, 0, 10_000), env="MAX_BATCH_WAIT_MS")
    max_queue: int = setting(256, between(int, 1, 1_000_000), env="MAX_QUEUE")
    request_timeout_s: float = setting(10.0, between(float, 0.01, 3600), env="REQUEST_TIMEOUT_S")
    max_upload_mb: float = setting(10.0, between(float, 0.001, 4096), env="MAX_UPLOAD_MB")
    max_image_pixels: int = setting(DEFAULT_MAX_PIXELS, between(int, 1, 2**31), env="MAX_IMAGE_PIXELS")
    max_batch_files: int = setting(32, between(int, 1, 1024), env="MAX_BATCH_FILES")
    torch_threads: int = setting(0, between(int, 1, 1024), env="TORCH_THREADS")  # 0 = default_torch_threads()
    log_level: str = setting("info", one_of(*LOG_LEVELS), env="LOG_LEVEL")
    model_name: str = setting("pet-classifier", _model_name, env="MODEL_NAME")  # the /v2 (Open Inference) name
    api_keys: tuple[str, ...] = setting((), _api_keys, env="API_KEYS", repr=False)  # empty = no auth; never printed
    metrics_public: bool = setting(True, flag, env="METRICS_PUBLIC")
    explain_concurrency: int = setting(1, between(int, 1, 64), env="EXPLAIN_CONCURRENCY")
    ui_enabled: bool = setting(True, flag, env="UI_ENABLED")  # GET / serves the try-it page (app/ui)
    gpu_decode: bool = setting(False, flag, env="GPU_DECODE")  # decode JPEGs on the GPU (nvJPEG); CUDA only
    # Request limits (docs/security.md): decoded pixels held at once per worker; how slowly a body may arrive.
    decode_budget_mb: float = setting(512.0, between(float, 1, 1_048_576), env="DECODE_BUDGET_MB")
    body_timeout_s: float = setting(10.0, between(float, 0.1, 3600), env="BODY_TIMEOUT_S")
    body_min_rate_kbps: float = setting(64.0, between(float, 0.001, 1_048_576), env="BODY_MIN_RATE_KBPS")

    @property
    def max_upload_bytes(self) -> int:
        """MAX_UPLOAD_MB in bytes (Flask's MAX_CONTENT_LENGTH)."""
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def decode_budget_bytes(self) -> int:
        """DECODE_BUDGET_MB in bytes."""
        return int(self.decode_budget_mb * 1024 * 1024)

    @property
    def model_paths(self) -> tuple[str, ...]:
        """MODEL_PATH as a list: one bundle, or several separated by commas (an ensemble)."""
        return parse_paths(self.model_path)


@declared
@dataclass(frozen=True)
class ServerSettings:
    """gunicorn's settings (gunicorn.conf.py reads them), declared like Settings."""

    port: int = setting(5000, between(int, 1, 65535), env="PORT")
    bind: str = setting("", text, env="BIND")  # empty = 0.0.0.0:PORT
    web_concurrency: int = setting(1, between(int, 1, 1024), env="WEB_CONCURRENCY")
    # >= 2 x MAX_BATCH_SIZE: one batch computes while the next is decoded in request threads.
    threads: int = setting(40, between(int, 1, 10_000), env="THREADS")
    timeout: int = setting(120, between(int, 1, 86_400), env="TIMEOUT")
    graceful_timeout: int = setting(30, between(int, 1, 86_400), env="GRACEFUL_TIMEOUT")
    keepalive: int = setting(5, between(int, 0, 3600), env="KEEPALIVE")
    max_requests: int = setting(0, between(int, 0, 1_000_000_000), env="MAX_REQUESTS")  # recycle after N (0 = never)
    max_requests_jitter: int = setting(0, between(int, 0, 1_000_000_000), env="MAX_REQUESTS_JITTER")  # + 0..N
    access_log: bool = setting(True, flag, env="ACCESS_LOG")  # one line per request on stdout
    # Seconds between the master's looks at MODEL_PATH; a replaced file reloads by itself (app/model_watch.py). 0: off.
    model_watch_s: float = setting(0.0, between(float, 0.0, 3600.0), env="MODEL_WATCH_S")

    @property
    def address(self) -> str:
        """Where gunicorn listens: BIND, else all interfaces on PORT."""
        return self.bind or f"0.0.0.0:{self.port}"


# Derived from the declarations (nothing is listed twice): field name -> parser, and the variables read.
PARSERS = parsers(Settings)
SERVER_PARSERS = parsers(ServerSettings)
VARIABLES = (*variables(Settings), *variables(ServerSettings))


def load_server_settings(environ: Mapping[str, str] | None = None) -> ServerSettings:
    """gunicorn's settings from `environ` (default os.environ); ConfigError names a bad variable."""
    return ServerSettings(**from_environment(ServerSettings, os.environ if environ is None else environ))


def default_torch_threads(environ: Mapping[str, str] = os.environ) -> int:
    """CPU cores divided among the gunicorn workers, so workers do not oversubscribe the cores."""
    try:
        workers = load_server_settings(environ).web_concurrency
    except ConfigError:
        workers = 1  # reported by gunicorn.conf.py, which reads the same variable
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // workers)


def _check_combination(settings: Settings) -> None:
    """Combinations that are wrong on any machine (no torch needed)."""
    torch_only = settings.device.startswith("cuda") or settings.precision in AMP_ONLY
    if settings.backend == "onnxruntime" and torch_only:
        raise ConfigError(
            f"BACKEND=onnxruntime with DEVICE={settings.device} and PRECISION={settings.precision}: ONNX Runtime "
            "serves fp32 and int8 on the CPU; use BACKEND=auto (PyTorch serves the rest) or BACKEND=torch"
        )
    if settings.gpu_decode and settings.device == "cpu":
        raise ConfigError("GPU_DECODE=true with DEVICE=cpu: decoding on the GPU needs DEVICE=cuda (or auto on a GPU)")


def needs_machine_check(settings: Settings) -> bool:
    """Whether PRECISION and DEVICE depend on what this machine has (checking that imports torch)."""
    return settings.precision != "fp32"


def measures_backends(settings: Settings) -> bool:
    """Whether start-up times ONNX Runtime against PyTorch (app/preflight.py): BACKEND=auto, not on CUDA, and a
    bundle carries its graph for PRECISION (both runtimes may serve it; the trial decides which does)."""
    graphs = any(carries(path, settings.precision) for path in settings.model_paths)
    return settings.backend == "auto" and not settings.device.startswith("cuda") and graphs


def check_machine(settings: Settings) -> None:
    """PRECISION on an explicit DEVICE as this machine can run it (e.g. bf16 needs avx512_bf16 or AMX on a CPU)."""
    if settings.device == "cpu" or (settings.precision == "int8" and settings.device != "auto"):
        import torch  # here, not at the top: the master reads settings without torch

        from models.runtime import precision_problem

        problem = precision_problem(settings.precision, torch.device(settings.device.partition(":")[0]))
        if problem:
            raise ConfigError(f"PRECISION={settings.precision} with DEVICE={settings.device}: {problem}")


def load_settings(
    environ: Mapping[str, str] | None = None, overrides: Mapping[str, object] | None = None, machine: bool = True
) -> Settings:
    """Defaults, then `environ` (default os.environ), then `overrides`; keys are the upper-case variable names.

    machine=False skips the checks that need torch (check_machine): gunicorn's master runs those in a child."""
    environ = os.environ if environ is None else environ
    values = from_environment(Settings, environ, overrides)
    if "torch_threads" not in values:
        values["torch_threads"] = default_torch_threads(environ)
    settings = Settings(**values)
    _check_combination(settings)
    if machine:
        check_machine(settings)
    return settings
