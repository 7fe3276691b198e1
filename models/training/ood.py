"""Fit the out-of-distribution detector: a score's statistics and the threshold that keeps 95% of validation known."""

from __future__ import annotations

import torch

from models.ood import SCORES, OodDetector

# Measured on the demo model (docs/trust.md, "Unknown inputs"): energy separated noise and photos from validation images
# as well as the max probability and with fewer false alarms; penultimate-feature Mahalanobis put noise closer to
# the class means than real validation images. Energy also needs no stored statistics and works for any member.
DEFAULT_SCORE = "energy"
KEEP = 0.95  # the fraction of validation images that must stay known


def auto_score(outlier_exposure: float) -> str:
    """`--ood-score auto`: what the training taught, max-probability after outlier exposure, else energy.

    Outlier exposure trains outliers towards equal logits, which the max probability reads (1/C) but energy does
    not (logits all 5 are uniform yet as energetic as a confident answer): measured on the test fixture trained
    on negatives, max-probability flagged 40 of 40 held-out noise images, energy 0 of 40.
    """
    return "max-probability" if outlier_exposure > 0 else DEFAULT_SCORE


def ledoit_wolf(centered: torch.Tensor) -> torch.Tensor:
    """Shrunk covariance of centred rows (Ledoit-Wolf): usable when there are fewer images than feature dimensions."""
    x = centered.double()
    n, d = x.shape
    cov = x.T @ x / n
    mu = torch.trace(cov) / d
    squares = x.square()
    beta = ((squares.T @ squares).sum() / n - cov.square().sum()) / (d * n)
    delta = (cov.square().sum() - 2 * mu * torch.trace(cov) + d * mu**2) / d
    shrinkage = 0.0 if delta <= 0 else min(beta, delta) / delta
    return (1 - shrinkage) * cov + shrinkage * mu * torch.eye(d, dtype=x.dtype)


def class_statistics(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Per-class means and the shared (tied, shrunk) covariance's inverse: the mahalanobis score's tensors."""
    features = features.double()
    means = torch.zeros(num_classes, features.shape[1], dtype=torch.float64)
    for index in range(num_classes):
        rows = features[labels == index]
        means[index] = rows.mean(dim=0) if len(rows) else features.mean(dim=0)
    covariance = ledoit_wolf(features - means[labels])
    return {"means": means.float(), "precision": torch.linalg.inv(covariance).float()}


def threshold_for(scores: torch.Tensor, keep: float = KEEP) -> float:
    """The `keep` quantile of in-distribution scores, rounded up to a score: at most 1 - keep of them lie above it."""
    return torch.quantile(scores.double(), keep, interpolation="higher").item()


def fit_detector(
    score: str,
    logits: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    reference: tuple[torch.Tensor, torch.Tensor] | None = None,
    keep: float = KEEP,
) -> dict:
    """The bundle's `ood` entry for `score`, thresholded on the validation (logits, features).

    `reference` = (features, labels) to fit the class statistics on (the training images); the validation
    set itself when None.
    """
    if score not in SCORES:
        raise ValueError(f"unknown ood score {score!r}; valid choices: {', '.join(SCORES)}")
    entry: dict = {"score": score, "threshold": 0.0}
    if score == "mahalanobis":
        ref_features, ref_labels = reference if reference is not None else (features, labels)
        entry.update(class_statistics(ref_features, ref_labels, logits.shape[1]))
        entry["fitted_on"] = f"class statistics on {len(ref_labels)} images, threshold on {len(labels)}"
    else:
        entry["fitted_on"] = f"threshold on {len(labels)} validation images"
    values = OodDetector.from_entry(entry)(logits.float() / temperature, features.float())
    entry.update(
        threshold=threshold_for(values, keep),
        keep=keep,
        scale=max(values.double().std().item(), 1e-6) if len(values) > 1 else 1.0,
    )
    return entry


def flagged(entry: dict, logits: torch.Tensor, features: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N,) booleans: which inputs the detector `entry` calls unknown."""
    detector = OodDetector.from_entry(entry)
    return detector(logits.float() / temperature, features.float()) > detector.threshold
