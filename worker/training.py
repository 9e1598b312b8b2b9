"""The training engine: a job spec in, a saved model directory out. No HTTP, no Redis, no Celery.

`train_job(spec, settings, reporter)` runs one job: load CIFAR-10 and draw the seeded subsets, build the model,
train it (the transfer model through the frozen-base fast path: base features computed once and cached, the head
trained on them, then optionally fine-tuning on images), evaluate it on the test subset, and write
model.keras, model.tflite, metadata.json and curves.png atomically through `ModelStore`. Progress, finished epochs
and the cancel check go through a `Reporter`; the Celery task and the command line each bring their own.

Stages, in order: loading_data, extracting_features (transfer; skipped on a cache hit), training, fine_tuning
(when asked for), evaluating, saving.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from worker.artifacts import CURVES_FILE, METADATA_FILE, ModelStore, write_json_atomic
from worker.config import Settings
from worker.data import Dataset, Subset, draw_subsets, load_cifar10, take
from worker.errors import ArtifactWriteError, JobCancelled
from worker.jobs import EpochRecord, Metrics, new_model_id, utc_now
from worker.runtime import RuntimeInfo, configure_tensorflow
from worker.spec import CLASS_NAMES, JobCreate

log = logging.getLogger(__name__)

STAGES = ("loading_data", "extracting_features", "training", "fine_tuning", "evaluating", "saving")

#: Head batches per compiled call. Measured on 2 CPU cores (5000 images, batch 32): 8 steps per execution is
#: ~15 % faster per epoch than 1, but Keras then calls batch callbacks only every 8 batches, and the Reporter
#: contract is a cancel check on every batch. XLA (`jit_compile`) is 15x slower than graph mode on this CPU.
HEAD_STEPS_PER_EXECUTION = 1


class Reporter(Protocol):
    """What the engine tells its caller, and the one thing it asks (whether to stop)."""

    def stage(self, stage: str) -> None: ...

    def progress(self, fraction: float) -> None: ...

    def epoch_end(self, record: EpochRecord) -> None: ...

    def cancel_requested(self) -> bool: ...


class NullReporter:
    """Reports nothing and never cancels."""

    def stage(self, stage: str) -> None:
        pass

    def progress(self, fraction: float) -> None:
        pass

    def epoch_end(self, record: EpochRecord) -> None:
        pass

    def cancel_requested(self) -> bool:
        return False


class LogReporter(NullReporter):
    """Logs stages, epochs and progress every 10 % (the command line's reporter)."""

    def __init__(self, logger: logging.Logger | None = None, total_epochs: int | None = None) -> None:
        self.log = logger or logging.getLogger("worker.train")
        self.total_epochs = total_epochs
        self._next_fraction = 0.1

    def stage(self, stage: str) -> None:
        self.log.info("stage: %s", stage)

    def progress(self, fraction: float) -> None:
        if fraction >= self._next_fraction:
            self.log.info("progress: %3.0f %%", 100 * fraction)
            self._next_fraction = (int(fraction * 10) + 1) / 10

    def epoch_end(self, record: EpochRecord) -> None:
        of = f"/{self.total_epochs}" if self.total_epochs else ""
        self.log.info("epoch %d%s: loss %.4f accuracy %.4f val_loss %.4f val_accuracy %.4f (%.1f s)",
                      record.epoch, of, record.loss, record.accuracy, record.val_loss, record.val_accuracy,
                      record.seconds)


@dataclass
class TrainResult:
    model_id: str
    model_dir: Path
    metrics: Metrics
    metadata: dict[str, Any]


# ----- progress -----

class _Progress:
    """Maps each stage's own 0..1 onto the job's 0..1 by estimated cost; never goes backwards."""

    def __init__(self, reporter: Reporter, weights: dict[str, float]) -> None:
        self.reporter = reporter
        self.weights = weights
        total = sum(weights.values()) or 1.0
        self.start: dict[str, float] = {}
        acc = 0.0
        for stage in STAGES:
            self.start[stage] = acc / total
            acc += weights.get(stage, 0.0)
        self.share = {stage: weights.get(stage, 0.0) / total for stage in STAGES}
        self.current = STAGES[0]
        self.last = 0.0
        self.timings: dict[str, float] = {}
        self._since: float | None = None

    def enter(self, stage: str) -> None:
        if stage == self.current and self._since is not None:
            return
        self._stop_clock()
        self.current = stage
        self._since = time.perf_counter()
        self.reporter.stage(stage)
        self.within(0.0)

    def _stop_clock(self) -> None:
        if self._since is not None:
            elapsed = time.perf_counter() - self._since
            self.timings[self.current] = round(self.timings.get(self.current, 0.0) + elapsed, 3)
            self._since = None

    def timings_so_far(self) -> dict[str, float]:
        """Seconds per stage, the running stage included up to now."""
        self._stop_clock()
        self._since = time.perf_counter()
        return dict(self.timings)

    def finish(self) -> None:
        self._stop_clock()
        self.set(1.0)

    def within(self, fraction: float) -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        self.set(self.start[self.current] + self.share[self.current] * fraction)

    def set(self, value: float) -> None:
        value = min(max(value, self.last), 1.0)
        self.last = value
        self.reporter.progress(value)

    def check_cancel(self) -> None:
        if self.reporter.cancel_requested():
            raise JobCancelled("the job was cancelled; no model was kept")


def _stage_weights(spec: JobCreate) -> dict[str, float]:
    """Rough CPU seconds per stage (only their ratios matter)."""
    images = spec.train_samples + spec.test_samples
    scale = (spec.image_size / 96) ** 2 * spec.alpha
    weights = {"loading_data": 2.0, "evaluating": 0.5, "saving": 5.0}
    if spec.model == "baseline":
        weights["training"] = spec.epochs * images * 0.0004
        return weights
    weights["extracting_features"] = 2.0 + (spec.train_samples * 0.0006 + spec.test_samples * 0.003) * scale
    weights["training"] = spec.epochs * spec.train_samples * 0.0002
    if spec.fine_tuning:
        weights["fine_tuning"] = spec.fine_tune_epochs * images * 0.006 * scale
        weights["evaluating"] += spec.test_samples * 0.003 * scale
    return weights


# ----- Keras plumbing -----

def _epoch_callback(progress: _Progress, epochs_in_phase: int, first_epoch: int,
                    history: list[EpochRecord]) -> Any:
    import keras

    reporter = progress.reporter

    class _Bridge(keras.callbacks.Callback):
        """Per batch: cancel check and progress; per epoch: the history record."""

        def on_train_begin(self, logs: Any = None) -> None:
            self._steps = max(int(self.params.get("steps") or 1), 1)
            self._epoch_index = 0

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self._epoch_started = time.perf_counter()

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            progress.check_cancel()
            progress.within((self._epoch_index + (batch + 1) / self._steps) / epochs_in_phase)

        def on_test_batch_end(self, batch: int, logs: Any = None) -> None:
            progress.check_cancel()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            logs = logs or {}
            record = EpochRecord(
                epoch=first_epoch + self._epoch_index,
                loss=float(logs["loss"]),
                accuracy=float(logs["accuracy"]),
                val_loss=float(logs["val_loss"]),
                val_accuracy=float(logs["val_accuracy"]),
                seconds=round(time.perf_counter() - self._epoch_started, 3),
            )
            self._epoch_index += 1
            history.append(record)
            reporter.epoch_end(record)

    return _Bridge()


def fused_adam(learning_rate: float) -> Any:
    """Adam whose update is TensorFlow's fused ResourceApplyAdam kernel (same formula, one pass over memory).

    Keras 3's Adam issues five element-wise ops per variable; on the head's 1.5M-parameter Dense kernel that is
    most of a step on a CPU. The update rule is the same: m += (g - m)(1 - b1); v += (g^2 - v)(1 - b2);
    w -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps). Only used for the head, never saved.
    """
    import keras
    import tensorflow as tf

    def handle(variable: Any) -> Any:
        return variable.handle if hasattr(variable, "handle") else variable.value.handle

    class FusedAdam(keras.optimizers.Adam):
        def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
            dtype = variable.dtype
            step = tf.cast(self.iterations + 1, dtype)
            index = self._get_variable_index(variable)
            beta_1 = tf.cast(self.beta_1, dtype)
            beta_2 = tf.cast(self.beta_2, dtype)
            tf.raw_ops.ResourceApplyAdam(
                var=handle(variable), m=handle(self._momentums[index]), v=handle(self._velocities[index]),
                beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step),
                lr=tf.cast(learning_rate, dtype), beta1=beta_1, beta2=beta_2,
                epsilon=tf.cast(self.epsilon, dtype), grad=tf.cast(gradient, dtype), use_locking=False,
            )

    return FusedAdam(learning_rate=learning_rate)


