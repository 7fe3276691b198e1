"""The start-up checks that need torch, run by gunicorn's master in a child process so the master imports none.

`python -m app.preflight` exits 0, or 2 after printing one line that names the bad setting: PRECISION on this
machine's DEVICE (check_machine) and, under PRECISION=int8, each bundle's int8 file.
"""

from __future__ import annotations

import sys

from app.config import ConfigError, load_settings
from models.graphs import graph_path
from models.quantize import int8_problem


def check() -> None:
    """Raise ConfigError for settings this machine or these bundles cannot serve."""
    settings = load_settings()
    if settings.precision == "int8":
        # Only where PyTorch serves int8: BACKEND=torch, a CUDA device, or no int8 graph (models/graphs checks those).
        torch_serves = [path for path in settings.model_paths if settings.backend == "torch"
                        or settings.device.startswith("cuda") or not graph_path(path, "int8").exists()]  # fmt: skip
        problem = next(filter(None, map(int8_problem, torch_serves)), None)
        if problem:
            raise ConfigError(f"PRECISION=int8: {problem} (or serve ONNX Runtime's int8: python scripts/export.py)")


def main() -> int:
    """Exit status 0 when serving can start, else 2 with the reason on stderr."""
    try:
        check()
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
