"""Every request bounded in memory and time (issue 21), against real gunicorn servers on loopback.

The hostile inputs are made here: 40-megapixel images that compress to a few KB, bodies that lie about their
length or never end, oversized JSON, thousands of multipart parts, malformed HTTP. Memory is the worker's peak
resident size (VmHWM, reset through /proc/<pid>/clear_refs before each request) over its resident size before.
"""

from __future__ import annotations

import io
import json
import socket
import time

import pytest
import requests
from PIL import Image

from app.config import load_settings
from models.explain import OVERLAY_MAX_SIDE
from tests.fixtures.server import poll_readyz, start_server
from tools.loadgen import children, status_kib
from tools.soak import memory_ceiling, most_expensive_image, worst_case

SIDE = 6324  # just under the default MAX_IMAGE_PIXELS (40 M): 39.99 M pixels
PIXELS = SIDE * SIDE
MB = 1024 * 1024
SLACK = 40 * MB  # decoder buffers, the strip being converted, the answer
BODY_TIMEOUT_S = 1.0
UPLOAD_MB = 12
LIMITS = {
    "MAX_UPLOAD_MB": UPLOAD_MB,
    "BODY_TIMEOUT_S": BODY_TIMEOUT_S,
    "THREADS": 8,
    "MAX_BATCH_WAIT_MS": 2,
}


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


# kind -> (the file, bytes a pixel Pillow holds it in)
HOSTILE = {
    "16-bit-png": (lambda: encode(Image.new("I;16", (SIDE, SIDE), 40000), "PNG"), 2),
    "float32-tiff": (lambda: encode(Image.new("F", (SIDE, SIDE), 1000.5), "TIFF", compression="tiff_adobe_deflate"), 4),
    "1-bit-png": (lambda: encode(Image.new("1", (SIDE, SIDE), 1), "PNG"), 1),
}


@pytest.fixture(scope="session")
def hostile_files() -> dict[str, bytes]:
    return {kind: make() for kind, (make, _) in HOSTILE.items()}


@pytest.fixture(scope="session")
def limit_servers(tiny_bundle_path, tmp_path_factory):
    """(patient, hurried): one-worker servers, REQUEST_TIMEOUT_S 60 and 0.05; both started before either is awaited."""
    patient = start_server(tiny_bundle_path, tmp_path_factory.mktemp("patient"), 1, REQUEST_TIMEOUT_S=60, **LIMITS)
    hurried = start_server(tiny_bundle_path, tmp_path_factory.mktemp("hurried"), 1, REQUEST_TIMEOUT_S=0.05, **LIMITS)
    try:
        for server in (patient, hurried):
            poll_readyz(server)
        yield patient, hurried
    finally:
        patient.stop()
        hurried.stop()


@pytest.fixture(scope="session")
def limited(limit_servers):
    return limit_servers[0]


def worker_pid(server) -> int:
    (pid,) = children(server.process.pid)
    return pid


