"""Hostile requests against the API (issue 12): a prefixed mount, oversized bodies, cross-site and rebinding
requests, floods of event streams, pixel bombs, idempotency misuse. Where a finding is about processes, the
API runs as a real uvicorn child process (`live_api`), talked to over sockets as clients do."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image
from svc_helpers import add_model, assert_problem, image_bytes, make_settings, raw_png

from service.errors import PayloadTooLarge
from service.launcher import Child, free_port, uvicorn_argv
from service.middleware import RequestGuard
from service.serving import decode
from worker import imaging
from worker.config import Settings

API_KEY = "hardening-key"


class LiveAPI:
    """uvicorn `service.main:app` in a child process on a free port, with the given `TL_*` settings."""

    def __init__(self, env: dict[str, str], extra_args: list[str], log_file: Path) -> None:
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_file = log_file
        self.child = Child("api", [*uvicorn_argv("127.0.0.1", port, "warning"), *extra_args], env,
                           die_with_parent=True)

    def start(self, timeout: float = 60.0) -> LiveAPI:
        self.child.start(log_file=self.log_file)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.child.running(), self.log()
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"uvicorn did not answer within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")[-4000:] if self.log_file.exists() else ""

    def stop(self) -> None:
        self.child.stop(grace=5)


@pytest.fixture
def live_api(redis_url: str, redis_db: redis.Redis, artifact_dir: Path,
             tmp_path: Path) -> Iterator[Callable[..., LiveAPI]]:
    """Start a live API: `live_api({"TL_API_KEY": ...}, "--root-path", "/api")`; stopped after the test."""
    started: list[LiveAPI] = []

    def start(settings: dict[str, str] | None = None, *extra_args: str) -> LiveAPI:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TL_")}
        env.update({"TL_REDIS_URL": redis_url, "TL_ARTIFACT_DIR": str(artifact_dir), "TL_ALLOW_DOWNLOAD": "false",
                    "TL_DATA_DIR": str(tmp_path / "no-data"), "PYTHONUNBUFFERED": "1", **(settings or {})})
        api = LiveAPI(env, list(extra_args), tmp_path / f"api{len(started)}.log")
        started.append(api)
        return api.start()

    yield start
    for api in started:
        api.stop()


def urlopen_status(request: urllib.request.Request, timeout: float = 30.0) -> tuple[int, bytes]:
    """Status and body of a urllib request (which writes the whole body before it reads the answer)."""
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


# ----- 3. auth under a path prefix -----


def test_the_key_is_required_under_a_root_path(live_api: Callable[..., LiveAPI]) -> None:
    api = live_api({"TL_API_KEY": API_KEY}, "--root-path", "/api")
    # Behind a proxy that strips /api, uvicorn --root-path /api sees scope["path"] == "/api/v1/jobs".
    assert httpx.get(f"{api.base_url}/v1/jobs").status_code == 401
    assert httpx.get(f"{api.base_url}/v1/models").status_code == 401
    assert httpx.post(f"{api.base_url}/v1/jobs", json={"model": "baseline"}).status_code == 401
    keyed = httpx.get(f"{api.base_url}/v1/jobs", headers={"Authorization": f"Bearer {API_KEY}"})
    assert keyed.status_code == 200, keyed.text
    assert httpx.get(f"{api.base_url}/healthz").status_code == 200


# ----- 13. oversized bodies: a 413 the client reads, not a reset -----

BIG_BODY = b" " * (20 * 1024 * 1024)  # twice TL_MAX_UPLOAD_BYTES' default


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/predict"])
def test_an_oversized_body_sent_whole_gets_the_413(live_api: Callable[..., LiveAPI], path: str) -> None:
    api = live_api()
    request = urllib.request.Request(f"{api.base_url}{path}", data=BIG_BODY, method="POST",
                                     headers={"Content-Type": "application/json"})
    status, body = urlopen_status(request)  # a reset would raise URLError / ConnectionResetError here
    assert status == 413
    assert b"TL_MAX_UPLOAD_BYTES" in body
    assert httpx.get(f"{api.base_url}/healthz").status_code == 200


def test_an_oversized_chunked_body_gets_the_413(live_api: Callable[..., LiveAPI]) -> None:
    api = live_api()
    chunks = (BIG_BODY[i:i + 65536] for i in range(0, len(BIG_BODY), 65536))
    request = urllib.request.Request(f"{api.base_url}/v1/jobs", data=chunks, method="POST",
                                     headers={"Content-Type": "application/json"})
    status, body = urlopen_status(request)  # no Content-Length: urllib sends it chunked
    assert status == 413
    assert b"TL_MAX_UPLOAD_BYTES" in body


class EndlessBody:
    """An ASGI client side that sends `chunk` forever (or goes silent after `chunks`), recording the answer."""

    def __init__(self, chunk: bytes, chunks: int | None = None) -> None:
        self.chunk, self.left, self.read = chunk, chunks, 0
        self.messages: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        if self.left is not None and self.read >= self.left:
            await asyncio.sleep(3600)  # silent, never disconnects
        self.read += 1
        return {"type": "http.request", "body": self.chunk, "more_body": True}

    async def send(self, message: dict[str, Any]) -> None:
        self.messages.append(message)


async def _never_called(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("the guard let an oversized request through")


@pytest.mark.parametrize("silent_after", [None, 3])
def test_the_lingering_close_is_bounded(silent_after: int | None) -> None:
    guard = RequestGuard(_never_called, api_key=None, max_body_bytes=1024, linger_min_bytes=64 * 1024,
                         linger_seconds=5.0, linger_idle_seconds=0.2)
    client = EndlessBody(b"x" * 1024, silent_after)
    scope = {"type": "http", "method": "POST", "path": "/v1/jobs", "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(10**9).encode())]}
    asyncio.run(asyncio.wait_for(guard(scope, client.receive, client.send), 10))
    assert client.messages[0]["status"] == 413
    assert client.messages[-1] == {"type": "http.response.body", "body": b""}  # the answer was ended
    assert client.read == (65 if silent_after is None else 3)  # stopped at 64 KiB dropped, or when idle


# ----- 4. web pages: Host (DNS rebinding), Origin (cross-site), Content-Type -----

JOB = {"model": "baseline", "train_samples": 100, "test_samples": 100, "epochs": 1}


def job_count(redis_db: redis.Redis) -> int:
    return int(redis_db.zcard("tl:jobs"))


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "rebind.attacker.test.", "10.9.8.7"])
def test_a_host_not_allowed_is_421(client: TestClient, redis_db: redis.Redis, host: str) -> None:
    assert_problem(client.get("/v1/jobs", headers={"Host": host}), 421, "TL_ALLOWED_HOSTS")
    assert_problem(client.get("/v1/models", headers={"Host": host}), 421)
    assert_problem(client.post("/v1/jobs", json=JOB, headers={"Host": host}), 421)
    assert job_count(redis_db) == 0


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST.",
                                  "testserver", socket.gethostname()])
def test_the_local_names_are_answered(client: TestClient, host: str) -> None:
    assert client.get("/v1/jobs", headers={"Host": host}).status_code == 200


def test_probes_answer_any_host(client: TestClient) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        assert client.get(path, headers={"Host": "pod-10-1-2-3.cluster.internal"}).status_code == 200, path


@pytest.mark.parametrize("allowed, host, status", [("api.example.com", "api.example.com", 200),
                                                   ("api.example.com", "localhost", 421),
                                                   (".example.com", "a.b.example.com", 200),
                                                   (".example.com", "example.com", 200),
                                                   (".example.com", "example.com.evil", 421),
                                                   ("*", "anything.test", 200)])
def test_allowed_hosts_is_a_setting(redis_url: str, artifact_dir: Path, app_client: Callable[[Settings], TestClient],
                                    allowed: str, host: str, status: int) -> None:
    client = app_client(make_settings(redis_url, artifact_dir, allowed_hosts=allowed))
    assert client.get("/v1/jobs", headers={"Host": host}).status_code == status


def test_the_live_api_refuses_a_rebinding_host(live_api: Callable[..., LiveAPI]) -> None:
    api = live_api()  # the settings' default TL_ALLOWED_HOSTS
    assert httpx.get(f"{api.base_url}/v1/jobs").status_code == 200  # Host 127.0.0.1:<port>, as the harness sends
    assert httpx.get(f"{api.base_url}/v1/jobs", headers={"Host": "localhost"}).status_code == 200
    refused = httpx.get(f"{api.base_url}/v1/jobs", headers={"Host": "evil.example"})
    assert_problem(refused, 421, "TL_ALLOWED_HOSTS")
    assert httpx.get(f"{api.base_url}/readyz", headers={"Host": "evil.example"}).status_code == 200


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://testserver:8080", "https://testserver.evil",
                                    "http://localhost"])
def test_a_cross_site_write_is_403(client: TestClient, redis_db: redis.Redis, origin: str) -> None:
    assert_problem(client.post("/v1/jobs", json=JOB, headers={"Origin": origin}), 403, "cross-origin")
    assert_problem(client.delete("/v1/models/m_x", headers={"Origin": origin}), 403)
    assert_problem(client.put("/v1/aliases/prod", json={"model_id": "m_x"}, headers={"Origin": origin}), 403)
    assert job_count(redis_db) == 0
    assert client.get("/v1/jobs", headers={"Origin": origin}).status_code == 200  # reads: CORS keeps them private


def test_a_cross_site_write_without_origin_is_403(client: TestClient, redis_db: redis.Redis) -> None:
    refused = client.post("/v1/jobs", json=JOB, headers={"Sec-Fetch-Site": "cross-site"})
    assert_problem(refused, 403, "Sec-Fetch-Site")
    assert job_count(redis_db) == 0


@pytest.mark.parametrize("headers", [{"Origin": "http://testserver"}, {"Origin": "https://testserver"},
                                     {"Origin": "http://localhost:8000", "Host": "localhost:8000"},
                                     {"Origin": "https://api.example.com", "Host": "127.0.0.1:8000",
                                      "X-Forwarded-Host": "api.example.com"},
                                     {"Sec-Fetch-Site": "same-origin"}, {}])
def test_same_origin_writes_are_accepted(client: TestClient, headers: dict[str, str]) -> None:
    assert client.post("/v1/jobs", json=JOB, headers=headers).status_code == 202


def test_a_body_without_content_type_is_415(client: TestClient, redis_db: redis.Redis) -> None:
    # What fetch(url, {method: "POST", mode: "no-cors", body: new Blob([json])}) sends: no Content-Type at all.
    response = client.post("/v1/jobs", content=json.dumps(JOB).encode())
    assert "content-type" not in response.request.headers
    assert_problem(response, 415, "Content-Type")
    assert_problem(client.put("/v1/aliases/prod", content=b'{"model_id": "m_x"}'), 415)
    assert job_count(redis_db) == 0
    assert client.post("/v1/jobs", json=JOB).status_code == 202


@pytest.mark.parametrize("path", ["/v2/models/m_x/infer", "/v1/models/m_x:predict"])
def test_inference_protocols_take_a_body_without_content_type(client: TestClient, path: str) -> None:
    # tritonclient.http and requests.post(url, data=json_text) send none; these routes read it as JSON.
    response = client.post(path, content=b'{"inputs": []}')
    assert response.status_code == 404, response.text  # no such model (not a 415)


# ----- 1. event streams: capped, time-limited, and never starving the Redis pool -----


def open_stream(base_url: str, path: str, timeout: float = 20.0) -> tuple[socket.socket, int, bytes]:
    """A raw `GET path` kept open: the socket, the status, and what came up to the first event (or the body)."""
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n".encode())
    seen = b""

    def complete() -> bool:
        head, found, body = seen.partition(b"\r\n\r\n")
        if not found:
            return False
        if head.startswith(b"HTTP/1.1 200"):
            return b"event: job" in body
        length = [line.split(b":", 1)[1] for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
        return len(body) >= int(length[0]) if length else False

    while not complete():
        chunk = sock.recv(65536)
        if not chunk:
            break
        seen += chunk
    return sock, int(seen.split(b" ", 2)[1]), seen


@pytest.mark.timeout(180)
def test_more_streams_than_the_cap_get_429_and_ordinary_requests_keep_answering(
        live_api: Callable[..., LiveAPI]) -> None:
    cap = 110  # above redis-py's default pool of 100 connections, which one connection per stream exhausted
    api = live_api({"TL_MAX_EVENT_STREAMS": str(cap)})
    job_id = httpx.post(f"{api.base_url}/v1/jobs", json=JOB).json()["id"]  # stays queued: no worker here
    streams: list[socket.socket] = []
    try:
        for _ in range(cap):
            sock, status, seen = open_stream(api.base_url, f"/v1/jobs/{job_id}/events")
            streams.append(sock)
            assert status == 200, seen
        extra, status, seen = open_stream(api.base_url, f"/v1/jobs/{job_id}/events")
        extra.close()
        assert status == 429, seen
        head, _, body = seen.partition(b"\r\n\r\n")
        assert b"retry-after: 5" in head.lower() and b"application/problem+json" in head.lower()
        assert b"TL_MAX_EVENT_STREAMS" in body
        with httpx.Client(base_url=api.base_url, timeout=10) as client:
            for _ in range(3):
                assert client.get("/v1/jobs").status_code == 200
                assert client.get("/readyz").status_code == 200
                assert client.get(f"/v1/jobs/{job_id}").status_code == 200
            assert client.post("/v1/jobs", json=JOB).status_code == 202
    finally:
        for sock in streams:
            sock.close()
    deadline = time.monotonic() + 30  # the closed streams give their slots back
    while True:
        sock, status, _ = open_stream(api.base_url, f"/v1/jobs/{job_id}/events")
        sock.close()
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert status == 200


@pytest.mark.timeout(60)
def test_a_stream_ends_after_its_time_limit_with_a_retry(redis_url: str, artifact_dir: Path,
                                                         app_client: Callable[[Settings], TestClient]) -> None:
    client = app_client(make_settings(redis_url, artifact_dir, event_stream_max_seconds=1.0))
    job_id = client.post("/v1/jobs", json=JOB).json()["id"]
    started = time.monotonic()
    response = client.get(f"/v1/jobs/{job_id}/events")  # queued for ever: only the time limit ends it
    assert response.status_code == 200
    assert time.monotonic() - started < 20
    assert response.text.startswith("event: job\ndata: ")
    assert "TL_EVENT_STREAM_MAX_SECONDS" in response.text and response.text.endswith("retry: 1000\n\n")
    services = client.app.state.services  # type: ignore[attr-defined]
    assert services.jobs._streams.open == 0  # its slot was given back


# ----- 2. pixel bombs: bounded per image and per request, from the headers, before decoding -----

BOMB_MODEL = "m_pixelbomb000000"


def one_bit_png(width: int, height: int) -> bytes:
    """A few KB of PNG that declares width x height pixels (all black, 1 bit each)."""
    return image_bytes(Image.new("1", (width, height), 0), optimize=True)


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every image the predict path decodes (worker.imaging.decode_image), and decodes it."""
    decoded: list[str] = []
    real = imaging.decode_image

    def spy(data: bytes, label: str, *args: Any, **kwargs: Any) -> Any:
        decoded.append(label)
        return real(data, label, *args, **kwargs)

    monkeypatch.setattr(imaging, "decode_image", spy)
    return decoded


