"""Extract image bytes from a request: multipart field `image`, a raw image/* body, or JSON base64."""

from __future__ import annotations

import base64
import binascii

from flask import Request

from app.errors import ApiError
from app.schemas import Base64ImageSchema

FIELD = "image"
ACCEPTED = "multipart/form-data (field 'image'), image/* (raw bytes) or application/json ({\"image\": base64})"
_base64_schema = Base64ImageSchema()


def _missing(request: Request) -> ApiError:
    others = sorted(set(request.files) | set(request.form))
    if others:
        return ApiError("missing_image", f"no multipart field '{FIELD}'; got fields {others}")
    return ApiError("missing_image", f"no image sent; send {ACCEPTED}")


def _checked(data: bytes, what: str) -> bytes:
    if not data:
        raise ApiError("empty_image", f"{what} is empty (0 bytes)")
    return data


def _multipart(request: Request) -> list[bytes]:
    uploads = request.files.getlist(FIELD)
    if not uploads:
        if FIELD in request.form:
            raise ApiError("missing_image", f"field '{FIELD}' must be a file upload (curl -F image=@file.jpg)")
        raise _missing(request)
    return [_checked(upload.read(), f"upload {index} ({upload.filename!r})") for index, upload in enumerate(uploads)]


def decode_base64(text: str, what: str = f"field '{FIELD}'") -> bytes:
    """Base64 text (whitespace and a `data:` URL prefix allowed) -> bytes; raises ApiError invalid_base64."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as error:
        raise ApiError("invalid_base64", f"{what} is not valid base64: {error}") from error


def _json(request: Request) -> bytes:
    try:
        payload = request.get_json(silent=True)
    except RecursionError:  # nesting deeper than the parser's recursion limit
        payload = None
    if payload is None:
        raise ApiError("invalid_json", "the body is not valid JSON")
    if not isinstance(payload, dict):
        raise ApiError("invalid_json", 'the JSON body must be an object like {"image": "<base64>"}')
    data = _base64_schema.load(payload, unknown="exclude")
    return _checked(decode_base64(data[FIELD]), f"field '{FIELD}'")


def single_image(request: Request) -> bytes:
    """The one image of a /predict request."""
    mimetype = request.mimetype
    if mimetype == "multipart/form-data":
        images = _multipart(request)
        if len(images) > 1:
            raise ApiError("too_many_files", f"/predict takes one '{FIELD}' field; use /predict/batch for more")
        return images[0]
    if mimetype.startswith("image/"):
        return _checked(request.get_data(cache=False), "the request body")
    if mimetype == "application/json":
        return _json(request)
    if not mimetype and not request.content_length:
        raise _missing(request)
    raise ApiError("unsupported_media_type", f"content type {mimetype or 'none'!r} is not accepted; send {ACCEPTED}")


def batch_images(request: Request, max_files: int) -> list[bytes]:
    """The images of a /predict/batch request (repeated multipart `image` fields), at most `max_files`."""
    if request.mimetype != "multipart/form-data":
        if not request.mimetype and not request.content_length:
            raise _missing(request)
        raise ApiError(
            "unsupported_media_type", f"/predict/batch takes multipart/form-data with repeated '{FIELD}' fields"
        )
    # Count before reading any file, so an oversized request costs no decoding.
    count = len(request.files.getlist(FIELD))
    if count > max_files:
        raise ApiError("too_many_files", f"{count} images sent; at most MAX_BATCH_FILES={max_files} per request")
    return _multipart(request)
