"""The README and docs/ against the code: their commands run as written, their settings are the ones read.

Every fenced shell command of README.md and docs/*.md is checked in the way it can be offline: a script's
`--help` (and every flag the text passes to it), `make` targets, repository paths, and `curl` or Python
client examples against a real gunicorn server. Commands that need what this machine lacks (Docker,
a cluster, a GPU, the internet) are checked for the files they name.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO_ROOT

PAGES = sorted([REPO_ROOT / "README.md", *(REPO_ROOT / "docs").rglob("*.md")])
SHELLS = {"bash", "sh", "shell"}
PYTHON = ".venv/bin/python"
# Programs whose commands need Docker, a cluster, a GPU machine or the internet: only the paths they name are checked.
ELSEWHERE = {
    *("docker", "docker-compose", "kubectl", "git", "pip", ".venv/bin/torchrun", "bash", "source", "open"),
    *("cp", "mv", "ln", "kill", "cd", "echo", "rm", "mkdir", "ls", "cat", "sudo", "base64"),
}
CHECKED = {"make", PYTHON, "curl", "python3"} | ELSEWHERE
# Folders whose paths a command may name that the repository must hold (data/ and models/*.pt are made by runs).
TRACKED_ROOTS = ("deploy/", "scripts/", "tests/", "docs/", "app/", "models/", "tools/", "Dockerfile", "docker-compose")
LOCAL_URL = re.compile(r"(https?://)?localhost:5000")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    text: str

    def __str__(self) -> str:
        return f"{self.page.relative_to(REPO_ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page."""
    found, lines = [], page.read_text().splitlines()
    start = lang = None
    for number, line in enumerate(lines, 1):
        fence = re.match(r"^\s*```\s*([\w-]*)", line)
        if fence and start is None:
            start, lang = number, fence.group(1).lower()
        elif fence:
            found.append(Block(page, start, lang, "\n".join(lines[start : number - 1])))
            start = None
    return found


ALL_BLOCKS = [block for page in PAGES for block in blocks(page)]


def commands(block: Block) -> list[tuple[list[str], str]]:
    """A shell block's simple commands as (argument list, the source line): continuations joined, comments and
    prompts dropped."""
    found, pending = [], ""
    for line in re.sub(r"\\\n\s*", " ", block.text).splitlines():
        pending = f"{pending}\n{line}" if pending else re.sub(r"^\s*\$\s+", "", line)
        try:
            words = shlex.split(pending, comments=True)
        except ValueError:
            continue  # a quoted string goes on over the next line
        source, pending = pending, ""
        command: list[str] = []
        for word in [*words, ";"]:
            if word in {"&&", "||", ";", "|", "&"} or word.endswith(";"):
                if word.endswith(";") and word != ";":
                    command.append(word[:-1])
                if strip_env(command):
                    found.append((strip_env(command), source))
                command = []
            else:
                command.append(word)
    assert not pending, f"{block}: unterminated quote in {pending!r}"
    return found


def strip_env(command: list[str]) -> list[str]:
    """The command without leading VAR=value assignments."""
    index = 0
    while index < len(command) and re.match(r"^[A-Z_][A-Z0-9_]*=", command[index]):
        index += 1
    return command[index:]


SHELL_LINES = [(block, *found) for block in ALL_BLOCKS if block.lang in SHELLS for found in commands(block)]
SHELL_COMMANDS = [(block, command) for block, command, _ in SHELL_LINES]


def flags(words: list[str]) -> set[str]:
    return {word.split("=")[0] for word in words if re.match(r"^--[a-z]", word)}


@functools.cache
def installed_env() -> dict[str, str]:
    """The environment `make` gives a page's command: the packages `pip install -e .` installs (app and models, of
    this checkout) importable, nothing else of the repository (tools/ only from the root, with -m)."""
    packages = Path(tempfile.mkdtemp(prefix="installed-"))
    for name in ("app", "models"):
        (packages / name).symlink_to(REPO_ROOT / name, target_is_directory=True)
    return {**os.environ, "PYTHONPATH": str(packages)}