@pytest.fixture
def bomb_model(artifact_dir: Path, trained_model: Path) -> str:
    add_model(artifact_dir, trained_model, BOMB_MODEL)
    return BOMB_MODEL


@pytest.mark.realdata
def test_a_request_of_64_pixel_bombs_is_413_before_any_decoding(client: TestClient, bomb_model: str,
                                                                  no_decoding: list[str]) -> None:
    bomb = one_bit_png(6320, 6320)  # 40 megapixels in about 5 KB: allowed per image before, 10+ s of CPU for 64
    assert len(bomb) < 20_000
    files = [("file", (f"bomb{i}.png", bomb, "image/png")) for i in range(64)]
    response = client.post(f"/v1/models/{bomb_model}/predict", files=files)
    assert_problem(response, 413, "39942400 pixels, at most 16000000 are accepted per image (TL_MAX_IMAGE_PIXELS)")
    assert no_decoding == []


@pytest.mark.realdata
@pytest.mark.parametrize("form", ["multipart", "b64"])
def test_images_within_the_image_bound_but_too_many_pixels_together_are_413(
        client: TestClient, bomb_model: str, no_decoding: list[str], form: str) -> None:
    image = one_bit_png(3000, 3000)  # 9 megapixels each: 64 of them declare 576 million together
    if form == "multipart":
        response = client.post(f"/v1/models/{bomb_model}/predict",
                               files=[("file", (f"i{i}.png", image, "image/png")) for i in range(64)])
    else:
        instances = [{"b64": base64.b64encode(image).decode()} for _ in range(64)]
        response = client.post(f"/v1/models/{bomb_model}/predict", json={"instances": instances})
    assert_problem(response, 413, "TL_MAX_REQUEST_PIXELS")
    assert no_decoding == []


