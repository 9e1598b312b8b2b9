"""The curl scripts in examples/, run as a user runs them, against a live service (the integration stack)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import httpx
import pytest
import testkit
from integration.harness import API_KEY, Stack, cifar10_test_images, png_bytes, shared_stack

EXAMPLES = testkit.REPO / "examples"
SCRIPTS = ["train_baseline.sh", "train_transfer.sh", "watch_job.sh", "predict.sh", "reproduce_seed.sh"]
#: Small settings the scripts take from the environment, so the whole file runs in a couple of minutes.
SMALL = {"TRAIN_SAMPLES": "200", "TEST_SAMPLES": "100", "EPOCHS": "1", "IMAGE_SIZE": "32", "POLL": "1"}

integration = pytest.mark.integration


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_executable_bash(script: str) -> None:
    path = EXAMPLES / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    assert path.read_text().startswith("#!/usr/bin/env bash\n")
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest, redis_server: testkit.RedisServer) -> Stack:
    return shared_stack(request, redis_server)


@pytest.fixture(scope="module")
def realdata() -> None:
    testkit.require_data()


@pytest.fixture(scope="module")
def weights(realdata: None) -> None:
    testkit.require_weights()


def run(stack: Stack, *args: str, timeout: float = 300, key: str = API_KEY,
        **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "BASE_URL": stack.base_url, "TL_API_KEY": key, **SMALL, **env}
    return subprocess.run([str(EXAMPLES / args[0]), *args[1:]], env=environment, capture_output=True, text=True,
                          timeout=timeout, cwd=EXAMPLES.parent)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result.stdout


@integration
@pytest.mark.realdata
def test_train_baseline_watch_and_predict(realdata: None, stack: Stack, tmp_path: Path) -> None:
    job = json.loads(ok(run(stack, "train_baseline.sh")))
    assert job["status"] == "queued" and job["spec"]["model"] == "baseline"
    assert job["spec"]["train_samples"] == 200 and job["spec"]["epochs"] == 1

    stream = ok(run(stack, "watch_job.sh", job["id"], timeout=300))  # returns once the server closes the stream
    events = [json.loads(line[len("data:"):]) for line in stream.splitlines() if line.startswith("data:")]
    assert "event: job" in stream
    assert events and events[-1]["status"] == "succeeded"
    model_id = events[-1]["model_id"]

    image = tmp_path / "image.png"
    image.write_bytes(png_bytes(cifar10_test_images(1, seed=5)[0][0]))
    result = json.loads(ok(run(stack, "predict.sh", str(image), model_id, TOP_K="2")))
    assert result["model_id"] == model_id
    assert len(result["predictions"]) == 1 and len(result["predictions"][0]["top_k"]) == 2
    result = json.loads(ok(run(stack, "predict.sh", str(image))))  # no ref: `default`, else the newest model
    assert len(result["predictions"]) == 1


@integration
def test_scripts_fail_loudly(stack: Stack, tmp_path: Path) -> None:
    refused = run(stack, "train_baseline.sh", key="wrong-key")
    assert refused.returncode != 0 and "401" in refused.stderr + refused.stdout
    missing = run(stack, "predict.sh", str(tmp_path / "nothing.png"))
    assert missing.returncode == 2 and "no such file" in missing.stderr
    usage = run(stack, "watch_job.sh")
    assert usage.returncode == 2 and "usage" in usage.stderr


@integration
@pytest.mark.realdata
def test_train_transfer_waits_for_the_end(weights: None, stack: Stack) -> None:
    job = json.loads(ok(run(stack, "train_transfer.sh", WAIT="1", DENSE_UNITS="32", timeout=400)))
    assert job["status"] == "succeeded", job
    assert job["spec"]["image_size"] == 32 and job["spec"]["dense_units"] == [32]


@integration
@pytest.mark.realdata
@pytest.mark.slow
def test_reproduce_seed_prints_the_side_by_side_table(weights: None, stack: Stack) -> None:
    out = ok(run(stack, "reproduce_seed.sh", timeout=600))
    for row in ("train accuracy", "test accuracy", "total params", "trainable params", "seconds"):
        assert re.search(rf"^\| {row} +\| +[\d.,]+ \| +[\d.,]+ \|$", out, re.MULTILINE), row
    links = re.findall(r"^(baseline|transfer) curves: (\S+/curves\.png)$", out, re.MULTILINE)
    assert [kind for kind, _ in links] == ["baseline", "transfer"]
    for _, url in links:
        response = httpx.get(url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
        assert response.status_code == 200 and response.content.startswith(b"\x89PNG")