def peak_growth(server, send) -> tuple[requests.Response, int]:
    """send() -> its response, and the worker's peak resident growth (bytes) while it ran."""
    pid = worker_pid(server)
    with open(f"/proc/{pid}/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current resident size
    before = status_kib(pid, "VmRSS:")
    response = send()
    return response, (status_kib(pid, "VmHWM:") - before) * 1024


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_a_hostile_image_costs_at_most_its_decoded_size(limited, hostile_files, kind):
    data, per_pixel = hostile_files[kind], HOSTILE[kind][1]

    def send():
        return requests.post(f"{limited.url}/predict", data=data, headers={"Content-Type": "image/png"}, timeout=120)

    response, growth = peak_growth(limited, send)
    assert response.status_code == 200, response.text
    print(f"{kind}: {len(data)} bytes, peak +{growth / MB:.0f} MB")
    # The budget: the decoded file in its own mode (<= 4 bytes a pixel = 4/3 of its 8-bit RGB size) plus SLACK.
    assert growth <= per_pixel * PIXELS + SLACK


def test_explain_works_on_a_bounded_picture(limited, hostile_files):
    data = hostile_files["1-bit-png"]

    def send():
        return requests.post(f"{limited.url}/explain", data=data, headers={"Content-Type": "image/png"}, timeout=120)

    response, growth = peak_growth(limited, send)
    assert response.status_code == 200, response.text
    assert Image.open(io.BytesIO(response.content)).size == (OVERLAY_MAX_SIDE, OVERLAY_MAX_SIDE)
    print(f"/explain 1-bit-png: peak +{growth / MB:.0f} MB")
    assert growth <= 150 * MB


def test_explain_and_batch_answer_504_past_the_deadline(limit_servers, hostile_files):
    _, hurried = limit_servers  # REQUEST_TIMEOUT_S=0.05: less than decoding one 40-megapixel file takes
    data = hostile_files["1-bit-png"]
    explained = requests.post(f"{hurried.url}/explain", data=data, headers={"Content-Type": "image/png"}, timeout=60)
    assert explained.status_code == 504 and explained.json()["error"]["code"] == "timeout"
    files = [("image", (f"{index}.png", data, "image/png")) for index in range(32)]
    started = time.monotonic()
    batch = requests.post(f"{hurried.url}/predict/batch", files=files, timeout=120)
    seconds = time.monotonic() - started
    assert batch.status_code == 504 and batch.json()["error"]["code"] == "timeout"
    single = requests.post(f"{limit_servers[0].url}/predict", data=data, headers={"Content-Type": "image/png"})
    assert single.status_code == 200
    # Stopped at the first check after the deadline, not after decoding all 32 (generous: 16 decodes' time).
    assert seconds < 16 * max(single.elapsed.total_seconds(), 0.05) + 2


def junk_after(data: bytes, megabytes: int):
    yield data
    for _ in range(megabytes):
        yield b"\0" * MB


def v2_image_request(data: bytes) -> dict:
    import base64

    encoded = base64.b64encode(data).decode()
    return {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [encoded]}]}


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/predict", "image/jpeg"),
        ("/predict/batch", "multipart/form-data; boundary=x"),
        ("/explain", "image/jpeg"),
        ("/v2/models/pet-classifier/infer", "application/json"),
    ],
)
def test_a_chunked_body_over_the_limit_is_413_on_every_route(limited, cat_jpeg, path, content_type):
    # No Content-Length: requests sends a generator chunked. A valid start, then junk past MAX_UPLOAD_MB.
    response = requests.post(
        f"{limited.url}{path}", data=junk_after(cat_jpeg, UPLOAD_MB + 1), headers={"Content-Type": content_type}
    )
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    message = error if path.startswith("/v2") else error["message"]
    assert f"MAX_UPLOAD_MB={UPLOAD_MB}" in message
    if not path.startswith("/v2"):
        assert error["code"] == "payload_too_large"


def test_a_chunked_body_within_the_limit_is_answered(limited, cat_jpeg):
    response = requests.post(f"{limited.url}/predict", data=iter([cat_jpeg]), headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200, response.text


def raw_exchange(server, head: bytes, body: bytes = b"", pause: float = 0.0, trickle: int = 0) -> tuple[bytes, float]:
    """Send `head` and `body` on a raw socket (then `trickle` more bytes, one each 0.2 s); everything read back
    until the server closes, and how long that took."""
    host, port = server.url.removeprefix("http://").split(":")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + body)
        for _ in range(trickle):
            time.sleep(0.2)
            try:
                sock.sendall(b"x")
            except OSError:
                break
        time.sleep(pause)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer, time.monotonic() - started


def body_timeouts(server) -> float:
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("petclf_body_timeouts_total")
    )


@pytest.mark.parametrize("trickle", [0, 40], ids=["short-content-length", "one-byte-each-0.2s"])
def test_a_body_slower_than_the_rate_is_cut_off_and_counted(limited, cat_jpeg, trickle):
    counted = body_timeouts(limited)
    promised = len(cat_jpeg) + (10 if not trickle else 10_000)
    head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {promised}\r\n\r\n"
    answer, seconds = raw_exchange(limited, head.encode(), cat_jpeg, trickle=trickle)
    status, _, rest = answer.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 408"), answer[:300]
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"] == "body_timeout"
    # Cut at BODY_TIMEOUT_S plus received / BODY_MIN_RATE_KBPS (here under 0.5 s), then closed by the server;
    # the trickle alone lasts 8 s: a read gathered from many tiny recvs is bounded as a whole.
    assert seconds < BODY_TIMEOUT_S + 4
    assert body_timeouts(limited) == counted + 1


