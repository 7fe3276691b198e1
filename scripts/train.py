"""Fine-tune a PetClassifier on an ImageFolder tree or Oxford-IIIT Pet and write a model bundle.

Single process:  python scripts/train.py --data-dir data/pets --weights imagenet
Several GPUs:    torchrun --nproc-per-node 4 scripts/train.py --data-dir data/pets --weights imagenet
"""

from __future__ import annotations

import argparse
import json
import sys

from models.pet_classifier import WeightsUnavailableError
from models.runtime import AMP_CHOICES
from models.training.config import (
    CHOICES,
    DEMO_PRESET,
    TrainConfig,
    flag_message,
    setting_names,
)

D = TrainConfig()  # the defaults live in the config; the flags only expose them


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Command-line flags, torchvision-reference style; every flag is a TrainConfig field."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter, add_help=add_help
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", help="ImageFolder root: DIR/train + DIR/val, or DIR/<class>/ split by --val-split")
    data.add_argument("--dataset", choices=CHOICES["dataset"], default=D.dataset, help="data source")
    data.add_argument("--dataset-root", default=D.dataset_root, help="download folder for --dataset oxford-pets")
    data.add_argument("--val-split", type=float, default=D.val_split, help="per-class val fraction without DIR/val")
    data.add_argument("--allow-overlap", action="store_true", help="accept identical files in train and val")
    data.add_argument("--image-size", type=int, default=D.image_size, help="training/eval crop size in pixels")
    data.add_argument("--augment", choices=CHOICES["augment"], default=D.augment, help="augmentation preset")
    data.add_argument("--mixup-alpha", type=float, default=D.mixup_alpha, help="MixUp alpha (0 = off)")
    data.add_argument("--cutmix-alpha", type=float, default=D.cutmix_alpha, help="CutMix alpha (0 = off)")
    data.add_argument(
        "--class-weights", choices=CHOICES["class_weights"], default=D.class_weights, help="loss weights per class"
    )
    data.add_argument("--balanced-sampler", action="store_true", help="sample classes equally (single process)")
    data.add_argument("--workers", type=int, default=D.workers, help="data-loader processes")
    model = parser.add_argument_group("model")
    model.add_argument("--arch", default=D.arch, help="torchvision architecture")
    model.add_argument("--weights", default=D.weights, help="none | imagenet | auto (imagenet if cached) | FILE")
    model.add_argument("--head-hidden", type=int, default=D.head_hidden, help="head's hidden width (0 = one linear)")
    model.add_argument("--dropout", type=float, default=D.dropout, help="dropout before the head")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--strategy", choices=CHOICES["strategy"], default=D.strategy, help="which layer groups train")
    optim.add_argument("--unfreeze-every", type=int, default=D.unfreeze_every, help="gradual-unfreeze: epochs/group")
    optim.add_argument("--epochs", type=int, default=D.epochs, help="total epochs")
    optim.add_argument("--batch-size", type=int, default=D.batch_size, help="images per process per step")
    optim.add_argument("--opt", choices=CHOICES["opt"], default=D.opt, help="optimizer")
    optim.add_argument("--lr", type=float, default=D.lr, help="base (head) lr; default 1e-3 adamw, 1e-2 sgd")
    optim.add_argument("--lr-mults", default=D.lr_mults, help="GROUP=MULT,...; auto = 0.1/0.05/0.01 if pretrained")
    optim.add_argument("--momentum", type=float, default=D.momentum, help="SGD momentum")
    optim.add_argument("--weight-decay", type=float, default=D.weight_decay, help="weight decay")
    optim.add_argument(
        "--lr-scheduler", choices=CHOICES["lr_scheduler"], default=D.lr_scheduler, help="learning-rate schedule"
    )
    optim.add_argument("--warmup-epochs", type=float, default=D.warmup_epochs, help="linear warm-up epochs")
    optim.add_argument("--lr-step-size", type=int, default=D.lr_step_size, help="step: epochs between decays")
    optim.add_argument("--lr-gamma", type=float, default=D.lr_gamma, help="step/plateau decay factor")
    optim.add_argument("--plateau-patience", type=int, default=D.plateau_patience, help="plateau: epochs w/o gain")
    optim.add_argument("--label-smoothing", type=float, default=D.label_smoothing, help="cross-entropy label smoothing")
    optim.add_argument("--patience", type=int, default=D.patience, help="early stop after N epochs w/o better val acc")
    run = parser.add_argument_group("run")
    run.add_argument("--output", default=D.output, help="bundle path (best val accuracy)")
    run.add_argument("--checkpoint", default=D.checkpoint, help="resumable checkpoint (default: <output stem>.ckpt)")
    run.add_argument("--resume", default=D.resume, help="continue from this checkpoint")
    run.add_argument("--device", default=D.device, help="auto | cpu | cuda | cuda:N | mps")
    run.add_argument("--amp", choices=AMP_CHOICES, default=D.amp, help="mixed precision (auto: bf16 on GPU)")
    run.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across GPUs under torchrun")
    run.add_argument("--seed", type=int, default=D.seed, help="random seed")
    run.add_argument("--log-dir", default=D.log_dir, help="TensorBoard events (default: <output stem>.tb/)")
    run.add_argument(
        "--outlier-exposure", type=float, default=D.outlier_exposure, help="weight of the outlier loss (0 = off)"
    )
    run.add_argument("--outliers", default=D.outliers, help="outlier images: synthetic | a folder of negatives")
    run.add_argument(
        "--ood-score", choices=CHOICES["ood_score"], default=D.ood_score,
        help="unknown-input score (auto: max-probability with outlier exposure, else energy)",
    )  # fmt: skip
    run.add_argument(
        "--graphs", default=D.graphs, help="ONNX Runtime graphs the bundle carries: fp32,int8 | fp32 | none"
    )
    run.add_argument("--demo", action="store_true", help=f"CPU demo preset, explicit flags win: {DEMO_PRESET}")
    run.add_argument("--print-config", action="store_true", help="print the resolved settings as JSON and exit")
    return parser


def parse_config(argv: list[str] | None = None) -> tuple[TrainConfig, bool]:
    """Flags -> (TrainConfig, print_config); with --demo the preset replaces the defaults, explicit flags win."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.demo:
        parser.set_defaults(**DEMO_PRESET)
        args = parser.parse_args(argv)
    names = set(setting_names())
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names}), args.print_config


def main(argv: list[str] | None = None) -> None:
    """Parse, then train (or print the settings); library errors come out naming the flags."""
    try:
        config, print_only = parse_config(argv)
        if print_only:
            print(json.dumps(config.to_dict(), indent=2))
            return
        from models.training.trainer import train  # heavy imports only when training

        train(config)
    except (ValueError, WeightsUnavailableError) as error:  # bad settings and data: a message, no traceback
        sys.exit(f"error: {flag_message(str(error))}")


if __name__ == "__main__":
    main()
