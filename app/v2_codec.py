"""Open Inference Protocol v2 (KServe v2 / Triton REST) messages: schemas, request decoding, response encoding.

Covers the JSON tensor form and the binary tensor data extension (`Inference-Header-Content-Length`,
`binary_data_size` on inputs, `binary_data` on outputs, `binary_data_output` on the request) and the
classification extension (`classification` on an output). Knows the model only through `ModelSpec`.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass

import numpy as np
import torch
from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

from app.body import decode_base64
from app.errors import ApiError
from models.predictor import top_indices

HEADER_LENGTH = "Inference-Header-Content-Length"
IMAGE, PIXELS, PROBABILITIES = "image", "pixels", "probabilities"
EXTENSIONS = ("binary_tensor_data", "classification")
_LENGTH = struct.Struct("<I")  # BYTES elements in binary form: a 4-byte little-endian length, then the bytes
_SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')  # a JSON string, escapes included
# Values a request may hold beyond its tensor data (keys, shapes, parameters, outputs).
_STRUCTURE_VALUES = 256


# Schemas: they validate the JSON part of requests, serialise answers and feed the OpenAPI document.

_PARAMETERS = {"keys": fields.String(), "values": fields.Raw()}


class V2TensorMetadataSchema(Schema):
    name = fields.String(required=True)
    datatype = fields.String(required=True)
    shape = fields.List(fields.Integer(), required=True, metadata={"description": "-1 = any size"})


class V2ServerMetadataSchema(Schema):
    name = fields.String(required=True)
    version = fields.String(required=True)
    extensions = fields.List(fields.String(), required=True)


class V2ModelMetadataSchema(Schema):
    name = fields.String(required=True)
    versions = fields.List(fields.String(), metadata={"description": "The bundle version, sha256:<12 hex>"})
    platform = fields.String(required=True)
    inputs = fields.List(fields.Nested(V2TensorMetadataSchema), required=True)
    outputs = fields.List(fields.Nested(V2TensorMetadataSchema), required=True)


class V2LiveSchema(Schema):
    live = fields.Boolean(required=True)


class V2ReadySchema(Schema):
    ready = fields.Boolean(required=True)


class V2ModelReadySchema(Schema):
    name = fields.String(required=True)
    ready = fields.Boolean(required=True)


class V2ErrorSchema(Schema):
    """The protocol's error form."""

    error = fields.String(required=True)
    id = fields.String(metadata={"description": "The request's id, when it sent one"})


class V2RequestInputSchema(Schema):
    name = fields.String(required=True, metadata={"description": f"'{IMAGE}' or '{PIXELS}'"})
    shape = fields.List(fields.Integer(strict=True, validate=validate.Range(min=0)), required=True)
    datatype = fields.String(required=True)
    parameters = fields.Dict(**_PARAMETERS, metadata={"description": "binary_data_size for binary data"})
    data = fields.Raw(metadata={"description": "Row-major tensor data, flat or nested; BYTES as base64 strings"})


class V2RequestOutputSchema(Schema):
    name = fields.String(required=True)
    parameters = fields.Dict(**_PARAMETERS, metadata={"description": "binary_data (bool), classification (top k)"})


class V2InferenceRequestSchema(Schema):
    """An inference request (the JSON part, when binary tensor data follows it)."""

    class Meta:
        unknown = EXCLUDE  # e.g. the model_name some clients add

    id = fields.String()
    parameters = fields.Dict(**_PARAMETERS, metadata={"description": "binary_data_output (bool)"})
    inputs = fields.List(fields.Nested(V2RequestInputSchema), required=True, validate=validate.Length(min=1))
    outputs = fields.List(fields.Nested(V2RequestOutputSchema))


class V2ResponseOutputSchema(Schema):
    name = fields.String(required=True)
    shape = fields.List(fields.Integer(), required=True)
    datatype = fields.String(required=True)
    parameters = fields.Dict(**_PARAMETERS)
    data = fields.Raw(metadata={"description": "Absent when the tensor follows the JSON as binary data"})


class V2InferenceResponseSchema(Schema):
    model_name = fields.String(required=True)
    model_version = fields.String()
    id = fields.String()
    outputs = fields.List(fields.Nested(V2ResponseOutputSchema), required=True)


_request_schema = V2InferenceRequestSchema()
_response_schema = V2InferenceResponseSchema()


# Decoded requests


