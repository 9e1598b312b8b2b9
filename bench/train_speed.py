"""Training speed: the engine against the reference way, in one process, on the same subset.

    python bench/train_speed.py                      # reference config: seed 42, 5000/1000, 10 epochs, 96px
    python bench/train_speed.py --train-samples 1000 --epochs 3 --skip-reference
    python bench/train_speed.py --scaling            # transfer job at 1k, 2k, 5k, 10k, 20k training images

Rows:
1. reference: what the original notebook did: images resized to 96px (and scaled to -1..1) up front, the whole
   model (frozen MobileNetV2 + head) trained with plain `model.fit`, same head, optimizer, epochs, batch size;
2. engine (cold): `train_job` with an empty artifact directory (features extracted, then cached);
3. engine (warm): `train_job` again with the feature cache filled by row 2.
Prints a table, the engine's stage timings and one JSON line. Nothing is asserted: the machine is shared,
so compare the ratio within one run. Data and weights: TL_DATA_DIR / TL_WEIGHTS_DIR, else ../shared.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from worker.config import Settings  # noqa: E402  (after the path set-up above)
from worker.spec import JobCreate  # noqa: E402


def bench_settings(artifact_dir: Path) -> Settings:
    """Settings from the environment, with ../shared for data and weights when they are not set."""
    settings = Settings()
    update: dict[str, Any] = {"artifact_dir": artifact_dir}
    if not (settings.data_dir / "cifar10" / "train.npz").is_file():
        update["data_dir"] = ROOT.parent / "shared" / "data"
    if settings.weights_dir is None:
        update["weights_dir"] = ROOT.parent / "shared" / "weights"
    return settings.model_copy(update=update)


def reference_way(spec: JobCreate, settings: Settings) -> dict[str, Any]:
    """The original notebook's way: resize up front, plain fit of the whole model."""
    import keras
    import numpy as np
    import tensorflow as tf

    from worker.engine.data import draw_subsets, load_cifar10, take
    from worker.engine.models import build_base, head_layers
    from worker.engine.weights import resolve_weights

    started = time.perf_counter()
    dataset = load_cifar10(settings)
    train_subset, test_subset = draw_subsets(dataset, spec.train_samples, spec.test_samples, spec.seed)
    (x_train, y_train), (x_test, y_test) = take(dataset.train, train_subset), take(dataset.test, test_subset)

    def prepare(x: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(x), 500):
            resized = tf.image.resize(tf.constant(x[start:start + 500], tf.float32), (spec.image_size,) * 2)
            out.append(keras.applications.mobilenet_v2.preprocess_input(resized.numpy()))
        return np.concatenate(out)

    x_train_big, x_test_big = prepare(x_train), prepare(x_test)
    keras.utils.set_random_seed(spec.seed)
    base = build_base(spec, resolve_weights(settings, spec.alpha, spec.image_size))
    inputs = keras.Input((spec.image_size, spec.image_size, 3))
    model = keras.Model(inputs, head_layers(base(inputs, training=False), spec, 10))
    model.compile(optimizer=keras.optimizers.Adam(spec.learning_rate), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    prepared = time.perf_counter()
    history = model.fit(x_train_big, y_train, batch_size=spec.batch_size, epochs=spec.epochs,
                        validation_data=(x_test_big, y_test), verbose=0)
    fitted = time.perf_counter()
    test_loss, test_accuracy = model.evaluate(x_test_big, y_test, batch_size=256, verbose=0)
    return {"seconds": round(time.perf_counter() - started, 2), "prepare_seconds": round(prepared - started, 2),
            "fit_seconds": round(fitted - prepared, 2), "test_accuracy": round(float(test_accuracy), 4),
            "test_loss": round(float(test_loss), 4),
            "epoch_seconds": round((fitted - prepared) / spec.epochs, 2),
            "val_accuracy": [round(v, 4) for v in history.history["val_accuracy"]]}


def engine(spec: JobCreate, settings: Settings) -> dict[str, Any]:
    from worker.engine.pipeline import NullReporter, train_job

    started = time.perf_counter()
    result = train_job(spec, settings, NullReporter())
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), "test_accuracy": round(result.metrics.test_accuracy, 4),
            "test_loss": round(result.metrics.test_loss, 4), "timings": result.metadata["timings"],
            "feature_cache": result.metadata["training"].get("feature_cache"),
            "tflite": result.metadata["export"].get("passed"),
            "tflite_seconds": [result.metadata["export"].get("convert_seconds"),
                               result.metadata["export"].get("check_seconds")]}


