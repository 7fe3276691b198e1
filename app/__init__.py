"""The pet classifier HTTP service. Run it with: gunicorn -c gunicorn.conf.py 'app:create_app()'.

The names below load on first use, so gunicorn's master imports its worker class (app.lifecycle) without torch,
Flask or the app.
"""

from __future__ import annotations

from models.lazy import lazy_attributes

_HOMES = {
    "ConfigError": "app.config",
    "Settings": "app.config",
    "create_app": "app.factory",
    "get_service": "app.service",
}
__all__ = sorted(_HOMES)

__getattr__ = lazy_attributes("app", _HOMES)  # `from app import create_app` imports app.factory now.
