"""The training engine: a job spec in, a saved model directory out. No HTTP, no Redis, no Celery.

`train_job(spec, settings, reporter)` runs one job: load CIFAR-10 or an uploaded dataset and draw the seeded
subsets (images resized to the model's input), build the model,
train it (the transfer model through the frozen-base fast path: base features computed once and cached, the head
trained on them, then optionally fine-tuning on images), evaluate it on the test subset (per-class scores and the
confusion matrix), and publish model.keras, model.tflite (when it passes its check), metadata.json, curves.png and
confusion.png atomically through
`ModelStore`. Progress, finished epochs and the cancel check go through a `Reporter`; the Celery task and the
command line each bring their own.

Stages, in order: loading_data, extracting_features (transfer; skipped on a cache hit), training, fine_tuning
(when asked for), evaluating, saving.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from worker.config import Settings
from worker.engine.augment import augmented_view, view_count
from worker.engine.data import Dataset, Subset, draw_subsets, load_cifar10, take
from worker.engine.datasets import class_weights, draw_uploaded_subsets, load_uploaded, resize_images
from worker.engine.evaluation import Evaluation, evaluate, plot_confusion
from worker.engine.export import ExportTemplate
from worker.engine.features import FeatureKey
from worker.engine.loop import CHUNK_BATCHES, LoopResult, TrainingLoop, loss_and_accuracy
from worker.engine.runtime import RuntimeInfo, configure_tensorflow
from worker.engine.weights import WeightsFile, resolve_weights
from worker.errors import ArtifactWriteError, JobCancelled, TrainingDiverged
from worker.imaging import INPUT_SHAPE
from worker.jobstore import EpochRecord, Metrics, new_model_id, utc_now
from worker.spec import CLASS_NAMES, JobCreate
from worker.store import (
    CONFUSION_FILE,
    CURVES_FILE,
    KERAS_FILE,
    METADATA_FILE,
    TFLITE_FILE,
    open_model_store,
    write_json_atomic,
)

log = logging.getLogger(__name__)

STAGES = ("loading_data", "extracting_features", "training", "fine_tuning", "evaluating", "saving")

#: Batch size for evaluating models that take images (the head on features uses worker.engine.loop's default).
IMAGE_EVAL_BATCH = 256


class Reporter(Protocol):
    """What the engine tells its caller, and the one thing it asks (whether to stop).

    `cancel_requested` is asked between chunks of training batches (worker.engine.loop.CHUNK_BATCHES), between
    batches of feature extraction and validation, and at the end of the other stages.
    """

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

    def __init__(self, total_epochs: int | None = None) -> None:
        self.log = logging.getLogger("worker.cli")
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


@dataclass(frozen=True)
class TrainResult:
    """A published model: its id, directory, metrics and the metadata.json written with it."""

    model_id: str
    model_dir: Path
    metrics: Metrics
    metadata: dict[str, Any]


# ----- progress -----

class _Progress:
    """Maps each stage's own 0..1 onto the job's 0..1 by estimated cost; never goes backwards."""

    def __init__(self, reporter: Reporter, weights: dict[str, float]) -> None:
        self.reporter = reporter
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
    train = spec.train_samples or 1000  # "all of an uploaded dataset": a guess, only ratios matter
    test = spec.test_samples or 250
    images = train + test
    views = max(1, view_count(spec.augment, spec.epochs))
    scale = (spec.image_size / 96) ** 2 * spec.alpha
    weights = {"loading_data": 2.0, "evaluating": 0.5, "saving": 5.0}
    if spec.model == "baseline":
        weights["training"] = spec.epochs * images * 0.0004
        return weights
    weights["extracting_features"] = 2.0 + (views * train * 0.0006 + test * 0.003) * scale
    weights["training"] = spec.epochs * train * 0.0002
    if spec.fine_tuning:
        weights["fine_tuning"] = spec.fine_tune_epochs * images * 0.006 * scale
        weights["evaluating"] += test * 0.003 * scale
    return weights


# ----- optimisation -----

def fused_adam(learning_rate: float) -> Any:
    """Adam whose update is TensorFlow's fused ResourceApplyAdam kernel (same formula, one pass over memory).

    Keras 3's Adam issues five element-wise ops per variable, which on a CPU weighs on the head's large Dense
    kernel. The update rule is the same: m += (g - m)(1 - b1); v += (g^2 - v)(1 - b2);
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


