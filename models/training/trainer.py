"""The trainer: state, checkpoint/resume and the epoch loop, driven by one TrainConfig.

Single process by default; under torchrun every process runs `train(config)` and joins the process group.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchvision.transforms import v2

from models.bundle import atomic_save, load_bundle, save_bundle
from models.pet_classifier import PetClassifier, imagenet_weights_cached
from models.runtime import DeviceError, Runtime, resolve_amp
from models.training import distributed as dist_utils
from models.training.agreement import pick
from models.training.calibration import fit_bundle
from models.training.config import SettingError, TrainConfig
from models.training.data import (
    DataError,
    DataSplit,
    ImageList,
    ShardSampler,
    balanced_class_weights,
    clean,
    discover,
    make_loader,
    oxford_pets,
    steps_per_epoch,
    train_sampler,
)
from models.training.engine import Exposure, evaluate, make_scaler, progress_enabled, train_one_epoch
from models.training.export import export_split
from models.training.outliers import outlier_dataset, outlier_loader
from models.training.reporting import classification_report, epoch_line, plot_curves, sibling, write_history
from models.training.strategies import (
    LRSchedule,
    build_optimizer,
    carry_state,
    group_names,
    parse_lr_mults,
    set_trainable,
    trainable_at,
)
from models.training.tensorboard_log import TrainingBoard
from models.transforms import default_preprocess, eval_transform, train_transform


@dataclass(frozen=True)
class Context:
    """Where this process runs (device, rank) and how it computes and reports."""

    dist: dist_utils.DistContext
    runtime: Runtime
    progress: bool

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and logs."""
        return self.dist.is_main

    def log(self, message: str) -> None:
        """Print on the main process only."""
        if self.is_main:
            print(message, flush=True)


@dataclass
class TrainState:
    """Everything that changes while training, and everything a checkpoint must restore."""

    model: PetClassifier
    net: nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer | None
    schedule: LRSchedule
    scaler: torch.amp.GradScaler
    stage: list[str] = field(default_factory=list)
    start_epoch: int = 0
    best_acc: float = -1.0
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)


def setup(config: TrainConfig) -> Context:
    """Process group, device, mixed precision, seeds."""
    try:
        dist = dist_utils.init_distributed(config.device)
        amp = resolve_amp(config.amp, dist.device)
    except DeviceError as error:
        raise SettingError(f"`device` {config.device} / `amp` {config.amp}: {error}") from error
    random.seed(config.seed)
    torch.manual_seed(config.seed)  # every process alike, so models start identical
    cuda = dist.device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    return Context(dist, Runtime(dist.device, amp, channels_last=cuda), progress_enabled(dist.is_main))


def load_data(config: TrainConfig, ctx: Context) -> DataSplit:
    """The main process finds and checks the images; every process gets the same result."""
    result = None
    if ctx.is_main:
        try:
            if config.dataset == "oxford-pets":
                split = oxford_pets(config.dataset_root)
            elif config.data_dir:
                split = discover(config.data_dir, config.val_split, config.seed)
            else:
                raise DataError("set `data_dir` (an ImageFolder tree) or `dataset` oxford-pets")
            result = clean(split, config.allow_overlap, workers=max(config.workers, 2))
        except DataError as error:
            result = error
    result = dist_utils.broadcast_object(result)
    if isinstance(result, DataError):
        raise result
    return result


