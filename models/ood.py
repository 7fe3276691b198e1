"""Out-of-distribution scores: how unusual an input looks to a model, computed from its one forward pass.

Every score is oriented the same way: higher = more unusual. A bundle's detector is a score plus the
threshold that keeps 95% of its validation images known; models.training.ood fits it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SCORES = ("mahalanobis", "energy", "max-probability")
DIRECTION = "higher"  # for every score: above the threshold = unknown
TENSOR_KEYS = ("means", "precision")  # the mahalanobis score's fitted statistics, stored as tensors
DESCRIPTIONS = {
    "mahalanobis": "squared Mahalanobis distance of the penultimate features to the nearest class mean",
    "energy": "energy of the calibrated logits, -logsumexp(logits / T)",
    "max-probability": "1 - the largest calibrated probability",
}


class OodError(ValueError):
    """A detector entry that cannot be used; the message says what is wrong."""


def energy(logits: torch.Tensor) -> torch.Tensor:
    """(B, C) calibrated logits -> (B,) energy; in-distribution inputs have lower (more negative) energy."""
    return -torch.logsumexp(logits, dim=1)


def max_probability(logits: torch.Tensor) -> torch.Tensor:
    """(B, C) calibrated logits -> (B,) 1 - max softmax probability."""
    return 1.0 - torch.softmax(logits, dim=1).amax(dim=1)


def whitening(precision: torch.Tensor) -> torch.Tensor:
    """A matrix L with precision = L L^T, so squared Mahalanobis distances are squared Euclidean after x @ L."""
    precision = precision.double()
    return torch.linalg.cholesky((precision + precision.T) / 2).float()


def mahalanobis(features: torch.Tensor, whitened_means: torch.Tensor, whiten: torch.Tensor) -> torch.Tensor:
    """(B, D) features -> (B,) squared Mahalanobis distance to the nearest class mean (shared covariance)."""
    distances = torch.cdist(features.float() @ whiten, whitened_means)  # Euclidean in the whitened space
    return distances.amin(dim=1).square()


@dataclass(frozen=True)
class OodDetector:
    """A fitted score and its threshold, ready to run on a batch's logits (and features)."""

    score: str
    threshold: float
    scale: float = 1.0  # spread of the validation scores: how ensembles put members' scores on one scale
    info: dict = field(default_factory=dict)  # the plain (non-tensor) entries, for GET /model
    tensors: dict = field(default_factory=dict)  # device-ready statistics (mahalanobis: whiten, whitened means)

    @classmethod
    def from_entry(cls, entry: dict) -> OodDetector:
        """A bundle's `ood` dict -> a detector; raises OodError naming the problem."""
        score = entry.get("score")
        if score not in SCORES:
            raise OodError(f"ood score {score!r} is not one of {', '.join(SCORES)}")
        threshold, scale = entry.get("threshold"), entry.get("scale", 1.0)
        if not isinstance(threshold, (int, float)) or not isinstance(scale, (int, float)) or scale <= 0:
            raise OodError(f"ood threshold {threshold!r} and scale {scale!r} must be numbers (scale > 0)")
        tensors = {}
        if score == "mahalanobis":
            missing = [key for key in TENSOR_KEYS if not isinstance(entry.get(key), torch.Tensor)]
            if missing:
                raise OodError(f"ood score mahalanobis needs tensors {missing}")
            whiten = whitening(entry["precision"])
            tensors = {"whiten": whiten, "means": entry["means"].float() @ whiten}
        info = {k: v for k, v in entry.items() if k not in TENSOR_KEYS}
        return cls(score, float(threshold), float(scale), info, tensors)

    @property
    def needs_features(self) -> bool:
        """True when the score reads the penultimate features, not only the logits."""
        return self.score == "mahalanobis"

    def to(self, device: torch.device) -> OodDetector:
        """The same detector with its tensors on `device`."""
        moved = {name: tensor.to(device) for name, tensor in self.tensors.items()}
        return OodDetector(self.score, self.threshold, self.scale, self.info, moved)

    def __call__(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C) calibrated logits [and (B, D) features] -> (B,) float32 scores, higher = more unusual."""
        if self.score == "energy":
            return energy(logits)
        if self.score == "max-probability":
            return max_probability(logits)
        if features is None:
            raise OodError("the mahalanobis score needs the penultimate features")
        return mahalanobis(features, self.tensors["means"], self.tensors["whiten"])


def describe(entry: dict | None) -> dict | None:
    """A bundle's `ood` entry for people: the plain values, what the score is, which side is unusual."""
    if not entry:
        return None
    plain = {k: v for k, v in entry.items() if k not in TENSOR_KEYS}
    return {**plain, "description": DESCRIPTIONS.get(entry.get("score"), ""), "direction": DIRECTION}