# ----- the job -----

#: How the loop trains, recorded with every model.
LOOP_RECORD: dict[str, Any] = {
    "loop": "worker.engine.loop.TrainingLoop (fit semantics, compiled chunks of batches)",
    "batches_per_call": CHUNK_BATCHES,
    "shuffle": "worker.engine.loop.epoch_order(seed, epoch, n)",
}


@dataclass(frozen=True, eq=False)
class JobData:
    """The dataset as read, the job's seeded subsets of it, and their images and labels."""

    dataset: Dataset
    classes: list[str]
    input_shape: tuple[int, int, int]  # the model's input; images are already at this size
    train_subset: Subset
    test_subset: Subset
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def class_count(self) -> int:
        return len(self.classes)


@dataclass(frozen=True, eq=False)
class JobContext:
    """One job's inputs, as the training, saving and metadata steps share them."""

    spec: JobCreate
    settings: Settings
    runtime: RuntimeInfo
    progress: _Progress
    data: JobData
    weights: WeightsFile | None  # transfer jobs only
    class_weights: np.ndarray | None  # `class_weight: balanced` only

    def train_views(self) -> list[np.ndarray]:
        """The training images to fit on: the images themselves, or their augmented views (computed once)."""
        cached = getattr(self, "_views", None)
        if cached is None:
            count = view_count(self.spec.augment, self.spec.epochs)
            cached = [self.data.x_train] if count == 0 else [
                augmented_view(self.data.x_train, self.spec.augment, self.spec.seed, view) for view in range(count)]
            object.__setattr__(self, "_views", cached)
        return list(cached)


@dataclass(frozen=True)
class FeatureRecord:
    """How the transfer head's features were obtained, per split ("train", "test")."""

    cache: dict[str, str]  # "hit", "miss" or "disabled"
    extractor: dict[str, str]  # the runtime and versions that computed them


@dataclass(frozen=True)
class FineTuningRecord:
    """What fine-tuning unfroze and how it trained."""

    layers: int
    layers_with_weights_unfrozen: int
    learning_rate: float


@dataclass(frozen=True)
class TrainingRecord:
    """How a model was trained and evaluated: metadata.json's "training"."""

    optimizer: str
    evaluated_on: str
    features: FeatureRecord | None = None  # the transfer model's frozen-base fast path
    fine_tuning: FineTuningRecord | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.features is not None:
            out.update(fast_path="frozen-base features, head trained on them", feature_cache=self.features.cache,
                       feature_extractor=self.features.extractor)
        out.update(optimizer=self.optimizer, **LOOP_RECORD)
        if self.fine_tuning is not None:
            out["fine_tuning"] = {"layers": self.fine_tuning.layers,
                                  "layers_with_weights_unfrozen": self.fine_tuning.layers_with_weights_unfrozen,
                                  "batch_normalization": "frozen, inference mode", "optimizer": "Adam",
                                  "learning_rate": self.fine_tuning.learning_rate}
        out.update(evaluated_on=self.evaluated_on,
                   train_accuracy="training accuracy of the last epoch (dropout active), as Keras reports")
        return out


@dataclass(frozen=True, eq=False)
class TrainedModel:
    """A trained model, its epochs, its probabilities on the test images, and how it got them."""

    model: Any  # keras.Model: image -> probabilities
    history: list[EpochRecord]
    test_probs: np.ndarray
    training: TrainingRecord

    def evaluation(self, labels: np.ndarray, classes: list[str]) -> Evaluation:
        return evaluate(labels, np.argmax(self.test_probs, axis=1), classes)


