"""The curl scripts in examples/, run as a user runs them, against a live service (the integration stack)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
import testkit
from integration.harness import API_KEY, Stack, cifar10_test_images, png_bytes, shared_stack
from PIL import Image

EXAMPLES = testkit.REPO / "examples"
SCRIPTS = ["train_baseline.sh", "train_transfer.sh", "watch_job.sh", "predict.sh", "reproduce_seed.sh",
           "train_on_folder.sh"]
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


# ----- train_on_folder.sh: upload a folder of class folders, train on it, classify one of its images -----

#: Three CIFAR-10 classes (their indices) for the folder.
FOLDER_CLASSES = {"cats": 3, "ships": 8, "trucks": 9}


def class_folders(root: Path, classes: dict[str, int], per_class: int = 30) -> Path:
    """`root/<name>/<i>.png`: `per_class` real CIFAR-10 test images of each class."""
    with np.load(testkit.cifar10_npz("test")) as data:
        x, y = data["x"], data["y"].reshape(-1)
    for name, label in classes.items():
        (root / name).mkdir(parents=True)
        for i, index in enumerate(np.flatnonzero(y == label)[:per_class]):
            Image.fromarray(x[index]).save(root / name / f"{i:03d}.png")
    return root


@integration
@pytest.mark.realdata
def test_train_on_folder_uploads_trains_and_classifies(weights: None, stack: Stack,
                                                      tmp_path: Path) -> None:
    folder = class_folders(tmp_path / "pets", FOLDER_CLASSES)
    (folder / "notes.txt").write_text("not an image\n")
    result = run(stack, "train_on_folder.sh", str(folder), TRAIN_SAMPLES="", TEST_SAMPLES="", EPOCHS="2",
                 timeout=400)
    summary = json.loads(ok(result))
    classes = sorted(FOLDER_CLASSES)
    assert summary["classes"] == classes
    assert summary["dataset_id"].startswith("ds_")
    assert summary["image"] == str(folder / "cats" / "000.png")
    assert summary["prediction"]["label"] in classes and len(summary["prediction"]["top_k"]) == 3
    assert f"dataset {summary['dataset_id']} ready: 3 classes, 72 train / 18 test images" in result.stderr
    assert re.search(r"^  cats +train +24 +test +6$", result.stderr, re.MULTILINE)
    assert "skipped 1 file(s)" in result.stderr and "notes.txt: not an image" in result.stderr

    with stack.client() as client:
        dataset = client.get(f"/v1/datasets/{summary['dataset_id']}").json()
        assert dataset["status"] == "ready" and dataset["name"] == "pets"
        model = client.get(f"/v1/models/{summary['model_id']}").json()
        job = client.get(f"/v1/jobs/{summary['job_id']}").json()
    assert model["classes"] == classes
    assert job["spec"]["model"] == "transfer" and job["spec"]["dataset"] == summary["dataset_id"]
    assert job["spec"]["epochs"] == 2 and job["spec"]["image_size"] == 32 and job["spec"]["train_samples"] is None


@integration
@pytest.mark.realdata
def test_train_on_folder_stops_at_a_dataset_that_fails_its_checks(realdata: None, stack: Stack, tmp_path: Path) -> None:
    folder = class_folders(tmp_path / "lonely", {"cats": 3}, per_class=10)
    result = run(stack, "train_on_folder.sh", str(folder), timeout=120)
    assert result.returncode == 1, result.stderr
    assert re.search(r"dataset ds_\w+ failed: InvalidDataset: found only 1 class \('cats'\)", result.stderr)
    assert "job " not in result.stderr and result.stdout == ""


@integration
def test_train_on_folder_needs_one_folder(stack: Stack, tmp_path: Path) -> None:
    usage = run(stack, "train_on_folder.sh")
    assert usage.returncode == 2 and "usage" in usage.stderr
    missing = run(stack, "train_on_folder.sh", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "no such folder" in missing.stderr
