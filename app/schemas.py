"""Marshmallow schemas: they validate queries and bodies, serialise answers and generate the OpenAPI document."""

from __future__ import annotations

from marshmallow import EXCLUDE, Schema, ValidationError, fields, post_load, validate, validates

DEFAULT_TOP_K = 5


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
    model_version = fields.String(required=True)


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

    version = fields.String(required=True)
    arch = fields.String(required=True)
    head = fields.Dict()
    class_names = fields.List(fields.String(), required=True)
    num_classes = fields.Integer(required=True)
    preprocess = fields.Dict()
    metrics = fields.Dict(metadata={"description": "Validation scores recorded by training"})
    device = fields.String(metadata={"description": "The torch device the model runs on"})
    precision = fields.String()
    ready = fields.Boolean()
    batching = fields.Nested(BatchingSchema)