@pytest.mark.realdata
def test_large_images_within_both_bounds_are_classified(client: TestClient, bomb_model: str,
                                                        no_decoding: list[str]) -> None:
    files = [("file", (f"i{i}.png", one_bit_png(4000, 4000), "image/png")) for i in range(3)]  # 48 MP in all
    response = client.post(f"/v1/models/{bomb_model}/predict", files=files)
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 3 and len(no_decoding) == 3


@pytest.mark.realdata
def test_the_pixel_bounds_are_settings(redis_url: str, artifact_dir: Path, trained_model: Path,
                                       app_client: Callable[[Settings], TestClient]) -> None:
    add_model(artifact_dir, trained_model, BOMB_MODEL)
    client = app_client(make_settings(redis_url, artifact_dir, max_image_pixels=1_000_000,
                                      max_request_pixels=2_500_000))
    predict = f"/v1/models/{BOMB_MODEL}/predict"
    big = client.post(predict, content=one_bit_png(1001, 1000), headers={"Content-Type": "image/png"})
    assert_problem(big, 413, "at most 1000000 are accepted per image (TL_MAX_IMAGE_PIXELS)")
    two = [("file", (f"i{i}.png", one_bit_png(1000, 1000), "image/png")) for i in range(2)]
    assert client.post(predict, files=two).status_code == 200
    assert_problem(client.post(predict, files=two + two[:1]), 413, "more than 2500000 together")


