"""The inference core shared by serving, evaluation and offline prediction.

One forward pass per member per batch -> logits / temperature -> float32 softmax -> OOD score; an
ensemble averages its members' calibrated probabilities. Test-time augmentation is extra views of the
same images, averaged afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.bundle import Bundle
from models.onnx_runtime import OnnxNetwork
from models.ood import OodDetector
from models.runtime import Runtime

TTA_MODES = ("none", "flip")


def tta_views(images: torch.Tensor, mode: str = "none") -> list[torch.Tensor]:
    """(..., H, W) normalised images -> the views to average: itself, plus its horizontal mirror for 'flip'."""
    if mode not in TTA_MODES:
        raise ValueError(f"unknown tta {mode!r}; valid choices: {', '.join(TTA_MODES)}")
    return [images] if mode == "none" else [images, images.flip(-1)]


@dataclass(frozen=True)
class Member:
    """One model of an ensemble: a PetClassifier-like nn.Module or an OnnxNetwork, its temperature and detector."""

    model: nn.Module | OnnxNetwork
    temperature: float = 1.0
    ood: OodDetector | None = None

    @classmethod
    def from_bundle(cls, bundle: Bundle, runtime: Runtime) -> Member:
        """The bundle's model placed by `runtime`, with its temperature and detector."""
        model = runtime.place(bundle.build_model(runtime.device)).requires_grad_(False)  # inference only
        ood = OodDetector.from_entry(bundle.ood).to(runtime.device) if bundle.ood else None
        return cls(model, bundle.temperature, ood)


@dataclass(frozen=True)
class MemberOutput:
    """A member's float32 logits for a batch, and its penultimate features when its detector reads them."""

    logits: torch.Tensor
    features: torch.Tensor | None = None


def forward(member: Member, images: torch.Tensor, features: bool = False) -> MemberOutput:
    """One forward pass of one member over a batch on the device; features when asked or its detector reads them."""
    model = member.model
    wanted = features or (member.ood is not None and member.ood.needs_features)
    if isinstance(model, OnnxNetwork):  # one run returns both; the features cost nothing extra
        logits, penultimate = model(images)
        return MemberOutput(logits, penultimate if wanted else None)
    if wanted:
        features = model.backbone(images)  # PetClassifier: backbone -> penultimate features -> head
        return MemberOutput(model.head(features).float(), features.float())
    return MemberOutput(model(images).float())


@dataclass(frozen=True)
class Output:
    """Per image: calibrated probabilities (B, C) and OOD scores (B,) (None without a detector), on the CPU."""

    probs: torch.Tensor
    ood_scores: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.probs)

    def __iter__(self):
        """One Output of one row per image (what the micro-batcher hands each request)."""
        for index in range(len(self.probs)):
            scores = None if self.ood_scores is None else self.ood_scores[index : index + 1]
            yield Output(self.probs[index : index + 1], scores)


def concat(outputs: list[Output]) -> Output:
    """Several batches' outputs as one, in order."""
    if not outputs:
        return Output(torch.empty(0, 0))
    scores = None if outputs[0].ood_scores is None else torch.cat([o.ood_scores for o in outputs])
    return Output(torch.cat([o.probs for o in outputs]), scores)


def average(outputs: list[Output]) -> Output:
    """The mean of several views' outputs (test-time augmentation); one view is returned unchanged."""
    if len(outputs) == 1:
        return outputs[0]
    probs = torch.stack([o.probs for o in outputs]).mean(dim=0)
    if any(o.ood_scores is None for o in outputs):
        return Output(probs)
    return Output(probs, torch.stack([o.ood_scores for o in outputs]).mean(dim=0))


class Predictor:
    """Members on one runtime: images -> calibrated (averaged) probabilities and OOD scores."""

    def __init__(self, members: list[Member], runtime: Runtime):
        if not members:
            raise ValueError("a predictor needs at least one member")
        self.members = list(members)
        self.runtime = runtime
        detectors = [m.ood for m in self.members]
        self.has_detector = all(d is not None for d in detectors)
        # One member: its own score and threshold. Several: normalised margins, unknown above 0.
        self.threshold = (detectors[0].threshold if len(detectors) == 1 else 0.0) if self.has_detector else None

    def outputs(self, images: torch.Tensor, features: bool = False) -> list[MemberOutput]:
        """Each member's logits (and features) for the batch: one forward pass per member."""
        with torch.inference_mode():
            images = self.runtime.to_device(images)
            with self.runtime.autocast():
                return [forward(member, images, features) for member in self.members]

    def combine(self, outputs: list[MemberOutput], calibrated: bool = True) -> Output:
        """Members' outputs -> averaged probabilities (temperature 1 when not `calibrated`) and OOD scores."""
        with torch.inference_mode():
            probs, scores = [], []
            for member, out in zip(self.members, outputs, strict=True):
                logits = out.logits / member.temperature
                probs.append(torch.softmax(logits if calibrated else out.logits, dim=1))
                if self.has_detector:
                    score = member.ood(logits, out.features)
                    scores.append(score if len(outputs) == 1 else (score - member.ood.threshold) / member.ood.scale)
            columns = [torch.stack(probs).mean(dim=0)]
            if scores:
                columns.append(torch.stack(scores).mean(dim=0)[:, None])
            # Softmax in float32 whatever the autocast dtype, then one device->host copy per batch.
            host = torch.cat(columns, dim=1).cpu()
            num_classes = columns[0].shape[1]
            return Output(host[:, :num_classes], host[:, num_classes] if scores else None)

    def __call__(self, images: torch.Tensor, calibrated: bool = True) -> Output:
        """(B, 3, H, W) -> Output: the serving path (the micro-batcher calls this once per batch)."""
        return self.combine(self.outputs(images), calibrated)

    def predict(self, images: torch.Tensor, tta: str = "none") -> Output:
        """Offline: every view of the batch through the same path, averaged."""
        return average([self(view) for view in tta_views(images, tta)])

    def is_unknown(self, score: float | None) -> bool:
        """True when a detector exists and `score` is above its threshold."""
        return self.threshold is not None and score is not None and score > self.threshold

    def warmup(self, batch_sizes: tuple[int, ...], crop: int) -> None:
        """Forward passes at the given batch sizes, so the first requests do not pay for lazy initialisation."""
        for size in batch_sizes:
            self(torch.zeros(size, 3, crop, crop))
        self.runtime.synchronize()


def top_indices(probs: list[float], k: int) -> list[int]:
    """Indices of the k most probable classes, most probable first (ties: lower index first)."""
    return sorted(range(len(probs)), key=probs.__getitem__, reverse=True)[:k]


def top_k(probs: list[float], class_names: tuple[str, ...] | list[str], k: int) -> list[dict]:
    """The k most probable classes, most probable first, as [{"label", "probability"}] (ties: lower index first)."""
    return [{"label": class_names[i], "probability": probs[i]} for i in top_indices(probs, k)]
