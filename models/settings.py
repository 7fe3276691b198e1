"""Settings declared once, Starlette-style: one dataclass field per setting holds its type (the annotation), default,
valid range or choices, and where it comes from (an environment variable, or the CLI flag named after the field):

    max_batch_size: int = setting(16, between(int, 1, 1024), env="MAX_BATCH_SIZE")

One mechanism for the service's settings (app/config.py) and the training configuration
(models/training/config.py). A field declared without `setting` fails when the class is checked (`declared`), so no
setting can silently ignore its variable. Imports no torch: gunicorn's master reads settings with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import MISSING, field, fields

# A parser turns a raw value (a string from the environment, or a Python value) into the setting, or raises
# SettingError with a message that names `label` (the variable, or the setting in backticks) and what is valid.
Parser = Callable[[str, object], object]
FLAGS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
_META = "setting"


class SettingError(ValueError):
    """A setting has a bad value; the message names it and what is valid."""


def setting(default, parse: Parser, env: str | None = None, **options):
    """A dataclass field with its parser and environment variable (None: not read from the environment)."""
    return field(default=default, metadata={_META: (parse, env)}, **options)


def declared(cls: type) -> type:
    """Class decorator: every field of the dataclass `cls` must be declared with `setting`."""
    bare = [spec.name for spec in fields(cls) if _META not in spec.metadata]
    if bare:
        raise TypeError(f"{cls.__name__}: fields {bare} are not declared with setting(...)")
    return cls


def parsers(cls: type) -> dict[str, Parser]:
    """Field name -> parser, for every field of the declared dataclass `cls`."""
    return {spec.name: spec.metadata[_META][0] for spec in fields(cls)}


def variables(cls: type) -> dict[str, str]:
    """Environment variable -> field name, for the fields of `cls` read from the environment."""
    return {spec.metadata[_META][1]: spec.name for spec in fields(cls) if spec.metadata[_META][1]}


def defaults(cls: type) -> dict[str, object]:
    """Field name -> default value."""
    return {spec.name: spec.default for spec in fields(cls) if spec.default is not MISSING}


def from_environment(cls: type, environ: Mapping[str, object], overrides: Mapping[str, object] | None = None) -> dict:
    """Parsed values of `cls`'s fields from `environ`, then `overrides` (both keyed by variable name); fields set
    to "" or None, or not set at all, are absent (their defaults apply)."""
    layered = {**environ, **dict(overrides or {})}
    values = {}
    for name, attribute in variables(cls).items():
        if layered.get(name) not in ("", None):
            values[attribute] = parsers(cls)[attribute](name, layered[name])
    return values


def validate(instance) -> None:
    """Parse every field of a declared dataclass instance in place (labels are `name` in backticks)."""
    for name, parse in parsers(type(instance)).items():
        object.__setattr__(instance, name, parse(f"`{name}`", getattr(instance, name)))


# Parsers


def _invalid(label: str, raw: object, reason: str) -> SettingError:
    return SettingError(f"{label}={raw!r} is invalid: {reason}")


def between(
    kind: type, low: float | None = None, high: float | None = None, *, open_low: bool = False, open_high: bool = False
) -> Parser:
    """An int or float in [low, high] (None: unbounded; open_low/open_high: that bound itself excluded)."""
    noun = "an integer" if kind is int else "a number"
    if low is not None and high is not None:
        bounds = f" in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    elif low is not None:
        bounds = f" {'>' if open_low else '>='} {low}"
    else:
        bounds = "" if high is None else f" <= {high}"

    def parse(label: str, raw: object):
        try:
            value = kind(raw)
        except (TypeError, ValueError):
            value = None
        fits = value is not None and not isinstance(raw, bool) and not (kind is float and math.isnan(value))
        fits = fits and (kind is not int or not isinstance(raw, float) or raw.is_integer())
        if fits and low is not None:
            fits = value > low if open_low else value >= low
        if fits and high is not None:
            fits = value < high if open_high else value <= high
        if not fits:
            raise _invalid(label, raw, f"must be {noun}{bounds}")
        return value

    return parse


def one_of(*choices: str, case: bool = False) -> Parser:
    """One of `choices` (compared in lower case unless `case`)."""

    def parse(label: str, raw: object) -> str:
        value = str(raw).strip() if case else str(raw).strip().lower()
        if value not in choices:
            raise _invalid(label, raw, f"valid choices are {', '.join(choices)}")
        return value

    parse.choices = choices  # for command lines (argparse choices=)
    return parse


def flag(label: str, raw: object) -> bool:
    """true/1/yes/on or false/0/no/off (and Python bools)."""
    if isinstance(raw, bool):
        return raw
    value = str(raw).strip().lower()
    if value not in FLAGS:
        raise _invalid(label, raw, f"valid choices are {', '.join(FLAGS)}")
    return FLAGS[value]


def text(label: str, raw: object) -> str:
    """Any string (surrounding blanks removed)."""
    return str(raw).strip()


def optional(parse: Parser) -> Parser:
    """None, or what `parse` accepts."""
    return lambda label, raw: None if raw is None else parse(label, raw)