def test_one_image_over_the_bound_is_refused_from_its_header() -> None:
    with pytest.raises(PayloadTooLarge, match=r"image 0 is too large: 16000001 pixels.*TL_MAX_IMAGE_PIXELS"):
        decode.decode_image(raw_png(16_000_001, 1, 8, 2, None), "image 0")  # a header, no pixel data
    assert decode.decode_image(one_bit_png(4000, 4000), "image 0").shape == (32, 32, 3)  # at the bound: decoded
    with pytest.raises(PayloadTooLarge, match="at most 100 are accepted"):
        decode.decode_image(one_bit_png(11, 10), "image 0", max_pixels=100)


def test_check_pixels_sums_the_headers_of_a_request() -> None:
    limits = decode.PixelLimits(per_image=100, per_request=250)
    small, large = one_bit_png(10, 10), one_bit_png(11, 10)
    decode.check_pixels([("a", small), ("b", small), ("c", b"not an image")], limits)  # 200: fine
    with pytest.raises(PayloadTooLarge, match="more than 250 together"):
        decode.check_pixels([("a", small), ("b", small), ("c", small)], limits)
    with pytest.raises(PayloadTooLarge, match="b is too large: 110 pixels"):
        decode.check_pixels([("a", small), ("b", large)], limits)


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGBA", "LA", "I;16"])
def test_a_large_image_is_reduced_in_its_own_mode_with_the_same_result(mode: str) -> None:
    # 1200x900 in each mode that used to be converted (copied) at full size before the resize; the result
    # matches that old order (convert the whole image, then resize) up to rounding.
    pixels = np.random.default_rng(7).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    base = Image.fromarray(pixels).resize((1200, 900), Image.Resampling.BICUBIC)
    if mode == "I;16":
        img = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    elif mode == "P":
        img = base.quantize(64)
    elif mode == "RGBA":
        img = base.copy()
        img.putalpha(Image.fromarray(pixels[:, :, 0]).resize((1200, 900)))
    else:
        img = base.convert(mode)
    data = image_bytes(img)
    assert Image.open(io.BytesIO(data)).mode == mode
    with Image.open(io.BytesIO(data)) as whole:
        reference = np.asarray(imaging.resize(imaging.to_rgb(whole), 32), dtype=np.int16)
    out = imaging.decode_image(data, "image 0").astype(np.int16)
    assert out.shape == (32, 32, 3)
    assert np.abs(out - reference).mean() < 1.0 and np.abs(out - reference).max() <= 8