@dataclass(frozen=True)
class ModelRecord:
    """What the saving step adds to metadata.json about a trained model."""

    model_id: str
    job_id: str | None
    metrics: Metrics
    params: dict[str, int]
    timings: dict[str, float]
    export: dict[str, Any]


def train_job(spec: JobCreate, settings: Settings, reporter: Reporter, *, job_id: str | None = None,
              model_id: str | None = None) -> TrainResult:
    """Run one training job and publish its model; raises worker.errors.* with actionable messages."""
    started = time.perf_counter()
    runtime = configure_tensorflow(settings)
    import keras

    model_id = model_id or new_model_id()
    progress = _Progress(reporter, _stage_weights(spec))

    progress.enter("loading_data")
    data = _load_data(spec, settings)
    weights = resolve_weights(settings, spec.alpha, spec.image_size) if spec.model == "transfer" else None
    progress.within(1.0)
    progress.check_cancel()
    balanced = class_weights(data.y_train, data.class_count) if spec.class_weight == "balanced" else None
    job = JobContext(spec, settings, runtime, progress, data, weights, balanced)

    keras.utils.set_random_seed(spec.seed)
    trained = _train_baseline(job) if spec.model == "baseline" else _train_transfer(job)

    progress.enter("evaluating")
    if not np.isfinite(trained.test_probs).all():
        raise _diverged(job, trained.history[-1].epoch if trained.history else 0, spec.epochs + 1)
    test_loss, test_accuracy = loss_and_accuracy(trained.test_probs, data.y_test)
    evaluation = trained.evaluation(data.y_test, data.classes)
    from worker.engine.models import count_params

    params = count_params(trained.model)
    progress.within(1.0)
    progress.check_cancel()

    progress.enter("saving")
    store = open_model_store(settings)
    with store.staging(model_id) as staging:
        try:
            export = _write_model_files(job, trained, staging, test_accuracy, evaluation)
        except OSError as exc:
            raise ArtifactWriteError(
                f"cannot write the model files of {model_id} under {store.models_dir}: {exc}; check free space "
                "and permissions of TL_ARTIFACT_DIR"
            ) from exc
        metrics = Metrics(
            train_accuracy=trained.history[-1].accuracy,
            test_accuracy=test_accuracy,
            test_loss=test_loss,
            params_total=params["total"],
            params_trainable=params["trainable"],
            params_non_trainable=params["non_trainable"],
            train_seconds=round(time.perf_counter() - started, 3),
            macro_f1=evaluation.macro_f1,
            per_class=evaluation.per_class,
            confusion_matrix=evaluation.confusion_matrix,
        )
        record = ModelRecord(model_id=model_id, job_id=job_id, metrics=metrics, params=params,
                             timings=progress.timings_so_far(), export=export)
        metadata = _metadata(job, trained, record)
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


def _load_data(spec: JobCreate, settings: Settings) -> JobData:
    """The job's subsets at the model's input size: 32x32 on CIFAR-10 and for the baseline on every dataset,
    `image_size` for the transfer model on an uploaded dataset."""
    if not spec.uploaded:
        dataset = load_cifar10(settings)
        assert spec.train_samples is not None and spec.test_samples is not None  # JobCreate fills CIFAR-10's
        train_subset, test_subset = draw_subsets(dataset, spec.train_samples, spec.test_samples, spec.seed)
        x_train, y_train = take(dataset.train, train_subset)
        x_test, y_test = take(dataset.test, test_subset)
        return JobData(dataset, list(CLASS_NAMES), INPUT_SHAPE, train_subset, test_subset,
                       x_train, y_train, x_test, y_test)
    dataset, classes = load_uploaded(settings, spec.dataset)
    train_subset, test_subset = draw_uploaded_subsets(dataset, spec.train_samples, spec.test_samples, spec.seed)
    size = INPUT_SHAPE[0] if spec.model == "baseline" else spec.image_size
    x_train, y_train = take(dataset.train, train_subset)
    x_test, y_test = take(dataset.test, test_subset)
    return JobData(dataset, classes, (size, size, 3), train_subset, test_subset,
                   resize_images(x_train, size), y_train, resize_images(x_test, size), y_test)


