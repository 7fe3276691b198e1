"""HTTP routes: parse the request, call one Service method, serialise the answer."""

from __future__ import annotations

import base64

from flask import Blueprint, Response, current_app, jsonify, request

from app.arrival import arrival_time
from app.errors import RETRY_AFTER_S
from app.inputs import batch_images, single_image
from app.schemas import BatchPredictionSchema, ExplanationSchema, HealthSchema, ModelInfoSchema, PredictionSchema
from app.service import Service, get_service

bp = Blueprint("api", __name__)
prediction_schema = PredictionSchema()
batch_schema = BatchPredictionSchema()
health_schema = HealthSchema()
model_schema = ModelInfoSchema()
explanation_schema = ExplanationSchema()


def service() -> Service:
    """This app's Service."""
    return get_service(current_app)


@bp.post("/predict")
def predict():
    """One image -> one prediction."""
    svc = service()
    options = svc.query_schema.load(request.args)
    (result,) = svc.predict([single_image(request)], **options, arrived=arrival_time())
    return jsonify(prediction_schema.dump(result))


@bp.post("/predict/batch")
def predict_batch():
    """Several images -> predictions in the same order; they share forward passes."""
    svc = service()
    options = svc.query_schema.load(request.args)
    images = batch_images(request, svc.settings.max_batch_files)
    results = svc.predict(images, **options, arrived=arrival_time())
    return jsonify(batch_schema.dump({"predictions": results, "model_version": svc.bundle.version}))


@bp.post("/explain")
def explain():
    """One image -> its Grad-CAM heat map over the image (PNG), or with ?format=json the prediction plus the PNG."""
    svc = service()
    options = svc.explain_schema.load(request.args)
    png, result = svc.explain(single_image(request), options["class_"], options["top_k"])
    if options["format"] == "png":
        return Response(png, content_type="image/png")
    result["heatmap_png"] = base64.b64encode(png).decode("ascii")
    return jsonify(explanation_schema.dump(result))


@bp.get("/model")
def model_info():
    """The served model and the serving settings."""
    return jsonify(model_schema.dump(service().model_info()))


@bp.get("/livez")
def livez():
    """The process answers."""
    return jsonify(health_schema.dump({"status": "ok"}))


@bp.get("/readyz")
def readyz():
    """200 when the batcher is alive and the worker is not draining; else 503 with the reasons.

    A worker takes connections only once its model is loaded and warm, so no client sees it cold.
    """
    reasons = service().reasons()
    if reasons:
        response = jsonify(health_schema.dump({"status": "not_ready", "reasons": reasons}))
        response.status_code = 503
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
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
