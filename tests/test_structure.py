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


def run_probe(probe: str, bundle_path) -> dict | list:
    """Run `probe` in a fresh interpreter on `bundle_path` and a photo; the JSON of its last line."""
    photo = REPO_ROOT / "tests" / "data" / "chelsea.jpg"
    result = subprocess.run(
        [sys.executable, "-c", probe, str(bundle_path), str(photo)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_serving_loads_no_training_code(tiny_bundle_path):
    loaded = run_probe(BOUNDARY_PROBE, tiny_bundle_path)
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


# One /predict through the app, traced in every thread (the batcher's too): the files of app/ and models/ each
# thread enters, and each chain of direct calls between them. A library frame starts a new chain: Flask calling a
# hook or a view, werkzeug reading the body stream, torch calling a network's forward.
REQUEST_PATH_PROBE = """
import json, os, sys, threading
ROOT, OURS, active = os.getcwd(), ("/app/", "/models/"), []
files, loops = {}, set()
def ours(frame):
    name = frame.f_code.co_filename
    return os.path.relpath(name, ROOT) if name.startswith(ROOT) and any(p in name for p in OURS) else None
def trace(frame, event, arg):
    if active and event == "call" and ours(frame):
        chain = []
        while frame is not None and ours(frame):
            if not chain or chain[-1] != ours(frame):
                chain.append(ours(frame))
            frame = frame.f_back
        files.setdefault(threading.current_thread().name, set()).add(chain[0])
        if len(set(chain)) < len(chain):
            loops.add(" <- ".join(chain))
threading.settrace(trace)  # before create_app starts the batcher thread
from app import create_app, get_service
app = create_app({"MODEL_PATH": sys.argv[1], "TORCH_THREADS": 1})
client, data = app.test_client(), open(sys.argv[2], "rb").read()
client.post("/predict", data=data, content_type="image/jpeg")  # lazy imports and first calls happen here
sys.settrace(trace)
active.append(True)
assert client.post("/predict", data=data, content_type="image/jpeg").status_code == 200
active.clear()
sys.settrace(None)
get_service(app).stop()
print(json.dumps({"files": {name: sorted(found) for name, found in files.items()}, "loops": sorted(loops)}))
"""


def test_a_predict_request_runs_one_way(tiny_bundle_path):
    """Issue 19: the request thread crosses at most 10 of the project's files, and no call chain re-enters a file it
    came through (service -> handler -> service was three round trips)."""
    traced = run_probe(REQUEST_PATH_PROBE, tiny_bundle_path)
    request_thread, batcher = traced["files"]["MainThread"], traced["files"]["micro-batcher"]
    assert {"app/routes.py", "app/service.py", "models/images.py"} <= set(request_thread)  # it really ran
    assert len(request_thread) <= 10, request_thread
    assert {"app/batching.py", "models/predictor.py"} <= set(batcher), batcher
    assert not traced["loops"], traced["loops"]
