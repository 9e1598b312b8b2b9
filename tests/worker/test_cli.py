"""python -m worker.cli: one job from the command line, validated like the API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import testkit
from PIL import Image
from pydantic import ValidationError
from testkit import REPO

from worker.config import Settings
from worker.jobstore import Metrics
from worker.spec import JobCreate


def _run(args: list[str], settings: Settings | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if settings is not None:
        env.update(TL_DATA_DIR=str(settings.data_dir), TL_WEIGHTS_DIR=str(settings.weights_dir),
                   TL_ALLOW_DOWNLOAD="false")
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.realdata
def test_cli_trains_and_prints_one_json_line(settings: Settings, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _run(["--model", "baseline", "--train-samples", "200", "--test-samples", "100", "--epochs", "1",
                 "--output", str(out)], settings)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == set(Metrics.model_fields) | {"model_id", "model_dir", "dataset_id"}
    assert result["dataset_id"] == "cifar10"
    assert Path(result["model_dir"]) == out / "models" / result["model_id"]
    assert (Path(result["model_dir"]) / "model.keras").is_file()
    assert result["params_total"] == 93482
    assert "stage: training" in proc.stderr and "epoch 1/1" in proc.stderr  # progress goes to stderr


@pytest.mark.parametrize(("args", "body"), [
    (["--model", "transfer", "--train-samples", "99"], {"model": "transfer", "train_samples": 99}),
    (["--model", "baseline", "--dropout", "0.3"], {"model": "baseline", "dropout": 0.3}),
    (["--model", "transfer", "--alpha", "0.6"], {"model": "transfer", "alpha": 0.6}),
    (["--model", "cnn"], {"model": "cnn"}),
    (["--epochs", "3"], {"epochs": 3}),
    (["--model", "transfer", "--dense-units", "128,0"], {"model": "transfer", "dense_units": [128, 0]}),
    (["--model", "baseline", "--augment", "flip,tilt"], {"model": "baseline", "augment": ["flip", "tilt"]}),
    (["--model", "baseline", "--augment", "flip", "flip"], {"model": "baseline", "augment": ["flip", "flip"]}),
])
def test_cli_rejects_bad_arguments_with_the_apis_messages(args: list[str], body: dict[str, object],
                                                         tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as api_error:  # what POST /v1/jobs validates the same body with
        JobCreate.model_validate(body)
    proc = _run([*args, "--output", str(tmp_path)], timeout=60)
    assert proc.returncode == 2
    for error in api_error.value.errors():
        assert error["msg"] in proc.stderr
    assert proc.stdout == ""
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize(("args", "expected"), [
    (["--model", "transfer", "--dense-units", "64,", "32"], {"dense_units": [64, 32]}),
    (["--model", "transfer", "--dense-units"], {"dense_units": []}),
    (["--model", "baseline", "--augment", "flip,zoom", "contrast"], {"augment": ["flip", "zoom", "contrast"]}),
    (["--model", "baseline", "--class-weight", "balanced"], {"class_weight": "balanced"}),
    (["--model", "baseline", "--alpha", "1.0", "--name", "007"], None),
])
def test_cli_flags_map_onto_the_job_body(args: list[str], expected: dict[str, object] | None) -> None:
    from worker.cli import build_parser, spec_from_args

    values = vars(build_parser().parse_args(args))
    for name in ("output", "dataset", "test_fraction"):
        values.pop(name)
    if expected is None:  # a transfer-only flag on a baseline job: refused as the API refuses it
        with pytest.raises(ValidationError, match="transfer-only"):
            spec_from_args(values)
        return
    spec = spec_from_args(values)
    assert {name: getattr(spec, name) for name in expected} == expected


def test_cli_rejects_unknown_flags_with_exit_2(tmp_path: Path) -> None:
    proc = _run(["--model", "transfer", "--colour", "red", "--output", str(tmp_path)], timeout=60)
    assert proc.returncode == 2
    assert "unrecognized arguments: --colour red" in proc.stderr


@pytest.mark.realdata
def test_cli_refuses_more_samples_than_the_data_holds(settings: Settings, tmp_path: Path) -> None:
    proc = _run(["--model", "baseline", "--train-samples", "30000", "--output", str(tmp_path)], settings)
    assert proc.returncode == 2
    assert "train_samples=30000" in proc.stderr and "holds only 20000 images" in proc.stderr


# ----- --dataset PATH: a local folder or archive, processed into the artifact store first -----

#: Three CIFAR-10 classes (their indices) for the local folders.
FOLDER_CLASSES = {"cats": 3, "ships": 8, "trucks": 9}


def _class_folders(root: Path, classes: dict[str, int], per_class: int = 30) -> Path:
    """`root/<name>/<i>.png`: `per_class` real CIFAR-10 test images of each class."""
    with np.load(testkit.cifar10_npz("test")) as data:
        x, y = data["x"], data["y"].reshape(-1)
    for name, label in classes.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i, index in enumerate(np.flatnonzero(y == label)[:per_class]):
            Image.fromarray(x[index]).save(folder / f"{i:03d}.png")
    return root


@pytest.mark.realdata
def test_cli_trains_on_a_local_folder_of_class_folders(settings: Settings, tmp_path: Path) -> None:
    folder = _class_folders(tmp_path / "pets", FOLDER_CLASSES)
    out = tmp_path / "out"
    proc = _run(["--model", "baseline", "--dataset", str(folder), "--epochs", "2", "--batch-size", "16",
                 "--test-fraction", "0.2", "--output", str(out)], settings)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert set(result) == set(Metrics.model_fields) | {"model_id", "model_dir", "dataset_id"}
    dataset_id = result["dataset_id"]
    assert dataset_id.startswith("ds_")

    metadata = json.loads((Path(result["model_dir"]) / "metadata.json").read_text())
    assert metadata["classes"] == sorted(FOLDER_CLASSES)
    assert metadata["dataset"]["id"] == dataset_id and metadata["dataset"]["name"] == "pets"
    assert metadata["data"]["train_images"] + metadata["data"]["test_images"] == 90
    assert metadata["data"]["test_images"] == 18  # 0.2 of each class of 30
    assert len(metadata["history"]) == 2

    record = json.loads((out / "datasets" / f"{dataset_id}.json").read_text())  # kept, ready, as the API lists it
    assert record["status"] == "ready" and record["classes"] == sorted(FOLDER_CLASSES)
    assert not list((out / "datasets" / ".uploads").iterdir())  # the packed zip is gone
    assert f"dataset {dataset_id}: ready" in proc.stderr

    again = _run(["--model", "baseline", "--dataset", dataset_id, "--train-samples", "30", "--epochs", "1",
                  "--output", str(out)], settings)  # the kept dataset, by id, without processing it again
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads(again.stdout.strip().splitlines()[-1])
    assert second["dataset_id"] == dataset_id and second["model_id"] != result["model_id"]
    assert "packing folder" not in again.stderr


@pytest.mark.realdata
def test_cli_refuses_a_folder_of_one_class_with_the_datasets_message(settings: Settings, tmp_path: Path) -> None:
    folder = _class_folders(tmp_path / "lonely", {"cats": 3}, per_class=10)
    out = tmp_path / "out"
    proc = _run(["--model", "baseline", "--dataset", str(folder), "--epochs", "1", "--output", str(out)], settings)
    assert proc.returncode == 2
    assert "InvalidDataset:" in proc.stderr
    assert "found only 1 class ('cats'); a dataset needs at least 2" in proc.stderr
    assert proc.stdout == ""
    assert not (out / "models").exists()
    assert not list((out / "datasets").glob("*.json"))  # the failed dataset is not left behind


def test_cli_refuses_a_file_that_is_no_archive(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not an archive\n")
    proc = _run(["--model", "baseline", "--dataset", str(notes), "--output", str(tmp_path / "out")], timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("InvalidDataset: ") or "\nInvalidDataset: " in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(("args", "message"), [
    (["--dataset", "no-such-folder"], "--dataset no-such-folder: no such folder or archive, and no dataset of that id"),
    (["--test-fraction", "0.3"], "--test-fraction: only for a --dataset that is a local folder or archive"),
    (["--dataset", ".", "--test-fraction", "0.7"], "argument --test-fraction: must be between 0.05 and 0.5"),
])
def test_cli_rejects_bad_dataset_flags_with_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    proc = _run(["--model", "baseline", *args, "--output", str(tmp_path)], timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "datasets").exists()
