"""Every kind of bad input through the Flask test client: one JSON error shape, never a 500."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from models.images import ALLOWED_FORMATS

# Formats Pillow can write; the first one the service does not accept stands for "a real image we refuse".
WRITABLE_FORMATS = ("PCX", "TGA", "PPM", "SGI", "ICO", "IM")


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def unsupported_image() -> bytes:
    fmt = next(f for f in WRITABLE_FORMATS if f not in ALLOWED_FORMATS)
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buffer, fmt)
    return buffer.getvalue()


def multipart(*files: tuple[str, bytes]) -> dict:
    return {"data": {name: (io.BytesIO(data), "upload.bin") for name, data in files}}


def repeated(count: int, data: bytes) -> dict:
    return {"data": {"image": [(io.BytesIO(data), f"{i}.jpg") for i in range(count)]}}


def raw(data: bytes, content_type: str = "image/jpeg") -> dict:
    return {"data": data, "content_type": content_type}


def b64json(text: str) -> dict:
    return {"json": {"image": text}}


BAD_INPUTS = {
    # id: (path, request kwargs builder taking the cat JPEG, expected status, expected code)
    "no-body": ("/predict", lambda cat: {}, 400, "missing_image"),
    "empty-multipart": (
        "/predict",
        lambda cat: {"data": {}, "content_type": "multipart/form-data"},
        400,
        "missing_image",
    ),
    "wrong-field": ("/predict", lambda cat: multipart(("file", cat)), 400, "missing_image"),
    "field-not-a-file": (
        "/predict",
        lambda cat: {"data": {"image": "hi"}, "content_type": "multipart/form-data"},
        400,
        "missing_image",
    ),
    "empty-file": ("/predict", lambda cat: multipart(("image", b"")), 400, "empty_image"),
    "empty-raw-body": ("/predict", lambda cat: raw(b""), 400, "empty_image"),
    "not-an-image": ("/predict", lambda cat: multipart(("image", b"hello, world" * 10)), 400, "invalid_image"),
    "truncated-jpeg": ("/predict", lambda cat: raw(cat[: len(cat) // 2]), 400, "invalid_image"),
    "unsupported-format": (
        "/predict",
        lambda cat: raw(unsupported_image(), "image/x-other"),
        415,
        "unsupported_format",
    ),
    "too-many-bytes": ("/predict", lambda cat: raw(b"\xff" * (2 * 1024 * 1024)), 413, "payload_too_large"),
    "too-many-pixels": ("/predict", lambda cat: raw(png_bytes(2500, 1000), "image/png"), 413, "image_too_large"),
    "text-content-type": ("/predict", lambda cat: raw(cat, "text/plain"), 415, "unsupported_media_type"),
    "form-urlencoded": (
        "/predict",
        lambda cat: raw(b"a=b", "application/x-www-form-urlencoded"),
        415,
        "unsupported_media_type",
    ),
    "invalid-base64": ("/predict", lambda cat: b64json("not base64 !!"), 400, "invalid_base64"),
    "base64-not-image": ("/predict", lambda cat: b64json(base64.b64encode(b"xyz").decode()), 400, "invalid_image"),
    "json-without-image": ("/predict", lambda cat: {"json": {"picture": "abc"}}, 400, "invalid_parameters"),
    "json-image-not-string": ("/predict", lambda cat: {"json": {"image": 5}}, 400, "invalid_parameters"),
    "json-not-object": ("/predict", lambda cat: {"json": ["abc"]}, 400, "invalid_json"),
    "broken-json": ("/predict", lambda cat: raw(b"{nope", "application/json"), 400, "invalid_json"),
    "two-images-to-single": ("/predict", lambda cat: repeated(2, cat), 400, "too_many_files"),
    "too-many-files": ("/predict/batch", lambda cat: repeated(5, cat), 400, "too_many_files"),
    "batch-no-files": (
        "/predict/batch",
        lambda cat: {"data": {}, "content_type": "multipart/form-data"},
        400,
        "missing_image",
    ),
    "batch-raw-body": ("/predict/batch", lambda cat: raw(cat), 415, "unsupported_media_type"),
    "batch-one-bad": (
        "/predict/batch",
        lambda cat: {"data": {"image": [(io.BytesIO(cat), "a.jpg"), (io.BytesIO(b"junk"), "b.jpg")]}},
        400,
        "invalid_image",
    ),
}


@pytest.mark.parametrize(("path", "build", "status", "code"), list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_input(client, cat_jpeg, path, build, status, code):
    response = client.post(path, **build(cat_jpeg))
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json
    error = response.get_json()["error"]
    assert error["code"] == code
    assert error["message"] and "Traceback" not in error["message"]


def test_batch_error_names_the_image(client, cat_jpeg):
    files = [(io.BytesIO(cat_jpeg), "a.jpg"), (io.BytesIO(b"junk"), "b.jpg")]
    error = client.post("/predict/batch", data={"image": files}).get_json()["error"]
    assert error["message"].startswith("image 1:")


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("top_k=0", "top_k"),
        ("top_k=4", "top_k"),
        ("top_k=two", "top_k"),
        ("include_probabilities=maybe", "include_probabilities"),
    ],
)
def test_bad_query_options_give_per_field_messages(client, cat_jpeg, query, field):
    response = client.post(f"/predict?{query}", **raw(cat_jpeg))
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "invalid_parameters"
    assert list(error["fields"]) == [field]


@pytest.mark.parametrize(("method", "path", "status", "code"), [
    ("get", "/nowhere", 404, "not_found"),
    ("get", "/predict", 405, "method_not_allowed"),
    ("delete", "/model", 405, "method_not_allowed"),
])  # fmt: skip
def test_http_errors_are_json(client, method, path, status, code):
    response = getattr(client, method)(path)
    assert response.status_code == status
    assert response.get_json()["error"]["code"] == code


def test_service_still_answers_after_bad_inputs(client, cat_jpeg):
    for _path, build, _status, _code in BAD_INPUTS.values():
        client.post("/predict", **build(cat_jpeg))
    assert client.post("/predict", **raw(cat_jpeg)).status_code == 200
    assert client.get("/readyz").status_code == 200