@functools.cache
def script_help(script: str) -> str:
    """The --help of `scripts/X.py`, or of the module `scripts.X` (run with -m, as the pages then say)."""
    target = [script] if script.endswith(".py") else ["-m", script]
    result = subprocess.run(
        [sys.executable, *target, "--help"], cwd=REPO_ROOT, env=installed_env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, f"{script} --help failed: {result.stderr}"
    return result.stdout


def python_script(command: list[str]) -> tuple[str, list[str]] | None:
    """(script or module, its arguments) of `.venv/bin/python scripts/X.py ...`, `.venv/bin/python -m scripts.X ...`
    or `.venv/bin/torchrun ... scripts/X.py ...`."""
    for index, word in enumerate(command):
        if re.match(r"^(scripts|tools)/\w+\.py$", word):
            return word, command[index + 1 :]
        module = command[index + 1] if word == "-m" and index + 1 < len(command) else ""
        if re.match(r"^(scripts|tools)\.\w+$", module):
            return module, command[index + 2 :]
    return None


def test_the_pages_have_commands_to_check():
    assert len(SHELL_COMMANDS) > 50 and (REPO_ROOT / "docs" / "configuration.md").is_file()


def ids(item) -> str | None:
    return str(item) if isinstance(item, Block) else None


@pytest.mark.parametrize(("block", "command"), SHELL_COMMANDS, ids=ids)
def test_shell_command_runs_as_written(block, command):
    program = command[0]
    # `python` outside a virtual environment lacks the project's packages: the pages say .venv/bin/python.
    assert not re.match(r"^python3?$", program) or command[1:2] == ["-c"], f"{block}: use .venv/bin/python"
    venv_tool = program.startswith(".venv/bin/") and (REPO_ROOT / program).exists()  # installed by make's .venv
    assert program in CHECKED or venv_tool, f"{block}: how is {program!r} checked? (tests/test_docs.py)"
    assert program not in {"pytest", "gunicorn", "ruff"}, f"{block}: use .venv/bin/{program}"
    for word in command:
        path = word.split("=", 1)[-1].split(":", 1)[0] if "=" in word and not word.startswith("-") else word
        if path.startswith(TRACKED_ROOTS) and not any(ch in path for ch in "*$<>{"):
            assert (REPO_ROOT / path).exists() or not _tracked_kind(path), f"{block}: no such path {path}"
    if program == "make":
        for target in command[1:]:
            if "=" not in target and not target.startswith("-"):
                assert target in make_targets(), f"{block}: make has no target {target}"
    if program == "kubectl" and "-k" in command and shutil.which("kubectl"):
        folder = command[command.index("-k") + 1]
        built = subprocess.run(["kubectl", "kustomize", folder], cwd=REPO_ROOT, capture_output=True, text=True)
        assert built.returncode == 0, f"{block}: kustomize {folder}: {built.stderr}"
    script = python_script(command)
    while script and program in {PYTHON, ".venv/bin/torchrun"}:  # `tools.cpu_isa P -- COMMAND`: COMMAND's too
        name, arguments = script
        split = arguments.index("--") if "--" in arguments else len(arguments)
        ours, inner = arguments[:split], arguments[split + 1 :]
        unknown = flags(ours) - set(re.findall(r"--[a-z][\w-]*", script_help(name)))
        assert not unknown, f"{block}: {name} has no {sorted(unknown)}"
        program, script = (inner[0], python_script(inner)) if inner else ("", None)
    if program.startswith(".venv/bin/"):
        assert (REPO_ROOT / program).exists() or program in {".venv/bin/activate"}, f"{block}: {program}"


def _tracked_kind(path: str) -> bool:
    """Whether a path is one the repository holds, not one a run makes (bundles, reports, data)."""
    return not re.search(r"\.(pt|ckpt|png|csv|json)$|^models/[^/]+$|^tests/data/[^/]+\.(jpg|png)$", path) or (
        path.startswith("tests/data/")
    )


@functools.cache
def make_targets() -> set[str]:
    text = (REPO_ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][\w-]*):", text, re.MULTILINE))


# Against a real server: curl, the Python client, the example answer


def live(text: str, server) -> str:
    """The text with localhost:5000 pointing at the test server (a URL stays a URL, host:port stays host:port)."""
    address = server.url.split("//", 1)[1]
    return LOCAL_URL.sub(lambda match: server.url if match.group(1) else address, text)


CURLS = [(block, source) for block, command, source in SHELL_LINES if command[0] == "curl" and LOCAL_URL.search(source)]


