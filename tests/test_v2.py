"""The Open Inference Protocol v2 routes through the Flask test client, on the real tiny bundle."""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import get_service
from models.bundle import load_bundle
from tests.helpers import PHOTOS, photos, pixels_of, sample

INFER = "/v2/models/pet-classifier/infer"
HEADER = "Inference-Header-Content-Length"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image_input(images: list[bytes], **overrides) -> dict:
    return {"name": "image", "shape": [len(images)], "datatype": "BYTES", "data": [b64(i) for i in images], **overrides}


def binary_body(document: dict, *chunks: bytes) -> tuple[bytes, dict]:
    header = json.dumps(document).encode()
    return header + b"".join(chunks), {HEADER: str(len(header)), "Content-Type": "application/octet-stream"}


def predict_probabilities(client, data: bytes) -> list[float]:
    return list(client.post("/predict", data=data, content_type="image/jpeg").get_json()["all_probabilities"].values())


def output(response, name: str = "probabilities") -> dict:
    (found,) = [o for o in response.get_json()["outputs"] if o["name"] == name]
    return found


def test_server_health_and_metadata(client):
    assert client.get("/v2").get_json() == {
        "name": "pet-classifier-service",
        "version": "0.1.0",
        "extensions": ["binary_tensor_data", "classification"],
    }
    assert client.get("/v2/health/live").get_json() == {"live": True}
    assert client.get("/v2/health/ready").get_json() == {"ready": True}


def test_model_metadata_under_every_version_spelling(client, tiny_bundle_path, class_names):
    version = load_bundle(tiny_bundle_path).version
    expected = {
        "name": "pet-classifier",
        "versions": [version],
        "platform": "pytorch",
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "pixels", "datatype": "FP32", "shape": [-1, 3, 64, 64]},
        ],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(class_names)]}],
    }
    digest = version.removeprefix("sha256:")
    for path in ("", f"/versions/{version}", f"/versions/{digest}", "/versions/sha256%3A" + digest):
        assert client.get(f"/v2/models/pet-classifier{path}").get_json() == expected
        assert client.get(f"/v2/models/pet-classifier{path}/ready").get_json() == {
            "name": "pet-classifier",
            "ready": True,
        }


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/v2/models/resnet", "unknown model 'resnet'; this server serves 'pet-classifier'"),
        ("/v2/models/resnet/ready", "unknown model 'resnet'"),
        ("/v2/models/pet-classifier/versions/1", "has no version '1'; the served version is sha256:"),
        ("/v2/models/pet-classifier/versions/1/ready", "has no version '1'"),
    ],
)
def test_unknown_models_and_versions_are_404_in_protocol_form(client, path, message):
    response = client.get(path)
    assert response.status_code == 404
    assert list(response.get_json()) == ["error"] and message in response.get_json()["error"]


def test_images_as_json_base64_match_predict(client, tiny_bundle_path):
    images = photos()
    response = client.post(INFER, json={"id": "req-7", "inputs": [image_input(images)]})
    assert response.status_code == 200, response.get_json()
    assert response.mimetype == "application/json" and HEADER not in response.headers
    body = response.get_json()
    assert body["model_name"] == "pet-classifier" and body["id"] == "req-7"
    assert body["model_version"] == load_bundle(tiny_bundle_path).version
    assert body["outputs"][0]["shape"] == [len(images), 3] and body["outputs"][0]["datatype"] == "FP32"
    rows = np.array(body["outputs"][0]["data"]).reshape(len(images), 3)
    for data, row in zip(images, rows, strict=True):
        assert row.tolist() == pytest.approx(predict_probabilities(client, data), abs=1e-4)


@pytest.mark.parametrize("layout", ["flat", "nested"])
def test_preprocessed_pixels_match_the_images(client, tiny_bundle_path, layout):
    images = photos()[:2]
    pixels = pixels_of(tiny_bundle_path, images)
    data = pixels.ravel().tolist() if layout == "flat" else pixels.tolist()
    tensor = {"name": "pixels", "shape": list(pixels.shape), "datatype": "FP32", "data": data}
    response = client.post(INFER, json={"inputs": [tensor]})
    assert response.status_code == 200, response.get_json()
    assert "id" not in response.get_json()
    from_images = client.post(INFER, json={"inputs": [image_input(images)]})
    assert output(response)["data"] == pytest.approx(output(from_images)["data"], abs=1e-5)


