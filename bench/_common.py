"""Shared pieces of the benchmarks: a model to measure, a running stack, percentiles and printing.

Benchmarks print figures (a table and one JSON line); they assert nothing about speed. Ratios are taken
within one run, since this machine is shared and noisy.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def shared_dir(name: str) -> Path:
    """TL_DATA_DIR / TL_WEIGHTS_DIR from the environment, else ../shared/<name> beside the repository."""
    env = {"data": "TL_DATA_DIR", "weights": "TL_WEIGHTS_DIR"}[name]
    return Path(os.environ.get(env) or ROOT.parent / "shared" / name).resolve()


def test_images(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Real CIFAR-10 test images (uint8 Nx32x32x3) and labels."""
    with np.load(shared_dir("data") / "cifar10" / "test.npz") as data:
        x, y = data["x"], data["y"].reshape(-1)
    index = np.random.default_rng(seed).choice(len(x), size=count, replace=False)
    return x[index], y[index].astype(int)


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def train_with_cli(out_dir: Path, model: str = "transfer", **fields: Any) -> dict[str, Any]:
    """Run one job with `python -m worker.cli`; returns its JSON line (metrics, model_id, model_dir)."""
    argv = [sys.executable, "-m", "worker.cli", "--model", model, "--output", str(out_dir)]
    for name, value in fields.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    env = {**os.environ, "TL_DATA_DIR": str(shared_dir("data")), "TL_WEIGHTS_DIR": str(shared_dir("weights"))}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker.cli failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def ensure_model(model_dir: str | None, work: Path, **fields: Any) -> Path:
    """An existing model directory, or a transfer model trained now (small: serving cost does not depend on it)."""
    if model_dir:
        return Path(model_dir).resolve()
    print("training a transfer model to serve (worker.cli) ...", file=sys.stderr, flush=True)
    fields = {"train_samples": 1000, "test_samples": 200, "epochs": 2, "seed": 42, **fields}
    return Path(train_with_cli(work / "trained", **fields)["model_dir"])


def start_stack(models: Sequence[Path] = (), env: dict[str, str] | None = None) -> Any:
    """The integration tests' real stack (Redis, one Celery worker, uvicorn) with `models` copied in."""
    os.environ.setdefault("TL_DATA_DIR", str(shared_dir("data")))
    os.environ.setdefault("TL_WEIGHTS_DIR", str(shared_dir("weights")))
    from tests.integration.harness import Stack

    # A Redis server of its own, never a database others may be using.
    stack = Stack(private_redis=True, extra_env=env)
    for model in models:
        shutil.copytree(model, stack.artifact_dir / "models" / model.name)
    return stack.start()


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99 and mean of `samples` (seconds) in milliseconds."""
    data = sorted(samples)

    def pick(q: float) -> float:
        return data[min(len(data) - 1, max(0, round(q * (len(data) - 1))))] * 1000

    return {"p50_ms": pick(0.50), "p95_ms": pick(0.95), "p99_ms": pick(0.99),
            "mean_ms": statistics.fmean(data) * 1000, "n": len(data)}


def timed(fn: Callable[[], Any], repeat: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def print_json(name: str, payload: dict[str, Any]) -> None:
    print(json.dumps({"bench": name, **payload}, sort_keys=True))
