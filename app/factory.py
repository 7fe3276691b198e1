"""The app factory: settings, bundle, metrics, routes; `app:create_app()` is this module's create_app."""

from __future__ import annotations

import logging

from flask import Flask

from app import body
from app.auth import install_api_keys, public_endpoints
from app.config import load_settings
from app.errors import register_error_handlers
from app.inference import serving_device
from app.metrics import Metrics
from app.openapi import build_spec
from app.routes import bp
from app.service import EXTENSION, Service, get_service
from app.ui import register as register_ui
from app.v2 import register as register_v2
from models.ensemble import load_ensemble


def _configure_logging(level: str) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
    logging.getLogger("app").setLevel(level.upper())




def create_app(test_config: dict | None = None) -> Flask:
    """Build the app: settings (defaults < environment < test_config), bundle, metrics, routes; returns it warm.

    Loading and warm-up happen here, synchronously, so a gunicorn worker starts accepting only once it can
    predict; any failure raises (at first start gunicorn then stops, see app.lifecycle for reloads).
    """
    settings = load_settings(overrides=test_config)
    _configure_logging(settings.log_level)
    # Fail fast: a bad bundle, members that disagree or an unusable DEVICE/PRECISION stop the worker at boot.
    bundle = load_ensemble(settings.model_paths)
    device = serving_device(settings)
    app = Flask(__name__)
    app.json.sort_keys = False  # keep class order in all_probabilities
    app.config.from_mapping(MAX_CONTENT_LENGTH=settings.max_upload_bytes)
    if test_config:
        app.config.from_mapping({k: v for k, v in test_config.items() if k != "API_KEYS"})  # keys stay in settings
    metrics = Metrics(bundle.class_names)
    app.extensions[EXTENSION] = Service(settings, bundle, device, metrics)
    register_error_handlers(app)
    body.install(app, settings, metrics)  # MAX_UPLOAD_MB for chunked bodies too; slow bodies cut off (408)
    metrics.observe_requests(app)
    install_api_keys(app, settings)
    app.register_blueprint(bp)
    register_v2(app)  # the Open Inference Protocol under /v2
    if settings.ui_enabled:
        register_ui(app, settings)  # the try-it page at /
    public = {rule.rule for rule in app.url_map.iter_rules() if rule.endpoint in public_endpoints(settings)}
    app.config["OPENAPI"] = build_spec(bundle.version, public if settings.api_keys else None)
    get_service(app).start()
    return app
