"""The try-it page: `GET /` serves one HTML page whose script calls the public API (/model, /predict, /explain).

It stays out of the API's way: no request hook, nothing on the prediction path; the page is rendered and the assets
are read and hashed once at start-up, then answered from memory with ETags; asset URLs carry their content hash, so
browsers keep them for a year and a new deployment changes the URL.
"""

from __future__ import annotations

import hashlib
import mimetypes
from dataclasses import dataclass
from pathlib import Path

from flask import Blueprint, Flask, Response, abort, current_app, render_template, request

from app.config import Settings

STATIC = Path(__file__).parent / "static"
EXTENSION = "petclf.ui"  # app.extensions key: the Assets below
PAGE_ENDPOINT, ASSET_ENDPOINT = "ui.page", "ui.asset"  # public even with API_KEYS (app/auth.py)
ASSET_MAX_AGE_S = 365 * 24 * 3600  # a versioned URL's content never changes
# The page loads nothing from elsewhere: the policy lets the browser enforce it. blob: previews the chosen photo,
# data: shows the heat map the API returns in base64.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:;"
    " connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

bp = Blueprint("ui", __name__, template_folder="templates")


@dataclass(frozen=True)
class Asset:
    """A file answered from memory: its bytes, content type and content hash (the ETag and the URL's `v`)."""

    body: bytes
    mimetype: str
    version: str

    @classmethod
    def of(cls, body: bytes, mimetype: str) -> Asset:
        """`body` with its sha256-based version."""
        return cls(body, mimetype, hashlib.sha256(body).hexdigest()[:16])


@dataclass(frozen=True)
class Assets:
    """Everything the page needs, built once per worker."""

    page: Asset
    files: dict[str, Asset]


def _send(asset: Asset, max_age: int | None) -> Response:
    """`asset` with its ETag (304 when the browser has it); max_age None = revalidate every time."""
    response = Response(asset.body, mimetype=asset.mimetype)
    response.set_etag(asset.version)
    if max_age is None:
        response.cache_control.no_cache = True
    else:
        response.cache_control.public = True
        response.cache_control.max_age = max_age
        response.cache_control.immutable = True
    response.headers.update(HEADERS)
    return response.make_conditional(request)


@bp.get("/")
def page():
    """The try-it page (always revalidated, so a new deployment's asset URLs reach the browser)."""
    return _send(current_app.extensions[EXTENSION].page, None)


@bp.get("/ui/<path:filename>")
def asset(filename: str):
    """A static file of the page; cached for a year when the URL carries its current version."""
    found = current_app.extensions[EXTENSION].files.get(filename)
    if found is None:
        abort(404)
    return _send(found, ASSET_MAX_AGE_S if request.args.get("v") == found.version else None)


def load_files() -> dict[str, Asset]:
    """The static files by name, read once."""
    files = {}
    for path in sorted(STATIC.iterdir()):
        mimetype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        files[path.name] = Asset.of(path.read_bytes(), mimetype)
    return files


def register(app: Flask, settings: Settings) -> None:
    """Serve the page on `app` at `/` and its files under `/ui/`; rendered once, here."""
    files = load_files()
    app.register_blueprint(bp)
    # Relative URLs (no leading /): the page keeps working behind a proxy that serves it under a path prefix.
    urls = {name: f"ui/{name}?v={asset.version}" for name, asset in files.items()}
    with app.app_context():
        html = render_template(
            "ui/index.html",
            asset_url=urls,
            keys_required=bool(settings.api_keys),
            max_upload_mb=f"{settings.max_upload_mb:g}",
        )
    app.extensions[EXTENSION] = Assets(Asset.of(html.encode("utf-8"), "text/html"), files)
