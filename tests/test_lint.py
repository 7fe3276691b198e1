"""The code style the project agreed on (ruff, configured in pyproject.toml) holds everywhere."""

import subprocess
import sys

from tests.helpers import REPO_ROOT


def test_ruff_passes():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