@pytest.mark.parametrize(("block", "source"), CURLS, ids=ids)
def test_curl_examples_answer(block, source, gunicorn_server, demo_data, tmp_path):
    # As written, against the test server (its bundle has the demo classes; data/demo is the session's demo set).
    line = live(source, gunicorn_server).replace("data/demo/", f"{demo_data}/")
    line = re.sub(r"-o \S+", f"-o {tmp_path}/out", line)
    result = subprocess.run(["bash", "-c", line], cwd=REPO_ROOT, capture_output=True, timeout=120)
    assert result.returncode == 0, f"{block}: {line}\n{result.stderr.decode(errors='replace')}"
    try:
        answer = json.loads(result.stdout)
    except ValueError:
        return  # an image, Prometheus text, ...
    assert not (isinstance(answer, dict) and "error" in answer), f"{block}: {line} -> {answer}"


def test_python_client_examples_run(gunicorn_server, tmp_path):
    clients = [block for block in ALL_BLOCKS if block.lang == "python" and LOCAL_URL.search(block.text)]
    assert any("import requests" in block.text for block in clients), "the README's requests example"
    for block in clients:
        if "tritonclient" in block.text or "kserve" in block.text:
            pytest.importorskip("tritonclient.http")
        script = tmp_path / "client.py"
        script.write_text(live(block.text, gunicorn_server))
        result = subprocess.run(
            [sys.executable, str(script)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, f"{block}:\n{result.stderr}"


def test_example_answers_have_the_services_keys(client, cat_jpeg):
    answer = client.post("/predict", data={"image": (io.BytesIO(cat_jpeg), "cat.jpg")}).get_json()
    examples = [json.loads(b.text) for b in ALL_BLOCKS if b.lang == "json" and '"predicted_class"' in b.text]
    assert examples, "an example answer"
    for example in examples:
        assert set(example) == set(answer), set(example) ^ set(answer)


# Settings: the configuration table against the code


def documented_variables() -> set[str]:
    """The variables in the first column of docs/configuration.md's tables."""
    found = set()
    for line in (REPO_ROOT / "docs" / "configuration.md").read_text().splitlines():
        cells = line.split("|")
        if len(cells) > 2 and not set(cells[1].strip()) <= {"-", " "}:
            found |= set(re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[1]))
    return found


PY_READS = (
    r"""os\.environ\.(?:get|setdefault)\(\s*["']([A-Z][A-Z0-9_]+)["']""",
    r"""os\.environ\[\s*["']([A-Z][A-Z0-9_]+)["']\s*\]""",
    r"""["']([A-Z][A-Z0-9_]+)["']\s+(?:not\s+)?in\s+os\.environ""",
    r"""os\.getenv\(\s*["']([A-Z][A-Z0-9_]+)["']""",
)


def variables_read() -> set[str]:
    """Every environment variable the project's code reads: settings, os.environ, shell and compose defaults."""
    from app.config import VARIABLES

    found = set(VARIABLES)
    sources = [REPO_ROOT / "gunicorn.conf.py", *(path for root in ("app", "models", "scripts", "tools")
                                                 for path in (REPO_ROOT / root).rglob("*.py"))]  # fmt: skip
    for path in sources:
        text = path.read_text()
        for pattern in PY_READS:
            found |= set(re.findall(pattern, text))
    for path in [*(REPO_ROOT / "scripts").glob("*.sh"), *REPO_ROOT.glob("docker-compose*.yml")]:
        found |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):?[-=]", path.read_text()))
    found |= set(re.findall(r"^([A-Z][A-Z0-9_]*) \?=", (REPO_ROOT / "Makefile").read_text(), re.MULTILINE))
    return found


def test_every_variable_the_code_reads_is_documented():
    missing = variables_read() - documented_variables()
    assert not missing, f"add to docs/configuration.md: {sorted(missing)}"


def test_every_documented_variable_is_read():
    unread = documented_variables() - variables_read()
    assert not unread, f"docs/configuration.md lists variables nothing reads: {sorted(unread)}"


def test_compose_passes_what_the_configuration_page_calls_a_setting():
    from app.config import VARIABLES

    settings = set(VARIABLES)
    api = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]["api"]["environment"]
    assert settings <= set(api) and settings <= documented_variables()


