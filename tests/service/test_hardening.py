"""Hostile requests against the API (issue 12): a prefixed mount, oversized bodies, cross-site and rebinding
requests, floods of event streams, pixel bombs, idempotency misuse. Where a finding is about processes, the
API runs as a real uvicorn child process (`live_api`), talked to over sockets as clients do."""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from service.launcher import Child, free_port, uvicorn_argv

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
