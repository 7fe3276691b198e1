"""HTTP routes and their query schemas: parse the request, call one Service method, serialise the answer through
the schema that documents it."""

from __future__ import annotations

import base64

from flask import Blueprint, Response, current_app, jsonify, request
from flask.blueprints import BlueprintSetupState
from marshmallow import EXCLUDE, Schema, ValidationError, fields, post_load, validate, validates

from app.body import batch_images, single_image
from app.connection import arrival_time
from app.errors import RETRY_AFTER_S
from app.schemas import (
    BatchPredictionSchema,
    ExplanationSchema,
    HealthSchema,
    ModelInfoSchema,
    PredictionSchema,
    model_document,
)
from app.service import EXTENSION, Service, get_service
from models.predictor import TTA_MODES

DEFAULT_TOP_K = 5
EXPLAIN_FORMATS = ("png", "json")
QUERIES = "petclf.queries"  # app.extensions key: this app's query schemas, made once


class PredictQuerySchema(Schema):
    """Query options of /predict and /predict/batch."""

    class Meta:
        unknown = EXCLUDE

    top_k = fields.Integer(
        load_default=None,
        validate=validate.Range(min=1),
        metadata={"description": f"How many classes to list in `top_k` (1..class count; default {DEFAULT_TOP_K})"},
    )
    include_probabilities = fields.Boolean(
        load_default=True, metadata={"description": "Include `all_probabilities`, the map of every class"}
    )
    tta = fields.String(
        load_default="none",
        validate=validate.OneOf(TTA_MODES),
        metadata={
            "description": "Test-time augmentation: `flip` also classifies the mirrored image (a second batch item)"
            " and averages the probabilities and OOD scores of both views"
        },
    )

    def __init__(self, num_classes: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes

    @validates("top_k")
    def _at_most_classes(self, value: int | None, data_key: str) -> None:
        if value is not None and self.num_classes is not None and value > self.num_classes:
            raise ValidationError(f"Must be at most the number of classes, {self.num_classes}.")

    @post_load
    def _default_top_k(self, data: dict, **_) -> dict:
        if data["top_k"] is None:
            data["top_k"] = min(DEFAULT_TOP_K, self.num_classes or DEFAULT_TOP_K)
        return data


class ExplainQuerySchema(PredictQuerySchema):
    """Query options of /explain."""

    class Meta:
        unknown = EXCLUDE
        exclude = ("tta", "include_probabilities")

    class_ = fields.String(
        data_key="class",
        load_default=None,
        metadata={"description": "The class to explain (a class name); default: the predicted class"},
    )
    format = fields.String(
        load_default="png",
        validate=validate.OneOf(EXPLAIN_FORMATS),
        metadata={"description": "`png`: the heat-map image; `json`: the prediction plus the PNG in base64"},
    )

    def __init__(self, num_classes: int | None = None, class_names: list[str] | None = None, **kwargs):
        super().__init__(num_classes=num_classes, **kwargs)
        self.class_names = list(class_names or [])

    @validates("class_")
    def _known_class(self, value: str | None, data_key: str) -> None:
        if value is not None and self.class_names and value not in self.class_names:
            raise ValidationError(f"Unknown class {value!r}; valid: {', '.join(self.class_names)}.")


bp = Blueprint("api", __name__)
prediction_schema = PredictionSchema()
batch_schema = BatchPredictionSchema()
health_schema = HealthSchema()
model_schema = ModelInfoSchema()
explanation_schema = ExplanationSchema()


def service() -> Service:
    """This app's Service (app.service.get_service, read here without a call into the service module)."""
    return current_app.extensions[EXTENSION]


@bp.record_once
def _make_queries(state: BlueprintSetupState) -> None:
    """The query schemas of the app's model (top_k and class are checked against its classes), made once."""
    names = get_service(state.app).bundle.class_names
    state.app.extensions[QUERIES] = {
        "predict": PredictQuerySchema(num_classes=len(names)),
        "explain": ExplainQuerySchema(num_classes=len(names), class_names=names),
    }


def query(name: str) -> dict:
    """The request's query string, validated by the route's schema ("predict" or "explain")."""
    return current_app.extensions[QUERIES][name].load(request.args)


@bp.post("/predict")
def predict():
    """One image -> one prediction."""
    options, image = query("predict"), single_image(request)
    (result,) = service().predict([image], **options, arrived=arrival_time())
    return jsonify(prediction_schema.dump(result))


@bp.post("/predict/batch")
def predict_batch():
    """Several images -> predictions in the same order; they share forward passes."""
    svc = service()
    options = query("predict")
    images = batch_images(request, svc.settings.max_batch_files)
    results = svc.predict(images, **options, arrived=arrival_time())
    return jsonify(batch_schema.dump({"predictions": results, "model_version": svc.bundle.version}))


@bp.post("/explain")
def explain():
    """One image -> its Grad-CAM heat map over the image (PNG), or with ?format=json the prediction plus the PNG."""
    options = query("explain")
    png, result = service().explain(single_image(request), options["class_"], options["top_k"], arrival_time())
    if options["format"] == "png":
        return Response(png, content_type="image/png")
    result["heatmap_png"] = base64.b64encode(png).decode("ascii")
    return jsonify(explanation_schema.dump(result))


@bp.get("/model")
def model_info():
    """The served model and the serving settings."""
    svc = service()
    document = model_document(svc.settings, svc.bundle, svc.member_info(), str(svc.device), not svc.reasons())
    return jsonify(model_schema.dump(document))


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
