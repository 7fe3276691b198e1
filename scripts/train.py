"""Fine-tune a PetClassifier on an ImageFolder tree or Oxford-IIIT Pet and write a model bundle.

Single process:  python scripts/train.py --data-dir data/pets --weights imagenet
Several GPUs:    torchrun --nproc-per-node 4 scripts/train.py --data-dir data/pets --weights imagenet
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from dataclasses import dataclass, field

import _path  # noqa: F401  (repository root on sys.path)
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchvision.transforms import v2

from models import distributed as dist_utils
from models.bundle import atomic_save, save_bundle
from models.data import (
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
from models.engine import (
    AMP_CHOICES,
    Runtime,
    evaluate,
    make_scaler,
    progress_enabled,
    resolve_amp,
    train_one_epoch,
)
from models.pet_classifier import PetClassifier, WeightsUnavailableError, imagenet_weights_cached
from models.reporting import classification_report, epoch_line, plot_curves, sibling, write_history
from models.strategies import (
    OPTIMIZERS,
    SCHEDULERS,
    STRATEGIES,
    LRSchedule,
    build_optimizer,
    carry_state,
    parse_lr_mults,
    trainable_at,
)
from models.transforms import AUGMENTATIONS, default_preprocess, eval_transform, train_transform

# `make run`: a model that is clearly better than chance on data/demo after a few CPU minutes.
DEMO_PRESET = {
    "arch": "resnet18",
    "weights": "auto",
    "image_size": 64,
    "epochs": 20,
    "batch_size": 16,
    "lr": 2e-3,
    "augment": "light",
    "warmup_epochs": 1.0,
    "label_smoothing": 0.0,
    "patience": 0,
    "device": "cpu",
    "workers": 2,
}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Command-line flags, torchvision-reference style."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter, add_help=add_help
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", help="ImageFolder root: DIR/train + DIR/val, or DIR/<class>/ split by --val-split")
    data.add_argument("--dataset", choices=["folder", "oxford-pets"], default="folder", help="data source")
    data.add_argument("--dataset-root", default="data/oxford-pets", help="download folder for --dataset oxford-pets")
    data.add_argument("--val-split", type=float, default=0.2, help="per-class validation fraction without DIR/val")
    data.add_argument("--allow-overlap", action="store_true", help="accept identical files in train and val")
    data.add_argument("--image-size", type=int, default=224, help="training/eval crop size in pixels")
    data.add_argument("--augment", choices=AUGMENTATIONS, default="standard", help="augmentation preset")
    data.add_argument("--mixup-alpha", type=float, default=0.0, help="MixUp alpha (0 = off)")
    data.add_argument("--cutmix-alpha", type=float, default=0.0, help="CutMix alpha (0 = off)")
    data.add_argument("--class-weights", choices=["none", "balanced"], default="none", help="loss weights per class")
    data.add_argument("--balanced-sampler", action="store_true", help="sample classes equally (single process)")
    data.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data-loader processes")
    model = parser.add_argument_group("model")
    model.add_argument("--arch", default="resnet50", help="torchvision architecture")
    model.add_argument("--weights", default="imagenet", help="none | imagenet | auto (imagenet if cached) | FILE")
    model.add_argument("--head-hidden", type=int, default=512, help="hidden width of the head (0 = one linear)")
    model.add_argument("--dropout", type=float, default=0.5, help="dropout before the head")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--strategy", choices=STRATEGIES, default="fine-tune", help="which layer groups train")
    optim.add_argument("--unfreeze-every", type=int, default=2, help="gradual-unfreeze: epochs per new group")
    optim.add_argument("--epochs", type=int, default=15, help="total epochs")
    optim.add_argument("--batch-size", type=int, default=32, help="images per process per step")
    optim.add_argument("--opt", choices=OPTIMIZERS, default="adamw", help="optimizer")
    optim.add_argument("--lr", type=float, default=None, help="base (head) lr; default 1e-3 adamw, 1e-2 sgd")
    optim.add_argument("--lr-mults", default="auto", help="GROUP=MULT,...; auto = 0.1/0.05/0.01 if pretrained")
    optim.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    optim.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay")
    optim.add_argument("--lr-scheduler", choices=SCHEDULERS, default="cosine", help="learning-rate schedule")
    optim.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up epochs")
    optim.add_argument("--lr-step-size", type=int, default=5, help="step: epochs between decays")
    optim.add_argument("--lr-gamma", type=float, default=0.1, help="step/plateau decay factor")
    optim.add_argument("--plateau-patience", type=int, default=2, help="plateau: epochs without better val loss")
    optim.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing")
    optim.add_argument("--patience", type=int, default=5, help="early stop after N epochs without better val acc")
    run = parser.add_argument_group("run")
    run.add_argument("--output", default="models/pet_classifier.pt", help="bundle path (best val accuracy)")
    run.add_argument("--checkpoint", default=None, help="resumable checkpoint (default: <output stem>.ckpt)")
    run.add_argument("--resume", default=None, help="continue from this checkpoint")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    run.add_argument("--amp", choices=AMP_CHOICES, default="auto", help="mixed precision (auto: bf16 on GPU)")
    run.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across GPUs under torchrun")
    run.add_argument("--seed", type=int, default=0, help="random seed")
    run.add_argument("--demo", action="store_true", help=f"CPU demo preset, explicit flags win: {DEMO_PRESET}")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags; with --demo the preset replaces the defaults, so explicit flags still override it."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.demo:
        parser.set_defaults(**DEMO_PRESET)
        args = parser.parse_args(argv)
    return args


def log(ctx, message: str) -> None:
    """Print on the main process only."""
    if ctx.is_main:
        print(message, flush=True)


def seed_everything(seed: int) -> None:
    """Seed Python and torch (every process alike, so models start identical)."""
    random.seed(seed)
    torch.manual_seed(seed)


def load_data(args, ctx) -> DataSplit:
    """The main process finds and checks the images; every process gets the same result."""
    result = None
    if ctx.is_main:
        try:
            if args.dataset == "oxford-pets":
                split = oxford_pets(args.dataset_root)
            elif args.data_dir:
                split = discover(args.data_dir, args.val_split, args.seed)
            else:
                raise DataError("pass --data-dir DIR (an ImageFolder tree) or --dataset oxford-pets")
            result = clean(split, args.allow_overlap, workers=max(args.workers, 2))
        except DataError as error:
            result = error
    result = dist_utils.broadcast_object(result)
    if isinstance(result, DataError):
        raise result
    return result


def report_data(data: DataSplit, ctx) -> None:
    """Class counts per split and every skipped file."""
    log(ctx, f"data: {data.source}")
    for split, counts in data.counts().items():
        log(ctx, f"  {split}: {sum(counts.values())} images " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    for item in data.skipped:
        log(ctx, f"  skipped unreadable image {item['path']}: {item['error']}")


def resolve_weights(args) -> str:
    """'auto' -> imagenet when already cached (no download), else none."""
    if args.weights != "auto":
        return args.weights
    return "imagenet" if imagenet_weights_cached(args.arch) else "none"


def build_loaders(args, data: DataSplit, preprocess: dict, ctx, runtime: Runtime):
    """Train and validation loaders; validation decodes like serving (min_size) and is sharded unpadded."""
    train_set = ImageList(data.train, train_transform(preprocess, args.augment))
    val_set = ImageList(data.val, eval_transform(preprocess), min_size=preprocess["resize"])
    sampler = train_sampler(
        data.train, len(data.class_names), args.balanced_sampler, ctx.rank, ctx.world_size, args.seed
    )
    pin = runtime.device.type == "cuda"
    train_loader = make_loader(
        train_set, args.batch_size, args.workers, sampler, shuffle=True, seed=args.seed + ctx.rank, pin=pin
    )
    val_sampler = ShardSampler(len(val_set), ctx.rank, ctx.world_size)
    val_loader = make_loader(val_set, args.batch_size, args.workers, val_sampler, pin=pin)
    return train_loader, val_loader


def build_criterion(args, data: DataSplit, device) -> nn.Module:
    """Cross-entropy with optional label smoothing and balanced class weights."""
    weight = None
    if args.class_weights == "balanced":
        weight = balanced_class_weights(data.train, len(data.class_names)).to(device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=args.label_smoothing)


def build_mix(args, num_classes: int):
    """MixUp and/or CutMix on whole batches (one of them at random when both are on), or None."""
    mixes = []
    if args.mixup_alpha > 0:
        mixes.append(v2.MixUp(alpha=args.mixup_alpha, num_classes=num_classes))
    if args.cutmix_alpha > 0:
        mixes.append(v2.CutMix(alpha=args.cutmix_alpha, num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


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


def set_stage(state: TrainState, groups: list[str], args, ctx, lr_mults: dict) -> bool:
    """Make exactly `groups` trainable; rebuild optimizer (keeping moments) and DDP wrapper if that changed."""
    if groups == state.stage:
        return False
    state.model.set_trainable(groups)
    optimizer = build_optimizer(state.model, args.opt, args.lr, lr_mults, args.weight_decay, args.momentum)
    if state.optimizer is not None:
        carry_state(state.optimizer, optimizer)
    state.optimizer, state.stage = optimizer, list(groups)
    if ctx.distributed:  # DDP registers gradient hooks for the parameters trainable when it is built
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        state.net = DistributedDataParallel(state.model, device_ids=ids)
    return True


def checkpoint_dict(state: TrainState, epoch: int, data: DataSplit, args) -> dict:
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
        "args": plain_args(args),
    }


def restore(state: TrainState, path: str, data: DataSplit, args, ctx, lr_mults: dict) -> None:
    """Continue from a checkpoint: weights, trainable stage, optimizer, schedule, scaler, epoch, best, history."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt["class_names"] != data.class_names:
        raise DataError(f"checkpoint {path} has classes {ckpt['class_names']}, the data has {data.class_names}")
    state.model.load_state_dict(ckpt["model"])
    set_stage(state, ckpt["stage"], args, ctx, lr_mults)
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.schedule.load_state_dict(ckpt["schedule"])
    state.scaler.load_state_dict(ckpt["scaler"])
    state.start_epoch, state.best_acc, state.bad_epochs = ckpt["epoch"] + 1, ckpt["best_acc"], ckpt["bad_epochs"]
    state.history = list(ckpt["history"])
    log(ctx, f"resumed from {path} at epoch {state.start_epoch} (best val acc so far {state.best_acc:.3f})")


