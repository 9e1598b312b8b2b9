"""Predict under load while a training job runs on the same machine.

    .venv/bin/python bench/load_predict.py [--model-dir DIR] [--clients 16] [--requests 2000]

Starts the real stack (Redis, a Celery worker, uvicorn) serving one transfer model, submits a transfer
training job through the API, and once it is `running` sends `--requests` single-image multipart predict
requests from `--clients` concurrent clients. Prints errors (goal: 0), p50/p95/p99 latency, throughput,
and the job's status before and after the load (it must have been training throughout). The job is
cancelled afterwards.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from _common import ensure_model, percentiles, png, print_json, print_table, start_stack, test_images
from _loadgen import run_clients


def run_load(base_url: str, headers: dict[str, str], clients: int, requests: int) -> dict[str, Any]:
    x, y = test_images(256, seed=3)
    load = run_clients(base_url, headers, [png(image) for image in x], clients, requests, labels=y.tolist())
    return {"requests": requests, "clients": clients, "errors": len(load.errors), "first_errors": load.errors[:3],
            "wall_s": load.wall_s, "requests_per_s": load.requests_per_s,
            "accuracy": load.correct / max(1, len(load.latencies)), **percentiles(load.latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="a model directory to serve (else a small transfer model is trained)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--train-samples", type=int, default=5000, help="size of the concurrent training job")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tl-bench-") as tmp:
        model_dir = ensure_model(args.model_dir, Path(tmp))
        stack = start_stack([model_dir])
        try:
            from tests.integration.harness import API_KEY

            headers = {"Authorization": f"Bearer {API_KEY}"}
            with httpx.Client(base_url=stack.base_url, headers=headers, timeout=30) as api:
                job = api.post("/v1/jobs", json={"model": "transfer", "train_samples": args.train_samples,
                                                 "test_samples": 1000, "epochs": 10, "seed": 5}).json()
                deadline = time.monotonic() + 120
                while api.get(f"/v1/jobs/{job['id']}").json()["status"] != "running":
                    if time.monotonic() > deadline:
                        raise TimeoutError("the training job did not start")
                    time.sleep(0.2)
                before = api.get(f"/v1/jobs/{job['id']}").json()
                result = run_load(stack.base_url, headers, args.clients, args.requests)
                after = api.get(f"/v1/jobs/{job['id']}").json()
                api.post(f"/v1/jobs/{job['id']}/cancel")
        finally:
            stack.stop()

    result["job_status_before"] = f"{before['status']}/{before['progress']['stage']}"
    result["job_status_after"] = f"{after['status']}/{after['progress']['stage']}"
    print_table("predict under load while training", ["figure", "value"],
                [[k, v] for k, v in result.items() if k != "first_errors"])
    if result["first_errors"]:
        print("first errors:", *result["first_errors"], sep="\n  ")
    print_json("load_predict", result)


if __name__ == "__main__":
    main()