def _export_template(job: JobContext) -> ExportTemplate | None:
    """Where and under which key the TFLite export may reuse an earlier conversion (worker.engine.export).

    Two transfer models without fine-tuning that share this key differ only in their head's Dense weights, so
    the second .tflite is the first one's bytes with those weights written over (checked like any export).
    """
    spec, runtime = job.spec, job.runtime
    if spec.model != "transfer" or spec.fine_tuning or job.weights is None:
        return None
    from worker.engine.models import head_layer_names

    key = json.dumps({"weights_sha256": job.weights.sha256, "image_size": spec.image_size,
                      "alpha": float(spec.alpha), "dense_units": list(spec.dense_units),
                      "classes": job.data.class_count, "input_shape": list(job.data.input_shape),
                      "tensorflow": runtime.tensorflow_version, "keras": runtime.keras_version}, sort_keys=True)
    return ExportTemplate(directory=job.settings.export_template_dir, key=hashlib.sha256(key.encode()).hexdigest(),
                          patch_layers=tuple(head_layer_names(spec)))


def _write_model_files(job: JobContext, trained: TrainedModel, staging: Path, test_accuracy: float,
                       evaluation: Evaluation) -> dict[str, Any]:
    """model.keras, model.tflite (when its check passes), curves.png and confusion.png; returns the export record."""
    from worker.engine.export import export_tflite, save_keras
    from worker.engine.exports import calibration_images, export_extra
    from worker.engine.plots import plot_curves

    spec, progress, data = job.spec, job.progress, job.data
    save_keras(trained.model, staging)
    progress.within(0.1)
    export = export_tflite(trained.model, data.x_test, trained.test_probs, staging,
                           template=_export_template(job), labels=data.y_test)
    progress.within(0.3)
    formats = job.settings.export_formats
    if formats:
        float32 = staging / TFLITE_FILE
        export["extra"] = export_extra(trained.model, formats, staging, calibration=calibration_images(data.x_train),
                                       images=data.x_test, labels=data.y_test, keras_probs=trained.test_probs,
                                       float32=float32.read_bytes() if float32.exists() else None,
                                       progress=lambda f: progress.within(0.3 + 0.55 * f))
    progress.within(0.85)
    plot_curves(trained.history, spec.model, test_accuracy, staging / CURVES_FILE,
                fine_tune_from=spec.epochs + 1 if spec.fine_tuning else None)
    plot_confusion(evaluation, job.data.classes, staging / CONFUSION_FILE, f"{spec.model} model")
    progress.within(0.9)
    return export


def _fit(job: JobContext, loop: TrainingLoop, x_train: np.ndarray | list[np.ndarray], x_test: np.ndarray, *,
         epochs: int, first_epoch: int = 1) -> LoopResult:
    """Train on (x_train, the job's train labels), validating on (x_test, its test labels) after each epoch;
    `x_train` may be a list of views (augmentation), one per epoch in turn."""
    progress = job.progress

    def after_chunk(fraction: float) -> None:
        progress.check_cancel()
        progress.within(fraction)

    def on_epoch(record: EpochRecord) -> None:
        progress.reporter.epoch_end(record)
        if not all(math.isfinite(v) for v in (record.loss, record.val_loss)):
            raise _diverged(job, record.epoch, first_epoch)

    return loop.fit(x_train, job.data.y_train, x_test, job.data.y_test, epochs=epochs, seed=job.spec.seed,
                    first_epoch=first_epoch, class_weights=job.class_weights, after_chunk=after_chunk,
                    on_epoch=on_epoch)