@dataclass(frozen=True)
class ModelSpec:
    """What the protocol needs to know of the served model, fixed at start-up."""

    name: str
    version: str
    crop: int
    class_names: tuple[str, ...]
    max_images: int
    resize: int  # the bundle's resize before the centre crop (the pixels' error message names it)

    @property
    def max_values(self) -> int:
        """The most JSON values an acceptable request holds: a full batch of pixels, plus its structure."""
        return self.max_images * 3 * self.crop * self.crop + _STRUCTURE_VALUES

    @property
    def inputs(self) -> list[dict]:
        """Input tensor metadata: encoded images, or preprocessed pixels (a request sends one of them)."""
        return [
            {"name": IMAGE, "datatype": "BYTES", "shape": [-1]},
            {"name": PIXELS, "datatype": "FP32", "shape": [-1, 3, self.crop, self.crop]},
        ]

    @property
    def outputs(self) -> list[dict]:
        """Output tensor metadata."""
        return [{"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, len(self.class_names)]}]


@dataclass(frozen=True)
class RequestedOutput:
    """One output to answer: as binary data or JSON, as the tensor or as top-`classification` strings."""

    name: str = PROBABILITIES
    binary: bool = False
    classification: int = 0


@dataclass(frozen=True)
class InferRequest:
    """A validated inference request: exactly one of `images` (encoded files) and `pixels` (N, 3, crop, crop)."""

    id: str | None
    images: list[bytes] | None
    pixels: torch.Tensor | None
    outputs: tuple[RequestedOutput, ...]


def _invalid(message: str) -> ApiError:
    return ApiError("invalid_tensor", message)


def _messages(errors: dict | list, path: str = "") -> list[str]:
    """Marshmallow's nested error dict as 'inputs.0.shape: message' lines."""
    if isinstance(errors, dict):
        return [line for key, value in errors.items() for line in _messages(value, f"{path}{key}.")]
    return [f"{path.rstrip('.')}: {message}" for message in errors]


def _check_value_count(text: bytes, spec: ModelSpec) -> None:
    """Refuse, before parsing, JSON that holds more values than any request to `spec`'s model can use.

    Counted on the bytes, at memchr speed: strings >= unescaped quotes / 2; array elements >= commas - colons
    outside strings (an object of k members has k colons and k - 1 commas). json.loads of 10 MB of such values
    cost 0.4-1.8 s and +90-170 MB before the shape was compared (issue 21).
    """
    strings = (text.count(b'"') - text.count(b'\\"')) // 2
    if strings > spec.max_images + _STRUCTURE_VALUES:
        most = spec.max_images
        raise _invalid(f"the request holds at least {strings} strings; this model takes at most {most} images")
    skeleton = _STRING.sub(b'""', text)  # few strings (checked above): fast
    values = skeleton.count(b",") - skeleton.count(b":")
    if values > spec.max_values:
        raise _invalid(
            f"the request holds at least {values} values; at most {spec.max_values} fit MAX_BATCH_FILES="
            f"{spec.max_images} images of [3, {spec.crop}, {spec.crop}] pixels"
        )


def split_body(body: bytes, header_length: str | None, spec: ModelSpec | None = None) -> tuple[dict, memoryview]:
    """The request's JSON object and the binary tensor data after it; raises ApiError.

    With `spec`, JSON holding more values than any request to that model can use is refused before parsing.
    """
    binary = memoryview(b"")
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            length = -1
        if not 0 < length <= len(body):
            raise _invalid(f"{HEADER_LENGTH}={header_length!r} must be an integer in [1, {len(body)}] (the body size)")
        body, binary = body[:length], memoryview(body)[length:]
    if spec is not None:
        _check_value_count(body, spec)
    try:
        document = json.loads(body)
    except RecursionError as error:
        raise ApiError("invalid_json", "the inference request's JSON is nested too deeply") from error
    except (UnicodeDecodeError, ValueError) as error:
        trailing = isinstance(error, json.JSONDecodeError) and error.msg == "Extra data" and not header_length
        hint = f" (binary tensor data after the JSON needs the {HEADER_LENGTH} header)" if trailing else ""
        raise ApiError("invalid_json", f"the inference request is not valid JSON{hint}: {error}") from error
    if not isinstance(document, dict):
        raise ApiError("invalid_json", 'the inference request must be a JSON object: {"inputs": [...]}')
    return document, binary


def request_id(document: dict) -> str | None:
    """The request's `id` when it is a string (echoed in the answer, errors included)."""
    value = document.get("id")
    return value if isinstance(value, str) else None


def decode_request(document: dict, binary: memoryview, spec: ModelSpec) -> InferRequest:
    """A parsed request body -> InferRequest for `spec`'s model; raises ApiError naming what is wrong."""
    try:
        request = _request_schema.load(document)
    except ValidationError as error:
        raise ApiError("invalid_json", "invalid inference request: " + "; ".join(_messages(error.messages))) from error
    inputs = request["inputs"]
    names = [tensor["name"] for tensor in inputs]
    if len(inputs) != 1 or names[0] not in (IMAGE, PIXELS):
        hint = ", ".join(f"'{t['name']}' ({t['datatype']} {t['shape']})" for t in spec.inputs)
        raise _invalid(f"this model takes exactly one input, '{IMAGE}' or '{PIXELS}'; got {names}. Inputs: {hint}")
    tensor = inputs[0]
    images = _images(tensor, binary, spec) if tensor["name"] == IMAGE else None
    pixels = _pixels(tensor, binary, spec) if tensor["name"] == PIXELS else None
    outputs = _outputs(request.get("outputs"), request.get("parameters") or {}, spec)
    return InferRequest(request.get("id"), images, pixels, outputs)


def _batch_size(tensor: dict, rank: int, spec: ModelSpec) -> int:
    shape, name = tensor["shape"], tensor["name"]
    if len(shape) != rank or not shape[0]:
        expected = next(t["shape"] for t in spec.inputs if t["name"] == name)
        raise _invalid(f"input '{name}' must have shape {expected} with N >= 1 for N images, got {shape}")
    if shape[0] > spec.max_images:
        raise ApiError("too_many_files", f"{shape[0]} images in one request; at most MAX_BATCH_FILES={spec.max_images}")
    return shape[0]


def _check_datatype(tensor: dict, expected: str) -> None:
    if tensor["datatype"] != expected:
        raise _invalid(f"input '{tensor['name']}' must have datatype {expected}, got {tensor['datatype']!r}")


def _tensor_data(tensor: dict, binary: memoryview) -> object:
    """The tensor's `data` (JSON), or its bytes cut from the binary part (which must be used up exactly)."""
    parameters, name = tensor.get("parameters") or {}, tensor["name"]
    if any(key in parameters for key in _SHARED_MEMORY):
        raise _invalid("the shared-memory extension is not supported; send the tensor as JSON data or binary data")
    size = parameters.get("binary_data_size")
    if size is None:
        if "data" not in tensor:
            raise _invalid(f"input '{name}' has no data: give 'data', or binary data with a binary_data_size parameter")
        if len(binary):
            raise _invalid(f"{len(binary)} bytes follow the JSON header but no input has a binary_data_size")
        return tensor["data"]
    if "data" in tensor:
        raise _invalid(f"input '{name}' has both 'data' and binary_data_size; send one of them")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _invalid(f"input '{name}': binary_data_size must be a non-negative integer, got {size!r}")
    if size != len(binary):
        raise _invalid(
            f"input '{name}' has binary_data_size {size} but {len(binary)} bytes follow the JSON header "
            f"(the {HEADER_LENGTH} header gives the JSON's length)"
        )
    return binary


def _flat(data: object, tensor: dict, count: int) -> list:
    """Row-major elements of flat or nested JSON tensor data (nested at most as deep as the tensor's rank),
    counted against the shape's `count` before any list is built."""
    elements = data if isinstance(data, list) else [data]
    _count(elements, tensor, count)
    for _ in range(len(tensor["shape"])):  # each pass removes one level of nesting; no recursion
        if not any(isinstance(element, list) for element in elements):
            return elements
        elements = [item for element in elements for item in (element if isinstance(element, list) else [element])]
    raise _invalid(f"input '{tensor['name']}' data is nested deeper than its shape {tensor['shape']}")


def _count(elements: list, tensor: dict, count: int) -> None:
    """Walk nested lists (no copies), refusing as soon as more leaves than `count` or deeper nesting show up."""
    stack, leaves, rank = [(elements, 0)], 0, len(tensor["shape"])
    while stack:
        items, depth = stack.pop()
        for item in items:
            if not isinstance(item, list):
                leaves += 1
            elif depth + 1 >= rank:
                raise _invalid(f"input '{tensor['name']}' data is nested deeper than its shape {tensor['shape']}")
            else:
                stack.append((item, depth + 1))
        if leaves > count:
            raise _invalid(f"input '{tensor['name']}' has shape {tensor['shape']} ({count} elements) but holds more")


def _images(tensor: dict, binary: memoryview, spec: ModelSpec) -> list[bytes]:
    _check_datatype(tensor, "BYTES")
    count = _batch_size(tensor, 1, spec)
    data = _tensor_data(tensor, binary)
    elements = _unpack_bytes(data) if isinstance(data, memoryview) else _flat(data, tensor, count)
    if len(elements) != count:
        raise _invalid(f"input '{IMAGE}' has shape {tensor['shape']} but holds {len(elements)} elements")
    if isinstance(data, memoryview):
        images = elements
    elif all(isinstance(element, str) for element in elements):
        images = [decode_base64(text, f"image {index}") for index, text in enumerate(elements)]
    else:
        raise _invalid(f"input '{IMAGE}' data must be base64 strings in JSON (raw bytes need binary data)")
    for index, image in enumerate(images):
        if not image:
            raise ApiError("empty_image", f"image {index} is empty (0 bytes)")
    return images


def _unpack_bytes(data: memoryview) -> list[bytes]:
    elements, offset = [], 0
    while offset < len(data):
        if offset + _LENGTH.size > len(data):
            raise _invalid(f"input '{IMAGE}': binary BYTES data ends inside an element's 4-byte length")
        (size,) = _LENGTH.unpack_from(data, offset)
        offset += _LENGTH.size
        if offset + size > len(data):
            raise _invalid(f"input '{IMAGE}': an element of {size} bytes runs past the binary data's end")
        elements.append(bytes(data[offset : offset + size]))
        offset += size
    return elements


def _pixels(tensor: dict, binary: memoryview, spec: ModelSpec) -> torch.Tensor:
    _check_datatype(tensor, "FP32")
    _batch_size(tensor, 4, spec)
    shape = tensor["shape"]
    if shape[1:] != [3, spec.crop, spec.crop]:
        raise _invalid(
            f"pixels must have shape [N, 3, {spec.crop}, {spec.crop}] with N >= 1 (the bundle's preprocess: "
            f"resize {spec.resize}, centre crop {spec.crop}, normalised), got {shape}"
        )
    data = _tensor_data(tensor, binary)
    count = math.prod(shape)
    if isinstance(data, memoryview):
        if len(data) != count * 4:
            raise _invalid(f"input '{PIXELS}' of shape {shape} needs {count * 4} bytes of FP32 data, got {len(data)}")
        array = np.frombuffer(data, dtype="<f4").astype(np.float32)  # a writable, native-order copy
    else:
        array = np.asarray(_flat(data, tensor, count))
        if array.dtype.kind not in "iuf" or array.ndim != 1:
            raise _invalid(f"input '{PIXELS}' data must be numbers")
        if array.size != count:
            raise _invalid(f"input '{PIXELS}' has shape {shape} ({count} elements) but holds {array.size}")
        array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise _invalid("pixels must be finite numbers (no NaN or infinity)")
    return torch.from_numpy(array.reshape(shape))


def _outputs(requested: list[dict] | None, parameters: dict, spec: ModelSpec) -> tuple[RequestedOutput, ...]:
    binary = _flag(parameters, "binary_data_output", False)
    if not requested:
        return (RequestedOutput(binary=binary),)
    names = [output["name"] for output in requested]
    if names != [PROBABILITIES]:
        raise _invalid(f"the model has one output, '{PROBABILITIES}' (FP32 [-1, {len(spec.class_names)}]); got {names}")
    parameters = requested[0].get("parameters") or {}
    if any(key in parameters for key in _SHARED_MEMORY):
        raise _invalid("the shared-memory extension is not supported; ask for JSON or binary data")
    count = parameters.get("classification", 0)
    if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= len(spec.class_names):
        raise _invalid(f"classification must be an integer in [0, {len(spec.class_names)}] (the class count)")
    return (RequestedOutput(binary=_flag(parameters, "binary_data", binary), classification=count),)


def _flag(parameters: dict, name: str, default: bool) -> bool:
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise _invalid(f"parameter {name} must be true or false, got {value!r}")
    return value


# Responses


def encode_response(
    spec: ModelSpec, request: InferRequest, probabilities: torch.Tensor
) -> tuple[bytes, dict[str, str]]:
    """(N, classes) probabilities -> the response body and its headers (binary outputs after the JSON)."""
    outputs, chunks = [], []
    for requested in request.outputs:
        output, data = _output(spec, requested, probabilities)
        if requested.binary:
            output["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            output["data"] = data
        outputs.append(output)
    document = {"model_name": spec.name, "model_version": spec.version}
    if request.id is not None:
        document["id"] = request.id
    document["outputs"] = outputs
    header = json.dumps(_response_schema.dump(document), separators=(",", ":")).encode()
    if not chunks:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(chunks), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def _output(spec: ModelSpec, requested: RequestedOutput, probabilities: torch.Tensor) -> tuple[dict, object]:
    """The output's metadata and its data: bytes when binary, else a flat JSON list."""
    rows = probabilities.numpy()
    if not requested.classification:
        output = {"name": requested.name, "datatype": "FP32", "shape": list(rows.shape)}
        return output, rows.astype("<f4").tobytes() if requested.binary else rows.ravel().tolist()
    # Triton's classification extension: "<value>:<index>:<label>", most probable first; str(float32) round-trips.
    labels = [
        f"{row[index]!s}:{index}:{spec.class_names[index]}"
        for row in rows
        for index in top_indices(row.tolist(), requested.classification)
    ]
    output = {"name": requested.name, "datatype": "BYTES", "shape": [len(rows), requested.classification]}
    if not requested.binary:
        return output, labels
    return output, b"".join(_LENGTH.pack(len(raw)) + raw for raw in (label.encode() for label in labels))