def plain_args(args) -> dict:
    """The training arguments as plain types."""
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in vars(args).items()}


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


def training_info(args, data: DataSplit, ctx, weights: str) -> dict:
    """The bundle's `training` entry: arguments, data summary and where it ran."""
    return {
        **plain_args(args),
        "weights_used": weights,
        "data_source": data.source,
        "class_counts": data.counts(),
        "skipped_images": data.skipped,
        "world_size": ctx.world_size,
        "device": str(ctx.device),
        "torch": torch.__version__,
    }


def write_reports(args, state: TrainState, data: DataSplit) -> None:
    """History JSON/CSV and the curves PNG next to the bundle."""
    history = {
        "class_names": data.class_names,
        "class_counts": data.counts(),
        "skipped_images": data.skipped,
        "best_val_acc": state.best_acc,
        "args": plain_args(args),
        "epochs": state.history,
    }
    write_history(args.output, history)
    plot_curves(state.history, sibling(args.output, ".curves.png"))


def run_epoch(epoch: int, state: TrainState, loaders, criteria, runtime: Runtime, mix) -> tuple[dict, dict]:
    """Train one epoch then validate; returns the history row and the validation result."""
    train_loader, val_loader = loaders
    if hasattr(train_loader.sampler, "set_epoch"):
        train_loader.sampler.set_epoch(epoch)
    start = time.perf_counter()
    train = train_one_epoch(
        state.net, train_loader, criteria[0], state.optimizer, state.scaler, runtime, state.schedule, epoch, mix
    )
    # Each process updated its own batch-norm statistics; validate (and save) rank 0's on every shard.
    dist_utils.broadcast_buffers(state.model)
    val = evaluate(state.model, val_loader, criteria[1], runtime, state.model.num_classes, f"epoch {epoch} val")
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
    return row, val


