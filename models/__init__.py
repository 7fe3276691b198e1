"""Model code shared by training and serving: the network, the bundle format, transforms and data."""

from models.bundle import Bundle, BundleError, load_bundle, load_model, save_bundle
from models.pet_classifier import HeadConfig, PetClassifier, WeightsUnavailableError, available_archs
from models.transforms import default_preprocess, eval_transform, train_transform

__all__ = [
    "Bundle",
    "BundleError",
    "HeadConfig",
    "PetClassifier",
    "WeightsUnavailableError",
    "available_archs",
    "default_preprocess",
    "eval_transform",
    "load_bundle",
    "load_model",
    "save_bundle",
    "train_transform",
]
