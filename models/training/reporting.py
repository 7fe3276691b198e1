"""Training and evaluation reports: per-class scores, history files, curve and confusion-matrix plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window (servers, CI, torchrun workers)
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

EPOCH_FIELDS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "images_per_s", "time_s")
OPTIONAL_FIELDS = ("outlier_loss",)  # with outlier exposure


def sibling(path: str | Path, suffix: str) -> Path:
    """models/pet_classifier.pt + '.history.json' -> models/pet_classifier.history.json."""
    path = Path(path)
    return path.with_name(path.stem + suffix)


def per_class_scores(confusion: list[list[int]], class_names: list[str]) -> dict[str, dict]:
    """Precision, recall (= per-class accuracy), F1 and support per class from a confusion matrix."""
    scores = {}
    for i, name in enumerate(class_names):
        true_pos = confusion[i][i]
        predicted = sum(row[i] for row in confusion)
        support = sum(confusion[i])
        precision = true_pos / predicted if predicted else 0.0
        recall = true_pos / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        scores[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return scores


def classification_report(confusion: list[list[int]], class_names: list[str], loss: float | None = None) -> dict:
    """Accuracy, macro averages and per-class scores as plain types."""
    per_class = per_class_scores(confusion, class_names)
    present = [s for s in per_class.values() if s["support"]]
    total = sum(sum(row) for row in confusion)
    macro = {k: sum(s[k] for s in present) / max(len(present), 1) for k in ("precision", "recall", "f1")}
    report = {
        "accuracy": sum(confusion[i][i] for i in range(len(class_names))) / max(total, 1),
        "images": total,
        "macro": macro,
        "per_class": per_class,
        "confusion_matrix": confusion,
        "class_names": list(class_names),
    }
    if loss is not None:
        report["loss"] = loss
    return report


def epoch_line(row: dict) -> str:
    """One log line per epoch."""
    return (
        f"epoch {row['epoch']:3d} | lr {row['lr']:.2e} | train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f}"
        f" | val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f} | {row['images_per_s']:.1f} img/s"
        f" | {row['time_s']:.1f}s"
    ) + (f" | outlier loss {row['outlier_loss']:.4f}" if "outlier_loss" in row else "")


def write_json(path: str | Path, data: dict) -> Path:
    """Pretty JSON, parent folders created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def write_history(output: str | Path, history: dict) -> list[Path]:
    """<bundle>.history.json (everything) and <bundle>.history.csv (one row per epoch)."""
    json_path = write_json(sibling(output, ".history.json"), history)
    csv_path = sibling(output, ".history.csv")
    with csv_path.open("w", newline="") as handle:
        extra = [name for name in OPTIONAL_FIELDS if any(name in row for row in history["epochs"])]
        writer = csv.DictWriter(handle, fieldnames=[*EPOCH_FIELDS, *extra], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history["epochs"])
    return [json_path, csv_path]


def plot_curves(epochs: list[dict], path: str | Path) -> Path:
    """Loss and accuracy against epoch, train and validation, side by side."""
    x = [row["epoch"] for row in epochs]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, metric in ((loss_ax, "loss"), (acc_ax, "acc")):
        ax.plot(x, [row[f"train_{metric}"] for row in epochs], marker="o", label="train")
        ax.plot(x, [row[f"val_{metric}"] for row in epochs], marker="o", label="validation")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("accuracy" if metric == "acc" else "cross-entropy loss (log scale)")
        ax.grid(alpha=0.3)
        ax.legend()
    loss_ax.set_yscale("log")  # early from-scratch epochs can spike far above the later losses
    acc_ax.set_ylim(0, 1.02)
    fig.suptitle("training curves")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_confusion(confusion: list[list[int]], class_names: list[str], path: str | Path) -> Path:
    """Confusion matrix heat map, rows = true class, columns = predicted, counts in the cells."""
    return _save(confusion_figure(confusion, class_names), path)


def confusion_figure(confusion: list[list[int]], class_names: list[str]):
    """The confusion matrix heat map as a matplotlib Figure (for a file or TensorBoard)."""
    size = max(4.0, 0.45 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size), constrained_layout=True)
    image = ax.imshow(confusion, cmap="Blues")
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=90)
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(class_names) <= 40:
        peak = max(max(row) for row in confusion) or 1
        for i, row in enumerate(confusion):
            for j, count in enumerate(row):
                ax.text(j, i, count, ha="center", va="center", color="white" if count > peak / 2 else "black")
    fig.colorbar(image, ax=ax, shrink=0.8)
    return fig


def _save(fig, path: str | Path) -> Path:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_reliability(before: list[dict], after: list[dict], path: str | Path) -> Path:
    """Reliability diagram: accuracy against confidence per bin, before and after the temperature, with counts."""
    return _save(reliability_figure(before, after), path)


def reliability_figure(before: list[dict], after: list[dict]):
    """The reliability diagram as a matplotlib Figure (for a file or TensorBoard)."""
    fig, (ax, counts_ax) = plt.subplots(
        2, 1, figsize=(5, 6), sharex=True, height_ratios=(3, 1), constrained_layout=True
    )
    width = before[0]["high"] - before[0]["low"]
    centres = [row["low"] + width / 2 for row in before]
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    for rows, label, offset in ((before, "before", -width / 4), (after, "after (temperature)", width / 4)):
        shown = [(c + offset, r["accuracy"]) for c, r in zip(centres, rows) if r["count"]]
        ax.bar([x for x, _ in shown], [y for _, y in shown], width=width / 2, alpha=0.7, label=label)
        counts_ax.bar([c + offset for c in centres], [r["count"] for r in rows], width=width / 2, alpha=0.7)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    ax.set_title(f"reliability ({len(before)} bins)")
    counts_ax.set_xlabel("confidence of the top class")
    counts_ax.set_ylabel("images")
    counts_ax.set_xlim(0, 1)
    return fig