def test_binary_tensor_data_in_and_out(client, tiny_bundle_path):
    images = photos()[:3]
    pixels = pixels_of(tiny_bundle_path, images).astype("<f4")
    document = {
        "inputs": [{"name": "pixels", "shape": list(pixels.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": pixels.nbytes}}],
        "parameters": {"binary_data_output": True},
    }  # fmt: skip
    body, headers = binary_body(document, pixels.tobytes())
    response = client.post(INFER, data=body, headers=headers)
    assert response.status_code == 200, response.data[:300]
    assert response.mimetype == "application/octet-stream"
    length = int(response.headers[HEADER])
    header = json.loads(response.data[:length])
    (out,) = header["outputs"]
    assert out["parameters"] == {"binary_data_size": 3 * 3 * 4} and "data" not in out
    rows = np.frombuffer(response.data[length:], dtype="<f4").reshape(out["shape"])
    expected = client.post(INFER, json={"inputs": [image_input(images)]})
    assert rows.ravel().tolist() == pytest.approx(output(expected)["data"], abs=1e-5)


def test_binary_bytes_input_and_per_output_override(client):
    images = photos()[:2]
    raw = b"".join(struct.pack("<I", len(data)) + data for data in images)
    document = {
        "inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": False}}],
        "parameters": {"binary_data_output": True},
    }
    body, headers = binary_body(document, raw)
    response = client.post(INFER, data=body, headers=headers)
    assert response.status_code == 200 and response.mimetype == "application/json"
    assert output(response)["data"][:3] == pytest.approx(predict_probabilities(client, images[0]), abs=1e-4)


def test_classification_extension(client, class_names):
    images = photos()
    document = {
        "inputs": [image_input(images)],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}],
    }
    out = output(client.post(INFER, json=document))
    assert out["datatype"] == "BYTES" and out["shape"] == [len(images), 2]
    for index, data in enumerate(images):
        top = client.post("/predict?top_k=2", data=data, content_type="image/jpeg").get_json()["top_k"]
        entries = [text.split(":") for text in out["data"][2 * index : 2 * index + 2]]
        assert [label for _, _, label in entries] == [entry["label"] for entry in top]
        assert [class_names[int(i)] for _, i, _ in entries] == [entry["label"] for entry in top]
        assert [float(p) for p, _, _ in entries] == pytest.approx([entry["probability"] for entry in top], abs=1e-4)


def _pixels_tensor(shape, data=None):
    size = int(np.prod(shape))
    return {"name": "pixels", "shape": shape, "datatype": "FP32", "data": [0.0] * size if data is None else data}