def test_documented_defaults_are_the_code_defaults():
    from app.config import ServerSettings, Settings
    from models.settings import variables

    defaults = {
        name: getattr(cls(), field) for cls in (Settings, ServerSettings) for name, field in variables(cls).items()
    }
    checked = 0
    for line in (REPO_ROOT / "docs" / "configuration.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.split("|")[1:-1]]
        literal = re.fullmatch(r"`([^`]+)`", cells[1]) if len(cells) > 2 else None
        name = re.fullmatch(r"`([A-Z][A-Z0-9_]+)`", cells[0]) if cells else None
        if not (name and literal and name.group(1) in defaults) or defaults[name.group(1)] in ("", 0):
            continue  # a derived default (cores / workers, 0.0.0.0:$PORT) is described in words
        default, text = defaults[name.group(1)], literal.group(1)
        if isinstance(default, bool):
            assert text == str(default).lower(), (name.group(1), text)
        elif isinstance(default, (int, float)):
            assert float(text) == default, (name.group(1), text)
        else:
            assert text == default, (name.group(1), text)
        checked += 1
    assert checked >= 15


def test_the_limits_table_has_the_code_defaults():
    from app.config import ServerSettings, Settings
    from models.settings import variables

    defaults = {
        name: getattr(cls(), field) for cls in (Settings, ServerSettings) for name, field in variables(cls).items()
    }
    section = (REPO_ROOT / "docs" / "security.md").read_text().split("## Limits", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| [^|]*`([A-Z][A-Z0-9_]+)` \| ([\d.]+)(?: (M)\b)?", section, re.MULTILINE)
    assert len(rows) >= 12
    # Written once: the other pages link to it instead of repeating it.
    for page in ("operations.md", "README.md"):
        text = (REPO_ROOT / ("README.md" if page == "README.md" else f"docs/{page}")).read_text()
        assert "| `MAX_UPLOAD_MB` |" not in text and "| request body, `MAX_UPLOAD_MB`" not in text, page
    for name, number, mega in rows:
        assert float(number) * (1e6 if mega else 1) == defaults[name], name


# The newcomer's path: what the README promises, and what the reference pages must keep saying


def test_the_readme_stays_short_and_links_the_reference():
    readme = (REPO_ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 220, "the reference belongs in docs/"
    prose = [line for line in readme.splitlines() if not line.startswith("|")]
    assert max(map(len, prose)) <= 160, "a line too long to read in a terminal"
    for page in ("api", "configuration", "training", "trust", "performance", "deployment", "operations",
                 "architecture"):  # fmt: skip
        assert f"](docs/{page}.md)" in readme, page
    assert "import requests" in readme and '"unknown": true' in readme and "/v2" in readme


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    return {slug(heading) for heading in re.findall(r"^#+ (.*)$", text, re.MULTILINE)}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO_ROOT)))
def test_links_between_pages_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^(https?|mailto):", target):
            continue
        path, _, anchor = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        assert destination.exists(), f"{page.name}: {target}"
        if anchor and destination.is_file():
            assert anchor in anchors(destination), f"{page.name}: {target}"


def test_every_error_code_is_in_the_api_table():
    from app.errors import STATUS

    api = (REPO_ROOT / "docs" / "api.md").read_text()
    rows = dict(re.findall(r"^\| (\d{3}) \| `(\w+)` \|", api, re.MULTILINE)[::-1])
    table = {code: int(status) for status, code in re.findall(r"^\| (\d{3}) \| `(\w+)` \|", api, re.MULTILINE)}
    assert rows and table == STATUS, set(table.items()) ^ set(STATUS.items())
    readme_codes = re.findall(r"`([a-z0-9_]+)`", (REPO_ROOT / "README.md").read_text().split("| status |")[1])
    assert {code for code in readme_codes if code in STATUS} >= set(STATUS) - {"invalid_tensor", "unknown_model",
                                                                               "explain_unsupported"}  # fmt: skip


def test_the_demo_preset_is_documented_as_it_is():
    from models.training.config import DEMO_PRESET

    (row,) = [line for line in (REPO_ROOT / "docs" / "training.md").read_text().splitlines() if "| `--demo` |" in line]
    for key, value in DEMO_PRESET.items():
        flag = "--" + key.replace("_", "-")
        found = re.search(rf"{flag} ([^\s`;]+)", row)
        assert found, f"the --demo row does not list {flag}"
        if isinstance(value, (int, float)):
            assert float(found.group(1)) == value, flag
        else:
            assert found.group(1) == str(value), flag


