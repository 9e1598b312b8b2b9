"""python -m worker.train: one job from the command line, validated like the API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker.config import Settings
from worker.jobs import Metrics

REPO = Path(__file__).resolve().parents[2]


def _run(args: list[str], settings: Settings | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if settings is not None:
        env.update(TL_DATA_DIR=str(settings.data_dir), TL_WEIGHTS_DIR=str(settings.weights_dir),
                   TL_ALLOW_DOWNLOAD="false")
    return subprocess.run([sys.executable, "-m", "worker.train", *args], cwd=REPO, env=env, capture_output=True,
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


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "transfer", "--train-samples", "99"], "--train-samples: Input should be greater than or equal to 100"),
    (["--model", "baseline", "--dropout", "0.3"], "dropout: transfer-only field(s), not allowed for a baseline job"),
    (["--model", "transfer", "--alpha", "0.6"], "--alpha: Input should be 0.35, 0.5, 0.75, 1.0, 1.3 or 1.4"),
    (["--model", "cnn"], "--model: Input should be 'baseline' or 'transfer'"),
    (["--epochs", "3"], "--model: Field required"),
    (["--model", "transfer", "--dense-units", "128,0"], "--dense-units.1: Input should be greater than or equal to 1"),
    (["--model", "transfer", "--colour", "red"], "unrecognized arguments: --colour red"),
])
def test_cli_rejects_bad_arguments_with_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    proc = _run([*args, "--output", str(tmp_path)], timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert proc.stdout == ""
    assert not (tmp_path / "models").exists()


@pytest.mark.realdata
def test_cli_refuses_more_samples_than_the_data_holds(settings: Settings, tmp_path: Path) -> None:
    proc = _run(["--model", "baseline", "--train-samples", "30000", "--output", str(tmp_path)], settings)
    assert proc.returncode == 2
    assert "train_samples=30000" in proc.stderr and "holds only 20000 images" in proc.stderr