def report_data(data: DataSplit, ctx: Context) -> None:
    """Class counts per split and every skipped file."""
    ctx.log(f"data: {data.source}")
    for split, counts in data.counts().items():
        ctx.log(f"  {split}: {sum(counts.values())} images " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    for item in data.skipped:
        ctx.log(f"  skipped unreadable image {item['path']}: {item['error']}")


def resolve_weights(config: TrainConfig) -> str:
    """'auto' -> imagenet when already cached (no download), else none."""
    if config.weights != "auto":
        return config.weights
    return "imagenet" if imagenet_weights_cached(config.arch) else "none"


def build_loaders(config: TrainConfig, data: DataSplit, preprocess: dict, ctx: Context):
    """Train and validation loaders; validation decodes like serving (min_size) and is sharded unpadded."""
    rank, world = ctx.dist.rank, ctx.dist.world_size
    train_set = ImageList(data.train, train_transform(preprocess, config.augment))
    val_set = ImageList(data.val, eval_transform(preprocess), min_size=preprocess["resize"])
    sampler = train_sampler(data.train, len(data.class_names), config.balanced_sampler, rank, world, config.seed)
    pin = ctx.runtime.device.type == "cuda"
    train_loader = make_loader(
        train_set, config.batch_size, config.workers, sampler, shuffle=True, seed=config.seed + rank, pin=pin
    )
    val_sampler = ShardSampler(len(val_set), rank, world)
    val_loader = make_loader(val_set, config.batch_size, config.workers, val_sampler, pin=pin)
    return train_loader, val_loader


def build_exposure(config: TrainConfig, data: DataSplit, preprocess: dict, ctx: Context) -> Exposure | None:
    """Outlier exposure's loader (one batch of `batch_size` outliers per training step, this rank's draws) or None."""
    if config.outlier_exposure <= 0:
        return None
    rank = ctx.dist.rank
    dataset = outlier_dataset(config.outliers, train_transform(preprocess, config.augment), seed=config.seed + rank)
    steps = steps_per_epoch(len(data.train), config.batch_size, ctx.dist.world_size)
    loader = outlier_loader(dataset, config.batch_size, steps, config.workers, seed=config.seed + rank)
    return Exposure(loader, config.outlier_exposure)


def build_criterion(config: TrainConfig, data: DataSplit, device: torch.device) -> nn.Module:
    """Cross-entropy with optional label smoothing and balanced class weights."""
    weight = None
    if config.class_weights == "balanced":
        weight = balanced_class_weights(data.train, len(data.class_names)).to(device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)


def build_mix(config: TrainConfig, num_classes: int):
    """MixUp and/or CutMix on whole batches (one of them at random when both are on), or None."""
    mixes = []
    if config.mixup_alpha > 0:
        mixes.append(v2.MixUp(alpha=config.mixup_alpha, num_classes=num_classes))
    if config.cutmix_alpha > 0:
        mixes.append(v2.CutMix(alpha=config.cutmix_alpha, num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


def build_state(config: TrainConfig, data: DataSplit, ctx: Context, weights: str) -> TrainState:
    """Model on the device plus optimizer machinery; the stage is set by the training loop."""
    head = {"hidden": config.head_hidden, "dropout": config.dropout}
    model = PetClassifier(len(data.class_names), arch=config.arch, weights=weights, head=head)
    if config.sync_bn and ctx.dist.distributed and ctx.dist.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = ctx.runtime.place(model)
    steps = steps_per_epoch(len(data.train), config.batch_size, ctx.dist.world_size)
    schedule = LRSchedule(
        config.lr_scheduler,
        config.epochs,
        steps,
        config.warmup_epochs,
        config.lr_step_size,
        config.lr_gamma,
        config.plateau_patience,
    )
    return TrainState(model, model, None, schedule, make_scaler(ctx.runtime))


def set_stage(state: TrainState, groups: list[str], config: TrainConfig, ctx: Context, lr_mults: dict) -> bool:
    """Make exactly `groups` trainable; rebuild optimizer (keeping moments) and DDP wrapper if that changed."""
    if groups == state.stage:
        return False
    set_trainable(state.model, groups)
    optimizer = build_optimizer(state.model, config.opt, config.base_lr, lr_mults, config.weight_decay, config.momentum)
    if state.optimizer is not None:
        carry_state(state.optimizer, optimizer)
    state.optimizer, state.stage = optimizer, list(groups)
    if ctx.dist.distributed:  # DDP registers gradient hooks for the parameters trainable when it is built
        ids = [ctx.dist.device.index] if ctx.dist.device.type == "cuda" else None
        state.net = DistributedDataParallel(state.model, device_ids=ids)
    return True


def checkpoint_dict(state: TrainState, epoch: int, data: DataSplit, config: TrainConfig) -> dict:
    """Plain dict of tensors and Python types (loadable with weights_only=True)."""
    return {
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "schedule": state.schedule.state_dict(),
        "scaler": state.scaler.state_dict(),
        "epoch": epoch,
        "stage": list(state.stage),
        "best_acc": state.best_acc,
        "bad_epochs": state.bad_epochs,
        "history": state.history,
        "class_names": list(data.class_names),
        "args": config.to_dict(),
    }


def restore(state: TrainState, data: DataSplit, config: TrainConfig, ctx: Context, lr_mults: dict) -> None:
    """Continue from `config.resume`: weights, stage, optimizer, schedule, scaler, epoch, best, history."""
    path = config.resume
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt["class_names"] != data.class_names:
        raise DataError(f"checkpoint {path} has classes {ckpt['class_names']}, the data has {data.class_names}")
    state.model.load_state_dict(ckpt["model"])
    set_stage(state, ckpt["stage"], config, ctx, lr_mults)
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.schedule.load_state_dict(ckpt["schedule"])
    state.scaler.load_state_dict(ckpt["scaler"])
    state.start_epoch, state.best_acc, state.bad_epochs = ckpt["epoch"] + 1, ckpt["best_acc"], ckpt["bad_epochs"]
    state.history = list(ckpt["history"])
    ctx.log(f"resumed from {path} at epoch {state.start_epoch} (best val acc so far {state.best_acc:.3f})")


def bundle_metrics(row: dict, val: dict, class_names: list[str]) -> dict:
    """What the bundle records about its best epoch."""
    report = classification_report(val["confusion"], class_names, val["loss"])
    return {
        "best_val_acc": val["acc"],
        "val_acc": val["acc"],
        "val_loss": val["loss"],
        "per_class_acc": {name: s["recall"] for name, s in report["per_class"].items()},
        "macro_f1": report["macro"]["f1"],
        "epoch": row["epoch"],
        "train_images_per_s": row["images_per_s"],
    }


def training_info(config: TrainConfig, data: DataSplit, ctx: Context, weights: str) -> dict:
    """The bundle's `training` entry: settings, data summary and where it ran."""
    return {
        **config.to_dict(),
        "weights_used": weights,
        "data_source": data.source,
        "class_counts": data.counts(),
        "skipped_images": data.skipped,
        "world_size": ctx.dist.world_size,
        "device": str(ctx.dist.device),
        "torch": torch.__version__,
    }


def write_reports(config: TrainConfig, state: TrainState, data: DataSplit) -> None:
    """History JSON/CSV and the curves PNG next to the bundle."""
    history = {
        "class_names": data.class_names,
        "class_counts": data.counts(),
        "skipped_images": data.skipped,
        "best_val_acc": state.best_acc,
        "args": config.to_dict(),
        "epochs": state.history,
    }
    write_history(config.output, history)
    plot_curves(state.history, sibling(config.output, ".curves.png"))


def run_epoch(epoch: int, state: TrainState, loaders, criteria, ctx: Context, mix, exposure=None) -> tuple[dict, dict]:
    """Train one epoch (with outlier exposure when given) then validate; returns the history row and the validation."""
    train_loader, val_loader = loaders
    if hasattr(train_loader.sampler, "set_epoch"):
        train_loader.sampler.set_epoch(epoch)
    start = time.perf_counter()
    train = train_one_epoch(
        state.net, train_loader, criteria[0], state.optimizer, state.scaler, ctx.runtime, state.schedule, epoch, mix,
        progress=ctx.progress, exposure=exposure,
    )  # fmt: skip
    # Each process updated its own batch-norm statistics; validate (and save) rank 0's on every shard.
    dist_utils.broadcast_buffers(state.model)
    num_classes = state.model.num_classes
    val = evaluate(state.model, val_loader, criteria[1], ctx.runtime, num_classes, f"epoch {epoch} val", ctx.progress)
    state.schedule.end_epoch(val["loss"])
    row = {
        "epoch": epoch,
        "lr": state.optimizer.param_groups[0]["lr"],
        "train_loss": train["loss"],
        "train_acc": train["acc"],
        "val_loss": val["loss"],
        "val_acc": val["acc"],
        "images_per_s": train["images_per_s"],
        "time_s": time.perf_counter() - start,
        "trainable": list(state.stage),
    }
    if "outlier_loss" in train:
        row["outlier_loss"] = train["outlier_loss"]
    return row, val


def train(config: TrainConfig) -> dict:
    """Train, keep the best bundle, checkpoint every epoch; return the best accuracy and the history."""
    ctx = setup(config)
    board = TrainingBoard()
    try:
        try:
            data = load_data(config, ctx)
            report_data(data, ctx)
            weights = resolve_weights(config)
            state = build_state(config, data, ctx, weights)
            lr_mults = parse_lr_mults(config.lr_mults, state.model, pretrained=weights != "none")
            if config.resume:
                restore(state, data, config, ctx, lr_mults)
            world, device = ctx.dist.world_size, ctx.dist.device
            ctx.log(f"{config.arch} ({weights} weights), {config.strategy}, {world} process(es) on {device}")
            board = TrainingBoard.open(config.tensorboard_dir, ctx.is_main, state.start_epoch, ctx.log)
            summary = fit(config, state, data, ctx, lr_mults, weights, board)
        finally:
            dist_utils.cleanup()
        if ctx.is_main:  # after leaving the process group: the other processes are done, nothing here is collective
            summary["calibration"] = calibrate(config, data, ctx)
            summary["runtimes"] = export_graphs(config, data, ctx)
            settings = {**config.to_dict(), "weights_used": weights, "world_size": ctx.dist.world_size}
            step = state.history[-1]["epoch"] if state.history else state.start_epoch
            board.finish(step, settings, final_metrics(config, summary), summary["calibration"])
    finally:
        board.close()
    return summary


def final_metrics(config: TrainConfig, summary: dict) -> dict:
    """The bundle's numeric validation metrics (its best epoch's, and the calibration's ECE), for the HParams view."""
    if not Path(config.output).is_file():
        return {"best_val_acc": summary["best_val_acc"]}
    metrics = load_bundle(config.output).metrics
    return {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def calibrate(config: TrainConfig, data: DataSplit, ctx: Context) -> dict | None:
    """Fit temperature and OOD detector on the best epoch's bundle (all validation images) and rewrite it."""
    if not Path(config.output).is_file():
        ctx.log(f"no bundle at {config.output}: nothing to calibrate")
        return None
    preprocess = default_preprocess(config.image_size)
    transform, pin = eval_transform(preprocess), ctx.runtime.device.type == "cuda"
    val, reference = (
        make_loader(
            ImageList(samples, transform, min_size=preprocess["resize"]), config.batch_size, config.workers, pin=pin
        )
        for samples in (data.val, data.train)
    )
    calibration = fit_bundle(config.output, val, reference, ctx.runtime.device, config.resolved_ood_score, ctx.progress)
    ctx.log(
        f"calibration: temperature {calibration['temperature']:.3f}, 15-bin ECE {calibration['ece_before']:.4f} "
        f"-> {calibration['ece_after']:.4f} on {calibration['images']} validation images; bundle {config.output}"
    )
    return calibration


def export_graphs(config: TrainConfig, data: DataSplit, ctx: Context) -> dict | None:
    """Write the ONNX Runtime graphs into the calibrated bundle (int8 calibrated on training images, each measured
    on validation images), so the file training leaves is the whole model."""
    if not config.graph_precisions or not Path(config.output).is_file():
        return None
    started = time.perf_counter()
    split = (pick(data.train, 300, config.seed), pick(data.val, 200, config.seed), data.source)
    report = export_split(config.output, split, config.graph_precisions, config.batch_size, config.workers)
    agreements = ", ".join(
        f"{name}: top-1 agreement with PyTorch {measured['agreement']:.2%}"
        for name, info in report["runtimes"].items()
        for measured in (info.get("agreement") or {}).values()
    )
    ctx.log(f"graphs for ONNX Runtime in {config.output} ({agreements}), {time.perf_counter() - started:.0f} s")
    return report["runtimes"]


def save_best(config: TrainConfig, state: TrainState, data: DataSplit, ctx: Context, weights: str, row, val):
    """Write the bundle of the best epoch so far."""
    preprocess = default_preprocess(config.image_size)
    metrics = bundle_metrics(row, val, data.class_names)
    info = training_info(config, data, ctx, weights)
    save_bundle(config.output, state.model, data.class_names, preprocess, metrics, info)


def fit(
    config: TrainConfig, state: TrainState, data: DataSplit, ctx: Context, lr_mults: dict, weights: str,
    board: TrainingBoard,
) -> dict:  # fmt: skip
    """The epoch loop; the board gets every epoch and, at the end, the best epoch's confusion matrix."""
    preprocess = default_preprocess(config.image_size)
    loaders = build_loaders(config, data, preprocess, ctx)
    exposure = build_exposure(config, data, preprocess, ctx)
    criteria = (build_criterion(config, data, ctx.dist.device), nn.CrossEntropyLoss())
    mix = build_mix(config, len(data.class_names))
    best = None  # (epoch, validation) of this run's best epoch
    for epoch in range(state.start_epoch, config.epochs):
        groups = trainable_at(config.strategy, group_names(state.model), epoch, config.unfreeze_every)
        if set_stage(state, groups, config, ctx, lr_mults):
            ctx.log(f"epoch {epoch}: training {', '.join(groups)}")
        row, val = run_epoch(epoch, state, loaders, criteria, ctx, mix, exposure)
        state.history.append(row)
        ctx.log(epoch_line(row))
        board.epoch(row, state.optimizer)
        improved = val["acc"] > state.best_acc
        best = (epoch, val) if improved else best
        state.best_acc, state.bad_epochs = max(state.best_acc, val["acc"]), 0 if improved else state.bad_epochs + 1
        if ctx.is_main:
            if improved:
                save_best(config, state, data, ctx, weights, row, val)
            atomic_save(checkpoint_dict(state, epoch, data, config), config.checkpoint_path)
            write_reports(config, state, data)
        if config.patience > 0 and state.bad_epochs >= config.patience:
            ctx.log(f"early stop: no better val accuracy for {config.patience} epochs")
            break
    if best is not None:
        board.confusion(best[0], best[1]["confusion"], data.class_names)
    ctx.log(f"best val acc {state.best_acc:.3f}; bundle {config.output}")
    return {"best_val_acc": state.best_acc, "history": state.history, "output": config.output}
