"""Latency, size and agreement of the TFLite exports (float32, float16, int8) in LiteRT on this CPU.

    .venv/bin/python bench/exports.py [--model-dir artifacts/models/m_...] [--images 500] [--repeat 50]

For one model (else a small transfer model is trained, `ensure_model`): each format's file size (and its share
of the float32 file), p50 per image at batch 1 and at batch 64, and top-1 agreement with model.keras and test
accuracy on real CIFAR-10 test images. A format the model directory lacks (an export that failed its check is
not shipped) is made here with the worker's own conversion (`worker.engine.exports`), calibrated on training
images. Inputs are as a client sends them: float32 raw pixels for float32 and float16, uint8 for int8.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import ensure_model, percentiles, print_json, print_table, shared_dir, test_images, timed


def _contents(model_dir: Path) -> dict[str, bytes]:
    from worker.engine import exports

    with np.load(shared_dir("data") / "cifar10" / "train.npz") as data:
        calibration = exports.calibration_images(data["x"][:5000])
    out = {"float32": (model_dir / "model.tflite").read_bytes()}
    for name, path, make in (("float16", exports.FILES[exports.FLOAT16], exports.convert_float16),
                             ("int8", exports.FILES[exports.INT8], exports.convert_int8)):
        file = model_dir / path
        started = time.perf_counter()
        out[name] = file.read_bytes() if file.exists() else make(out["float32"], calibration)
        if not file.exists():
            print(f"{name}: made here in {time.perf_counter() - started:.1f} s (not in the model directory)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="a model directory with model.keras and model.tflite (else one is trained)")
    parser.add_argument("--images", type=int, default=500, help="test images for agreement and accuracy")
    parser.add_argument("--repeat", type=int, default=50, help="timed single-image runs per format")
    args = parser.parse_args()

    import keras

    from worker.litert import LiteRTInterpreter, cpu_threads, run_batches

    with tempfile.TemporaryDirectory(prefix="tl-bench-") as tmp:
        model_dir = ensure_model(args.model_dir, Path(tmp))
        model = keras.saving.load_model(str(model_dir / "model.keras"), compile=False)
        contents = _contents(model_dir)
    x, y = test_images(args.images, seed=3)
    keras_top1 = model.predict(x.astype(np.float32), verbose=0).argmax(axis=1)
    results: dict[str, Any] = {}
    for name, content in contents.items():
        dtype = np.uint8 if name == "int8" else np.float32
        images = x.astype(dtype)
        probs = run_batches(content, images, batch_size=64)
        one = LiteRTInterpreter(content, cpu_threads())
        many = LiteRTInterpreter(content, cpu_threads())
        single = percentiles(timed(lambda: one.run(images[:1]), args.repeat))  # noqa: B023
        batch = percentiles(timed(lambda: many.run(images[:64]), max(5, args.repeat // 5)))  # noqa: B023
        results[name] = {"bytes": len(content), "share_of_float32": len(content) / len(contents["float32"]),
                         "batch1_p50_ms": single["p50_ms"], "batch64_p50_per_image_ms": batch["p50_ms"] / 64,
                         "top1_agreement": float(np.mean(probs.argmax(axis=1) == keras_top1)),
                         "test_accuracy": float(np.mean(probs.argmax(axis=1) == y))}
    rows = [[name, r["bytes"] / 1e6, r["share_of_float32"], r["batch1_p50_ms"], r["batch64_p50_per_image_ms"],
             r["top1_agreement"], r["test_accuracy"]] for name, r in results.items()]
    print_table(f"TFLite exports in LiteRT ({cpu_threads()} threads, {args.images} test images)",
                ["format", "MB", "of float32", "batch 1 p50 ms", "batch 64 p50 ms/image", "agreement", "accuracy"],
                rows)
    print_json("exports", {"model_dir": str(model_dir), "images": args.images, "formats": results})


if __name__ == "__main__":
    main()
