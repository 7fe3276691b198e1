"""Optional API keys: with API_KEYS set, every endpoint except the public ones needs `Authorization: Bearer <key>`.

One mechanism for every route, present and future: an endpoint is protected unless it is listed here, so a
route another blueprint adds is protected by default.
"""

from __future__ import annotations

import hmac

from flask import Flask, request

from app.config import Settings
from app.errors import coded_response
from app.ui import ASSET_ENDPOINT, PAGE_ENDPOINT

# Probes and the API description stay open: orchestrators and clients need them before they hold a key. So does
# the try-it page: it holds no data, and every API call it makes sends the key the user types into it.
PUBLIC_ENDPOINTS = frozenset(
    {"api.livez", "api.readyz", "api.openapi", "v2.live", "v2.ready", PAGE_ENDPOINT, ASSET_ENDPOINT}
)
METRICS_ENDPOINT = "api.metrics"  # public unless METRICS_PUBLIC=false
REALM = "pet-classifier"


def public_endpoints(settings: Settings) -> frozenset[str]:
    """The endpoints that need no key under `settings`."""
    return PUBLIC_ENDPOINTS | ({METRICS_ENDPOINT} if settings.metrics_public else frozenset())


def bearer_token(header: str) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header value, or None."""
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token.encode("latin-1", errors="replace")  # WSGI header values are latin-1 strings


def key_matches(token: bytes, keys: tuple[bytes, ...]) -> bool:
    """Whether `token` is one of `keys`, in time independent of where (or whether) they differ."""
    found = False
    for key in keys:  # every key is compared, so the time does not tell which one matched
        found |= hmac.compare_digest(token, key)
    return found


def install_api_keys(app: Flask, settings: Settings) -> None:
    """Refuse requests to protected endpoints without a valid key (401 `unauthorized`); no-op without API_KEYS."""
    if not settings.api_keys:
        return
    keys = tuple(key.encode("ascii") for key in settings.api_keys)
    public = public_endpoints(settings)

    @app.before_request
    def _require_api_key():
        if request.endpoint in public:
            return None
        token = bearer_token(request.headers.get("Authorization", ""))
        if token is not None and key_matches(token, keys):
            return None
        challenge = f'Bearer realm="{REALM}"'
        if token is None:
            response = coded_response("unauthorized", "this endpoint needs the header `Authorization: Bearer <key>`")
        else:
            response = coded_response("unauthorized", "the API key is not valid")
            challenge += ', error="invalid_token"'
        response.headers["WWW-Authenticate"] = challenge
        return response
