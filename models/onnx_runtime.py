"""A bundle member served by ONNX Runtime on the CPU: its graph (fp32 or int8) behind the predictor's interface."""

from __future__ import annotations

import threading

import numpy as np
import torch

from models.graphs import Graph, open_session


class OnnxNetwork:
    """One graph's session, opened on first use (in the batcher thread that runs it), after which its bytes are let
    go; `info` is what export recorded.

    Called with a (B, 3, crop, crop) float batch it returns (logits, features) as float32 CPU tensors.
    """

    def __init__(self, graph: Graph, precision: str, threads: int = 1, info: dict | None = None):
        self.where = graph.where
        self._graph = graph
        self.precision = precision
        self.threads = threads
        self.info = dict(info or {})
        self._session = None
        self._lock = threading.Lock()

    @property
    def session(self):
        """The InferenceSession, built once: ONNX Runtime's own pool of `threads` intra-op threads."""
        if self._session is None:
            with self._lock:
                if self._session is None:
                    self._session = open_session(self._graph.data, self.threads)
                    self._graph = None
        return self._session

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> (logits, features); a channels-last batch is made contiguous NCHW first."""
        array = np.ascontiguousarray(images.detach().cpu().float().numpy())
        logits, features = self.session.run(("logits", "features"), {"images": array})
        return torch.from_numpy(logits), torch.from_numpy(features)

    def summary(self) -> dict:
        """What GET /model says of this member's runtime."""
        agreement = (self.info.get("agreement") or {}).get(self.precision)
        return {"backend": "onnxruntime", "precision": self.precision, "graph": self.where, "agreement": agreement}