def compare(args: argparse.Namespace) -> dict[str, Any]:
    spec = JobCreate(model="transfer", train_samples=args.train_samples, test_samples=args.test_samples,
                     epochs=args.epochs, seed=args.seed, image_size=args.image_size)
    out: dict[str, Any] = {"spec": spec.public(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="tl-bench-") as tmp:
        settings = bench_settings(Path(tmp) / "artifacts")
        from worker.engine.runtime import configure_tensorflow

        configure_tensorflow(settings)
        if not args.skip_reference:
            print("reference way (plain fit of the whole model on pre-resized images)...", file=sys.stderr)
            out["reference"] = reference_way(spec, settings)
        print("engine, cold feature cache...", file=sys.stderr)
        out["engine_cold"] = engine(spec, settings)
        print("engine, warm feature cache...", file=sys.stderr)
        out["engine_warm"] = engine(spec, settings)
    if "reference" in out:
        ref = out["reference"]["seconds"]
        out["speedup_cold"] = round(ref / out["engine_cold"]["seconds"], 2)
        out["speedup_warm"] = round(ref / out["engine_warm"]["seconds"], 2)
        out["accuracy_gap_points"] = round(
            100 * (out["engine_cold"]["test_accuracy"] - out["reference"]["test_accuracy"]), 2)
    return out


def print_comparison(out: dict[str, Any]) -> None:
    rows = [("reference (plain fit)", out.get("reference")), ("engine, cold cache", out["engine_cold"]),
            ("engine, warm cache", out["engine_warm"])]
    print(f"{'run':<24}{'wall s':>10}{'test acc':>10}{'speed-up':>10}")
    ref = out.get("reference")
    for name, row in rows:
        if row is None:
            print(f"{name:<24}{'skipped':>10}")
            continue
        speedup = f"{ref['seconds'] / row['seconds']:.1f}x" if ref else "-"
        print(f"{name:<24}{row['seconds']:>10.1f}{row['test_accuracy']:>10.4f}{speedup:>10}")
    for name in ("engine_cold", "engine_warm"):
        print(f"{name} stages: " + ", ".join(f"{k} {v:.2f}s" for k, v in out[name]["timings"].items())
              + f"; tflite convert/check {out[name]['tflite_seconds']}")
    if ref:
        print(f"reference: prepare {ref['prepare_seconds']} s, fit {ref['fit_seconds']} s "
              f"({ref['epoch_seconds']} s/epoch)")


def scaling(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for count in (1000, 2000, 5000, 10000, 20000):
        spec = JobCreate(model="transfer", train_samples=count, test_samples=args.test_samples, epochs=args.epochs,
                         seed=args.seed, image_size=args.image_size)
        with tempfile.TemporaryDirectory(prefix="tl-bench-") as tmp:
            settings = bench_settings(Path(tmp) / "artifacts")
            print(f"engine, {count} training images (cold cache)...", file=sys.stderr)
            row = engine(spec, settings)
        row["train_samples"] = count
        row["seconds_per_image"] = round(row["seconds"] / count, 5)
        rows.append(row)
        print(f"{count:>7} images {row['seconds']:>8.1f} s {1000 * row['seconds_per_image']:>8.2f} ms/image "
              f"test acc {row['test_accuracy']:.4f}  " + ", ".join(f"{k} {v:.1f}s" for k, v in row["timings"].items()),
              flush=True)
    return {"scaling": rows, "epochs": args.epochs, "test_samples": args.test_samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-samples", type=int, default=5000)
    parser.add_argument("--test-samples", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--skip-reference", action="store_true", help="only the engine (cold and warm)")
    parser.add_argument("--scaling", action="store_true", help="transfer job at 1k..20k training images")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.scaling:
        out = scaling(args)
    else:
        out = compare(args)
        print_comparison(out)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