def setup(args):
    """Process group, device, runtime options and seeds."""
    ctx = dist_utils.init_distributed(args.device)
    seed_everything(args.seed)
    if args.lr is None:
        args.lr = 1e-2 if args.opt == "sgd" else 1e-3
    if args.checkpoint is None:
        args.checkpoint = str(sibling(args.output, ".ckpt"))
    cuda = ctx.device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    runtime = Runtime(ctx.device, resolve_amp(args.amp, ctx.device), channels_last=cuda)
    return ctx, Runtime(runtime.device, runtime.amp, runtime.channels_last, progress_enabled(ctx.is_main))


def build_state(args, data: DataSplit, ctx, runtime: Runtime, weights: str) -> TrainState:
    """Model on the device plus optimizer machinery; the stage is set by the training loop."""
    head = {"hidden": args.head_hidden, "dropout": args.dropout}
    model = PetClassifier(len(data.class_names), arch=args.arch, weights=weights, head=head)
    if args.sync_bn and ctx.distributed and ctx.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(ctx.device, memory_format=torch.channels_last if runtime.channels_last else torch.preserve_format)
    steps = steps_per_epoch(len(data.train), args.batch_size, ctx.world_size)
    schedule = LRSchedule(
        args.lr_scheduler,
        args.epochs,
        steps,
        args.warmup_epochs,
        args.lr_step_size,
        args.lr_gamma,
        args.plateau_patience,
    )
    return TrainState(model, model, None, schedule, make_scaler(runtime))