def test_the_probes_on_the_operations_page_are_the_deployments():
    deployment = yaml.safe_load((REPO_ROOT / "deploy" / "kubernetes" / "deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    (block,) = [
        b for b in blocks(REPO_ROOT / "docs" / "operations.md") if b.lang == "yaml" and "startupProbe" in b.text
    ]
    documented = yaml.safe_load(block.text)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert documented[probe] == container[probe], probe
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert f"terminationGracePeriodSeconds: {grace}" in block.text


def test_kubernetes_steps_fill_the_bundle_before_the_pods_start():
    page = "docs/deployment.md"  # written once: the README links to them
    readme = (REPO_ROOT / "README.md").read_text()
    assert "kubectl apply" not in readme and "docs/deployment.md#kubernetes" in readme
    lines = [
        source for block, command, source in SHELL_LINES if str(block).startswith(page) and command[0] == "kubectl"
    ]
    order = [next(i for i, line in enumerate(lines) if re.search(pattern, line)) for pattern in (
        r"apply .*model-pvc\.yaml", r" cp .*pet_classifier\.pt", r"apply -n pets -k deploy/kubernetes$")]  # fmt: skip
    assert order == sorted(order), f"{page}: the claim, then the bundle, then the service"


def test_the_image_is_described_as_the_dockerfile_builds_it():
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)", dockerfile, re.MULTILINE).group(1)
    for page in ("README.md", "docs/deployment.md"):
        assert base in (REPO_ROOT / page).read_text(), page
    deployment = (REPO_ROOT / "docs" / "deployment.md").read_text()
    assert ("pip wheel --no-deps" in dockerfile) == ("pip wheel --no-deps" in deployment)
    user = re.search(r"^USER (\d+)", dockerfile, re.MULTILINE).group(1)
    assert f"user `{user}`" in deployment


def test_the_training_flags_table_has_the_scripts_defaults():
    parser = runpy.run_path(str(REPO_ROOT / "scripts" / "train.py"))["get_args_parser"]()
    defaults = {action.option_strings[0]: action.default for action in parser._actions if action.option_strings}
    section = (REPO_ROOT / "docs" / "training.md").read_text().split("### Important flags", 1)[1].split("\n#", 1)[0]
    checked = 0
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.split("|")[1:-1]]
        if len(cells) < 2:
            continue
        names = re.findall(r"`(--[a-z][\w-]*)`", cells[0])
        values = [value.strip().strip("`") for value in cells[1].split(", ")]
        if not names or len(names) != len(values):
            continue
        for name, value in zip(names, values, strict=True):
            if not re.fullmatch(r"[\w.-]+", value):
                continue  # described in words: min(4, cores), <output stem>.ckpt
            default = defaults[name]
            off = value == "off" and default in (False, None, 0, "none")
            assert off or value == str(default) or _same_number(value, default), (name, value, default)
            checked += 1
    assert checked >= 20


def _same_number(text: str, value) -> bool:
    try:
        return float(text) == float(value)
    except (TypeError, ValueError):
        return False


def test_every_exported_metric_is_in_the_api_page(client, cat_jpeg):
    client.post("/predict", data={"image": (io.BytesIO(cat_jpeg), "cat.jpg")})  # so labelled families have samples
    exported = set(re.findall(r"^# TYPE petclf_(\w+) ", client.get("/metrics").get_data(as_text=True), re.MULTILINE))
    assert {"requests_total", "queue_depth", "model_info"} <= exported
    api = (REPO_ROOT / "docs" / "api.md").read_text().split("## Metrics", 1)[1]
    exported = {name for name in exported if not name.endswith("_created")}  # prometheus_client's own series
    missing = {name for name in exported if not re.search(rf"`(petclf_)?{name}[`{{]", api)}
    assert not missing, f"docs/api.md, Metrics: {sorted(missing)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO_ROOT)))
def test_repository_paths_in_the_prose_exist(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    for path in re.findall(r"`((?:deploy|scripts|tools|app|tests|docs|models)/[\w./-]*)`", text):
        if re.search(r"\.(pt|onnx|ckpt|json|csv|png)$|/$", path) and not path.startswith(("docs/", "tests/data")):
            continue  # what a run writes (bundles, graphs, reports), or a folder named loosely
        assert (REPO_ROOT / path).exists() or (page.parent / path).exists(), f"{page.name}: {path}"
