"""Several bundles served as one model: same classes and preprocessing, averaged calibrated probabilities.

A single bundle is an ensemble of one, with that bundle's own version, so every caller has one code path.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass

from models.bundle import Bundle, BundleError, load_bundle
from models.ood import DIRECTION, describe
from models.paths import PATH_SEPARATOR, parse_paths

# Members' OOD scores are put on one scale before averaging: (score - threshold) / scale, unknown above 0.
ENSEMBLE_OOD = "mean over members of (score - threshold) / scale"


@dataclass(frozen=True)
class Ensemble:
    """One or more loaded bundles that agree on classes and preprocessing; reads like one Bundle."""

    bundles: tuple[Bundle, ...]

    def __post_init__(self):
        first = self.bundles[0]
        for other in self.bundles[1:]:
            for key in ("class_names", "preprocess"):
                if getattr(other, key) != getattr(first, key):
                    raise BundleError(
                        f"ensemble members disagree on {key}: {first.path} has {getattr(first, key)}, "
                        f"{other.path} has {getattr(other, key)}; every member needs the same {key}"
                    )

    @property
    def class_names(self) -> list[str]:
        """The shared class names (index = output position)."""
        return self.bundles[0].class_names

    @property
    def preprocess(self) -> dict:
        """The shared eval preprocessing."""
        return self.bundles[0].preprocess

    @property
    def version(self) -> str:
        """The bundle's version for one member; else a hash over the members' content hashes (order-free)."""
        if len(self.bundles) == 1:
            return self.bundles[0].version
        digest = hashlib.sha256(PATH_SEPARATOR.join(sorted(b.content_hash for b in self.bundles)).encode())
        return f"sha256:{digest.hexdigest()[:12]}"

    @property
    def arch(self) -> str:
        """The member's architecture, or 'ensemble(a,b)'."""
        archs = [b.arch for b in self.bundles]
        return archs[0] if len(archs) == 1 else f"ensemble({','.join(archs)})"

    @property
    def head(self) -> dict:
        """The first member's head shape."""
        return self.bundles[0].head

    @property
    def metrics(self) -> dict:
        """The member's validation metrics (one member); an ensemble has none of its own (see `members`)."""
        return self.bundles[0].metrics if len(self.bundles) == 1 else {}

    def calibration(self) -> dict:
        """The member's calibration; for an ensemble, each member applies its own temperature."""
        if len(self.bundles) == 1:
            return self.bundles[0].calibration
        return {"temperature": None, "per_member": [b.calibration for b in self.bundles]}

    def ood(self) -> dict | None:
        """The detector in plain words: one member's, or how members' scores combine; None without detectors."""
        entries = [b.ood for b in self.bundles]
        if any(entry is None for entry in entries):
            return None
        if len(entries) == 1:
            return describe(entries[0])
        scores = sorted({entry["score"] for entry in entries})
        return {"score": "+".join(scores), "combine": ENSEMBLE_OOD, "threshold": 0.0, "direction": DIRECTION}

    def class_mix(self) -> dict[str, float] | None:
        """Each class's share of the first member's validation images (its training record); None when unrecorded."""
        counts = (self.bundles[0].training.get("class_counts") or {}).get("val") or {}
        total = sum(counts.get(name, 0) for name in self.class_names)
        return {name: counts.get(name, 0) / total for name in self.class_names} if total else None

    def members(self) -> list[dict]:
        """Each member's file name (not its path on the server), version, architecture, metrics and calibration."""
        return [
            {
                "path": os.path.basename(b.path),
                "version": b.version,
                "arch": b.arch,
                "metrics": b.metrics,
                "calibration": b.calibration,
            }
            for b in self.bundles
        ]


def load_ensemble(paths: str | os.PathLike | Iterable[str]) -> Ensemble:
    """Load every bundle ('a.pt,b.pt' or a list); BundleError when one is bad or they disagree."""
    try:
        parsed = parse_paths(paths if isinstance(paths, str | list | tuple) else str(paths))
    except ValueError as error:
        raise BundleError(str(error)) from error
    return Ensemble(tuple(load_bundle(path) for path in parsed))
