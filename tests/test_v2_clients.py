"""Real Open Inference Protocol clients nobody here wrote (tritonclient, KServe's SDK) against real gunicorn."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from tritonclient.utils import InferenceServerException

from models.bundle import load_bundle
from tests.helpers import PHOTO_NAMES, photos, pixels_of

pytestmark = pytest.mark.slow
MODEL = "pet-classifier"
TIMEOUT = 60


@pytest.fixture(scope="module")
def expected(gunicorn_server) -> np.ndarray:
    """/predict's probabilities for each photo, in PHOTO_NAMES order: what every client must get back."""
    rows = []
    for data in photos():
        response = requests.post(f"{gunicorn_server.url}/predict", files={"image": data}, timeout=TIMEOUT)
        rows.append(list(response.json()["all_probabilities"].values()))
    return np.array(rows, dtype=np.float32)


@pytest.fixture
def triton_client(gunicorn_server):
    client = triton.InferenceServerClient(
        gunicorn_server.url.removeprefix("http://"), connection_timeout=TIMEOUT, network_timeout=TIMEOUT
    )
    yield client
    client.close()


def triton_images(binary: bool) -> triton.InferInput:
    """The photos as a BYTES input: raw bytes in binary form; in JSON, which must be text, base64."""
    data = photos() if binary else [base64.b64encode(data) for data in photos()]
    tensor = triton.InferInput("image", [len(data)], "BYTES")
    return tensor.set_data_from_numpy(np.array(data, dtype=np.object_), binary_data=binary)


def test_tritonclient_health_and_metadata(triton_client, tiny_bundle_path, class_names):
    version = load_bundle(tiny_bundle_path).version
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    assert triton_client.is_model_ready(MODEL)
    assert triton_client.is_model_ready(MODEL, model_version=version)  # the ':' goes into the URL unquoted
    assert triton_client.is_model_ready(MODEL, model_version=version.removeprefix("sha256:"))
    assert not triton_client.is_model_ready("resnet")
    assert set(triton_client.get_server_metadata()["extensions"]) >= {"binary_tensor_data", "classification"}
    metadata = triton_client.get_model_metadata(MODEL, model_version=version)
    assert metadata["versions"] == [version]
    assert [t["name"] for t in metadata["inputs"]] == ["image", "pixels"]
    assert metadata["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(class_names)]}]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_infers_bytes_like_predict(triton_client, expected, binary):
    outputs = [triton.InferRequestedOutput("probabilities", binary_data=binary)]
    result = triton_client.infer(MODEL, [triton_images(binary)], outputs=outputs, request_id="t-1")
    assert result.get_response()["id"] == "t-1"
    assert result.get_response()["model_name"] == MODEL
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-4)


def test_tritonclient_default_outputs_come_back_binary(triton_client, expected):
    # Without `outputs`, tritonclient asks for every output as binary data (binary_data_output).
    result = triton_client.infer(MODEL, [triton_images(binary=True)])
    assert result.get_response()["outputs"][0]["parameters"]["binary_data_size"] == expected.nbytes
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-4)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_infers_fp32_pixels(triton_client, tiny_bundle_path, expected, binary):
    pixels = pixels_of(tiny_bundle_path, photos()).astype(np.float32)
    tensor = triton.InferInput("pixels", list(pixels.shape), "FP32").set_data_from_numpy(pixels, binary_data=binary)
    outputs = [triton.InferRequestedOutput("probabilities", binary_data=binary)]
    result = triton_client.infer(MODEL, [tensor], outputs=outputs)
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-4)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_class_count(triton_client, gunicorn_server, binary):
    outputs = [triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=2)]
    result = triton_client.infer(MODEL, [triton_images(binary=True)], outputs=outputs)
    classes = result.as_numpy("probabilities")
    assert classes.shape == (len(PHOTO_NAMES), 2)
    for row, data in zip(classes, photos(), strict=True):
        top = requests.post(f"{gunicorn_server.url}/predict?top_k=2", files={"image": data}, timeout=TIMEOUT)
        entries = [(element.decode() if binary else element).split(":") for element in row]
        assert [label for _, _, label in entries] == [entry["label"] for entry in top.json()["top_k"]]
        assert [float(p) for p, _, _ in entries] == pytest.approx(
            [entry["probability"] for entry in top.json()["top_k"]], abs=1e-4
        )


@pytest.mark.parametrize(
    ("call", "status", "message"),
    [
        (lambda c: c.get_model_metadata("resnet"), "404", "unknown model 'resnet'"),
        (lambda c: c.get_model_metadata(MODEL, model_version="2"), "404", "has no version '2'"),
        (
            lambda c: c.infer(MODEL, [triton.InferInput("pixels", [1, 3, 8, 8], "FP32").set_data_from_numpy(
                np.zeros((1, 3, 8, 8), np.float32))]),
            "400", "pixels must have shape [N, 3, 64, 64]",
        ),
        (
            lambda c: c.infer(MODEL, [triton.InferInput("image", [1], "INT32").set_data_from_numpy(
                np.zeros(1, np.int32))]),
            "400", "input 'image' must have datatype BYTES",
        ),
    ],
)  # fmt: skip
def test_tritonclient_sees_protocol_errors(triton_client, call, status, message):
    with pytest.raises(InferenceServerException) as error:
        call(triton_client)
    assert error.value.status() == status
    assert message in error.value.message()


async def _kserve_session(url: str, requests_: list[InferRequest]) -> tuple[bool, bool, bool, list]:
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=TIMEOUT))
    try:
        live = await client.is_server_live(url)
        ready = await client.is_server_ready(url)
        model_ready = await client.is_model_ready(url, MODEL)
        answers = [await client.infer(url, request, model_name=MODEL) for request in requests_]
    finally:
        await client.close()
    return live, ready, model_ready, answers


def test_kserve_rest_client(gunicorn_server, tiny_bundle_path, expected):
    json_images = InferInput(
        "image", [len(PHOTO_NAMES)], "BYTES", data=[base64.b64encode(d).decode() for d in photos()]
    )
    binary_images = InferInput("image", [len(PHOTO_NAMES)], "BYTES")
    binary_images.set_data_from_numpy(np.array(photos(), dtype=np.object_), binary_data=True)
    pixels = pixels_of(tiny_bundle_path, photos()).astype(np.float32)
    binary_pixels = InferInput("pixels", list(pixels.shape), "FP32")
    binary_pixels.set_data_from_numpy(pixels, binary_data=True)
    requests_ = [
        InferRequest(MODEL, [json_images], request_id="k-json"),
        InferRequest(MODEL, [binary_images], request_id="k-bin", parameters={"binary_data_output": True}),
        InferRequest(MODEL, [binary_pixels], request_id="k-pixels"),
    ]
    live, ready, model_ready, answers = asyncio.run(_kserve_session(gunicorn_server.url, requests_))
    assert live and ready and model_ready
    for request, answer in zip(requests_, answers, strict=True):
        assert answer.id == request.id and answer.model_name == MODEL
        np.testing.assert_allclose(answer.outputs[0].as_numpy(), expected, atol=1e-4)
