"""The try-it page from the server's side: served and cached, public under API keys, off with UI_ENABLED=false,
out of the API's way and its document, and shipped in the wheel. Its behaviour in a browser: test_ui_browser.py."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from app.ui import ASSET_MAX_AGE_S, STATIC
from tests.helpers import REPO_ROOT

KEY = "ui-test-key-0123456789"
ASSET_URL = re.compile(r'(?:href|src)="(ui/[^"?]+)\?v=([0-9a-f]+)"')


def asset_urls(page: str) -> dict[str, str]:
    """The page's own files: path -> version in its URL."""
    return dict(ASSET_URL.findall(page))


def test_the_page_and_its_files_are_served_and_cached(client):
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert page.headers["Cache-Control"] == "no-cache" and page.headers["ETag"]  # revalidated, 304 when unchanged
    assert client.get("/", headers={"If-None-Match": page.headers["ETag"]}).status_code == 304
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    urls = asset_urls(page.get_data(as_text=True))
    assert set(urls) == {f"ui/{path.name}" for path in STATIC.iterdir()}
    for path, version in urls.items():
        versioned = client.get(f"/{path}?v={version}")
        assert versioned.status_code == 200 and versioned.headers["ETag"] == f'"{version}"'
        assert versioned.headers["Cache-Control"] == f"public, max-age={ASSET_MAX_AGE_S}, immutable"
        assert client.get(f"/{path}?v={version}", headers={"If-None-Match": f'"{version}"'}).status_code == 304
        for stale in (f"/{path}", f"/{path}?v=0123"):  # an old or missing version is revalidated, never pinned
            assert client.get(stale).headers["Cache-Control"] == "no-cache"
    assert client.get("/ui/ui.js").mimetype in ("text/javascript", "application/javascript")
    missing = client.get("/ui/../config.py")
    assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "not_found"


def test_the_page_loads_nothing_from_elsewhere(client):
    texts = [client.get("/").get_data(as_text=True)] + [path.read_text() for path in STATIC.iterdir()]
    for text in texts:
        assert not re.search(r"https?://|(?:src|href)=\"//|\burl\(", text), "the page must work offline"
    policy = client.get("/").headers["Content-Security-Policy"]
    assert "connect-src 'self'" in policy and "script-src 'self'" in policy  # the browser enforces it too


def test_ui_enabled_false_removes_the_page(app_factory, cat_jpeg):
    client = app_factory(UI_ENABLED="false").test_client()
    assert client.get("/").status_code == 404
    assert client.get("/ui/ui.js").status_code == 404
    assert client.post("/predict", data=cat_jpeg, content_type="image/jpeg").status_code == 200


def names(hooks: dict) -> dict:
    """Request hooks by blueprint (None = the app), as names: each app has its own closures."""
    return {scope: [hook.__qualname__ for hook in functions] for scope, functions in hooks.items() if functions}


def test_the_page_adds_no_request_hook(app, app_factory):
    # Nothing per request: the page and its files are prepared at start-up; /predict meets the same hooks.
    without = app_factory(UI_ENABLED="false")
    for hooks in ("before_request_funcs", "after_request_funcs", "teardown_request_funcs", "url_value_preprocessors"):
        assert names(getattr(app, hooks)) == names(getattr(without, hooks)), hooks
    assert app.view_functions["api.predict"] is without.view_functions["api.predict"]


def test_with_api_keys_the_page_is_open_and_the_api_is_not(app_factory, client):
    keyed = app_factory(API_KEYS=KEY).test_client()
    page = keyed.get("/")
    assert page.status_code == 200 and 'data-keys-required="true"' in page.get_data(as_text=True)
    for path in asset_urls(page.get_data(as_text=True)):
        assert keyed.get(f"/{path}").status_code == 200
    assert keyed.get("/model").status_code == 401
    assert keyed.get("/model", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    open_page = client.get("/").get_data(as_text=True)
    assert 'data-keys-required="false"' in open_page and re.search(r'id="key-section"[^>]* hidden', open_page)


def test_the_page_is_not_part_of_the_api_document(client):
    paths = client.get("/openapi.json").get_json()["paths"]
    assert "/" not in paths and not any(path.startswith("/ui") for path in paths)


@pytest.mark.slow
def test_the_wheel_ships_the_page(tmp_path):
    # What the Dockerfile does: the project's metadata and packages, built into a wheel without its dependencies.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source)
    for package in ("app", "models"):
        shutil.copytree(REPO_ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path), str(source)]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    page = {"app/ui/templates/ui/index.html"} | {f"app/ui/static/{path.name}" for path in STATIC.iterdir()}
    assert page <= shipped, page - shipped