def _diverged(job: JobContext, epoch: int, first_epoch: int) -> TrainingDiverged:
    spec = job.spec
    fine_tuning = spec.fine_tuning and first_epoch > spec.epochs
    field, rate = ("fine_tune_learning_rate", spec.fine_tune_learning_rate) if fine_tuning else \
        ("learning_rate", spec.learning_rate)
    return TrainingDiverged(f"training diverged: the loss became NaN or infinite at epoch {epoch}, so the model "
                            f"would predict nothing; lower {field} (now {rate:g}, e.g. to {rate / 10:g}) and "
                            "submit the job again")


def _train_baseline(job: JobContext) -> TrainedModel:
    import keras

    from worker.engine.models import build_baseline

    spec = job.spec
    model = build_baseline(job.data.class_count)
    job.progress.enter("training")
    loop = TrainingLoop(model, keras.optimizers.Adam(learning_rate=spec.learning_rate), spec.batch_size,
                        validation_batch=IMAGE_EVAL_BATCH)
    result = _fit(job, loop, job.train_views(), job.data.x_test, epochs=spec.epochs)
    # The last epoch's validation pass ran the final weights on the test images: those are the test results.
    return TrainedModel(model, result.history, result.val_probs,
                        TrainingRecord(optimizer="Adam", evaluated_on="full model on the test images"))


@dataclass(frozen=True, eq=False)
class _SplitFeatures:
    """One split whose features are to be computed: its cache key, its images and the runtime to use."""

    split: str
    key: FeatureKey
    images: Callable[[], np.ndarray]  # only called on a cache miss (augmented views are computed then)
    count: int
    litert: bool


def _transfer_features(job: JobContext, extractor: Any) -> tuple[dict[str, np.ndarray], FeatureRecord]:
    """Base features of the job's train and test images, from the cache or computed (and then cached)."""
    from worker.engine.features import FeatureCache, extract_features, extract_features_litert, litert_version

    spec, runtime, data, progress = job.spec, job.runtime, job.data, job.progress
    assert job.weights is not None
    tensorflow_runtime = f"tensorflow {runtime.tensorflow_version} keras {runtime.keras_version}"
    # The test split always goes through TensorFlow: the head on those features then gives exactly the saved
    # model's probabilities. The training split goes through LiteRT on a CPU (faster there; the values differ
    # only by float rounding), through TensorFlow on a GPU.
    use_litert = runtime.gpus == 0
    views = view_count(spec.augment, spec.epochs)
    splits: list[tuple[str, str, Subset, Callable[[], np.ndarray], bool]] = []
    if views == 0:
        splits.append(("train", data.dataset.train.identity, data.train_subset, lambda: data.x_train, use_litert))
    for view in range(views):
        identity = (f"{data.dataset.train.identity}|augment={','.join(sorted(spec.augment))}|seed={spec.seed}"
                    f"|view={view}")
        splits.append((f"train-view{view}", identity, data.train_subset,
                       lambda view=view: job.train_views()[view], use_litert))  # type: ignore[misc]
    splits.append(("test", data.dataset.test.identity, data.test_subset, lambda: data.x_test, False))
    cache = FeatureCache(job.settings.feature_cache_dir, job.settings.feature_cache_max_bytes)
    features: dict[str, np.ndarray] = {}
    cache_report: dict[str, str] = {}
    extractors: dict[str, str] = {}
    pending: list[_SplitFeatures] = []
    for name, identity, subset, load_images, litert in splits:
        extractor_name = f"{litert_version()} (converted by {tensorflow_runtime})" if litert else tensorflow_runtime
        key = FeatureKey(split=name, data_identity=identity, indices_sha256=subset.indices_sha256,
                         count=len(subset.indices), image_size=spec.image_size, alpha=float(spec.alpha),
                         weights_sha256=job.weights.sha256, extractor=extractor_name)
        extractors[name] = extractor_name
        cached = cache.load(key)
        if cached is not None:
            features[name] = cached
            cache_report[name] = "hit"
        else:
            pending.append(_SplitFeatures(name, key, load_images, len(subset.indices), litert))
            cache_report[name] = "miss" if cache.enabled else "disabled"
    if pending:
        progress.enter("extracting_features")
        # LiteRT takes less time per image, so its images weigh less in the stage's progress.
        cost = {True: 0.2, False: 1.0}
        total = sum(item.count * cost[item.litert] for item in pending)
        done_before = 0.0
        for item in pending:
            def on_batch(done: int, _total: int, offset: float = done_before, weight: float = cost[item.litert],
                         ) -> None:
                progress.check_cancel()
                progress.within((offset + done * weight) / total)

            key = item.key
            images = item.images()
            if item.litert:
                try:
                    features[item.split] = extract_features_litert(extractor, images, on_batch=on_batch)
                except JobCancelled:
                    raise
                except Exception as exc:  # conversion or runtime trouble: TensorFlow computes the same thing
                    log.warning("LiteRT feature extraction failed (%s: %s); using TensorFlow",
                                type(exc).__name__, exc)
                    key = dataclasses.replace(key, extractor=tensorflow_runtime)
                    extractors[item.split] = tensorflow_runtime
                    features[item.split] = extract_features(extractor, images, on_batch=on_batch)
            else:
                features[item.split] = extract_features(extractor, images, on_batch=on_batch)
            done_before += item.count * cost[item.litert]
            cache.store(key, features[item.split])
    return features, FeatureRecord(cache=cache_report, extractor=extractors)


