"""Service settings: defaults, then environment variables, then overrides; read once and validated."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

import torch

from models.bundle import DEFAULT_BUNDLE_PATH
from models.images import DEFAULT_MAX_PIXELS
from models.runtime import precision_problem

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
PRECISIONS = ("fp32", "fp16", "bf16")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class ConfigError(ValueError):
    """A setting has a bad value; the message names the variable and what is valid."""


@dataclass(frozen=True)
class Settings:
    """Typed settings; field names are the environment variable names in lower case."""

    model_path: str = DEFAULT_BUNDLE_PATH
    device: str = "auto"
    precision: str = "fp32"
    max_batch_size: int = 16
    max_batch_wait_ms: float = 5.0
    max_queue: int = 256
    request_timeout_s: float = 10.0
    max_upload_mb: float = 10.0
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_batch_files: int = 32
    torch_threads: int = 0  # 0 = default_torch_threads()
    log_level: str = "info"

    @property
    def max_upload_bytes(self) -> int:
        """MAX_UPLOAD_MB in bytes (Flask's MAX_CONTENT_LENGTH)."""
        return int(self.max_upload_mb * 1024 * 1024)


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


def _path(name: str, raw: object) -> str:
    value = str(raw).strip()
    if not value:
        raise ConfigError(f"{name} is empty: set it to the path of a model bundle")
    return value


PARSERS: dict[str, Callable[[str, object], object]] = {
    "model_path": _path,
    "device": _device,
    "precision": _choice(PRECISIONS),
    "max_batch_size": _number(int, 1, 1024),
    "max_batch_wait_ms": _number(float, 0, 10_000),
    "max_queue": _number(int, 1, 1_000_000),
    "request_timeout_s": _number(float, 0.01, 3600),
    "max_upload_mb": _number(float, 0.001, 4096),
    "max_image_pixels": _number(int, 1, 2**31),
    "max_batch_files": _number(int, 1, 1024),
    "torch_threads": _number(int, 1, 1024),
    "log_level": _choice(LOG_LEVELS),
}


@dataclass(frozen=True)
class ServerSettings:
    """gunicorn's settings (gunicorn.conf.py reads them); field names are the variable names in lower case."""

    port: int = 5000
    bind: str = ""  # empty = 0.0.0.0:PORT
    web_concurrency: int = 1
    threads: int = 16
    timeout: int = 120
    graceful_timeout: int = 30
    keepalive: int = 5

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
}


def _layered(cls: type, parsers: Mapping, environ: Mapping[str, str], overrides: Mapping[str, object] | None) -> dict:
    """Parsed values of `cls`'s fields from environ, then overrides (keys are upper-case names); unset ones absent."""
    layered = {**{k: v for k, v in environ.items() if k.lower() in parsers}, **dict(overrides or {})}
    values = {}
    for field in fields(cls):
        name = field.name.upper()
        if name in layered and layered[name] not in ("", None):
            values[field.name] = parsers[field.name](name, layered[name])
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
    if settings.device == "cpu":
        problem = precision_problem(settings.precision, torch.device("cpu"))
        if problem:
            raise ConfigError(f"PRECISION={settings.precision} with DEVICE=cpu: {problem}")


def load_settings(environ: Mapping[str, str] | None = None, overrides: Mapping[str, object] | None = None) -> Settings:
    """Defaults, then `environ` (default os.environ), then `overrides`; keys are the upper-case variable names."""
    environ = os.environ if environ is None else environ
    values = _layered(Settings, PARSERS, environ, overrides)
    if "torch_threads" not in values:
        values["torch_threads"] = default_torch_threads(environ)
    settings = Settings(**values)
    _check_combination(settings)
    return settings
