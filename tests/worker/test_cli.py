"""python -m worker.cli: one job from the command line, validated like the API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
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
    assert set(result) == set(Metrics.model_fields) | {"model_id", "model_dir"}
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


def test_cli_rejects_unknown_flags_with_exit_2(tmp_path: Path) -> None:
    proc = _run(["--model", "transfer", "--colour", "red", "--output", str(tmp_path)], timeout=60)
    assert proc.returncode == 2
    assert "unrecognized arguments: --colour red" in proc.stderr


@pytest.mark.realdata
def test_cli_refuses_more_samples_than_the_data_holds(settings: Settings, tmp_path: Path) -> None:
    proc = _run(["--model", "baseline", "--train-samples", "30000", "--output", str(tmp_path)], settings)
    assert proc.returncode == 2
    assert "train_samples=30000" in proc.stderr and "holds only 20000 images" in proc.stderr