def _train_transfer(job: JobContext) -> TrainedModel:
    import keras

    from worker.engine.models import build_head, build_transfer, copy_head_weights, unfreeze_top

    spec, data, progress = job.spec, job.data, job.progress
    assert job.weights is not None
    # The full model is built first and the head copies its initial weights, so for a given seed the fast path
    # starts from exactly the weights a plain `fit` of the whole model would.
    transfer = build_transfer(spec, job.weights, data.class_count, data.input_shape)
    head = build_head(spec, transfer.feature_shape, data.class_count)
    copy_head_weights(transfer.model, head, spec)

    features, feature_record = _transfer_features(job, transfer.extractor)

    progress.enter("training")
    loop = TrainingLoop(head, fused_adam(spec.learning_rate), spec.batch_size)
    train_features = [features[name] for name in sorted(features) if name.startswith("train")]
    result = _fit(job, loop, train_features, features["test"], epochs=spec.epochs)
    history = list(result.history)
    copy_head_weights(head, transfer.model, spec)
    optimizer = "Adam (fused kernel) for the head"

    if not spec.fine_tuning:
        # The saved model computes head(base(preprocess(resize(x)))); the base part is exactly the features
        # already computed for these test images, so the head on them (the last epoch's validation pass) gives
        # the full model's probabilities (tests/worker/engine/test_training.py checks this against the saved
        # model's predictions on the images).
        return TrainedModel(transfer.model, history, result.val_probs,
                            TrainingRecord(optimizer=optimizer, evaluated_on="head on the test images' base features",
                                           features=feature_record))

    progress.enter("fine_tuning")
    unfrozen = unfreeze_top(transfer.base, spec.fine_tune_layers)
    tuning = TrainingLoop(transfer.model, keras.optimizers.Adam(learning_rate=spec.fine_tune_learning_rate),
                          spec.batch_size, validation_batch=IMAGE_EVAL_BATCH)
    tuned = _fit(job, tuning, job.train_views(), data.x_test, epochs=spec.fine_tune_epochs,
                 first_epoch=spec.epochs + 1)
    history.extend(tuned.history)
    fine_tuning = FineTuningRecord(layers=spec.fine_tune_layers, layers_with_weights_unfrozen=unfrozen,
                                   learning_rate=spec.fine_tune_learning_rate)
    return TrainedModel(transfer.model, history, tuned.val_probs,
                        TrainingRecord(optimizer=optimizer, evaluated_on="full model on the test images",
                                       features=feature_record, fine_tuning=fine_tuning))


