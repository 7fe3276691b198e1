"""One JSON error shape for every failure: {"error": {"code": ..., "message": ...}}."""

from __future__ import annotations

import logging

from flask import Flask, g, jsonify
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException

from app.schemas import ErrorSchema
from models.images import ImageError

log = logging.getLogger(__name__)
_error_schema = ErrorSchema()
HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


class ApiError(Exception):
    """An error answer: HTTP status, stable code, human message, optional headers and field messages."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None, fields: dict | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.fields = fields


def error_response(status: int, code: str, message: str, headers: dict | None = None, fields: dict | None = None):
    """The JSON error response."""
    body = {"code": code, "message": message}
    if fields:
        body["fields_"] = fields
    response = jsonify(_error_schema.dump({"error": body}))
    response.status_code = status
    response.headers.update(headers or {})
    g.error_code = code  # read by the metrics hook, which counts rejections by code
    return response


def _api_error(error: ApiError):
    return error_response(error.status, error.code, error.message, error.headers, error.fields)


def _image_error(error: ImageError):
    return error_response(error.status, error.code, str(error))


def _validation_error(error: ValidationError):
    return error_response(400, "invalid_parameters", "invalid query parameters or body", fields=error.messages)


def _http_error(error: HTTPException):
    code = HTTP_CODES.get(error.code or 500, (error.name or "error").lower().replace(" ", "_"))
    return error_response(error.code or 500, code, error.description or error.name)


def _unexpected(error: Exception):
    log.exception("unhandled error")
    return error_response(500, "internal_error", "internal server error")


def register_error_handlers(app: Flask) -> None:
    """Install the JSON handlers on `app`."""
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(ImageError, _image_error)
    app.register_error_handler(ValidationError, _validation_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