# ----- 12. the cost of one request: JSON bodies, /metrics, filtered listings -----


class CountingJson:
    """Stands in for the `json` module of `service.serving.decode`, counting the bodies it parses."""

    def __init__(self) -> None:
        self.parsed = 0

    def loads(self, body: bytes) -> Any:
        self.parsed += 1
        return json.loads(body)


def nested_lists_body(count: int) -> bytes:
    return json.dumps({"instances": [np.full((32, 32, 3), 255).tolist()] * count}).encode()


@pytest.mark.parametrize("count, parsed", [(64, 1), (65, 0), (640, 0)])
def test_a_json_body_holding_far_more_than_max_batch_images_is_refused_unparsed(
        monkeypatch: pytest.MonkeyPatch, count: int, parsed: int) -> None:
    counting = CountingJson()
    monkeypatch.setattr(decode, "json", counting)
    body = nested_lists_body(count)  # 640 images: about 10 MB
    if count <= 64:
        assert decode._images_from_json(body, 64, (32, 32, 3), decode.PixelLimits()).shape == (count, 32, 32, 3)
    else:
        with pytest.raises(PayloadTooLarge, match="TL_MAX_BATCH"):
            decode._images_from_json(body, 64, (32, 32, 3), decode.PixelLimits())
    assert counting.parsed == parsed


