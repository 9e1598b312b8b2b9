"""Request body limits: 413 from Content-Length without reading the body, and while a chunked body streams."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from svc_helpers import assert_problem, make_settings

from service.main import create_app
from worker.config import Settings

LIMIT = 4096


@pytest.fixture
def small(redis_url: str, artifact_dir: Path, app_client: Callable[[Settings], TestClient]) -> TestClient:
    return app_client(make_settings(redis_url, artifact_dir, max_upload_bytes=LIMIT))


def job_body(size: int) -> bytes:
    """A valid job request padded with whitespace to exactly `size` bytes."""
    body = json.dumps({"model": "baseline", "epochs": 1}).encode()
    return body + b" " * (size - len(body))


def test_a_body_at_the_limit_is_accepted(small: TestClient) -> None:
    response = small.post("/v1/jobs", content=job_body(LIMIT), headers={"content-type": "application/json"})
    assert response.status_code == 202, response.text


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/predict", "/v1/models/latest/predict", "/v1/aliases/x"])
def test_a_declared_length_over_the_limit_is_413(small: TestClient, path: str) -> None:
    method = "put" if "aliases" in path else "post"
    response = small.request(method, path, content=job_body(LIMIT + 1), headers={"content-type": "application/json"})
    assert_problem(response, 413, f"at most {LIMIT} bytes")


def test_a_chunked_body_over_the_limit_is_413(small: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield from (b" " * 1024 for _ in range(8))

    response = small.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_problem(response, 413, f"at most {LIMIT} bytes")
    image = small.post("/v1/predict", content=chunks(), headers={"content-type": "image/png"})
    assert image.status_code in (404, 413)  # no model here: either answer, never a 500
    multipart = small.post("/v1/jobs", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert multipart.status_code in (413, 415)


def test_an_invalid_content_length_is_400(small: TestClient) -> None:
    response = small.post("/v1/jobs", content=b"{}", headers={"content-type": "application/json",
                                                             "content-length": "abc"})
    assert_problem(response, 400, "Content-Length")


class Recorder:
    """An ASGI client side: feeds a body in chunks, records what the app read and answered."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.read = 0
        #: Chunks read when the answer started (the guard then drops the rest of the body before it closes).
        self.read_when_answered: int | None = None
        self.messages: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        if self.read < len(self.chunks):
            self.read += 1
            more = self.read < len(self.chunks)
            return {"type": "http.request", "body": self.chunks[self.read - 1], "more_body": more}
        await asyncio.sleep(3600)  # a client that never disconnects
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if not self.messages:
            self.read_when_answered = self.read
        self.messages.append(message)

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])


def scope(path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"host", b"test"), *headers], "client": ("127.0.0.1", 1), "server": ("test", 80)}


def run_app(settings: Settings, request_scope: dict[str, Any], recorder: Recorder) -> None:
    app = create_app(settings)

    async def go() -> None:
        async with app.router.lifespan_context(app):
            await asyncio.wait_for(app(request_scope, recorder.receive, recorder.send), 30)

    asyncio.run(go())


def test_declared_oversize_is_refused_before_reading_a_byte(settings: Settings) -> None:
    recorder = Recorder([b"x" * 1024] * 100)
    run_app(settings.model_copy(update={"max_upload_bytes": LIMIT}),
            scope("/v1/jobs", [(b"content-type", b"application/json"), (b"content-length", b"102400")]), recorder)
    assert recorder.status == 413
    assert recorder.read_when_answered == 0
    assert ("connection", "close") in {(k.decode(), v.decode()) for k, v in recorder.messages[0]["headers"]}
    assert recorder.read == 100  # then the body was read to its end and dropped, so the close is no reset


@pytest.mark.parametrize("path, content_type", [("/v1/jobs", b"application/json"),
                                                ("/v1/predict", b"image/png"),
                                                ("/v1/predict", b"multipart/form-data; boundary=xyz")])
def test_a_streamed_body_is_cut_off_at_the_limit(settings: Settings, path: str, content_type: bytes,
                                                 artifact_dir: Path, trained_model_if_any: None) -> None:
    chunks = [b"x" * 1024] * 100  # 100 KiB, no Content-Length
    if content_type.startswith(b"multipart"):  # a well-formed start of a file part, then its endless content
        chunks[0] = (b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
                     b"Content-Type: image/png\r\n\r\n").ljust(1024, b"x")
    recorder = Recorder(chunks)
    run_app(settings.model_copy(update={"max_upload_bytes": LIMIT}), scope(path, [(b"content-type", content_type)]),
            recorder)
    assert recorder.status == 413, recorder.messages
    # The app stopped right after the limit, not at the end of the body (the rest is dropped, never held).
    assert recorder.read_when_answered is not None and recorder.read_when_answered <= LIMIT // 1024 + 1
    body = json.loads(b"".join(m.get("body", b"") for m in recorder.messages[1:]))
    assert body["status"] == 413 and body["type"] == "about:blank"


@pytest.fixture
def trained_model_if_any(request: pytest.FixtureRequest, artifact_dir: Path) -> None:
    """Predict only reads the body of a model that exists: use the trained one when real data is present."""
    if "predict" in request.node.name:
        from svc_helpers import add_model

        add_model(artifact_dir, request.getfixturevalue("trained_model"), "m_limits")
