"""A schema-driven fuzz pass: schemathesis generates requests for every operation of the served OpenAPI
schema (valid and invalid bodies, paths, queries, headers) and sends them to a real uvicorn server.
No response may be a 5xx.

The server under fuzz has a Redis database and an artifact directory of its own (one real model
trained into it by the command line, so predict and the model routes do real work) and no worker: the jobs it accepts
stay queued and are wiped afterwards, so the fuzzer cannot start a 200-epoch training run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import requests
import schemathesis
import testkit
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from service.launcher import Child, free_port, uvicorn_argv

from .harness import API_KEY, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.realdata]
#: Generated requests per operation and generation mode.
EXAMPLES = 25


def train_tiny_model(artifacts: Path, env: dict[str, str]) -> str:
    """A real (small) baseline model written by the command line into `artifacts`; returns its id."""
    argv = [sys.executable, "-m", "worker.cli", "--model", "baseline", "--train-samples", "200",
            "--test-samples", "100", "--epochs", "1", "--seed", "5", "--output", str(artifacts)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return str(json.loads(done.stdout.strip().splitlines()[-1])["model_id"])


class FuzzServer:
    def __init__(self, env: dict[str, str], url: str) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="tl-fuzz-"))
        self.artifacts = self.tmp / "artifacts"
        self.model_id = train_tiny_model(self.artifacts, env)
        self.redis_url = url
        redis.Redis.from_url(url).flushdb()
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        child_env = {**env, "TL_REDIS_URL": url, "TL_ARTIFACT_DIR": str(self.artifacts), "TL_API_KEY": API_KEY}
        self.api = Child("fuzz-api", uvicorn_argv("127.0.0.1", port, "warning"), child_env, die_with_parent=True)
        self.api.start(log_file=self.tmp / "api.log")
        wait_for(self._ready, 60, what="the fuzz server")

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.base_url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        self.api.stop(grace=5)
        redis.Redis.from_url(self.redis_url).flushdb()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def fuzz_server(redis_server: testkit.RedisServer) -> Iterator[FuzzServer]:
    data = testkit.require_data()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TL_")}
    env.update({"TL_DATA_DIR": str(data), "TL_ALLOW_DOWNLOAD": "false", "PYTHONUNBUFFERED": "1"})
    server = FuzzServer(env, redis_server.url(testkit.FUZZ_DB))
    try:
        yield server
    finally:
        print((server.tmp / "api.log").read_text(errors="replace")[-5000:] if server.tmp.exists() else "")
        server.stop()


def _operations(server: FuzzServer) -> list[Any]:
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def test_every_operation_is_in_the_schema(fuzz_server: FuzzServer) -> None:
    labels = {op.label for op in _operations(fuzz_server)}
    for expected in ("POST /v1/jobs", "GET /v1/jobs/{job_id}", "POST /v1/models/{ref}/predict", "POST /v1/predict",
                     "PUT /v1/aliases/{alias}", "GET /v1/models/{ref}/weights", "GET /readyz"):
        assert any(label.replace("{id}", "{job_id}") == expected or label == expected for label in labels), (
            expected, sorted(labels))


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(fuzz_server: FuzzServer, mode: GenerationMode) -> None:
    """Valid (positive) and invalid (negative) requests for every operation: never a 5xx."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    failures: list[str] = []
    counts: dict[str, int] = {}
    session = requests.Session()

    def fuzz(operation: Any) -> None:
        label = operation.label

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def run(case: Any) -> None:
            if case.path_parameters and counts.get(label, 0) % 2:
                for name in ("ref", "model_id"):  # half the time the real model, so the routes do real work
                    if name in case.path_parameters:
                        case.path_parameters[name] = fuzz_server.model_id
            counts[label] = counts.get(label, 0) + 1
            response = case.call(base_url=fuzz_server.base_url, headers=headers, session=session, timeout=30)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: "
                                f"{response.text[:300]}")

        try:
            run()
        except Unsatisfiable:
            # No invalid request exists for an operation without parameters or body (GET /healthz, say).
            assert mode is GenerationMode.NEGATIVE, label

    for operation in _operations(fuzz_server):
        if not operation.path.endswith("/events"):
            # A stream stays open until its job ends; its 404/422 answers are covered by unit tests.
            fuzz(operation)
    print(f"{sum(counts.values())} requests over {len(counts)} operations ({mode.value})")
    assert not failures, "\n".join(failures[:20])
    assert sum(counts.values()) >= 5 * len(counts)