def _compile(model: Any, optimizer: Any, steps_per_execution: int = 1) -> None:
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                  steps_per_execution=steps_per_execution)


def _loss_and_accuracy(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Sparse categorical cross-entropy (Keras' clipping) and accuracy of predicted probabilities."""
    eps = 1e-7  # keras.config.epsilon(), as Keras' cross-entropy clips
    picked = np.clip(probs[np.arange(len(labels)), labels].astype(np.float64), eps, 1 - eps)
    return float(-np.mean(np.log(picked))), float(np.mean(probs.argmax(axis=1) == labels))


def _images(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32)


# ----- the job -----

@dataclass
class _Outcome:
    model: Any
    history: list[EpochRecord]
    test_probs: np.ndarray
    evaluated_on: str
    extra: dict[str, Any] = field(default_factory=dict)


def train_job(spec: JobCreate, settings: Settings, reporter: Reporter, *, job_id: str | None = None,
              model_id: str | None = None) -> TrainResult:
    """Run one training job and publish its model; raises worker.errors.* with actionable messages."""
    started = time.perf_counter()
    runtime = configure_tensorflow(settings)
    import keras

    model_id = model_id or new_model_id()
    progress = _Progress(reporter, _stage_weights(spec))

    progress.enter("loading_data")
    dataset = load_cifar10(settings)
    train_subset, test_subset = draw_subsets(dataset, spec.train_samples, spec.test_samples, spec.seed)
    x_train, y_train = take(dataset.train, train_subset)
    x_test, y_test = take(dataset.test, test_subset)
    weights = None
    if spec.model == "transfer":
        from worker.weights import resolve_weights

        weights = resolve_weights(settings, spec.alpha, spec.image_size)
    progress.within(1.0)
    progress.check_cancel()

    keras.utils.set_random_seed(spec.seed)
    if spec.model == "baseline":
        outcome = _train_baseline(spec, progress, x_train, y_train, x_test, y_test)
    else:
        assert weights is not None
        outcome = _train_transfer(spec, settings, runtime, progress, dataset, (train_subset, test_subset),
                                  weights, x_train, y_train, x_test, y_test)

    progress.enter("evaluating")
    test_loss, test_accuracy = _loss_and_accuracy(outcome.test_probs, y_test)
    from worker.models import count_params

    params = count_params(outcome.model)
    progress.within(1.0)
    progress.check_cancel()

    progress.enter("saving")
    store = ModelStore(settings.artifact_dir)
    with store.staging(model_id) as staging:
        try:
            export = _write_model_files(outcome, spec, staging, test_accuracy, x_test, progress)
        except OSError as exc:
            raise ArtifactWriteError(
                f"cannot write the model files of {model_id} under {store.models_dir}: {exc}; check free space "
                "and permissions of TL_ARTIFACT_DIR"
            ) from exc
        metrics = Metrics(
            train_accuracy=outcome.history[-1].accuracy,
            test_accuracy=test_accuracy,
            test_loss=test_loss,
            params_total=params["total"],
            params_trainable=params["trainable"],
            params_non_trainable=params["non_trainable"],
            train_seconds=round(time.perf_counter() - started, 3),
        )
        metadata = _metadata(spec, model_id, job_id, metrics, params, outcome, dataset, train_subset, test_subset,
                             weights, runtime, progress.timings_so_far(), export)
        try:
            write_json_atomic(staging / METADATA_FILE, metadata)
        except OSError as exc:
            raise ArtifactWriteError(f"cannot write {METADATA_FILE} of {model_id} under {store.models_dir}: {exc}; "
                                     "check free space and permissions of TL_ARTIFACT_DIR") from exc
        progress.check_cancel()  # last chance: a cancel seen here still leaves nothing behind
        model_dir = store.publish(staging, model_id)
    progress.finish()
    log.info("model %s written to %s: test accuracy %.4f in %.1f s", model_id, model_dir, test_accuracy,
             metrics.train_seconds)
    return TrainResult(model_id=model_id, model_dir=model_dir, metrics=metrics, metadata=metadata)


def _write_model_files(outcome: _Outcome, spec: JobCreate, staging: Path, test_accuracy: float,
                       x_test: np.ndarray, progress: _Progress) -> dict[str, Any]:
    """model.keras, model.tflite (when its check passes) and curves.png; returns the export record."""
    from worker.export import export_tflite, save_keras
    from worker.plots import plot_curves

    save_keras(outcome.model, staging)
    progress.within(0.2)
    export = export_tflite(outcome.model, x_test, outcome.test_probs, staging)
    progress.within(0.8)
    plot_curves(outcome.history, spec.model, test_accuracy, staging / CURVES_FILE,
                fine_tune_from=spec.epochs + 1 if spec.fine_tuning else None)
    progress.within(0.9)
    return export


def _train_baseline(spec: JobCreate, progress: _Progress, x_train: np.ndarray, y_train: np.ndarray,
                    x_test: np.ndarray, y_test: np.ndarray) -> _Outcome:
    import keras

    from worker.models import build_baseline

    model = build_baseline(spec)
    _compile(model, keras.optimizers.Adam(learning_rate=spec.learning_rate))
    history: list[EpochRecord] = []
    progress.enter("training")
    test_images = _images(x_test)
    model.fit(_images(x_train), y_train, batch_size=spec.batch_size, epochs=spec.epochs,
              validation_data=(test_images, y_test), shuffle=True, verbose=0,
              callbacks=[_epoch_callback(progress, spec.epochs, 1, history)])
    progress.enter("evaluating")
    probs = _predict(model, test_images, progress)
    return _Outcome(model, history, probs, "full model on the test images",
                    {"optimizer": "Adam", "steps_per_execution": 1})


def _predict(model: Any, images: np.ndarray, progress: _Progress, batch_size: int = 256) -> np.ndarray:
    """Probabilities in batches, with the cancel check between batches."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def run(batch: tf.Tensor) -> tf.Tensor:
        return model(batch, training=False)

    out = []
    for start in range(0, len(images), batch_size):
        out.append(run(tf.constant(images[start:start + batch_size])).numpy())
        progress.check_cancel()
        progress.within(min(start + batch_size, len(images)) / len(images))
    return np.concatenate(out).astype(np.float32)


def _train_transfer(spec: JobCreate, settings: Settings, runtime: RuntimeInfo, progress: _Progress,
                    dataset: Dataset, subsets: tuple[Subset, Subset], weights: Any,
                    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> _Outcome:
    import keras

    from worker.features import FeatureCache, FeatureKey, extract_features, extract_features_litert, litert_version
    from worker.models import build_head, build_transfer, copy_head_weights, head_layer_names, unfreeze_top

    # The full model is built first and the head copies its initial weights, so for a given seed the fast path
    # starts from exactly the weights a plain `fit` of the whole model would.
    transfer = build_transfer(spec, weights)
    head = build_head(spec, transfer.feature_shape)
    for name in head_layer_names(spec):
        head.get_layer(name).set_weights(transfer.model.get_layer(name).get_weights())

    tensorflow_runtime = f"tensorflow {runtime.tensorflow_version} keras {runtime.keras_version}"
    # The test split always goes through TensorFlow: the head on those features then gives exactly the saved
    # model's probabilities. The training split goes through LiteRT on a CPU (about 5x faster, same values to
    # ~4e-5), through TensorFlow on a GPU.
    use_litert = runtime.gpus == 0
    plan = [(subsets[0], dataset.train, x_train, use_litert), (subsets[1], dataset.test, x_test, False)]
    cache = FeatureCache(settings.feature_cache_dir, settings.feature_cache_max_bytes)
    features: dict[str, np.ndarray] = {}
    cache_report: dict[str, str] = {}
    extractors: dict[str, str] = {}
    pending: list[tuple[str, FeatureKey, np.ndarray, bool]] = []
    for subset, split, images, litert in plan:
        extractor = f"{litert_version()} (converted by {tensorflow_runtime})" if litert else tensorflow_runtime
        key = FeatureKey(split=subset.split, data_identity=split.identity, indices_sha256=subset.indices_sha256,
                         count=len(subset.indices), image_size=spec.image_size, alpha=float(spec.alpha),
                         weights_sha256=weights.sha256, extractor=extractor)
        extractors[subset.split] = extractor
        cached = cache.load(key)
        if cached is not None:
            features[subset.split] = cached
            cache_report[subset.split] = "hit"
        else:
            pending.append((subset.split, key, images, litert))
            cache_report[subset.split] = "miss" if cache.enabled else "disabled"
    if pending:
        progress.enter("extracting_features")
        # LiteRT runs ~5x faster per image, so weight its images less in the stage's progress.
        cost = {True: 0.2, False: 1.0}
        total = sum(len(images) * cost[litert] for _, _, images, litert in pending)
        done_before = 0.0
        for split_name, key, images, litert in pending:
            def on_batch(done: int, _total: int, offset: float = done_before, weight: float = cost[litert]) -> None:
                progress.check_cancel()
                progress.within((offset + done * weight) / total)

            if litert:
                try:
                    features[split_name] = extract_features_litert(transfer.extractor, images, on_batch=on_batch)
                except JobCancelled:
                    raise
                except Exception as exc:  # conversion or runtime trouble: TensorFlow computes the same thing
                    log.warning("LiteRT feature extraction failed (%s: %s); using TensorFlow",
                                type(exc).__name__, exc)
                    key = dataclasses.replace(key, extractor=tensorflow_runtime)
                    extractors[split_name] = tensorflow_runtime
                    features[split_name] = extract_features(transfer.extractor, images, on_batch=on_batch)
            else:
                features[split_name] = extract_features(transfer.extractor, images, on_batch=on_batch)
            done_before += len(images) * cost[litert]
            cache.store(key, features[split_name])

    history: list[EpochRecord] = []
    progress.enter("training")
    _compile(head, fused_adam(spec.learning_rate), HEAD_STEPS_PER_EXECUTION)
    # Validation in large batches: the same numbers, a sixth of the steps per epoch.
    head.fit(features["train"], y_train, batch_size=spec.batch_size, epochs=spec.epochs,
             validation_data=(features["test"], y_test), validation_batch_size=1024, shuffle=True, verbose=0,
             callbacks=[_epoch_callback(progress, spec.epochs, 1, history)])
    copy_head_weights(head, transfer.model, spec)
    extra: dict[str, Any] = {"fast_path": "frozen-base features, head trained on them", "feature_cache": cache_report,
                             "feature_extractor": extractors,
                             "optimizer": "Adam (fused kernel) for the head",
                             "steps_per_execution": HEAD_STEPS_PER_EXECUTION}

    if not spec.fine_tuning:
        progress.enter("evaluating")
        # The saved model computes head(base(preprocess(resize(x)))); the base part is exactly the features
        # already computed for these test images, so the head on them gives the full model's probabilities
        # (tests/worker check this against model.predict on the images).
        probs = head.predict(features["test"], batch_size=1024, verbose=0).astype(np.float32)
        return _Outcome(transfer.model, history, probs, "head on the test images' base features", extra)

    progress.enter("fine_tuning")
    unfrozen = unfreeze_top(transfer.base, spec.fine_tune_layers)
    _compile(transfer.model, keras.optimizers.Adam(learning_rate=spec.fine_tune_learning_rate))
    test_images = _images(x_test)
    transfer.model.fit(
        _images(x_train), y_train, batch_size=spec.batch_size, epochs=spec.epochs + spec.fine_tune_epochs,
        initial_epoch=spec.epochs, validation_data=(test_images, y_test), shuffle=True, verbose=0,
        callbacks=[_epoch_callback(progress, spec.fine_tune_epochs, spec.epochs + 1, history)],
    )
    extra["fine_tuning"] = {"layers": spec.fine_tune_layers, "layers_with_weights_unfrozen": unfrozen,
                            "batch_normalization": "frozen, inference mode", "optimizer": "Adam",
                            "learning_rate": spec.fine_tune_learning_rate}
    progress.enter("evaluating")
    probs = _predict(transfer.model, test_images, progress)
    return _Outcome(transfer.model, history, probs, "full model on the test images", extra)


def _metadata(spec: JobCreate, model_id: str, job_id: str | None, metrics: Metrics, params: dict[str, int],
              outcome: _Outcome, dataset: Dataset, train_subset: Subset, test_subset: Subset, weights: Any,
              runtime: RuntimeInfo, timings: dict[str, float], export: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": model_id,
        "name": spec.name,
        "kind": spec.model,
        "job_id": job_id,
        "created_at": utc_now(),
        "classes": list(CLASS_NAMES),
        "input_shape": [32, 32, 3],
        "input": "float32 (batch, 32, 32, 3) raw RGB 0..255; preprocessing is inside the model",
        "output": "float32 (batch, 10) softmax probabilities in the order of classes",
        "spec": spec.public(),
        "metrics": metrics.model_dump(mode="json"),
        "history": [record.model_dump(mode="json") for record in outcome.history],
        "params": params,
        "data": {
            "dataset": spec.dataset,
            "source": dataset.source,
            "train_split_size": len(dataset.train),
            "test_split_size": len(dataset.test),
            "train_samples": spec.train_samples,
            "test_samples": spec.test_samples,
            "seed": spec.seed,
            "subset_rule": "numpy default_rng([seed, 0]) for train, [seed, 1] for test; choice without "
                           "replacement, indices sorted",
            "train_indices_sha256": train_subset.indices_sha256,
            "test_indices_sha256": test_subset.indices_sha256,
        },
        "weights": weights.as_dict() if weights is not None else None,
        "training": {**outcome.extra, "evaluated_on": outcome.evaluated_on,
                     "train_accuracy": "training accuracy of the last epoch (dropout active), as Keras reports"},
        "versions": _versions(runtime),
        "runtime": {"gpus": runtime.gpus, "mixed_precision": runtime.mixed_precision,
                    "deterministic_ops": runtime.deterministic},
        "timings": dict(timings),
        "export": export,
    }


def _versions(runtime: RuntimeInfo) -> dict[str, str]:
    return {"tensorflow": runtime.tensorflow_version, "keras": runtime.keras_version,
            "numpy": np.__version__, "python": platform.python_version()}