JPEG = (PHOTOS / "chelsea.jpg").read_bytes()
BAD_REQUESTS = {
    "not json": (b"{nope", {}, 400, "not valid JSON"),
    "binary data without the header": (b'{"inputs": []}\x00\x01', {}, 400, f"needs the {HEADER} header"),
    "nested too deeply": (b"[" * 5000 + b"]" * 5000, {}, 400, "nested too deeply"),
    "data nested deeper than the shape": ({"inputs": [image_input([JPEG], data=[[b64(JPEG)]])]}, {}, 400,
                                          "nested deeper than its shape [1]"),
    "json array": (b"[1]", {}, 400, "must be a JSON object"),
    "no inputs": ({"id": "x"}, {}, 400, "inputs: Missing data for required field"),
    "id not a string": ({"id": 7, "inputs": [image_input([JPEG])]}, {}, 400, "id: Not a valid string"),
    "unknown field in an input": ({"inputs": [image_input([JPEG], extra=1)]}, {}, 400, "inputs.0.extra: Unknown"),
    "two inputs": ({"inputs": [image_input([JPEG]), _pixels_tensor([1, 3, 64, 64])]}, {}, 400, "exactly one input"),
    "unknown input": ({"inputs": [image_input([JPEG], name="img")]}, {}, 400, "got ['img']. Inputs: 'image' (BYTES"),
    "image as FP32": ({"inputs": [image_input([JPEG], datatype="FP32")]}, {}, 400, "must have datatype BYTES, got"),
    "image rank 2": ({"inputs": [image_input([JPEG], shape=[1, 1])]}, {}, 400, "must have shape [-1] with N >= 1"),
    "no images": ({"inputs": [image_input([], shape=[0])]}, {}, 400, "N >= 1"),
    "shape and data differ": ({"inputs": [image_input([JPEG], shape=[2])]}, {}, 400, "holds 1 elements"),
    "over MAX_BATCH_FILES": ({"inputs": [image_input([JPEG] * 5)]}, {}, 400, "at most MAX_BATCH_FILES=4"),
    "bad base64": ({"inputs": [image_input([JPEG], data=["***"])]}, {}, 400, "image 0 is not valid base64"),
    "numbers as images": ({"inputs": [image_input([JPEG], data=[1])]}, {}, 400, "must be base64 strings"),
    "not an image": ({"inputs": [image_input([b"hello"])]}, {}, 400, "image"),
    "empty image": ({"inputs": [image_input([JPEG], data=[""])]}, {}, 400, "image 0 is empty"),
    "no data": ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES"}]}, {}, 400, "has no data"),
    "pixels of the wrong size": ({"inputs": [_pixels_tensor([1, 3, 64, 63])]}, {}, 400, "[N, 3, 64, 64]"),
    "pixels as FP16": ({"inputs": [{**_pixels_tensor([1, 3, 64, 64]), "datatype": "FP16"}]}, {}, 400, "FP32"),
    "pixels rank 3": ({"inputs": [_pixels_tensor([3, 64, 64])]}, {}, 400, "[-1, 3, 64, 64]"),
    "pixels as text": ({"inputs": [_pixels_tensor([1, 3, 64, 64], ["a"])]}, {}, 400, "must be numbers"),
    "too few pixels": ({"inputs": [_pixels_tensor([1, 3, 64, 64], [0.0])]}, {}, 400, "(12288 elements) but holds 1"),
    "unknown output": ({"inputs": [image_input([JPEG])], "outputs": [{"name": "logits"}]}, {}, 400, "one output"),
    "classification over the class count": (
        {"inputs": [image_input([JPEG])], "outputs": [{"name": "probabilities", "parameters": {"classification": 4}}]},
        {}, 400, "classification must be an integer in [0, 3]",
    ),
    "binary_data not a bool": (
        {"inputs": [image_input([JPEG])], "outputs": [{"name": "probabilities", "parameters": {"binary_data": 1}}]},
        {}, 400, "binary_data must be true or false",
    ),
    "shared memory": (
        {"inputs": [image_input([JPEG], parameters={"shared_memory_region": "r"})]}, {}, 400, "shared-memory",
    ),
    "header past the body": ({"inputs": [image_input([JPEG])]}, {HEADER: "999999"}, 400, "must be an integer in [1,"),
    "header not a number": ({"inputs": [image_input([JPEG])]}, {HEADER: "ten"}, 400, HEADER),
    "gzip body": ({"inputs": [image_input([JPEG])]}, {"Content-Encoding": "gzip"}, 415, "send the body uncompressed"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_are_refused_in_protocol_form(client, case):
    body, headers, status, message = BAD_REQUESTS[case]
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    response = client.post(INFER, data=body, headers=headers)
    assert response.status_code == status
    answer = response.get_json()
    assert set(answer) <= {"error", "id"} and isinstance(answer["error"], str)
    assert message in answer["error"]


@pytest.mark.parametrize(
    ("describe", "chunks", "message"),
    [
        ("size differs from the bytes sent", lambda raw: (raw[:-1],), "binary_data_size"),
        ("element runs past the end", lambda raw: (struct.pack("<I", 10**6) + raw[4:],), "runs past"),
        ("truncated length prefix", lambda raw: (raw + b"\x01",), "4-byte length"),
    ],
)
def test_bad_binary_data_is_refused(client, describe, chunks, message):
    raw = struct.pack("<I", len(JPEG)) + JPEG
    (chunk,) = chunks(raw)
    size = len(raw) if describe == "size differs from the bytes sent" else len(chunk)
    document = {
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": size}}]
    }
    body, headers = binary_body(document, chunk)
    response = client.post(INFER, data=body, headers=headers)
    assert response.status_code == 400 and message in response.get_json()["error"]


def test_non_finite_pixels_are_refused(client):
    pixels = np.zeros((1, 3, 64, 64), dtype="<f4")
    pixels[0, 0, 0, 0] = np.nan
    document = {"inputs": [{"name": "pixels", "shape": [1, 3, 64, 64], "datatype": "FP32",
                            "parameters": {"binary_data_size": pixels.nbytes}}]}  # fmt: skip
    body, headers = binary_body(document, pixels.tobytes())
    response = client.post(INFER, data=body, headers=headers)
    assert response.status_code == 400 and "finite" in response.get_json()["error"]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=12,
)  # fmt: skip
PARAMETERS = st.dictionaries(
    st.sampled_from(
        ["binary_data_size", "binary_data", "binary_data_output", "classification", "shared_memory_region"]
    ),
    st.booleans() | st.integers(0, 64) | JSON_VALUES,
    max_size=3,
)
# Mostly well-formed requests with one thing wrong, so the generated cases get past the envelope's validation.
IMAGE_TENSORS = st.fixed_dictionaries(
    {"name": st.just("image"), "datatype": st.sampled_from(["BYTES", "BYTES", "FP32"]),
     "shape": st.lists(st.integers(0, 5), min_size=1, max_size=2)},
    optional={"data": st.lists(st.text(max_size=12) | JSON_VALUES, max_size=5), "parameters": PARAMETERS},
)  # fmt: skip
PIXEL_TENSORS = st.fixed_dictionaries(
    {"name": st.sampled_from(["pixels", "pixel"]), "datatype": st.sampled_from(["FP32", "FP32", "INT8"]),
     "shape": st.tuples(st.integers(0, 2), st.sampled_from([3, 1]), st.sampled_from([64, 2]), st.just(64)).map(list)},
    optional={"data": st.lists(st.floats(-3, 3) | JSON_VALUES, max_size=5), "parameters": PARAMETERS},
)  # fmt: skip
OUTPUTS = st.lists(
    st.fixed_dictionaries({"name": st.sampled_from(["probabilities", "scores"])}, optional={"parameters": PARAMETERS}),
    max_size=2,
)
REQUESTS = JSON_VALUES | st.fixed_dictionaries(
    {"inputs": st.lists(IMAGE_TENSORS | PIXEL_TENSORS, min_size=1, max_size=2)},
    optional={"id": st.text(max_size=8) | JSON_VALUES, "outputs": OUTPUTS, "parameters": PARAMETERS},
)


def test_generated_requests_get_protocol_errors_never_a_crash(client):
    @given(document=REQUESTS, tail=st.binary(max_size=16), header=st.booleans())
    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(document, tail, header):
        body, headers = binary_body(document, tail) if header else (json.dumps(document).encode(), {})
        response = client.post(INFER, data=body, headers=headers)
        assert response.status_code in (200, 400), response.get_json()
        if response.status_code == 400:
            answer = response.get_json()
            assert set(answer) <= {"error", "id"} and answer["error"]

    check()


def test_json_nested_too_deeply_is_a_400_on_the_own_api_too(client):
    response = client.post("/predict", data=b"[" * 5000 + b"]" * 5000, content_type="application/json")
    assert response.status_code == 400 and response.get_json()["error"]["code"] == "invalid_json"


def test_errors_echo_the_request_id(client):
    response = client.post(INFER, json={"id": "abc", "inputs": [image_input([JPEG], datatype="UINT8")]})
    assert response.status_code == 400
    assert response.get_json()["id"] == "abc"


def test_too_large_and_unknown_routes_answer_in_protocol_form(client):
    too_large = client.post(INFER, data=b"x" * (1024 * 1024 + 1), content_type="application/json")
    assert too_large.status_code == 413 and "MAX_UPLOAD_MB=1" in too_large.get_json()["error"]
    assert client.get("/v2/repository/index").status_code == 404
    assert set(client.get("/v2/repository/index").get_json()) == {"error"}
    wrong_method = client.get(INFER)
    assert wrong_method.status_code == 405 and isinstance(wrong_method.get_json()["error"], str)
    assert client.get("/nowhere").get_json()["error"]["code"] == "not_found"  # the own API keeps its form


def test_v2_requests_and_predictions_are_counted(app_factory):
    app = app_factory()
    client = app.test_client()
    images = photos()
    top_1 = [{"name": "probabilities", "parameters": {"classification": 1}}]
    classes = client.post(INFER, json={"inputs": [image_input(images)], "outputs": top_1})
    client.post(INFER, json={"inputs": [image_input([b"junk"])]})
    top = [text.split(":")[2] for text in output(classes)["data"]]
    route = "/v2/models/<model_name>/infer"
    assert sample(app, "petclf_requests_total", route=route, status="200") == 1
    assert sample(app, "petclf_requests_total", route=route, status="400") == 1
    assert sample(app, "petclf_rejected_requests_total", reason="invalid_image") == 1
    for label in set(top):
        assert sample(app, "petclf_predictions_total", **{"class": label}) == top.count(label)
    assert sample(app, "petclf_batch_size_sum") == len(images)


def test_model_name_setting(app_factory):
    client = app_factory(MODEL_NAME="pets").test_client()
    assert client.get("/v2/models/pets/ready").status_code == 200
    assert client.get("/v2/models/pet-classifier/ready").status_code == 404
    response = client.post("/v2/models/pets/infer", json={"inputs": [image_input([JPEG])]})
    assert response.get_json()["model_name"] == "pets"


def test_not_ready_answers_503_in_protocol_form(app_factory):
    app = app_factory()
    client = app.test_client()
    assert client.get("/v2/health/ready").status_code == 200
    get_service(app).batcher.stop()  # a dead batcher: the worker can no longer predict
    assert client.get("/v2/health/live").status_code == 200
    for response in (
        client.get("/v2/health/ready"),
        client.get("/v2/models/pet-classifier/ready"),
        client.post(INFER, json={"inputs": [image_input([JPEG])]}),
    ):
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert response.get_json() == {"error": "batcher thread is not running"}
