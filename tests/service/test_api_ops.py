"""Operations (/healthz, /readyz, /metrics), the OpenAPI document, and bearer-key authentication."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from svc_helpers import assert_problem, make_settings
from testkit import REPO

from worker.config import Settings

KEY = "s3cret-key"


def test_healthz(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_readyz_reports_redis_and_no_workers_on_our_database(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"redis": "ok", "workers": 0}


def test_metrics_count_requests_by_route_template_and_status(client: TestClient) -> None:
    client.get("/v1/jobs/j_missing1")
    client.get("/v1/jobs/j_missing2")
    client.post("/v1/jobs", json={"model": "baseline", "epochs": 1})
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'tl_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"} 2.0' in text
    assert 'tl_http_requests_total{method="POST",route="/v1/jobs",status="202"} 1.0' in text
    assert "j_missing1" not in text  # raw paths never become labels
    assert re.search(r'tl_http_request_duration_seconds_bucket\{le="0.005",method="GET",'
                     r'route="/v1/jobs/\{job_id\}",status="404"\}', text)
    assert 'tl_jobs{status="queued"} 1.0' in text and 'tl_jobs{status="running"} 0.0' in text
    assert "tl_job_store_up 1.0" in text
    assert "tl_predictions_total 0.0" in text


def test_metrics_label_unknown_paths_as_unmatched(client: TestClient) -> None:
    client.get("/no/such/path")
    assert 'route="<unmatched>",status="404"' in client.get("/metrics").text


def test_docs_and_openapi_are_served_and_redoc_is_not(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/redoc").status_code == 404


def test_openapi_documents_every_route(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    expected = {
        ("/v1/jobs", "post"), ("/v1/jobs", "get"), ("/v1/jobs/{job_id}", "get"), ("/v1/jobs/{job_id}/cancel", "post"),
        ("/v1/jobs/{job_id}/events", "get"), ("/v1/models", "get"), ("/v1/models/{ref}", "get"),
        ("/v1/models/{model_id}", "delete"), ("/v1/models/{ref}/weights", "get"),
        ("/v1/models/{ref}/curves.png", "get"), ("/v1/models/{ref}/confusion.png", "get"),
        ("/v1/models/{ref}/predict", "post"), ("/v1/predict", "post"), ("/v1/aliases", "get"),
        ("/v1/aliases/{alias}", "put"), ("/v1/aliases/{alias}", "delete"), ("/healthz", "get"), ("/readyz", "get"),
        ("/v1/datasets", "post"), ("/v1/datasets", "get"), ("/v1/datasets/{dataset_id}", "get"),
        ("/v1/datasets/{dataset_id}", "delete"), ("/v1/datasets/{dataset_id}/preview.png", "get"),
        ("/metrics", "get"),
        ("/v2/health/live", "get"), ("/v2/health/ready", "get"), ("/v2", "get"), ("/v2/models/{name}", "get"),
        ("/v2/models/{name}/versions/{model_id}", "get"), ("/v2/models/{name}/ready", "get"),
        ("/v2/models/{name}/versions/{model_id}/ready", "get"), ("/v2/models/{name}/infer", "post"),
        ("/v2/models/{name}/versions/{model_id}/infer", "post"), ("/v1/models/{name}:predict", "post"),
        ("/v1/models/{name}/versions/{model_id}:predict", "post"),
    }
    found = {(path, method) for path, ops in schema["paths"].items() for method in ops}
    assert found == expected
    for path, ops in schema["paths"].items():
        protocol = path.startswith("/v2") or path.endswith(":predict")  # errors are the protocols' {"error"}
        for method, op in ops.items():
            assert op.get("summary") and op.get("description"), (path, method)
            success = [code for code in op["responses"] if code.startswith("2")]
            assert success, (path, method)
            for code, response in op["responses"].items():
                if protocol and code[0] in "45":
                    assert response["content"] == {"application/json": {"schema": {
                        "$ref": "#/components/schemas/ProtocolError"}}}, (path, method, code)
                elif code[0] in "45" and code != "503" or (code == "503" and path != "/readyz"):
                    assert list(response["content"]) == ["application/problem+json"], (path, method, code)
            if path.startswith("/v1") or (path.startswith("/v2") and not path.startswith("/v2/health/")):
                assert {"bearerAuth": []} in op["security"]
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    assert {"type", "title", "status", "detail", "errors"} <= set(schema["components"]["schemas"]["Problem"]
                                                                   ["properties"])


def test_every_operation_has_a_camel_case_operation_id(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    ids = {(path, method): op["operationId"] for path, ops in schema["paths"].items() for method, op in ops.items()}
    assert len(set(ids.values())) == len(ids)
    assert all(re.fullmatch(r"[a-z]+(?:[A-Z][a-z0-9]*)*", op_id) for op_id in ids.values()), ids
    assert {ids[("/v1/jobs", "post")], ids[("/v1/jobs", "get")], ids[("/v1/jobs/{job_id}", "get")],
            ids[("/v1/jobs/{job_id}/cancel", "post")], ids[("/v1/jobs/{job_id}/events", "get")],
            ids[("/v1/models", "get")], ids[("/v1/models/{ref}", "get")], ids[("/v1/models/{model_id}", "delete")],
            ids[("/v2/models/{name}/infer", "post")]} == {
        "createJob", "listJobs", "getJob", "cancelJob", "streamJobEvents", "listModels", "getModel", "deleteModel",
        "inferModel"}


def _free_form(schema: dict[str, object]) -> bool:
    """A schema that says nothing about its value (`Any`), or an object that says nothing about its fields
    (`dict[str, Any]`)."""
    if not set(schema) - {"title", "description", "default", "examples"}:
        return True
    if schema.get("type") != "object" or "properties" in schema:
        return False
    extra = schema.get("additionalProperties", True)
    return extra is True or extra == {}


def test_jobs_and_models_have_typed_spec_metrics_dataset_and_exports(client: TestClient) -> None:
    components = client.get("/openapi.json").json()["components"]["schemas"]
    for model, field in [("Job", "spec"), ("Job", "metrics"), ("ModelInfo", "spec"), ("ModelInfo", "metrics"),
                         ("ModelInfo", "dataset")]:
        prop = components[model]["properties"][field]
        refs = [prop.get("$ref")] + [alt.get("$ref") for alt in prop.get("anyOf", [])]
        assert any(refs), (model, field, prop)
    assert components["JobSpec"]["properties"]["epochs"]["type"] == "integer"
    assert {"test_accuracy", "per_class", "confusion_matrix"} <= set(components["Metrics"]["properties"])
    for model in ("Job", "ModelInfo"):  # `exports` too, once models have them: no free-form objects
        for field, prop in components[model]["properties"].items():
            assert not _free_form(prop), (model, field, prop)
            for alt in prop.get("anyOf", []):
                assert not _free_form(alt), (model, field, prop)
            if prop.get("type") == "object" and isinstance(prop.get("additionalProperties"), dict):
                assert not _free_form(prop["additionalProperties"]) and prop["additionalProperties"], (model, field)


def test_openapi_has_examples_for_job_creation_and_predict(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    job_body = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert job_body["$ref"].endswith("/JobCreate")
    assert schema["components"]["schemas"]["JobCreate"]["examples"]
    assert schema["paths"]["/v1/jobs"]["post"]["responses"]["202"]["content"]["application/json"]["example"]
    predict = schema["paths"]["/v1/predict"]["post"]
    assert set(predict["requestBody"]["content"]) == {"multipart/form-data", "application/json", "image/png",
                                                      "image/jpeg"}
    assert predict["requestBody"]["content"]["application/json"]["example"]["instances"]
    assert schema["components"]["schemas"]["PredictResponse"]["examples"]
    for name in ("top_k", "probabilities"):
        assert any(p["name"] == name for p in predict["parameters"])


# ----- authentication -----


@pytest.fixture
def keyed(redis_url: str, artifact_dir: Path, app_client: Callable[[Settings], TestClient]) -> TestClient:
    return app_client(make_settings(redis_url, artifact_dir, api_key=KEY))


@pytest.mark.parametrize("method, path", [
    ("get", "/v1/jobs"), ("post", "/v1/jobs"), ("get", "/v1/jobs/j_x"), ("post", "/v1/jobs/j_x/cancel"),
    ("get", "/v1/jobs/j_x/events"), ("get", "/v1/models"), ("get", "/v1/models/latest"),
    ("delete", "/v1/models/m_x"), ("get", "/v1/models/latest/weights"), ("get", "/v1/models/latest/curves.png"),
    ("post", "/v1/models/latest/predict"), ("post", "/v1/predict"), ("get", "/v1/aliases"),
    ("put", "/v1/aliases/default"), ("delete", "/v1/aliases/default"), ("get", "/v1/no-such-route"),
])
def test_every_v1_route_needs_the_key(keyed: TestClient, method: str, path: str) -> None:
    response = keyed.request(method, path)
    assert_problem(response, 401, "bearer")
    assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize("header", [f"Bearer {KEY}x", f"Basic {KEY}", KEY, "Bearer", "Bearer  ",
                                    f"Bearer {KEY[:-1]}", "Bearer caf\u00e9"])
def test_a_wrong_key_is_401(keyed: TestClient, header: str) -> None:
    response = keyed.get("/v1/jobs", headers={"Authorization": header.encode("utf-8")})
    assert_problem(response, 401)
    assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_right_key_is_accepted(keyed: TestClient, scheme: str) -> None:
    response = keyed.get("/v1/jobs", headers={"Authorization": f"{scheme} {KEY}"})
    assert response.status_code == 200 and response.json() == {"items": [], "next_cursor": None}


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/docs", "/openapi.json",
                                  "/docs/oauth2-redirect"])
def test_operations_stay_open_with_a_key(keyed: TestClient, path: str) -> None:
    assert keyed.get(path).status_code == 200


def test_the_key_is_checked_before_the_body_is_looked_at(keyed: TestClient) -> None:
    response = keyed.post("/v1/predict", content=b"x", headers={"content-length": str(10**12),
                                                                "content-type": "image/png"})
    assert_problem(response, 401)


@pytest.mark.parametrize("variable, value, field", [("TL_MAX_BATCH", "0", "max_batch"),
                                                    ("TL_REDIS_URL", "http://x", "redis_url"),
                                                    ("TL_PORT", "high", "port")])
def test_bad_settings_stop_start_up_with_a_clear_message(variable: str, value: str, field: str) -> None:
    env = {**os.environ, variable: value}
    done = subprocess.run([sys.executable, "-c", "import service.main"], env=env, capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode != 0
    assert "ValidationError" in done.stderr and field in done.stderr
