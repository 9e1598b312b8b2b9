"""Uploaded datasets (issue 11): upload + processing time per 1,000 images, and a transfer job on an uploaded
dataset (cold and warm feature cache) against the reference way on the same images.

    .venv/bin/python bench/datasets.py                 # N=1000 and N=3000 uploads; 10-epoch jobs on N=3000
    .venv/bin/python bench/datasets.py --quick         # smoke run: N=600, 3 epochs
    .venv/bin/python bench/datasets.py --images 1000 3000 --epochs 10

1. Uploads: a zip of N JPEG images (CIFAR-10 training images upscaled 32 -> 200 px with Pillow, bicubic, JPEG
   quality 90) in 10 class folders named by CIFAR-10's classes, N/10 per class, seeded; sent raw
   (`POST /v1/datasets`, `application/zip`) to a live stack (tests/integration/harness.py: Redis, the training
   and dataset workers, uvicorn). Timed: the upload request (body sent -> 202), and 202 -> `ready` (polling
   `GET /v1/datasets/{id}`), each also per 1,000 images.
2. Training on the largest upload (default test_fraction 0.2): a transfer job at image_size 96 through HTTP,
   twice with the same spec: cold (the first job on the dataset, features extracted) and warm (features from
   the cache). Job wall seconds are the record's created_at -> finished_at. Then the reference way, in this
   process after the stack is stopped: the dataset's stored arrays (worker.datasets.load_arrays) resized to
   image_size (worker.engine.datasets.resize_images), the whole transfer model (build_transfer + resolve_weights)
   compiled with Adam and sparse categorical cross-entropy and trained with plain `model.fit`, same epochs,
   batch size, learning rate and seed, validated on the test split each epoch as the engine's loop is.

Prints tables and one JSON line; asserts nothing (the machine is shared: compare ratios within one run).
Data and weights: TL_DATA_DIR / TL_WEIGHTS_DIR, else ../shared.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import zipfile
from datetime import datetime
from typing import Any

import httpx
import numpy as np
from _common import print_json, print_table, shared_dir, start_stack

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TERMINAL = {"succeeded", "failed", "cancelled"}


# ----- the archive -----

def pick_images(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` CIFAR-10 training images, count/10 of each class (the rest spread over the first classes), seeded."""
    with np.load(shared_dir("data") / "cifar10" / "train.npz") as data:
        x, y = data["x"], data["y"].reshape(-1)
    rng = np.random.default_rng(seed)
    per_class = [count // 10 + (1 if c < count % 10 else 0) for c in range(10)]
    index = np.concatenate([rng.choice(np.flatnonzero(y == c), size=n, replace=False)
                            for c, n in enumerate(per_class)])
    return x[index], y[index].astype(int)


def build_zip(x: np.ndarray, y: np.ndarray, size: int) -> bytes:
    """Class folders of JPEGs (quality 90) upscaled to size x size, deflated as common zip tools do."""
    from PIL import Image

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for i, (pixels, label) in enumerate(zip(x, y, strict=True)):
            jpeg = io.BytesIO()
            Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC).save(jpeg, format="JPEG",
                                                                                       quality=90)
            archive.writestr(f"{CIFAR10_CLASSES[label]}/{i:05d}.jpg", jpeg.getvalue())
    return buffer.getvalue()


# ----- through the API -----

def iso_seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def upload(api: httpx.Client, body: bytes, name: str, images: int, poll: float) -> dict[str, Any]:
    start = time.perf_counter()
    response = api.post("/v1/datasets", content=body, params={"name": name},
                        headers={"Content-Type": "application/zip"})
    accepted = time.perf_counter()
    if response.status_code != 202:
        raise RuntimeError(f"upload refused: {response.status_code} {response.text[:500]}")
    dataset_id = response.json()["id"]
    polls = 0
    while True:
        record = api.get(f"/v1/datasets/{dataset_id}").json()
        polls += 1
        if record["status"] != "processing":
            break
        if time.perf_counter() - accepted > 1800:
            raise TimeoutError(f"dataset {dataset_id} still processing after 1800 s")
        time.sleep(poll)
    ready = time.perf_counter()
    if record["status"] != "ready":
        raise RuntimeError(f"dataset {dataset_id} ended {record['status']}: {record.get('error')}")
    upload_s, processing_s = accepted - start, ready - accepted
    return {"id": dataset_id, "images": images, "archive_bytes": len(body), "upload_s": round(upload_s, 3),
            "processing_s": round(processing_s, 3), "total_s": round(upload_s + processing_s, 3),
            "upload_s_per_1000": round(1000 * upload_s / images, 3),
            "processing_s_per_1000": round(1000 * processing_s / images, 3),
            "total_s_per_1000": round(1000 * (upload_s + processing_s) / images, 3),
            "train": sum(record["counts"]["train"].values()), "test": sum(record["counts"]["test"].values()),
            "skipped": record.get("skipped_count", 0), "duplicates": record.get("duplicates"),
            "stored_bytes": record.get("bytes"), "image_shape": record.get("image_shape"), "polls": polls}


