"""A Python client generated from the service's own `/openapi.json` by `openapi-python-client` works: it creates a
job and reads it back, lists jobs and reads a model, with typed `spec` and `metrics` (no free-form dicts)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from fastapi.testclient import TestClient
from svc_helpers import add_model

PACKAGE = "tl_generated_client"


@pytest.fixture
def generated(client: TestClient, tmp_path: Path) -> Iterator[ModuleType]:
    """The client package generated from this app's OpenAPI document, importable for the test's duration."""
    spec = tmp_path / "openapi.json"
    spec.write_text(json.dumps(client.get("/openapi.json").json()))
    generator = Path(sys.executable).with_name("openapi-python-client")
    env = {**os.environ, "PATH": f"{generator.parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # its ruff pass
    done = subprocess.run([str(generator), "generate", "--path", str(spec), "--output-path", str(tmp_path / PACKAGE),
                           "--meta", "none"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Unable to process schema" not in done.stdout, done.stdout  # every schema became a model class
    sys.path.insert(0, str(tmp_path))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(tmp_path))
        for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def api(package: ModuleType, module: str) -> Any:
    return importlib.import_module(f"{package.__name__}.api.{module}")


def models(package: ModuleType) -> Any:
    return importlib.import_module(f"{package.__name__}.models")


def connect(package: ModuleType, client: TestClient) -> Any:
    """A generated `Client` whose requests go to the app (the TestClient is an httpx.Client)."""
    generated_client = package.Client(base_url=str(client.base_url))
    generated_client.set_httpx_client(client)
    return generated_client


def test_a_generated_client_creates_a_job_and_reads_it(generated: ModuleType, client: TestClient) -> None:
    m = models(generated)
    tl = connect(generated, client)
    body = m.JobCreate(model=m.JobCreateModel.BASELINE, epochs=2, train_samples=200, name="from-generated-client")
    created = api(generated, "jobs.create_job").sync_detailed(client=tl, body=body)
    assert created.status_code == 202, created.content
    job = created.parsed
    assert isinstance(job, m.Job) and job.status == m.JobStatus.QUEUED
    assert created.headers["location"] == f"/v1/jobs/{job.id}"

    read = api(generated, "jobs.get_job").sync(job.id, client=tl)
    assert isinstance(read, m.Job) and read.id == job.id
    assert isinstance(read.spec, m.JobSpec)  # typed, not a dict
    assert read.spec.model == m.JobSpecModel.BASELINE and read.spec.epochs == 2 and read.spec.train_samples == 200
    assert read.spec.name == "from-generated-client" and read.spec.batch_size == 32  # defaults filled in
    assert read.spec.to_dict() == client.get(f"/v1/jobs/{job.id}").json()["spec"]  # the same JSON as before

    listed = api(generated, "jobs.list_jobs").sync(client=tl)
    assert [j.id for j in listed.items] == [job.id]
    cancelled = api(generated, "jobs.cancel_job").sync(job.id, client=tl)
    assert cancelled.status == m.JobStatus.CANCELLED


def test_a_generated_client_reads_typed_models(generated: ModuleType, client: TestClient, artifact_dir: Path,
                                               trained_model: Path) -> None:
    add_model(artifact_dir, trained_model, "m_generated0000000")
    m = models(generated)
    tl = connect(generated, client)
    model = api(generated, "models.get_model").sync("latest", client=tl)
    assert isinstance(model, m.ModelInfo) and model.id == "m_generated0000000"
    assert isinstance(model.spec, m.JobSpec) and model.spec.model == m.JobSpecModel.BASELINE
    assert isinstance(model.metrics, m.Metrics) and 0 <= model.metrics.test_accuracy <= 1
    assert isinstance(model.dataset, m.DatasetRef) and model.dataset.id == "cifar10"
    assert model.to_dict() == client.get("/v1/models/latest").json()
    missing = api(generated, "models.get_model").sync_detailed("m_missing", client=tl)
    assert missing.status_code == 404 and isinstance(missing.parsed, m.Problem)
