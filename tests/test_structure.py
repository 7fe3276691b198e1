"""The layout's promises: serving never loads training code, dependencies point one way, scripts are thin."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

from tests.helpers import REPO_ROOT

PACKAGES = ("app", "models", "scripts", "tests", "tools")
# torch.hub imports tqdm whenever it is installed (and falls back to a stub without it), so the probe makes the
# training-only packages unimportable: serving must build and predict without any of them.
BOUNDARY_PROBE = """
import json, sys
for name in ("models.training", "tqdm", "matplotlib"):
    sys.modules[name] = None  # any import of them now raises ImportError
from app import create_app, get_service
app = create_app({"MODEL_PATH": sys.argv[1], "TORCH_THREADS": 1})
assert not get_service(app).reasons()
app.test_client().post("/predict", data=open(sys.argv[2], "rb").read(), content_type="image/jpeg")
get_service(app).stop()
print(json.dumps(sorted(name for name, module in sys.modules.items() if module is not None)))
"""


def imports_of(path) -> set[str]:
    """Every module a Python file imports (absolute names)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def python_files(*packages: str):
    for package in packages:
        yield from sorted((REPO_ROOT / package).rglob("*.py"))


def test_serving_loads_no_training_code(tiny_bundle_path):
    photo = REPO_ROOT / "tests" / "data" / "chelsea.jpg"
    result = subprocess.run(
        [sys.executable, "-c", BOUNDARY_PROBE, str(tiny_bundle_path), str(photo)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.splitlines()[-1])
    assert "app" in loaded and "models.runtime" in loaded  # the probe really built and used the app
    leaked = [m for m in loaded if m.startswith(("models.training", "tqdm", "matplotlib"))]
    assert not leaked, leaked


def test_dependencies_point_one_way():
    for path in python_files("models"):
        assert not any(name.split(".")[0] == "app" for name in imports_of(path)), f"{path} imports app"
    for path in python_files("app"):
        assert not any(name.startswith("models.training") for name in imports_of(path)), f"{path} imports training"
    for path in python_files("app", "models"):  # the measurement tools and their HTTP client stay outside
        assert not {name.split(".")[0] for name in imports_of(path)} & {"tools", "requests"}, path


def test_tools_are_neither_packaged_nor_in_the_image():
    lines = (REPO_ROOT / "pyproject.toml").read_text().splitlines()
    (include,) = [line for line in lines if line.startswith("include")]
    assert "tools" not in include, include  # setuptools' package find: app and models only
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert {"tools", "scripts/benchmark.py", "scripts/soak.py"} <= set(ignored)


def test_no_sys_path_tricks_and_no_test_imports_from_scripts():
    assert not (REPO_ROOT / "scripts" / "_path.py").exists()
    script_modules = {path.stem for path in (REPO_ROOT / "scripts").glob("*.py")}
    for path in python_files(*PACKAGES):
        if path.name == "test_structure.py":
            continue
        assert "sys.path" not in path.read_text(), f"{path} manipulates sys.path"
        if path.is_relative_to(REPO_ROOT / "tests"):
            top = {name.split(".")[0] for name in imports_of(path)}
            assert not top & (script_modules | {"scripts"}), f"{path} imports from scripts/"
            tests_imported = [name for name in imports_of(path) if name.startswith("tests.test_")]
            assert not tests_imported, f"{path} imports {tests_imported}: shared helpers live in tests/helpers.py"


def test_scripts_are_thin():
    for path in (REPO_ROOT / "scripts").glob("*.py"):
        assert len(path.read_text().splitlines()) < 150, f"{path.name} holds library code"
    tree = ast.parse((REPO_ROOT / "scripts" / "train.py").read_text())
    classes = [node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]
    assert not classes, f"scripts/train.py defines {classes}; the trainer lives in models/training"
