"""Marshmallow schemas of the bodies and answers: they serialise the answers and generate the OpenAPI document.

The query schemas live next to their routes (app/routes.py); the /model document is built here, by its schema.
"""

from __future__ import annotations

from marshmallow import Schema, fields

from models.ood import DESCRIPTIONS

_OOD_SCORES = "; ".join(f"`{name}`: {text}" for name, text in DESCRIPTIONS.items())


class Base64ImageSchema(Schema):
    """JSON body of /predict: the image as base64 (a `data:` URL prefix is accepted)."""

    image = fields.String(required=True, metadata={"description": "The image file's bytes, base64-encoded"})


class TopKEntrySchema(Schema):
    label = fields.String(required=True)
    probability = fields.Float(required=True)


class PredictionSchema(Schema):
    """One image's prediction."""

    predicted_class = fields.String(required=True)
    confidence = fields.Float(required=True, metadata={"description": "Probability of predicted_class"})
    all_probabilities = fields.Dict(
        keys=fields.String(),
        values=fields.Float(),
        metadata={"description": "Every class -> probability (omitted with include_probabilities=false)"},
    )
    top_k = fields.List(fields.Nested(TopKEntrySchema), required=True, metadata={"description": "Most probable first"})
    unknown = fields.Boolean(
        required=True,
        metadata={
            "description": "True when the input looks unlike the training data (ood_score above the model's"
            " threshold, see GET /model `ood`); always false for a model without a detector"
        },
    )
    ood_score = fields.Float(
        required=True,
        allow_none=True,
        metadata={
            "description": "How unusual the input looks; higher = more unusual. Which score: GET /model `ood.score`"
            f" ({_OOD_SCORES}); an ensemble's is the mean of its members' (score - threshold) / scale, unknown"
            " above 0. Null for a model without a detector"
        },
    )
    model_version = fields.String(required=True)


class ExplanationSchema(PredictionSchema):
    """/explain?format=json: the prediction, the explained class and the heat-map PNG."""

    explained_class = fields.String(required=True, metadata={"description": "The class the heat map explains"})
    heatmap_png = fields.String(
        required=True, metadata={"description": "Base64 PNG: the Grad-CAM heat over the image, at the image's size"}
    )


class BatchPredictionSchema(Schema):
    """Predictions for several images, in the order they were sent."""

    predictions = fields.List(fields.Nested(PredictionSchema), required=True)
    model_version = fields.String(required=True)


class ErrorBodySchema(Schema):
    code = fields.String(required=True, metadata={"description": "Stable machine-readable error code"})
    message = fields.String(required=True)
    fields_ = fields.Dict(
        data_key="fields",
        keys=fields.String(),
        metadata={"description": "Per-field validation messages (validation errors only)"},
    )


class ErrorSchema(Schema):
    """Every error answer has this shape."""

    error = fields.Nested(ErrorBodySchema, required=True)


class HealthSchema(Schema):
    status = fields.String(required=True, metadata={"description": "ok, or not_ready"})
    reasons = fields.List(fields.String(), metadata={"description": "Why the worker is not ready"})


class BatchingSchema(Schema):
    max_batch_size = fields.Integer()
    max_batch_wait_ms = fields.Float()
    max_queue = fields.Integer()
    request_timeout_s = fields.Float()
    max_batch_files = fields.Integer()


class ModelInfoSchema(Schema):
    """The served model and how it is served."""

    name = fields.String(
        required=True, metadata={"description": "MODEL_NAME: the model's name (its name under /v2/models too)"}
    )
    version = fields.String(required=True)
    arch = fields.String(required=True)
    head = fields.Dict()
    class_names = fields.List(fields.String(), required=True)
    num_classes = fields.Integer(required=True)
    preprocess = fields.Dict()
    metrics = fields.Dict(metadata={"description": "Validation scores recorded by training (one bundle)"})
    calibration = fields.Dict(
        metadata={
            "description": "temperature (logits are divided by it before the softmax), ece_before / ece_after"
            " (15-bin expected calibration error on the validation set); ensembles list it per member"
        }
    )
    ood = fields.Dict(
        allow_none=True,
        metadata={
            "description": "The unknown-input detector: score (which one), threshold (keeps 95% of validation"
            " images known), direction (`higher` = more unusual); null when the model has none"
        },
    )
    members = fields.List(
        fields.Dict(),
        metadata={
            "description": "The bundles served (several for an ensemble): path, version, metrics, and what runs"
            " each: backend (onnxruntime or torch), precision, graph (its ONNX file, or null), agreement (top-1"
            " agreement with fp32 recorded at export, int8), reason (why this backend), measured (BACKEND=auto on the"
            " CPU, where both runtimes can serve: backend, batch, threads, seconds and per candidate its file and"
            " ms_per_image, timed once at start-up; null when one runtime could serve)"
        },
    )
    device = fields.String(metadata={"description": "The torch device the model runs on"})
    precision = fields.String()
    backend = fields.String(metadata={"description": "BACKEND: auto, torch or onnxruntime (members say which runs)"})
    ready = fields.Boolean()
    explain_concurrency = fields.Integer(metadata={"description": "Explanations one worker runs at once"})
    batching = fields.Nested(BatchingSchema)


def model_document(settings, ensemble, members: list[dict], device: str, ready: bool) -> dict:
    """The served model and the serving settings, as ModelInfoSchema documents them (GET /model).

    settings: app.config.Settings; ensemble: models.ensemble.Ensemble; members: extra facts per member (int8).
    """
    return {
        "name": settings.model_name,
        "version": ensemble.version,
        "arch": ensemble.arch,
        "head": ensemble.head,
        "class_names": ensemble.class_names,
        "num_classes": len(ensemble.class_names),
        "preprocess": ensemble.preprocess,
        "metrics": ensemble.metrics,
        "calibration": ensemble.calibration(),
        "ood": ensemble.ood(),
        "members": [{**one, **extra} for one, extra in zip(ensemble.members(), members, strict=True)],
        "device": device,
        "precision": settings.precision,
        "backend": settings.backend,
        "ready": ready,
        "explain_concurrency": settings.explain_concurrency,
        "batching": {
            "max_batch_size": settings.max_batch_size,
            "max_batch_wait_ms": settings.max_batch_wait_ms,
            "max_queue": settings.max_queue,
            "request_timeout_s": settings.request_timeout_s,
            "max_batch_files": settings.max_batch_files,
        },
    }
