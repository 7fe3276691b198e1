"""The request body: read within limits whatever the client does, then the image bytes taken out of it.

Limits: at most MAX_UPLOAD_MB (chunked bodies too), and no slower than BODY_MIN_RATE_KBPS after a grace of
BODY_TIMEOUT_S. A WSGI wrapper around wsgi.input, below werkzeug: werkzeug alone cuts a chunked body silently at
MAX_CONTENT_LENGTH (the view then saw a truncated image), and a body that stops arriving held the request
thread until the client gave up (190 s measured, issue 21). Its exceptions are not OSError or ValueError, which
werkzeug's LimitedStream would turn into 400 "client disconnected".

Images: a multipart field `image`, a raw image/* body, or JSON {"image": base64}.
"""

from __future__ import annotations

import base64
import binascii
import socket
import time

from flask import Flask, Request, request
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.sansio.multipart import MultipartDecoder

from app.config import Settings
from app.connection import WATCHDOG, release_headers
from app.errors import ApiError, coded_response
from app.metrics import Metrics
from app.schemas import Base64ImageSchema


class BodyTooLarge(Exception):
    """More body bytes than MAX_UPLOAD_MB arrived (a body without Content-Length)."""


class BodyTimeout(Exception):
    """The body arrived slower than the allowed rate, or stopped arriving."""


class GuardedInput:
    """wsgi.input that raises BodyTooLarge past `limit` bytes and BodyTimeout when the body falls behind:
    after `grace_s` + received / `rate` seconds from the first read. `sock` (gunicorn's) is shut for reading
    when a read outlives that deadline."""

    def __init__(self, stream, sock: socket.socket | None, limit: int, grace_s: float, rate: float, chunked: bool):
        self.stream, self.sock, self.limit, self.grace_s, self.rate = stream, sock, limit, grace_s, rate
        self.chunked = chunked  # no Content-Length: werkzeug stops asking at `limit`, so look one byte past it
        self.received = 0
        self.started: float | None = None

    def _timed(self, read, size: int):
        if self.started is None:
            self.started = time.monotonic()
        deadline = self.started + self.grace_s + self.received / self.rate
        if deadline <= time.monotonic():
            raise BodyTimeout(self._behind())
        if self.sock is None:  # not under gunicorn (e.g. Flask's test client): nothing blocks
            data = read(size)
        else:
            ticket = WATCHDOG.watch(deadline, self.sock)
            try:
                data = read(size)
            except Exception as error:
                if WATCHDOG.release(ticket):
                    raise BodyTimeout(self._behind()) from error
                raise
            if WATCHDOG.release(ticket):
                raise BodyTimeout(self._behind())
        self.received += len(data)
        if self.received > self.limit:
            raise BodyTooLarge(f"more than {self.limit} bytes")
        return data

    def _behind(self) -> str:
        waited = time.monotonic() - (self.started or time.monotonic())
        return f"{self.received} bytes in {waited:.1f} s"

    def read(self, size: int | None = -1) -> bytes:
        size = -1 if size is None else size
        data = self._timed(self.stream.read, size)
        if self.chunked and data and self.received == self.limit and self._timed(self.stream.read, 1):
            raise BodyTooLarge(f"more than {self.limit} bytes")
        return data

    def readline(self, size: int | None = -1) -> bytes:
        return self._timed(self.stream.readline, -1 if size is None else size)

    def __iter__(self):
        return iter(self.readline, b"")


def _parts_exceeded(error: BaseException) -> int | None:
    """The part limit when werkzeug's multipart decoder raised `error` for too many parts, else None."""
    trace = error.__traceback__
    while trace is not None:
        decoder = trace.tb_frame.f_locals.get("self")
        limit = getattr(decoder, "max_parts", None) if isinstance(decoder, MultipartDecoder) else None
        if limit is not None and getattr(decoder, "_parts_decoded", 0) > limit:
            return limit
        trace = trace.tb_next
    return None


def install(app: Flask, settings: Settings, metrics: Metrics) -> None:
    """Guard every request's body on `app` and answer the guard's refusals in the error shape."""
    limit, grace_s, rate = settings.max_upload_bytes, settings.body_timeout_s, settings.body_min_rate_kbps * 1024
    inner = app.wsgi_app

    def guarded(environ, start_response):
        release_headers()  # they arrived: from here on the body's own deadlines apply
        chunked = not environ.get("CONTENT_LENGTH")
        stream = environ["wsgi.input"]
        environ["wsgi.input"] = GuardedInput(stream, environ.get("gunicorn.socket"), limit, grace_s, rate, chunked)
        return inner(environ, start_response)

    app.wsgi_app = guarded
    too_large = f"the request body exceeds MAX_UPLOAD_MB={settings.max_upload_mb:g} MB"

    @app.errorhandler(BodyTooLarge)
    def _body_too_large(_error):
        return coded_response("payload_too_large", too_large)

    @app.errorhandler(RequestEntityTooLarge)
    def _werkzeug_too_large(error):
        parts = _parts_exceeded(error)
        if parts is not None:
            return coded_response("payload_too_large", f"the multipart body has more than {parts} parts")
        return coded_response("payload_too_large", too_large)

    @app.errorhandler(BodyTimeout)
    def _body_timeout(error):
        metrics.body_timeout(request.url_rule.rule if request.url_rule else "unmatched")
        message = (
            f"the request body arrived too slowly ({error}): it must arrive within BODY_TIMEOUT_S={grace_s:g} s "
            f"plus 1 s per BODY_MIN_RATE_KBPS={settings.body_min_rate_kbps:g} KB"
        )
        return coded_response("body_timeout", message)


# The image bytes of a request

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
