"""Shared, session-scoped fixtures: one demo dataset and one tiny bundle per test session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from models.bundle import save_bundle
from models.pet_classifier import PetClassifier
from models.training.demo_data import CLASSES, make_demo_data
from models.transforms import default_preprocess
from tests.helpers import PHOTOS

# Fixtures owned by the service, training, browser and alert-rule test suites.
pytest_plugins = [
    "tests.fixtures.server",
    "tests.fixtures.training",
    "tests.fixtures.browser",
    "tests.fixtures.prometheus",
]

TINY_ARCH = "resnet18"
TINY_IMAGE_SIZE = 64

# Tests share two cores; keep each process from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def class_names() -> list[str]:
    """The demo dataset's classes, in ImageFolder (sorted) order."""
    return sorted(CLASSES)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """A small demo dataset in ImageFolder layout (train/ and val/)."""
    return make_demo_data(tmp_path_factory.mktemp("demo") / "data", per_class=12, val_per_class=4, seed=0)


@pytest.fixture(scope="session")
def tiny_model(class_names) -> PetClassifier:
    """An untrained resnet18 PetClassifier (deterministic weights), in eval mode."""
    torch.manual_seed(0)
    return PetClassifier(len(class_names), arch=TINY_ARCH, weights="none").eval()


@pytest.fixture(scope="session")
def tiny_bundle_path(tmp_path_factory, tiny_model, class_names) -> Path:
    """A bundle of the untrained tiny model with 64-pixel preprocessing."""
    path = tmp_path_factory.mktemp("bundle") / "tiny.pt"
    save_bundle(path, tiny_model, class_names, default_preprocess(TINY_IMAGE_SIZE), metrics={"val_acc": 0.0})
    return path


@pytest.fixture
def bundle_copy(tmp_path, tiny_bundle_path) -> Path:
    """A private copy of the tiny bundle that a test may modify."""
    return Path(shutil.copy(tiny_bundle_path, tmp_path / "copy.pt"))


@pytest.fixture(scope="session")
def cat_jpeg() -> bytes:
    """A real camera JPEG of a cat (CC0, see tests/data/README.md)."""
    return (PHOTOS / "chelsea.jpg").read_bytes()