def run_job(api: httpx.Client, stack: Any, body: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    response = api.post("/v1/jobs", json=body)
    if response.status_code != 202:
        raise RuntimeError(f"job refused: {response.status_code} {response.text[:500]}")
    job_id = response.json()["id"]
    stages: dict[str, float] = {}
    while True:
        job = api.get(f"/v1/jobs/{job_id}").json()
        stage = (job.get("progress") or {}).get("stage")
        if stage and stage not in stages:
            stages[stage] = round(time.perf_counter() - start, 2)
        if job["status"] in TERMINAL:
            break
        if time.perf_counter() - start > 3600:
            raise TimeoutError(f"job {job_id} still {job['status']} after 3600 s")
        time.sleep(0.5)
    client_s = time.perf_counter() - start
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job_id} ended {job['status']}: {job.get('error')}")
    metrics = job["metrics"]
    out: dict[str, Any] = {
        "job_id": job_id, "model_id": job["model_id"],
        "wall_s": round(iso_seconds(job["finished_at"]) - iso_seconds(job["created_at"]), 2),
        "queued_s": round(iso_seconds(job["started_at"]) - iso_seconds(job["created_at"]), 2),
        "client_s": round(client_s, 2), "test_accuracy": round(metrics["test_accuracy"], 4),
        "macro_f1": round(metrics["macro_f1"], 4), "train_seconds": metrics["train_seconds"],
        "stage_first_seen_s": stages}
    metadata_file = stack.artifact_dir / "models" / job["model_id"] / "metadata.json"
    if metadata_file.is_file():
        metadata = json.loads(metadata_file.read_text())
        out["timings"] = metadata.get("timings")
        out["feature_cache"] = (metadata.get("training") or {}).get("feature_cache")
    return out


# ----- the reference way -----

