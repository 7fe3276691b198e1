"""Where bundles live and how MODEL_PATH lists them; imports no torch, so settings can be read without it."""

from __future__ import annotations

from collections.abc import Iterable

DEFAULT_BUNDLE_PATH = "models/pet_classifier.pt"  # where training writes and serving looks by default
PATH_SEPARATOR = ","


def parse_paths(values: str | Iterable[str]) -> tuple[str, ...]:
    """'a.pt,b.pt' (or several such strings) -> ('a.pt', 'b.pt'); raises ValueError on empty or repeated entries."""
    values = [values] if isinstance(values, str) else list(values)
    paths = tuple(part.strip() for value in values for part in str(value).split(PATH_SEPARATOR))
    if not paths or any(not path for path in paths):
        raise ValueError(f"{PATH_SEPARATOR.join(values)!r} has an empty bundle path; separate paths with commas")
    repeated = sorted({path for path in paths if paths.count(path) > 1})
    if repeated:
        raise ValueError(f"bundle path(s) {repeated} listed more than once")
    return paths
