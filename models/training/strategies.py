"""Transfer-learning strategies: the network's layer groups, which of them train when (freezing), per-group learning
rates, optimizer and schedule. Training policy lives here; PetClassifier, which serving loads, knows none of it."""

from __future__ import annotations

import math

import torch
from torch import nn

from models.pet_classifier import PetClassifier

STRATEGIES = ("feature-extraction", "fine-tune", "gradual-unfreeze")
HEAD_GROUP = "head"
REST_GROUP = "rest"
# Layer groups, from the output towards the input: the order gradual unfreezing follows.
RESNET_GROUPS = (HEAD_GROUP, "layer4", "layer3", REST_GROUP)
FEATURES_GROUPS = (HEAD_GROUP, "features-late", "features-mid", REST_GROUP)
OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "step", "plateau", "none")
# Pretrained layers near the input hold generic features: they move least (discriminative fine-tuning).
PRETRAINED_LR_MULTS = {"head": 1.0, "layer4": 0.1, "layer3": 0.05, "rest": 0.01}
FEATURES_LR_MULTS = {"head": 1.0, "features-late": 0.1, "features-mid": 0.05, "rest": 0.01}


def group_names(model: PetClassifier) -> tuple[str, ...]:
    """Layer-group names of `model`, head first."""
    return RESNET_GROUPS if hasattr(model.backbone, "layer4") else FEATURES_GROUPS