def v2_pixels(values: str, shape: list[int]) -> bytes:
    head = json.dumps({"inputs": [{"name": "pixels", "shape": shape, "datatype": "FP32", "data": [0]}]})
    return head.replace("[0]", f"[{values}]").encode()


@pytest.mark.parametrize(
    "body",
    [
        v2_pixels(",".join(["0"] * 5_000_000), [1, 3, 64, 64]),  # 10 MB: more values than any request can use
        v2_pixels(",".join(["0"] * 2 * 3 * 64 * 64), [1, 3, 64, 64]),  # within that, but twice the shape
        json.dumps(
            {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["a"] * 2_000_000}]}
        ).encode(),
    ],
    ids=["5M-zeros", "twice-the-shape", "2M-strings"],
)
def test_v2_json_larger_than_its_shape_is_refused_before_it_is_built(limited, body):
    url = f"{limited.url}/v2/models/pet-classifier/infer"

    def send():
        return requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=60)

    response, growth = peak_growth(limited, send)
    assert response.status_code == 400, response.text
    print(f"v2 {len(body)} bytes: {response.elapsed.total_seconds():.2f} s, peak +{growth / MB:.0f} MB")
    assert growth <= 2 * len(body) + SLACK  # the body (and Flask's copy of it), not the values parsed out of it


def test_the_multipart_part_limit_has_its_own_message(limited):
    files = [("f", (f"{index}", b"x", "text/plain")) for index in range(2000)]
    response = requests.post(f"{limited.url}/predict/batch", files=files)
    assert response.status_code == 413
    error = response.json()["error"]
    assert (
        error["code"] == "payload_too_large" and "parts" in error["message"] and "MAX_UPLOAD_MB" not in error["message"]
    )


@pytest.mark.parametrize(
    ("head", "status", "code"),
    [
        (b"NOT A REQUEST LINE\r\n\r\n", 400, "bad_request"),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
        (b"GET /livez HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n", 431, None),
    ],
    ids=["bad-request-line", "uri-too-long", "too-many-headers"],
)
def test_gunicorn_refusals_answer_in_the_json_error_shape(limited, head, status, code):
    answer, _ = raw_exchange(limited, head)
    head_part, _, body = answer.partition(b"\r\n\r\n")
    assert head_part.startswith(b"HTTP/1.1 %d" % status), answer[:200]
    assert b"Content-Type: application/json" in head_part
    error = json.loads(body)["error"]
    assert error["message"] and error["code"] == (code or "headers_too_large")


def test_model_shows_bundle_file_names_not_server_paths(limited, tiny_bundle_path):
    document = requests.get(f"{limited.url}/model", timeout=10)
    assert [member["path"] for member in document.json()["members"]] == [tiny_bundle_path.name]
    assert str(tiny_bundle_path.parent) not in document.text  # nor in any other field (the backend's reason)


def test_threads_clients_at_once_with_the_costliest_image_stay_under_the_ceiling(limited, tiny_bundle_path):
    settings = load_settings({k: str(v) for k, v in LIMITS.items()}, {"MODEL_PATH": str(tiny_bundle_path)})
    data = most_expensive_image(settings.max_image_pixels)
    result = worst_case(limited.url, worker_pid(limited), data, clients=LIMITS["THREADS"])
    print(f"worst case: {result}")
    assert set(result["answers"]) <= {"200", "413", "503", "504"} and result["worker_survived"], result
    growth = (result["rss_mb"]["peak"] - result["rss_mb"]["before"]) * MB
    assert growth <= memory_ceiling(settings, LIMITS["THREADS"])


def test_headers_that_stop_arriving_are_cut_off(limited):
    # gunicorn reads headers without a deadline once their first byte came; BODY_TIMEOUT_S bounds them too.
    answer, seconds = raw_exchange(limited, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: ima")
    assert answer == b"" and seconds < BODY_TIMEOUT_S + 4  # closed without an answer: the request never began
    assert requests.get(f"{limited.url}/livez", timeout=10).status_code == 200
