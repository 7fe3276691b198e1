"""One JSON error shape for every failure: {"error": {"code": ..., "message": ...}}."""

from __future__ import annotations

import logging
from collections.abc import Callable

from flask import Flask, Response, current_app, g, jsonify, request
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException

from app.schemas import ErrorSchema
from models.images import ImageError

log = logging.getLogger(__name__)
_error_schema = ErrorSchema()
# Stable error code -> HTTP status: the one place where the service's failures meet HTTP.
STATUS = {
    "missing_image": 400,
    "empty_image": 400,
    "invalid_image": 400,
    "invalid_base64": 400,
    "invalid_json": 400,
    "invalid_parameters": 400,
    "invalid_tensor": 400,
    "too_many_files": 400,
    "unauthorized": 401,
    "unknown_model": 404,
    "body_timeout": 408,
    "payload_too_large": 413,
    "image_too_large": 413,
    "unsupported_media_type": 415,
    "unsupported_format": 415,
    "internal_error": 500,
    "explain_unsupported": 501,
    "not_ready": 503,
    "queue_full": 503,
    "explain_busy": 503,
    "timeout": 504,
}
ERROR_FORMS = "petclf.error_forms"  # app.extensions key: [(URL prefix, render)] from register_error_form
RETRY_AFTER_S = 1  # for 503s: the condition (warm-up, a full queue, a running explanation) passes within seconds
HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


class ApiError(Exception):
    """A refusal with a stable `code` (a key of STATUS), a human message and optional per-field messages."""

    def __init__(self, code: str, message: str, fields: dict | None = None):
        if code not in STATUS:
            raise ValueError(f"unknown error code {code!r}; known: {sorted(STATUS)}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.fields = fields


def register_error_form(app: Flask, prefix: str, render: Callable[[int, str], Response]) -> None:
    """Answer errors under URL `prefix` (e.g. a protocol's routes) with `render(status, message)` instead."""
    app.extensions.setdefault(ERROR_FORMS, []).append((prefix, render))


def _error_form(path: str) -> Callable[[int, str], Response] | None:
    for prefix, render in current_app.extensions.get(ERROR_FORMS, ()):
        if path == prefix or path.startswith(prefix + "/"):
            return render
    return None


def error_response(status: int, code: str, message: str, fields: dict | None = None):
    """The JSON error response (or the form registered for the request's path); 503s carry Retry-After."""
    render = _error_form(request.path)
    if render is not None:
        response = render(status, f"{message}: {fields}" if fields else message)
    else:
        body = {"code": code, "message": message}
        if fields:
            body["fields_"] = fields
        response = jsonify(_error_schema.dump({"error": body}))
        response.status_code = status
    if status == 503:
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
    g.error_code = code  # read by the metrics hook, which counts rejections by code
    return response


def coded_response(code: str, message: str, fields: dict | None = None):
    """The JSON error response for a stable error code."""
    return error_response(STATUS[code], code, message, fields)


def _api_error(error: ApiError):
    return coded_response(error.code, error.message, error.fields)


def _image_error(error: ImageError):
    return coded_response(error.code, str(error))


def _validation_error(error: ValidationError):
    return coded_response("invalid_parameters", "invalid query parameters or body", fields=error.messages)


def _http_error(error: HTTPException):
    code = HTTP_CODES.get(error.code or 500, (error.name or "error").lower().replace(" ", "_"))
    return error_response(error.code or 500, code, error.description or error.name)


def _unexpected(error: Exception):
    log.exception("unhandled error")
    return coded_response("internal_error", "internal server error")


def register_error_handlers(app: Flask) -> None:
    """Install the JSON handlers on `app`."""
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(ImageError, _image_error)
    app.register_error_handler(ValidationError, _validation_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