def reference_way(arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]],
                  body: dict[str, Any]) -> dict[str, Any]:
    """Plain `fit` of the whole transfer model (frozen MobileNetV2 + head) on the dataset's images."""
    from worker.config import Settings
    from worker.engine.runtime import configure_tensorflow
    from worker.spec import JobCreate

    settings = Settings()
    if settings.weights_dir is None:
        settings = settings.model_copy(update={"weights_dir": shared_dir("weights")})
    configure_tensorflow(settings)
    import keras

    from worker.engine.datasets import resize_images
    from worker.engine.evaluation import evaluate
    from worker.engine.models import build_transfer
    from worker.engine.weights import resolve_weights

    spec = JobCreate(**body)
    x_train, y_train, x_test, y_test, classes = arrays
    started = time.perf_counter()
    size = spec.image_size
    x_train_in = resize_images(x_train, size).astype(np.float32)
    x_test_in = resize_images(x_test, size).astype(np.float32)
    y_train, y_test = np.asarray(y_train, np.int64), np.asarray(y_test, np.int64)
    resized = time.perf_counter()
    keras.utils.set_random_seed(spec.seed)
    model = build_transfer(spec, resolve_weights(settings, spec.alpha, size), len(classes), (size, size, 3)).model
    model.compile(optimizer=keras.optimizers.Adam(spec.learning_rate), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    built = time.perf_counter()
    model.fit(x_train_in, y_train, batch_size=spec.batch_size, epochs=spec.epochs,
              validation_data=(x_test_in, y_test), verbose=0)
    fitted = time.perf_counter()
    probabilities = model.predict(x_test_in, batch_size=256, verbose=0)
    accuracy = float(np.mean(probabilities.argmax(axis=1) == y_test))
    macro_f1 = evaluate(y_test, probabilities.argmax(axis=1), classes).macro_f1
    return {"wall_s": round(time.perf_counter() - started, 2), "resize_s": round(resized - started, 2),
            "build_s": round(built - resized, 2), "fit_s": round(fitted - built, 2),
            "epoch_s": round((fitted - built) / spec.epochs, 2), "test_accuracy": round(accuracy, 4),
            "macro_f1": round(float(macro_f1), 4), "train": len(y_train), "test": len(y_test)}


# ----- main -----

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=None,
                        help="archive sizes to upload (default 1000 3000); the jobs train on the largest")
    parser.add_argument("--epochs", type=int, default=None, help="job epochs (default 10)")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--jpeg-size", type=int, default=200, help="side of the JPEGs in the archive")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--poll", type=float, default=0.1, help="seconds between dataset polls")
    parser.add_argument("--idle-wait", type=float, default=15.0,
                        help="seconds to let the training worker's new pool child import TensorFlow before a job")
    parser.add_argument("--quick", action="store_true", help="smoke run: --images 600 --epochs 3")
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args()
    sizes = sorted(args.images or ([600] if args.quick else [1000, 3000]))
    epochs = args.epochs or (3 if args.quick else 10)

    archives = {}
    for n in sizes:
        started = time.perf_counter()
        archives[n] = build_zip(*pick_images(n, args.seed), args.jpeg_size)
        print(f"built a zip of {n} JPEGs ({len(archives[n]) / 2**20:.1f} MiB) in "
              f"{time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)

    out: dict[str, Any] = {"cpus": os.cpu_count(), "jpeg_size": args.jpeg_size, "epochs": epochs,
                           "image_size": args.image_size, "uploads": [], "quick": args.quick}
    stack = start_stack()
    try:
        from tests.integration.harness import API_KEY

        with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {API_KEY}"},
                          timeout=600) as api:
            for n in sizes:
                print(f"uploading {n} images ...", file=sys.stderr, flush=True)
                row = upload(api, archives[n], f"cifar-jpeg-{n}", n, args.poll)
                out["uploads"].append(row)
                print(f"  upload {row['upload_s']:.2f} s, processing {row['processing_s']:.2f} s",
                      file=sys.stderr, flush=True)
            dataset = out["uploads"][-1]
            body = {"model": "transfer", "dataset": dataset["id"], "epochs": epochs, "image_size": args.image_size,
                    "seed": args.seed}
            out["job_spec"] = body
            for name in ("cold", "warm"):
                time.sleep(args.idle_wait)
                print(f"transfer job, {name} feature cache ...", file=sys.stderr, flush=True)
                out[f"job_{name}"] = run_job(api, stack, body)
                print(f"  {out[f'job_{name}']['wall_s']:.1f} s", file=sys.stderr, flush=True)
        from worker.datasets import load_arrays

        arrays = load_arrays(stack.artifact_dir / "datasets" / dataset["id"], mmap=False)
    finally:
        stack.stop()

    if not args.skip_reference:
        print("reference way (plain fit of the whole model) ...", file=sys.stderr, flush=True)
        out["reference"] = reference_way(arrays, body)
        for name in ("cold", "warm"):
            out[f"reference_over_{name}"] = round(out["reference"]["wall_s"] / out[f"job_{name}"]["wall_s"], 2)

    print_table("uploads (raw application/zip; processing = 202 -> ready)",
                ["images", "archive MiB", "upload s", "processing s", "upload s/1000", "processing s/1000",
                 "total s/1000", "train/test", "skipped"],
                [[r["images"], r["archive_bytes"] / 2**20, r["upload_s"], r["processing_s"], r["upload_s_per_1000"],
                  r["processing_s_per_1000"], r["total_s_per_1000"], f"{r['train']}/{r['test']}", r["skipped"]]
                 for r in out["uploads"]])
    rows = [[f"service job, {name} cache", out[f"job_{name}"]["wall_s"], out[f"job_{name}"]["test_accuracy"],
             out[f"job_{name}"]["macro_f1"],
             f"{out['reference']['wall_s'] / out[f'job_{name}']['wall_s']:.2f}x" if "reference" in out else "-"]
            for name in ("cold", "warm")]
    if "reference" in out:
        ref = out["reference"]
        rows.insert(0, ["reference (plain fit)", ref["wall_s"], ref["test_accuracy"], ref["macro_f1"], "1.00x"])
    print_table(f"transfer on {dataset['train']}/{dataset['test']} uploaded images, {epochs} epochs, "
                f"{args.image_size}px", ["run", "wall s", "test acc", "macro F1", "reference / run"], rows)
    for name in ("cold", "warm"):
        job = out[f"job_{name}"]
        timings = ", ".join(f"{k} {v:.2f}s" for k, v in (job.get("timings") or {}).items())
        print(f"{name}: queued {job['queued_s']} s; stages {timings}; feature cache {job.get('feature_cache')}")
    if "reference" in out:
        ref = out["reference"]
        print(f"reference: resize {ref['resize_s']} s, build {ref['build_s']} s, fit {ref['fit_s']} s "
              f"({ref['epoch_s']} s/epoch)")
    print_json("datasets", out)


if __name__ == "__main__":
    main()
