"""Model code shared by training and serving: the network, the bundle format, transforms and data.

The names below load on first use: importing a torch-free module (models.paths, models.settings) loads no torch.
"""

from __future__ import annotations

from models.lazy import lazy_attributes

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

__getattr__ = lazy_attributes("models", _HOMES)  # `from models import PetClassifier` imports models.pet_classifier now.