def _exports_summary(export: dict[str, Any], keras_accuracy: float) -> dict[str, Any]:
    """The Model object's `exports` (every downloadable format: size, and its check against the Keras model on
    the test subset) and `export_failures` (why a format is not offered)."""
    offered: dict[str, Any] = {"keras": {"file": KERAS_FILE, "top1_agreement": 1.0,
                                         "test_accuracy": round(keras_accuracy, 6)}}
    failures: dict[str, str] = {}
    records = {"tflite": export, **export.get("extra", {})}
    for name, rec in records.items():
        if rec.get("passed") and rec.get("file"):
            offered[name] = {"file": rec["file"], "bytes": rec.get("bytes"),
                             "top1_agreement": round(float(rec["top1_agreement"]), 6),
                             "test_accuracy": rec.get("test_accuracy")}
        else:
            failures[name] = str(rec.get("reason") or "not made")
    return {"exports": offered, "export_failures": failures}


def _metadata(job: JobContext, trained: TrainedModel, record: ModelRecord) -> dict[str, Any]:
    spec, data, runtime = job.spec, job.data, job.runtime
    height, width, channels = data.input_shape
    source = data.dataset.source
    if spec.uploaded:
        dataset = {"id": spec.dataset, "name": source.get("name"), "sha256": source.get("sha256")}
        subset_rule = ("all of each split when no count is given, else per class in proportion, numpy "
                       "default_rng([seed, 0]) for train and [seed, 1] for test, indices sorted")
    else:
        dataset = {"id": spec.dataset, "name": "CIFAR-10", "sha256": source.get("train", {}).get("sha256")}
        subset_rule = "numpy default_rng([seed, 0]) for train, [seed, 1] for test; choice without replacement, " \
                      "indices sorted"
    return {
        "id": record.model_id,
        "name": spec.name,
        "kind": spec.model,
        "job_id": record.job_id,
        "created_at": utc_now(),
        "classes": list(data.classes),
        "input_shape": list(data.input_shape),
        "dataset": dataset,
        "input": f"float32 (batch, {height}, {width}, {channels}) raw RGB 0..255; preprocessing is inside the model",
        "output": f"float32 (batch, {data.class_count}) softmax probabilities in the order of classes",
        "spec": spec.public(),
        "metrics": record.metrics.model_dump(mode="json"),
        "history": [epoch.model_dump(mode="json") for epoch in trained.history],
        "params": record.params,
        "data": {
            "dataset": spec.dataset,
            "source": data.dataset.source,
            "train_split_size": len(data.dataset.train),
            "test_split_size": len(data.dataset.test),
            "train_samples": spec.train_samples,
            "test_samples": spec.test_samples,
            "seed": spec.seed,
            "subset_rule": subset_rule,
            "train_images": len(data.y_train),
            "test_images": len(data.y_test),
            "class_weight": spec.class_weight,
            "augment": {"views": view_count(spec.augment, spec.epochs), "layers": list(spec.augment)},
            "train_indices_sha256": data.train_subset.indices_sha256,
            "test_indices_sha256": data.test_subset.indices_sha256,
        },
        "weights": job.weights.as_dict() if job.weights is not None else None,
        "training": trained.training.as_dict(),
        "versions": {"tensorflow": runtime.tensorflow_version, "keras": runtime.keras_version,
                     "numpy": np.__version__, "python": platform.python_version()},
        "runtime": {"gpus": runtime.gpus, "mixed_precision": runtime.mixed_precision,
                    "deterministic_ops": runtime.deterministic},
        "timings": dict(record.timings),
        "export": record.export,
        **_exports_summary(record.export, record.metrics.test_accuracy),
    }