def test_the_json_bound_scales_with_the_model_input() -> None:
    decode.refuse_oversized_json(json.dumps([np.zeros((96, 96, 3), int).tolist()] * 4).encode(), 4, (96, 96, 3))
    with pytest.raises(PayloadTooLarge, match="4 images of 96x96x3"):
        decode.refuse_oversized_json(json.dumps([np.zeros((96, 96, 3), int).tolist()] * 5).encode(), 4, (96, 96, 3))
    b64 = json.dumps({"instances": [{"b64": "data:image/png;base64," + "A" * 1000}] * 64}).encode()
    decode.refuse_oversized_json(b64, 64, (32, 32, 3))  # base64 images: no separators to speak of


@pytest.mark.realdata
def test_a_10_mib_json_of_nested_lists_answers_413(client: TestClient, bomb_model: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    counting = CountingJson()
    monkeypatch.setattr(decode, "json", counting)
    body = nested_lists_body(600)
    assert 9 * 1024 * 1024 < len(body) <= 10 * 1024 * 1024  # under TL_MAX_UPLOAD_BYTES
    response = client.post(f"/v1/models/{bomb_model}/predict", content=body,
                           headers={"Content-Type": "application/json"})
    assert_problem(response, 413, "at most 64 per request, TL_MAX_BATCH")
    assert counting.parsed == 0


def test_metrics_count_jobs_at_most_every_few_seconds(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    store = client.app.state.services.jobs.store  # type: ignore[attr-defined]
    real = store.count_by_status
    calls: list[int] = []

    async def counting(*args: Any, **kwargs: Any) -> dict[str, int]:
        calls.append(1)
        return await real(*args, **kwargs)

    monkeypatch.setattr(store, "count_by_status", counting)
    client.post("/v1/jobs", json=JOB)
    texts = [client.get("/metrics").text for _ in range(10)]
    assert len(calls) == 1  # ten scrapes, one count of up to 10,000 job statuses
    assert all('tl_jobs{status="queued"} 1.0' in text and "tl_job_store_up 1.0" in text for text in texts)


def add_jobs(redis_db: redis.Redis, statuses: list[str]) -> list[str]:
    """Job records written as the store writes them, oldest first; returns their ids."""
    from worker.jobstore import INDEX_KEY, encode_fields, index_member, job_key, new_job_fields, new_job_id
    from worker.spec import JobCreate

    spec = JobCreate(**JOB)
    ids, pipe = [], redis_db.pipeline()
    for status in statuses:
        job_id = new_job_id()
        fields = {**new_job_fields(job_id, spec), **encode_fields({"status": status})}
        pipe.hset(job_key(job_id), mapping=fields)
        pipe.zadd(INDEX_KEY, {index_member(fields): 0})
        ids.append(job_id)
    pipe.execute()
    return ids


def test_a_filtered_listing_reads_a_bounded_number_of_records_per_page(
        client: TestClient, redis_db: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    from service import jobs as job_service
    from worker import jobstore

    [oldest] = add_jobs(redis_db, ["queued"])
    add_jobs(redis_db, ["succeeded"] * 1200)  # newer than it: a status filter must get past them
    decoded: list[int] = []
    for module in (job_service, jobstore):
        real = module.decode_job
        monkeypatch.setattr(module, "decode_job", lambda raw, real=real: decoded.append(1) or real(raw))
    first = client.get("/v1/jobs", params={"status": "queued"}).json()
    assert first["items"] == [] and first["next_cursor"]  # 1,000 records read, none decoded, more to come
    assert decoded == []
    second = client.get("/v1/jobs", params={"status": "queued", "cursor": first["next_cursor"]}).json()
    assert [job["id"] for job in second["items"]] == [oldest] and second["next_cursor"] is None
    assert len(decoded) == 1
    page = client.get("/v1/jobs", params={"status": "succeeded", "limit": 3}).json()
    assert len(page["items"]) == 3 and all(job["status"] == "succeeded" for job in page["items"])
    assert page["next_cursor"] and len(decoded) == 4
    assert len(client.get("/v1/jobs", params={"model": "transfer"}).json()["items"]) == 0


# ----- 9. idempotency: a key is bound to its body, and outlives a lost record once -----


def test_an_idempotency_key_reused_with_another_body_is_422(client: TestClient, redis_db: redis.Redis) -> None:
    first = client.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == 202
    other = client.post("/v1/jobs", json={**JOB, "epochs": 2}, headers={"Idempotency-Key": "k-1"})
    body = assert_problem(other, 422, "Idempotency-Key")
    assert first.json()["id"] in body["detail"] and body["errors"][0]["loc"] == ["header", "Idempotency-Key"]
    assert job_count(redis_db) == 1
    # The same job written another way (defaults spelled out, other key order) is the same body.
    same = client.post("/v1/jobs", json={"epochs": 1, "test_samples": 100, "train_samples": 100, "seed": 42,
                                         "model": "baseline", "batch_size": 32}, headers={"Idempotency-Key": "k-1"})
    assert same.status_code == 202 and same.json()["id"] == first.json()["id"]
    assert same.headers["idempotent-replayed"] == "true"


def test_a_key_whose_job_record_is_gone_makes_one_new_job(client: TestClient, redis_db: redis.Redis) -> None:
    lost = client.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "k-2"}).json()["id"]
    redis_db.delete(f"tl:job:{lost}")  # expired, flushed, or its first request died before writing it
    retries = [client.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": "k-2"}) for _ in range(3)]
    assert all(retry.status_code == 202 for retry in retries)
    ids = {retry.json()["id"] for retry in retries}
    assert len(ids) == 1 and lost not in ids  # one new job, bound to the key from then on
    assert "idempotent-replayed" not in retries[0].headers
    assert [retry.headers.get("idempotent-replayed") for retry in retries[1:]] == ["true", "true"]
