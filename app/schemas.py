"""Marshmallow schemas: they validate queries and bodies, serialise answers and generate the OpenAPI document."""

from __future__ import annotations

from marshmallow import EXCLUDE, Schema, ValidationError, fields, post_load, validate, validates

from models.ood import DESCRIPTIONS
from models.predictor import TTA_MODES

DEFAULT_TOP_K = 5
EXPLAIN_FORMATS = ("png", "json")
_OOD_SCORES = "; ".join(f"`{name}`: {text}" for name, text in DESCRIPTIONS.items())


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
            " agreement with fp32 recorded at export, int8), reason (why this backend)"
        },
    )
    device = fields.String(metadata={"description": "The torch device the model runs on"})
    precision = fields.String()
    backend = fields.String(metadata={"description": "BACKEND: auto, torch or onnxruntime (members say which runs)"})
    ready = fields.Boolean()
    explain_concurrency = fields.Integer(metadata={"description": "Explanations one worker runs at once"})
    batching = fields.Nested(BatchingSchema)
