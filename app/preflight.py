"""The start-up checks and the runtime trial that need torch, run in a child process so gunicorn's master imports none.

`python -m app.preflight [OVERRIDES]` (OVERRIDES: JSON of settings by variable name) exits 2 after printing one line
that names the bad setting: PRECISION on this machine's DEVICE (check_machine) and, under PRECISION=int8, each
bundle's int8 file. Else, under BACKEND=auto on the CPU, it times ONNX Runtime against PyTorch for each member both
can serve (models/loader.py, models/choice.py) and prints the choices as one JSON line, exit 0. The master runs it
once per start and reload, before forking, and hands the choices to every worker (BACKENDS_ENV): all serve the same
runtime, and the trial costs one start-up, not one per worker. Torch and the model code load only in the child.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from app.config import ConfigError, Settings, load_settings, measures_backends
from models.settings import variables

BACKENDS_ENV = "PETCLF_BACKENDS"  # the master's choices (JSON), inherited by the workers it forks
MEASURED_SETTINGS = ("MODEL_PATH", "DEVICE", "PRECISION", "BACKEND", "TORCH_THREADS", "MAX_BATCH_SIZE")


def check(settings: Settings) -> None:
    """Raise ConfigError for settings this machine or these bundles cannot serve."""
    from models.graphs import carries
    from models.quantize import int8_problem

    if settings.precision == "int8":
        # Only where PyTorch serves int8: BACKEND=torch, a CUDA device, or no int8 graph (models/graphs checks those).
        torch_serves = [path for path in settings.model_paths if settings.backend == "torch"
                        or settings.device.startswith("cuda") or not carries(path, "int8")]  # fmt: skip
        problem = next(filter(None, map(int8_problem, torch_serves)), None)
        if problem:
            raise ConfigError(f"PRECISION=int8: {problem} (or serve ONNX Runtime's int8: python scripts/export.py)")


def measure(settings: Settings) -> dict:
    """Build the members as a worker would, timing both runtimes where both can serve one; returns {precision,
    threads, members: {content hash: {backend, reason, measured}}} for the members that were measured."""
    import torch

    from app.lifecycle import return_big_buffers
    from models.choice import TRIAL_BATCH
    from models.loader import load_predictor
    from models.runtime import resolve_device

    # As in a worker: its batcher's threads, and its malloc (else glibc maps and unmaps every activation over 32 MB
    # of a ResNet-50 batch at each call: PyTorch's fp32 timed 43-52 instead of 27 ms per image on the AMX Xeon).
    torch.set_num_threads(settings.torch_threads)
    return_big_buffers()
    device = resolve_device(settings.device, mps=False)
    if device.type != "cpu":  # DEVICE=auto found a GPU: PyTorch serves, nothing to time
        return _choices(settings, {})
    loaded = load_predictor(settings.model_paths, device, settings.precision, settings.backend,
                            settings.torch_threads, trial_batch=min(settings.max_batch_size, TRIAL_BATCH))  # fmt: skip
    members = {
        bundle.content_hash: {key: member[key] for key in ("backend", "reason", "measured")}
        for bundle, member in zip(loaded.ensemble.bundles, loaded.members, strict=True)
        if member["measured"]
    }
    return _choices(settings, members)


def _choices(settings: Settings, members: dict) -> dict:
    """What the child prints: the measured members, and the settings they were measured under."""
    return {"precision": settings.precision, "threads": settings.torch_threads, "members": members}


def run_child(command: list[str]) -> str:
    """Run a start-up check in a child process and return what it printed; ConfigError with its last line when it
    fails (gunicorn's master runs this one and models.graphs' that way)."""
    checked = subprocess.run(command, capture_output=True, text=True)
    if checked.returncode:
        raise ConfigError((checked.stderr.strip().splitlines() or [f"{command[2]} failed"])[-1])
    return checked.stdout


def chosen_backends(settings: Settings) -> dict:
    """Worker: content hash -> the runtime start-up measured faster ({backend, reason, measured}), from gunicorn's
    master; without one (create_app outside gunicorn) the same trial runs now, in a child. {}: nothing to measure."""
    if not measures_backends(settings):
        return {}
    decided = json.loads(os.environ.get(BACKENDS_ENV) or "{}")
    if (decided.get("precision"), decided.get("threads")) != (settings.precision, settings.torch_threads):
        fields = variables(Settings)
        overrides = {name: getattr(settings, fields[name]) for name in MEASURED_SETTINGS}
        decided = parse_choices(run_child([sys.executable, "-m", "app.preflight", json.dumps(overrides)]))
    return decided["members"]


def parse_choices(printed: str) -> dict:
    """The choices `python -m app.preflight` printed (its last line: libraries may print before it)."""
    return json.loads(printed.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    """Exit status 0 after printing the choices (JSON) when serving can start, else 2 with the reason on stderr."""
    try:
        settings = load_settings(overrides=json.loads(argv[0]) if argv else None)
        check(settings)
        decided = measure(settings) if measures_backends(settings) else _choices(settings, {})
    except ValueError as error:  # ConfigError, and the loader's BundleError, GraphError, QuantizationError...
        print(" ".join(str(error).split()), file=sys.stderr)
        return 2
    print(json.dumps(decided))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