def should_stop(state: TrainState, patience: int) -> bool:
    """Early stopping on validation accuracy (patience 0 = never)."""
    return patience > 0 and state.bad_epochs >= patience


def main(args: argparse.Namespace) -> dict:
    """Train, keep the best bundle, checkpoint every epoch; return the best accuracy and the history."""
    ctx, runtime = setup(args)
    try:
        data = load_data(args, ctx)
        report_data(data, ctx)
        weights = resolve_weights(args)
        state = build_state(args, data, ctx, runtime, weights)
        lr_mults = parse_lr_mults(args.lr_mults, state.model, pretrained=weights != "none")
        if args.resume:
            restore(state, args.resume, data, args, ctx, lr_mults)
        log(ctx, f"{args.arch} ({weights} weights), {args.strategy}, {ctx.world_size} process(es) on {ctx.device}")
        return fit(args, state, data, ctx, runtime, lr_mults, weights)
    finally:
        dist_utils.cleanup()


def fit(args, state: TrainState, data: DataSplit, ctx, runtime: Runtime, lr_mults: dict, weights: str) -> dict:
    """The epoch loop."""
    preprocess = default_preprocess(args.image_size)
    loaders = build_loaders(args, data, preprocess, ctx, runtime)
    criteria = (build_criterion(args, data, ctx.device), nn.CrossEntropyLoss())
    mix = build_mix(args, len(data.class_names))
    for epoch in range(state.start_epoch, args.epochs):
        groups = trainable_at(args.strategy, state.model.group_names(), epoch, args.unfreeze_every)
        if set_stage(state, groups, args, ctx, lr_mults):
            log(ctx, f"epoch {epoch}: training {', '.join(groups)}")
        row, val = run_epoch(epoch, state, loaders, criteria, runtime, mix)
        state.history.append(row)
        log(ctx, epoch_line(row))
        improved = val["acc"] > state.best_acc
        state.best_acc, state.bad_epochs = max(state.best_acc, val["acc"]), 0 if improved else state.bad_epochs + 1
        if ctx.is_main:
            if improved:
                metrics = bundle_metrics(row, val, data.class_names)
                save_bundle(
                    args.output,
                    state.model,
                    data.class_names,
                    preprocess,
                    metrics,
                    training_info(args, data, ctx, weights),
                )
            atomic_save(checkpoint_dict(state, epoch, data, args), args.checkpoint)
            write_reports(args, state, data)
        if should_stop(state, args.patience):
            log(ctx, f"early stop: no better val accuracy for {args.patience} epochs")
            break
    log(ctx, f"best val acc {state.best_acc:.3f}; bundle {args.output}")
    return {"best_val_acc": state.best_acc, "history": state.history, "output": args.output}


if __name__ == "__main__":
    try:
        main(parse_args())
    except (ValueError, WeightsUnavailableError) as error:  # DataError and bad flag values: a message, no traceback
        sys.exit(f"error: {error}")
