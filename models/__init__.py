"""Model code shared by training and serving: the network, the bundle format, transforms and data.

The names below load on first use: importing a torch-free module (models.paths, models.settings) loads no torch.
"""

from __future__ import annotations

import importlib

_HOMES = {
    "Bundle": "models.bundle",
    "BundleError": "models.bundle",
    "load_bundle": "models.bundle",
    "load_model": "models.bundle",
    "save_bundle": "models.bundle",
    "HeadConfig": "models.pet_classifier",
    "PetClassifier": "models.pet_classifier",
    "WeightsUnavailableError": "models.pet_classifier",
    "available_archs": "models.pet_classifier",
    "default_preprocess": "models.transforms",
    "eval_transform": "models.transforms",
    "train_transform": "models.transforms",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    """`from models import PetClassifier` imports models.pet_classifier now."""
    if name not in _HOMES:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
