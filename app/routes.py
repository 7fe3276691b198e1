"""HTTP routes: thin functions over the Service, the inputs module and the schemas."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify, request

from app.inputs import batch_images, single_image
from app.schemas import BatchPredictionSchema, HealthSchema, ModelInfoSchema, PredictionSchema
from app.service import Service
from models.images import ImageError

bp = Blueprint("api", __name__)
prediction_schema = PredictionSchema()
batch_schema = BatchPredictionSchema()
health_schema = HealthSchema()
model_schema = ModelInfoSchema()


def service() -> Service:
    """This app's Service."""
    return current_app.extensions["petclf"]


def _tensors(classifier, images: list[bytes]) -> list:
    if len(images) == 1:
        return [classifier.preprocess(images[0])]
    tensors = []
    for index, data in enumerate(images):
        try:
            tensors.append(classifier.preprocess(data))
        except ImageError as error:
            raise type(error)(f"image {index}: {error}") from error
    return tensors


def _predictions(svc: Service, images: list[bytes]) -> list[dict]:
    options = svc.query_schema.load(request.args)
    classifier = svc.ready_classifier()
    results = []
    for probs in svc.predict(_tensors(classifier, images)):
        result = classifier.postprocess(probs, options["top_k"], options["include_probabilities"])
        svc.metrics.predicted(result["predicted_class"])
        results.append(result)
    return results


@bp.post("/predict")
def predict():
    """One image -> one prediction."""
    svc = service()
    (result,) = _predictions(svc, [single_image(request)])
    return jsonify(prediction_schema.dump(result))


@bp.post("/predict/batch")
def predict_batch():
    """Several images -> predictions in the same order; they share forward passes."""
    svc = service()
    results = _predictions(svc, batch_images(request, svc.settings.max_batch_files))
    return jsonify(batch_schema.dump({"predictions": results, "model_version": svc.bundle.version}))


@bp.get("/model")
def model_info():
    """The served model and the serving settings."""
    svc = service()
    settings, bundle = svc.settings, svc.bundle
    info = {
        "version": bundle.version,
        "arch": bundle.arch,
        "head": bundle.head,
        "class_names": bundle.class_names,
        "num_classes": len(bundle.class_names),
        "preprocess": bundle.preprocess,
        "metrics": bundle.metrics,
        "device": str(svc.device),
        "precision": settings.precision,
        "ready": not svc.reasons(),
        "batching": {
            "max_batch_size": settings.max_batch_size,
            "max_batch_wait_ms": settings.max_batch_wait_ms,
            "max_queue": settings.max_queue,
            "request_timeout_s": settings.request_timeout_s,
            "max_batch_files": settings.max_batch_files,
        },
    }
    return jsonify(model_schema.dump(info))


@bp.get("/livez")
def livez():
    """The process answers."""
    return jsonify(health_schema.dump({"status": "ok"}))


@bp.get("/readyz")
def readyz():
    """200 when loaded, warmed up, batcher alive and not draining; else 503 with the reasons."""
    reasons = service().reasons()
    if reasons:
        response = jsonify(health_schema.dump({"status": "not_ready", "reasons": reasons}))
        response.status_code = 503
        response.headers["Retry-After"] = "1"
        return response
    return jsonify(health_schema.dump({"status": "ok", "reasons": []}))


@bp.get("/metrics")
def metrics():
    """Prometheus text format, aggregated over the gunicorn workers."""
    body, content_type = service().metrics.render()
    return Response(body, content_type=content_type)


@bp.get("/openapi.json")
def openapi():
    """The OpenAPI 3 document."""
    return jsonify(current_app.config["OPENAPI"])
