"""PetClassifier: a torchvision backbone with a replaceable classification head."""

from __future__ import annotations

import os
import urllib.error
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

DEFAULT_ARCH = "resnet50"
WEIGHT_CHOICES = ("none", "imagenet", "<path to a state-dict file>")


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be fetched or read."""


@dataclass(frozen=True)
class HeadConfig:
    """Shape of the classification head: dropout -> linear(hidden) -> ReLU -> dropout -> linear."""

    hidden: int = 512
    dropout: float = 0.5
    hidden_dropout: float = 0.3

    def __post_init__(self):
        if self.hidden < 0:
            raise ValueError(f"head hidden width must be >= 0 (0 = single linear layer), got {self.hidden}")
        for name in ("dropout", "hidden_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"head {name} must be in [0, 1), got {value}")

    @classmethod
    def from_dict(cls, data: dict | HeadConfig | None) -> HeadConfig:
        """Build from a bundle's plain dict (or pass a HeadConfig through)."""
        if data is None:
            return cls()
        if isinstance(data, HeadConfig):
            return data
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown head keys {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}")
        return cls(**data)

    def to_dict(self) -> dict:
        """Plain types only, for the bundle."""
        return asdict(self)

    def build(self, in_features: int, num_classes: int) -> nn.Sequential:
        """The head module for the given feature width and class count."""
        if self.hidden == 0:
            return nn.Sequential(nn.Dropout(self.dropout), nn.Linear(in_features, num_classes))
        return nn.Sequential(
            nn.Dropout(self.dropout),
            nn.Linear(in_features, self.hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(self.hidden_dropout),
            nn.Linear(self.hidden, num_classes),
        )


def available_archs() -> list[str]:
    """Every torchvision classification architecture name."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _check_arch(arch: str) -> None:
    archs = available_archs()
    if arch not in archs:
        raise ValueError(f"unknown arch {arch!r}; valid choices: {', '.join(archs)}")


def imagenet_weights_cached(arch: str) -> bool:
    """True when the arch's default ImageNet weights are already in the torch hub cache."""
    _check_arch(arch)
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    return _cache_path(weights.url).is_file()


def _cache_path(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _offline_message(arch: str, url: str, error: Exception) -> str:
    return (
        f"could not fetch ImageNet weights for {arch} from {url}: {error}. "
        f"Without internet access, pre-seed the torch cache by copying {os.path.basename(url)} to "
        f"{_cache_path(url)} (or set TORCH_HOME), or pass the path of a local state-dict file "
        f"as the weights (e.g. `weights` /path/to/{os.path.basename(url)}), or use weights 'none'."
    )


def _build_backbone(arch: str, weights: str | os.PathLike | None) -> nn.Module:
    """A torchvision model with the requested weights (classifier still in place)."""
    _check_arch(arch)
    spec = "none" if weights is None else str(weights)
    if spec == "none":
        return torchvision.models.get_model(arch, weights=None)
    if spec == "imagenet":
        default = torchvision.models.get_model_weights(arch).DEFAULT
        try:
            return torchvision.models.get_model(arch, weights=default)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as error:
            raise WeightsUnavailableError(_offline_message(arch, default.url, error)) from error
    return _backbone_from_file(arch, Path(spec))


def _backbone_from_file(arch: str, path: Path) -> nn.Module:
    if not path.is_file():
        raise WeightsUnavailableError(
            f"weights {str(path)!r} is neither a file nor one of: {', '.join(WEIGHT_CHOICES)}"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt files
        raise WeightsUnavailableError(f"cannot read weights file {path}: {error}") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    model = torchvision.models.get_model(arch, weights=None)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise WeightsUnavailableError(f"weights file {path} does not fit {arch}: {error}") from error
    return model


def _detach_classifier(model: nn.Module) -> tuple[str, int]:
    """Replace the classifier's last Linear with Identity; return the classifier attribute and its input width."""
    for attr in ("fc", "classifier", "head", "heads"):
        old = getattr(model, attr, None)
        if isinstance(old, nn.Linear):
            setattr(model, attr, nn.Identity())
            return attr, old.in_features
        if not isinstance(old, nn.Module):
            continue
        linears = [(name, m) for name, m in old.named_modules() if isinstance(m, nn.Linear)]
        if linears:
            # Keep whatever precedes the last Linear (pooling, norms, a pretrained hidden layer).
            path, last = linears[-1]
            parent = old.get_submodule(path.rpartition(".")[0]) if "." in path else old
            setattr(parent, path.rpartition(".")[2], nn.Identity())
            return attr, last.in_features
    raise ValueError(f"cannot find the classifier of {type(model).__name__} to replace")


class PetClassifier(nn.Module):
    """A pretrained-style torchvision backbone whose classifier is replaced by `HeadConfig`'s head."""

    def __init__(
        self,
        num_classes: int,
        arch: str = DEFAULT_ARCH,
        weights: str | os.PathLike | None = "none",
        head: HeadConfig | dict | None = None,
    ):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.arch = arch
        self.num_classes = num_classes
        self.head_config = HeadConfig.from_dict(head)
        self.backbone = _build_backbone(arch, weights)
        self.classifier_attr, self.feature_dim = _detach_classifier(self.backbone)
        self.head = self.head_config.build(self.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, num_classes)."""
        return self.head(self.backbone(x))
