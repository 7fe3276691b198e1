"""Open Inference Protocol v2 routes (KServe v2 / Triton REST): health, metadata and infer, beside the own API.

Inference goes through the same Service as /predict (batcher, metrics, calibration); errors under /v2 take the
protocol's form, {"error": "..."} (plus the request's `id` when it sent one).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request

from app.connection import arrival_time
from app.errors import ApiError, register_error_form
from app.service import Service, get_service
from app.v2_codec import (
    EXTENSIONS,
    HEADER_LENGTH,
    ModelSpec,
    V2ErrorSchema,
    V2LiveSchema,
    V2ModelMetadataSchema,
    V2ModelReadySchema,
    V2ReadySchema,
    V2ServerMetadataSchema,
    decode_request,
    encode_response,
    request_id,
    split_body,
)

PREFIX = "/v2"
EXTENSION = "petclf.v2"  # app.extensions key: the ModelSpec and the metadata answers, made once
SERVER_NAME = "pet-classifier-service"
PLATFORM = "pytorch"
bp = Blueprint("v2", __name__, url_prefix=PREFIX)
# Every answer is serialised by the schema the OpenAPI document shows for it.
_live, _ready, _model_ready, _error_schema = V2LiveSchema(), V2ReadySchema(), V2ModelReadySchema(), V2ErrorSchema()


def _package_version() -> str:
    try:
        return version(SERVER_NAME)
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def register(app: Flask) -> None:
    """Add the /v2 routes and their error form to an app whose Service exists."""
    service = get_service(app)
    settings, bundle = service.settings, service.bundle
    spec = ModelSpec(
        name=settings.model_name,
        version=bundle.version,
        crop=bundle.preprocess["crop"],
        class_names=tuple(bundle.class_names),
        max_images=settings.max_batch_files,
        resize=bundle.preprocess["resize"],
    )
    app.extensions[EXTENSION] = {
        "spec": spec,
        "server": V2ServerMetadataSchema().dump(
            {"name": SERVER_NAME, "version": _package_version(), "extensions": list(EXTENSIONS)}
        ),
        "model": V2ModelMetadataSchema().dump(
            {"name": spec.name, "versions": [spec.version], "platform": PLATFORM, "inputs": spec.inputs,
             "outputs": spec.outputs}
        ),
    }  # fmt: skip
    register_error_form(app, PREFIX, _error)
    app.register_blueprint(bp)


def _error(status: int, message: str) -> Response:
    body = {"error": message}
    if g.get("v2_request_id") is not None:
        body["id"] = g.v2_request_id
    response = jsonify(_error_schema.dump(body))
    response.status_code = status
    return response


def _spec() -> ModelSpec:
    return current_app.extensions[EXTENSION]["spec"]


def _service() -> Service:
    return get_service(current_app)


def _served(model_name: str, model_version: str | None) -> ModelSpec:
    """The spec when the URL names the served model (and version); else a 404 naming what is served."""
    spec = _spec()
    if model_name != spec.name:
        raise ApiError("unknown_model", f"unknown model {model_name!r}; this server serves {spec.name!r}")
    # The version is the bundle's "sha256:<hex>"; the bare hex is accepted too, for clients that cannot send ':'.
    if model_version is not None and model_version not in (spec.version, spec.version.partition(":")[2]):
        served = f"the served version is {spec.version}"
        raise ApiError("unknown_model", f"model {spec.name!r} has no version {model_version!r}; {served}")
    return spec


def _not_ready(reasons: list[str]) -> ApiError:
    return ApiError("not_ready", "; ".join(reasons))


@bp.get("")
def server_metadata():
    """Server name, version and protocol extensions."""
    return jsonify(current_app.extensions[EXTENSION]["server"])


@bp.get("/health/live")
def live():
    """The process answers."""
    return jsonify(_live.dump({"live": True}))


@bp.get("/health/ready")
def ready():
    """200 when the model is loaded, warmed up and not draining; else 503 with the reasons."""
    reasons = _service().reasons()
    if reasons:
        raise _not_ready(reasons)
    return jsonify(_ready.dump({"ready": True}))


@bp.get("/models/<model_name>")
@bp.get("/models/<model_name>/versions/<model_version>")
def model_metadata(model_name: str, model_version: str | None = None):
    """Name, versions, platform and the input and output tensors."""
    _served(model_name, model_version)
    return jsonify(current_app.extensions[EXTENSION]["model"])


@bp.get("/models/<model_name>/ready")
@bp.get("/models/<model_name>/versions/<model_version>/ready")
def model_ready(model_name: str, model_version: str | None = None):
    """200 when this model can answer inference requests; else 503 with the reasons."""
    spec = _served(model_name, model_version)
    reasons = _service().reasons()
    if reasons:
        raise _not_ready(reasons)
    return jsonify(_model_ready.dump({"name": spec.name, "ready": True}))


@bp.post("/models/<model_name>/infer")
@bp.post("/models/<model_name>/versions/<model_version>/infer")
def infer(model_name: str, model_version: str | None = None):
    """Encoded images (BYTES) or preprocessed pixels (FP32) -> probabilities, or top-k classification strings."""
    spec = _served(model_name, model_version)
    encoding = request.headers.get("Content-Encoding", "identity").lower()
    if encoding != "identity":
        message = f"Content-Encoding {encoding!r} is not supported; send the body uncompressed"
        raise ApiError("unsupported_media_type", message)
    document, binary = split_body(request.get_data(cache=False), request.headers.get(HEADER_LENGTH), spec)
    g.v2_request_id = request_id(document)
    parsed = decode_request(document, binary, spec)
    service = _service()
    if parsed.images is not None:
        probabilities = service.probabilities(parsed.images, arrived=arrival_time())
    else:
        probabilities = service.pixel_probabilities(parsed.pixels, arrived=arrival_time())
    body, headers = encode_response(spec, parsed, probabilities)
    return Response(body, content_type=headers.pop("Content-Type"), headers=headers)