def _group_modules(model: PetClassifier) -> dict[str, list[nn.Module]]:
    if hasattr(model.backbone, "layer4"):
        return {HEAD_GROUP: [model.head], "layer4": [model.backbone.layer4], "layer3": [model.backbone.layer3]}
    blocks = list(getattr(model.backbone, "features", nn.Sequential()).children())
    leftover = [getattr(model.backbone, model.classifier_attr)]
    if len(blocks) < 4:
        return {HEAD_GROUP: [model.head], "features-late": leftover, "features-mid": []}
    quarter = max(1, len(blocks) // 4)
    return {
        HEAD_GROUP: [model.head],
        "features-late": leftover + blocks[-quarter:],
        "features-mid": blocks[-2 * quarter : -quarter],
    }


def layer_groups(model: PetClassifier) -> dict[str, list[nn.Parameter]]:
    """Parameters of `model` by layer group; every parameter belongs to exactly one group."""
    modules = _group_modules(model)
    claimed = {id(p) for mods in modules.values() for m in mods for p in m.parameters()}
    groups = {name: [p for m in mods for p in m.parameters()] for name, mods in modules.items()}
    groups[REST_GROUP] = [p for p in model.backbone.parameters() if id(p) not in claimed]
    return groups


def _check_groups(model: PetClassifier, names) -> None:
    unknown = [n for n in names if n not in group_names(model)]
    if unknown:
        raise ValueError(f"unknown layer group(s) {unknown} for {model.arch}; valid: {list(group_names(model))}")


def set_trainable(model: PetClassifier, names) -> None:
    """Make exactly the named layer groups trainable; freeze everything else."""
    names = list(names)
    _check_groups(model, names)
    for group, params in layer_groups(model).items():
        for param in params:
            param.requires_grad_(group in names)


def param_groups(
    model: PetClassifier, base_lr: float, lr_mults: dict[str, float] | None = None, weight_decay: float = 0.0
) -> list[dict]:
    """Optimizer parameter groups: trainable parameters only, lr = base_lr * the group's multiplier."""
    lr_mults = dict(lr_mults or {})
    _check_groups(model, lr_mults)
    result = []
    for name, params in layer_groups(model).items():
        trainable = [p for p in params if p.requires_grad]
        if trainable:
            result.append({"params": trainable, "lr": base_lr * lr_mults.get(name, 1.0), "weight_decay": weight_decay,
                           "name": name})  # fmt: skip
    return result


def train_mode(model: nn.Module) -> nn.Module:
    """model.train(), except that batch-norm layers whose parameters are all frozen stay in eval mode."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()
    return model


def trainable_at(strategy: str, groups: tuple[str, ...], epoch: int, unfreeze_every: int = 1) -> list[str]:
    """The layer groups (head first) that train during `epoch` (0-based) under `strategy`."""
    if strategy == "feature-extraction":
        return [groups[0]]
    if strategy == "fine-tune":
        return list(groups)
    if strategy == "gradual-unfreeze":
        if unfreeze_every < 1:
            raise ValueError(f"`unfreeze_every` must be >= 1, got {unfreeze_every}")
        return list(groups[: 1 + epoch // unfreeze_every])
    raise ValueError(f"unknown strategy {strategy!r}; valid choices: {', '.join(STRATEGIES)}")


def parse_lr_mults(text: str | None, model: PetClassifier, pretrained: bool) -> dict[str, float]:
    """'layer4=0.1,rest=0.01' -> {group: multiplier}; 'auto' -> discriminative when pretrained, else all 1."""
    if text in (None, "", "auto"):
        if not pretrained:
            return dict.fromkeys(group_names(model), 1.0)
        return dict(PRETRAINED_LR_MULTS if "layer4" in group_names(model) else FEATURES_LR_MULTS)
    mults = dict.fromkeys(group_names(model), 1.0)
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in mults:
            raise ValueError(f"bad `lr_mults` item {item!r}: use GROUP=FLOAT with GROUP in {list(group_names(model))}")
        mults[name.strip()] = float(value)
    return mults


def build_optimizer(
    model: PetClassifier, name: str, lr: float, lr_mults: dict[str, float], weight_decay: float, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """An optimizer over the trainable groups; each param group remembers its `base_lr` for the schedule."""
    groups = param_groups(model, lr, lr_mults, weight_decay)
    if not groups:
        raise ValueError("no trainable parameters: the strategy froze everything")
    for group in groups:
        group["base_lr"] = group["lr"]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    raise ValueError(f"unknown optimizer {name!r}; valid choices: {', '.join(OPTIMIZERS)}")


def carry_state(old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> None:
    """Keep momentum / Adam moments of parameters that stay trainable when the optimizer is rebuilt."""
    for param, state in old.state.items():
        if any(param is p for group in new.param_groups for p in group["params"]):
            new.state[param] = state


class LRSchedule:
    """Learning-rate factor per step: linear warm-up, then cosine, step decay, plateau decay or constant.

    It is a function of (epoch, step) plus a little plateau state rather than a torch scheduler bound to one
    optimizer, so rebuilding the optimizer when gradual unfreezing adds groups keeps the schedule.
    """

    def __init__(
        self,
        kind: str,
        epochs: int,
        steps_per_epoch: int,
        warmup_epochs: float = 0.0,
        step_size: int = 10,
        gamma: float = 0.1,
        plateau_patience: int = 2,
    ):
        if kind not in SCHEDULERS:
            raise ValueError(f"unknown lr scheduler {kind!r}; valid choices: {', '.join(SCHEDULERS)}")
        self.kind, self.epochs, self.steps_per_epoch = kind, epochs, max(1, steps_per_epoch)
        self.warmup_epochs, self.step_size, self.gamma = warmup_epochs, max(1, step_size), gamma
        self.plateau_patience = plateau_patience
        self.plateau_scale, self.best_loss, self.bad_epochs = 1.0, math.inf, 0

    def factor(self, epoch: int, step: int = 0) -> float:
        """Multiplier of each group's base lr at `step` of `epoch`."""
        t = epoch + step / self.steps_per_epoch
        if t < self.warmup_epochs:
            return (t + 1 / self.steps_per_epoch) / (self.warmup_epochs + 1 / self.steps_per_epoch)
        if self.kind == "cosine":
            span = max(self.epochs - self.warmup_epochs, 1e-8)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (t - self.warmup_epochs) / span)))
        if self.kind == "step":
            return self.gamma ** (epoch // self.step_size)
        if self.kind == "plateau":
            return self.plateau_scale
        return 1.0

    def apply(self, optimizer: torch.optim.Optimizer, epoch: int, step: int = 0) -> float:
        """Set every group's lr for this step; return the factor."""
        factor = self.factor(epoch, step)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        return factor

    def end_epoch(self, val_loss: float) -> None:
        """Plateau bookkeeping: decay by gamma after `plateau_patience` epochs without a lower val loss."""
        if val_loss < self.best_loss - 1e-4:
            self.best_loss, self.bad_epochs = val_loss, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.plateau_patience:
            self.plateau_scale *= self.gamma
            self.bad_epochs = 0

    def state_dict(self) -> dict:
        """Plain-typed state for the checkpoint."""
        return {"plateau_scale": self.plateau_scale, "best_loss": self.best_loss, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        """Restore plateau state saved by state_dict()."""
        self.plateau_scale = float(state["plateau_scale"])
        self.best_loss = float(state["best_loss"])
        self.bad_epochs = int(state["bad_epochs"])
