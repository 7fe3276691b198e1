"""Service settings: defaults, then environment variables, then overrides; read once and validated."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields

import torch

from models.bundle import DEFAULT_BUNDLE_PATH
from models.ensemble import PATH_SEPARATOR, parse_paths
from models.images import DEFAULT_MAX_PIXELS
from models.runtime import precision_problem

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
AMP_ONLY = ("fp16", "bf16")  # precisions only PyTorch serves
BACKENDS = ("auto", "torch", "onnxruntime")  # models.loader.BACKENDS
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# A model name must be one URL path segment that Kubernetes, KServe and Triton clients accept unquoted.
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
FLAGS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
MIN_KEY_LENGTH = 16
API_KEY_PATTERN = re.compile(r"^[!-+\--~]+$")  # printable ASCII without space and comma
PATH_PREFIXES = ("/", "./", "../", "~")  # API_KEYS names a file


class ConfigError(ValueError):
    """A setting has a bad value; the message names the variable and what is valid."""


@dataclass(frozen=True)
class Settings:
    """Typed settings; field names are the environment variable names in lower case."""

    model_path: str = DEFAULT_BUNDLE_PATH
    device: str = "auto"
    precision: str = "fp32"
    backend: str = "auto"  # auto: ONNX Runtime on the CPU where the bundle's graph for PRECISION exists, else PyTorch
    max_batch_size: int = 16
    max_batch_wait_ms: float = 5.0
    max_queue: int = 256
    request_timeout_s: float = 10.0
    max_upload_mb: float = 10.0
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_batch_files: int = 32
    torch_threads: int = 0  # 0 = default_torch_threads()
    log_level: str = "info"
    model_name: str = "pet-classifier"  # the name the Open Inference Protocol (/v2) serves the model under
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # empty = no authentication; never printed
    metrics_public: bool = True
    explain_concurrency: int = 1
    ui_enabled: bool = True  # GET / serves the try-it page (app/ui)
    gpu_decode: bool = False  # decode JPEGs on the GPU (nvJPEG) and resize there; CUDA only

    @property
    def max_upload_bytes(self) -> int:
        """MAX_UPLOAD_MB in bytes (Flask's MAX_CONTENT_LENGTH)."""
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def model_paths(self) -> tuple[str, ...]:
        """MODEL_PATH as a list: one bundle, or several separated by commas (an ensemble)."""
        return parse_paths(self.model_path)


def _number(kind: type, low: float, high: float) -> Callable[[str, object], object]:
    def parse(name: str, raw: object):
        try:
            value = kind(raw)
        except (TypeError, ValueError):
            value = None
        if value is None or isinstance(raw, bool) or not low <= value <= high:
            label = "an integer" if kind is int else "a number"
            raise ConfigError(f"{name}={raw!r} is invalid: must be {label} in [{low}, {high}]")
        return value

    return parse


def _choice(choices: tuple[str, ...]) -> Callable[[str, object], str]:
    def parse(name: str, raw: object) -> str:
        value = str(raw).strip().lower()
        if value not in choices:
            raise ConfigError(f"{name}={raw!r} is invalid: valid choices are {', '.join(choices)}")
        return value

    return parse


def _device(name: str, raw: object) -> str:
    value = str(raw).strip().lower()
    if not DEVICE_PATTERN.match(value):
        raise ConfigError(f"{name}={raw!r} is invalid: valid choices are auto, cpu, cuda, cuda:N")
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


def _flag(name: str, raw: object) -> bool:
    value = str(raw).strip().lower()
    if value not in FLAGS:
        raise ConfigError(f"{name}={raw!r} is invalid: valid choices are {', '.join(FLAGS)}")
    return FLAGS[value]


def _key_list(text: str) -> list[str]:
    """Keys separated by commas or newlines; blank entries and `#` comment lines are skipped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
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


PARSERS: dict[str, Callable[[str, object], object]] = {
    "model_path": _paths,
    "device": _device,
    "precision": _choice(PRECISIONS),
    "backend": _choice(BACKENDS),
    "max_batch_size": _number(int, 1, 1024),
    "max_batch_wait_ms": _number(float, 0, 10_000),
    "max_queue": _number(int, 1, 1_000_000),
    "request_timeout_s": _number(float, 0.01, 3600),
    "max_upload_mb": _number(float, 0.001, 4096),
    "max_image_pixels": _number(int, 1, 2**31),
    "max_batch_files": _number(int, 1, 1024),
    "torch_threads": _number(int, 1, 1024),
    "log_level": _choice(LOG_LEVELS),
    "model_name": _model_name,
    "api_keys": _api_keys,
    "metrics_public": _flag,
    "explain_concurrency": _number(int, 1, 64),
    "ui_enabled": _flag,
    "gpu_decode": _flag,
}


@dataclass(frozen=True)
class ServerSettings:
    """gunicorn's settings (gunicorn.conf.py reads them); field names are the variable names in lower case."""

    port: int = 5000
    bind: str = ""  # empty = 0.0.0.0:PORT
    web_concurrency: int = 1
    # >= 2 x MAX_BATCH_SIZE: one batch computes while the next is decoded in request threads (phase 1, 32 clients:
    # THREADS=16 gave mean batch 8, 16 clients queued in gunicorn; 48 gave full batches of 16).
    threads: int = 40
    timeout: int = 120
    graceful_timeout: int = 30
    keepalive: int = 5
    max_requests: int = 0  # recycle a worker after this many requests (0 = never)
    max_requests_jitter: int = 0  # plus a random 0..jitter, so workers do not recycle together

    @property
    def address(self) -> str:
        """Where gunicorn listens: BIND, else all interfaces on PORT."""
        return self.bind or f"0.0.0.0:{self.port}"


SERVER_PARSERS: dict[str, Callable[[str, object], object]] = {
    "port": _number(int, 1, 65535),
    "bind": lambda _name, raw: str(raw).strip(),
    "web_concurrency": _number(int, 1, 1024),
    "threads": _number(int, 1, 10_000),
    "timeout": _number(int, 1, 86_400),
    "graceful_timeout": _number(int, 1, 86_400),
    "keepalive": _number(int, 0, 3600),
    "max_requests": _number(int, 0, 1_000_000_000),
    "max_requests_jitter": _number(int, 0, 1_000_000_000),
}


def _layered(cls: type, parsers: Mapping, environ: Mapping[str, str], overrides: Mapping[str, object] | None) -> dict:
    """Parsed values of `cls`'s fields from environ, then overrides (keys are upper-case names); unset ones absent."""
    layered = {**{k: v for k, v in environ.items() if k.lower() in parsers}, **dict(overrides or {})}
    values = {}
    for spec in fields(cls):
        name = spec.name.upper()
        if name in layered and layered[name] not in ("", None):
            values[spec.name] = parsers[spec.name](name, layered[name])
    return values


def load_server_settings(environ: Mapping[str, str] | None = None) -> ServerSettings:
    """gunicorn's settings from `environ` (default os.environ); ConfigError names a bad variable."""
    return ServerSettings(**_layered(ServerSettings, SERVER_PARSERS, os.environ if environ is None else environ, None))


def default_torch_threads(environ: Mapping[str, str] = os.environ) -> int:
    """CPU cores divided among the gunicorn workers, so workers do not oversubscribe the cores."""
    try:
        workers = load_server_settings(environ).web_concurrency
    except ConfigError:
        workers = 1  # reported by gunicorn.conf.py, which reads the same variable
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // workers)


def _check_combination(settings: Settings) -> None:
    """Combinations that are wrong whatever the machine has (the device itself is checked when a worker starts)."""
    if settings.device == "cpu" or (settings.precision == "int8" and settings.device != "auto"):
        problem = precision_problem(settings.precision, torch.device(settings.device.partition(":")[0]))
        if problem:
            raise ConfigError(f"PRECISION={settings.precision} with DEVICE={settings.device}: {problem}")
    torch_only = settings.device.startswith("cuda") or settings.precision in AMP_ONLY
    if settings.backend == "onnxruntime" and torch_only:
        raise ConfigError(
            f"BACKEND=onnxruntime with DEVICE={settings.device} and PRECISION={settings.precision}: ONNX Runtime "
            "serves fp32 and int8 on the CPU; use BACKEND=auto (PyTorch serves the rest) or BACKEND=torch"
        )
    if settings.gpu_decode and settings.device == "cpu":
        raise ConfigError("GPU_DECODE=true with DEVICE=cpu: decoding on the GPU needs DEVICE=cuda (or auto on a GPU)")


def load_settings(environ: Mapping[str, str] | None = None, overrides: Mapping[str, object] | None = None) -> Settings:
    """Defaults, then `environ` (default os.environ), then `overrides`; keys are the upper-case variable names."""
    environ = os.environ if environ is None else environ
    values = _layered(Settings, PARSERS, environ, overrides)
    if "torch_threads" not in values:
        values["torch_threads"] = default_torch_threads(environ)
    settings = Settings(**values)
    _check_combination(settings)
    return settings
