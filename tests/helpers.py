"""Helpers the test modules share (fixtures live in conftest.py and tests/fixtures/); test files import from here,
never from each other."""

from __future__ import annotations

import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from app import get_service
from models.bundle import load_bundle, load_model
from models.images import decode_image
from models.transforms import eval_transform
from tools.harness import spawn_server, wait_ready

REPO_ROOT = Path(__file__).resolve().parent.parent
PHOTOS = REPO_ROOT / "tests" / "data"
PHOTO_NAMES = ("chelsea", "astronaut", "coffee", "rocket")
DOCKERFILE = REPO_ROOT / "Dockerfile"
READY_TIMEOUT_S = 120


def photos() -> list[bytes]:
    """The real camera photos of tests/data, in PHOTO_NAMES order."""
    return [(PHOTOS / f"{name}.jpg").read_bytes() for name in PHOTO_NAMES]


def reference_probabilities(bundle_path: Path, data: bytes, flip: bool = False) -> list[float]:
    """The model run in-process, outside the service, with the bundle's own decoding, transform and temperature.

    flip: the mean over the image and its mirror (what ?tta=flip answers).
    """
    model, bundle = load_model(bundle_path)
    image = eval_transform(bundle.preprocess)(decode_image(data, min_size=bundle.preprocess["resize"]))
    views = torch.stack([image, image.flip(-1)] if flip else [image])
    with torch.inference_mode():
        return torch.softmax(model(views) / bundle.temperature, dim=1).mean(dim=0).tolist()


def pixels_of(bundle_path, images: list[bytes]) -> np.ndarray:
    """What the service's preprocessing makes of `images`, computed here with the bundle's own transform."""
    preprocess = load_bundle(bundle_path).preprocess
    transform = eval_transform(preprocess)
    return np.stack([transform(decode_image(data, min_size=preprocess["resize"])).numpy() for data in images])


def sample(app, name: str, **labels) -> float:
    """One metric sample of an app built by create_app (0 when absent)."""
    return get_service(app).metrics.registry.get_sample_value(name, labels) or 0.0


def dockerfile_instructions(stage: str | None = None) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined; only `stage` when given."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    pairs, current = [], None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        keyword, _, rest = line.strip().partition(" ")
        if keyword.upper() == "FROM":
            current = rest.split(" AS ")[-1].strip() if " AS " in rest else None
        if stage is None or current == stage:
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


@dataclass
class Server:
    """A gunicorn server started with the canonical command."""

    process: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        """Everything the server wrote so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; kill if it does not stop in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        return self.process.returncode


def start_server(model_path: Path, tmp_dir: Path, workers: int = 2, **env) -> Server:
    """`gunicorn -c gunicorn.conf.py 'app:create_app()'` on a free loopback port (does not wait for ready)."""
    env = {
        "MODEL_PATH": model_path,
        "WEB_CONCURRENCY": workers,
        "TORCH_THREADS": 1,
        "PROMETHEUS_MULTIPROC_DIR": tmp_dir / "metrics",
        **env,
    }
    log_path = tmp_dir / "server.log"
    with open(log_path, "wb") as log:
        process, url = spawn_server(env, log)
    return Server(process, url, log_path)


def poll_readyz(server: Server, timeout: float = READY_TIMEOUT_S, workers: int = 0) -> list[int]:
    """tools.harness.wait_ready for `server` (the one readiness poller): every /readyz status seen until 200 (and
    `workers` warmed-up workers); a probe during warm-up waits, connected, for the answer. Errors carry the log."""
    try:
        return wait_ready(server.url, server.process, workers, timeout, probe_timeout=timeout)
    except (RuntimeError, TimeoutError) as error:
        raise type(error)(f"{error}:\n{server.log()}") from error


def tensorboard_events(log_dir: Path):
    """Every event under `log_dir`, read with TensorBoard's own reader (an EventAccumulator, loaded)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # a training/dev dependency

    assert Path(log_dir).is_dir(), f"no TensorBoard directory {log_dir}"
    return EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0}).Reload()


def tensorboard_scalars(log_dir: Path, tag: str) -> list[float]:
    """The values of `tag` in `log_dir`'s events, in step order."""
    return [event.value for event in sorted(tensorboard_events(log_dir).Scalars(tag), key=lambda e: e.step)]


def legacy_bundle(source: Path, output: Path) -> Path:
    """A format-2 copy of the format-3 bundle `source` at `output`, its runtimes moved beside it as format 2 had them
    (`<stem>.fp32.onnx`, `<stem>.int8.onnx`, `<stem>.int8.pt`): what bundles made before format 3 look like."""
    from models.bundle import atomic_save
    from models.graphs import graph_path
    from models.quantize import ENTRY, int8_path

    raw = torch.load(source, map_location="cpu", weights_only=True)
    runtimes = raw.pop("runtimes")
    raw["format"] = {**raw["format"], "version": 2}
    atomic_save(raw, output)
    for name, entry in runtimes.items():
        if name == ENTRY:
            torch.save(dict(entry), int8_path(output))
        else:
            graph_path(output, name.split("/")[1]).write_bytes(entry["graph"].numpy().tobytes())
    return output
