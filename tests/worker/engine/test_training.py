"""train_job end to end on real CIFAR-10 and MobileNetV2 weights, at small sizes."""

from __future__ import annotations

import json
import math
from typing import Any

import keras
import numpy as np
import pytest

from worker.config import Settings
from worker.engine.data import draw_subsets, load_cifar10, take
from worker.engine.loop import CHUNK_BATCHES, TrainingLoop
from worker.engine.pipeline import TrainResult, train_job
from worker.errors import ArtifactWriteError, JobCancelled
from worker.litert import run_batches
from worker.spec import CLASS_NAMES, JobCreate
from worker.store import CONFUSION_FILE, CURVES_FILE, KERAS_FILE, METADATA_FILE, TFLITE_FILE, ModelStore

pytestmark = pytest.mark.realdata

REQUIRED_METADATA = {"id", "name", "kind", "job_id", "created_at", "classes", "input_shape", "spec", "metrics",
                     "history", "params", "data", "weights", "versions", "timings", "export"}


def _test_subset(settings: Settings, spec: JobCreate) -> tuple[np.ndarray, np.ndarray]:
    dataset = load_cifar10(settings)
    _, test_subset = draw_subsets(dataset, spec.train_samples, spec.test_samples, spec.seed)
    return take(dataset.test, test_subset)


def _model_entries(settings: Settings) -> list[str]:
    """Everything under models/ except an empty staging folder."""
    models = settings.artifact_dir / "models"
    if not models.exists():
        return []
    entries = [p.name for p in models.iterdir() if p.name != ".staging"]
    staging = models / ".staging"
    if staging.exists():
        entries += [f".staging/{p.name}" for p in staging.iterdir()]
    return entries


@pytest.fixture(scope="module")
def module_settings(shared_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return shared_settings.model_copy(update={"artifact_dir": tmp_path_factory.mktemp("artifacts")})


@pytest.fixture(scope="module")
def export_settings(module_settings: Settings) -> Settings:
    """`module_settings` with every export (the default TL_EXPORTS): only transfer_run pays for them."""
    return module_settings.model_copy(update={"exports": Settings.model_fields["exports"].default})


BASELINE = JobCreate(model="baseline", train_samples=400, test_samples=200, epochs=2, seed=7, name="tiny-cnn")
TRANSFER = JobCreate(model="transfer", train_samples=300, test_samples=200, epochs=2, seed=7)


@pytest.fixture(scope="module")
def baseline_run(module_settings: Settings, recording_reporter: Any) -> tuple[TrainResult, Any]:
    reporter = recording_reporter()
    return train_job(BASELINE, module_settings, reporter, job_id="j_test_baseline"), reporter


@pytest.fixture(scope="module")
def transfer_run(export_settings: Settings, recording_reporter: Any) -> tuple[TrainResult, Any]:
    reporter = recording_reporter()
    return train_job(TRANSFER, export_settings, reporter, job_id="j_test_transfer"), reporter


@pytest.mark.parametrize("run", ["baseline_run", "transfer_run"])
def test_a_job_writes_a_complete_model_directory(run: str, request: pytest.FixtureRequest,
                                                 module_settings: Settings) -> None:
    result, _ = request.getfixturevalue(run)
    files = {p.name for p in result.model_dir.iterdir()}
    metadata = json.loads((result.model_dir / METADATA_FILE).read_text())
    exported = {info["file"] for info in metadata["exports"].values()}
    assert files == {KERAS_FILE, TFLITE_FILE, METADATA_FILE, CURVES_FILE, CONFUSION_FILE} | exported
    assert (result.model_dir / CURVES_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (result.model_dir / CONFUSION_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metadata = json.loads((result.model_dir / METADATA_FILE).read_text())
    assert REQUIRED_METADATA <= set(metadata)
    assert metadata["id"] == result.model_id and metadata["classes"] == list(CLASS_NAMES)
    assert metadata["created_at"].endswith("Z") and metadata["input_shape"] == [32, 32, 3]
    assert metadata["metrics"] == result.metrics.model_dump(mode="json")
    assert metadata["data"]["source"]["train"]["sha256"] and metadata["data"]["seed"] == 7
    assert metadata["versions"]["tensorflow"] and metadata["versions"]["keras"]
    assert metadata["export"]["passed"] is True and metadata["export"]["file"] == TFLITE_FILE
    info = ModelStore(module_settings.artifact_dir).info(result.model_id)
    assert info is not None and info.kind == metadata["kind"] and info.job_id == metadata["job_id"]


def test_baseline_metadata_and_progress(baseline_run: tuple[TrainResult, Any]) -> None:
    result, reporter = baseline_run
    assert result.metadata["kind"] == "baseline" and result.metadata["name"] == "tiny-cnn"
    assert result.metadata["weights"] is None
    assert result.metadata["spec"] == BASELINE.public()
    assert result.metrics.params_total == 93482
    assert reporter.stages == ["loading_data", "training", "evaluating", "saving"]
    assert [r.epoch for r in reporter.epochs] == [1, 2]
    assert reporter.fractions == sorted(reporter.fractions) and reporter.fractions[-1] == 1.0
    # consulted after every chunk of batches and every validation batch: 2 epochs of ceil(400 / 32) = 13 batches
    assert reporter.checks_in_stage["training"] >= 2 * (math.ceil(13 / CHUNK_BATCHES) + 1)


def test_transfer_metadata_records_weights_and_cache(transfer_run: tuple[TrainResult, Any]) -> None:
    result, reporter = transfer_run
    metadata = result.metadata
    assert metadata["kind"] == "transfer"
    assert metadata["weights"]["file_name"] == "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5"
    assert len(metadata["weights"]["sha256"]) == 64 and metadata["weights"]["size"] == 96
    assert (result.metrics.params_total, result.metrics.params_trainable, result.metrics.params_non_trainable) == (
        3741578, 1483594, 2257984)
    assert metadata["training"]["feature_cache"] == {"train": "miss", "test": "miss"}
    assert reporter.stages == ["loading_data", "extracting_features", "training", "evaluating", "saving"]
    assert set(metadata["timings"]) == set(reporter.stages)


@pytest.mark.parametrize("run", ["baseline_run", "transfer_run"])
def test_saved_model_loads_in_safe_mode_and_reproduces_the_metrics(
        run: str, request: pytest.FixtureRequest, module_settings: Settings) -> None:
    """The reloaded model on the job's test images gives the accuracy and loss the job reported.

    For the transfer job the reported numbers came from the head on cached features, so this also shows the
    fast path's evaluation equals the saved full model's on the images.
    """
    result, _ = request.getfixturevalue(run)
    spec = BASELINE if run == "baseline_run" else TRANSFER
    x_test, y_test = _test_subset(module_settings, spec)
    model = keras.models.load_model(result.model_dir / KERAS_FILE, safe_mode=True)
    probs = model.predict(x_test.astype("float32"), verbose=0)
    accuracy = float(np.mean(probs.argmax(axis=1) == y_test))
    loss = float(np.mean(keras.losses.sparse_categorical_crossentropy(y_test, probs)))
    assert accuracy == pytest.approx(result.metrics.test_accuracy, abs=1e-9)
    assert loss == pytest.approx(result.metrics.test_loss, abs=1e-4)


@pytest.mark.parametrize("run", ["baseline_run", "transfer_run"])
def test_tflite_export_agrees_with_the_keras_model(run: str, request: pytest.FixtureRequest,
                                                   module_settings: Settings) -> None:
    result, _ = request.getfixturevalue(run)
    spec = BASELINE if run == "baseline_run" else TRANSFER
    x_test, _ = _test_subset(module_settings, spec)
    keras_probs = keras.models.load_model(result.model_dir / KERAS_FILE).predict(x_test.astype("float32"),
                                                                                verbose=0)
    lite_probs = run_batches(result.model_dir / TFLITE_FILE, x_test, batch_size=64)
    assert lite_probs.shape == (len(x_test), 10)
    assert np.mean(lite_probs.argmax(1) == keras_probs.argmax(1)) >= 0.999
    assert np.max(np.abs(lite_probs - keras_probs)) <= 1e-3


def test_second_transfer_job_hits_the_feature_cache_and_agrees(
        recording_reporter: Any, transfer_run: tuple[TrainResult, Any], module_settings: Settings) -> None:
    first, _ = transfer_run
    reporter = recording_reporter()
    second = train_job(TRANSFER, module_settings, reporter)
    assert "extracting_features" not in reporter.stages
    assert second.metadata["training"]["feature_cache"] == {"train": "hit", "test": "hit"}
    # Same seed and spec on the CPU with deterministic ops: the same model, to the last digit.
    assert second.metrics.test_accuracy == first.metrics.test_accuracy
    assert [r.val_loss for r in reporter.epochs] == [h["val_loss"] for h in first.metadata["history"]]


def test_cancel_during_training_keeps_no_model(recording_reporter: Any, settings: Settings) -> None:
    reporter = recording_reporter(cancel_after=0, cancel_in_stage="training")
    with pytest.raises(JobCancelled):
        train_job(BASELINE.model_copy(update={"epochs": 5}), settings, reporter)
    assert reporter.checks_in_stage["training"] == 1  # stopped at the first check, after the first chunk
    assert reporter.epochs == []
    assert _model_entries(settings) == []


def test_cancel_during_feature_extraction_keeps_no_model_and_no_cache(recording_reporter: Any,
                                                                     settings: Settings) -> None:
    reporter = recording_reporter(cancel_after=1, cancel_in_stage="extracting_features")
    spec = TRANSFER.model_copy(update={"train_samples": 600})
    with pytest.raises(JobCancelled):
        train_job(spec, settings, reporter)
    assert reporter.stages[-1] == "extracting_features"
    assert _model_entries(settings) == []
    assert not list(settings.feature_cache_dir.glob("*.npy")) if settings.feature_cache_dir.exists() else True


def test_cancel_seen_while_saving_leaves_nothing(recording_reporter: Any, settings: Settings) -> None:
    reporter = recording_reporter(cancel_after=0, cancel_in_stage="saving")
    with pytest.raises(JobCancelled):
        train_job(BASELINE.model_copy(update={"epochs": 1}), settings, reporter)
    assert _model_entries(settings) == []


def test_a_write_failure_while_saving_leaves_nothing(recording_reporter: Any, settings: Settings,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.engine.plots

    def disk_full(*args: Any, **kwargs: Any) -> None:  # fault injection: the last file cannot be written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(worker.engine.plots, "plot_curves", disk_full)
    with pytest.raises(ArtifactWriteError, match="No space left on device.*TL_ARTIFACT_DIR"):
        train_job(BASELINE.model_copy(update={"epochs": 1}), settings, recording_reporter())
    assert _model_entries(settings) == []


def test_fine_tuning_continues_epochs_and_keeps_batch_norm_frozen(recording_reporter: Any,
                                                                  settings: Settings) -> None:
    spec = JobCreate(model="transfer", train_samples=200, test_samples=100, epochs=1, image_size=32,
                     fine_tune_layers=12, fine_tune_epochs=2, fine_tune_learning_rate=1e-3, seed=3)
    reporter = recording_reporter()
    result = train_job(spec, settings, reporter)
    assert reporter.stages == ["loading_data", "extracting_features", "training", "fine_tuning", "evaluating",
                               "saving"]
    assert [r["epoch"] for r in result.metadata["history"]] == [1, 2, 3]
    assert result.metrics.params_trainable > 1280 * 128 + 128 * 64 + 64 * 10  # the head plus unfrozen layers

    saved = keras.models.load_model(result.model_dir / KERAS_FILE, safe_mode=True)
    weights_path = result.metadata["weights"]["path"]
    fresh = keras.applications.MobileNetV2(input_shape=(32, 32, 3), include_top=False, weights=weights_path)
    base = next(layer for layer in saved.layers if isinstance(layer, keras.Model))
    changed = []
    for layer, original in zip(base.layers, fresh.layers, strict=True):
        if not layer.weights:
            continue
        same = all(np.array_equal(a, b) for a, b in zip(layer.get_weights(), original.get_weights(), strict=True))
        if isinstance(layer, keras.layers.BatchNormalization):
            assert same, f"{layer.name}: BatchNormalization weights or statistics moved"
        elif not same:
            changed.append(layer.name)
    assert changed and set(changed) <= {layer.name for layer in base.layers[-12:]}


def test_same_seed_and_spec_reproduce_the_model_from_scratch(
        recording_reporter: Any, transfer_run: tuple[TrainResult, Any], settings: Settings) -> None:
    """A second run with an empty artifact directory (features recomputed) trains the very same model."""
    first, _ = transfer_run
    second = train_job(TRANSFER, settings, recording_reporter())
    assert second.metadata["training"]["feature_cache"] == {"train": "miss", "test": "miss"}
    assert second.metadata["data"]["train_indices_sha256"] == first.metadata["data"]["train_indices_sha256"]
    assert second.metadata["history"] == [{**h, "seconds": s["seconds"]} for h, s in
                                          zip(first.metadata["history"], second.metadata["history"], strict=True)]
    assert second.metrics.test_accuracy == first.metrics.test_accuracy


@pytest.mark.parametrize("run", ["baseline_run", "transfer_run"])
def test_every_job_is_evaluated_per_class(run: str, request: pytest.FixtureRequest) -> None:
    result, _ = request.getfixturevalue(run)
    metrics = result.metrics
    matrix = np.asarray(metrics.confusion_matrix)
    assert matrix.shape == (10, 10) and int(matrix.sum()) == result.metadata["data"]["test_images"]
    assert [c.class_ for c in metrics.per_class] == list(CLASS_NAMES)
    assert [c.support for c in metrics.per_class] == matrix.sum(axis=1).tolist()
    assert np.trace(matrix) / matrix.sum() == pytest.approx(metrics.test_accuracy, abs=1e-6)
    f1 = [c.f1 for c in metrics.per_class if c.support]
    assert metrics.macro_f1 == pytest.approx(sum(f1) / len(f1), abs=1e-5)
    assert result.metadata["dataset"]["id"] == "cifar10" and result.metadata["dataset"]["sha256"]


def test_a_diverged_training_fails_the_job_with_what_to_change() -> None:
    from types import SimpleNamespace

    from worker.engine.pipeline import JobContext, NullReporter, _fit, _Progress
    from worker.errors import TrainingDiverged

    spec = JobCreate(model="baseline", learning_rate=1.0, epochs=2)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    x = np.ones((64, 4), dtype=np.float32)
    x[5, 0] = np.inf  # the first batch's loss is not finite: the weights become NaN, as a diverging run's do
    y = np.zeros(64, dtype=np.int64)
    data = SimpleNamespace(y_train=y, y_test=y)
    progress = _Progress(NullReporter(), {"training": 1.0})
    progress.enter("training")
    job = JobContext(spec, None, None, progress, data, None, None)  # type: ignore[arg-type]
    loop = TrainingLoop(model, keras.optimizers.Adam(learning_rate=1.0), 32)
    with pytest.raises(TrainingDiverged, match=r"lower learning_rate \(now 1, e.g. to 0.1\)"):
        _fit(job, loop, x, x, epochs=2)


def test_exports_are_checked_and_offered_only_when_they_pass(transfer_run: tuple[TrainResult, Any],
                                                             module_settings: Settings) -> None:
    import tarfile

    import tensorflow as tf

    result, _ = transfer_run
    meta = result.metadata
    exports, failures = meta["exports"], meta["export_failures"]
    assert set(exports) | set(failures) == {"keras", "tflite", "tflite-float16", "tflite-int8", "savedmodel"}
    assert not set(exports) & set(failures) and all(failures.values())
    for name, info in exports.items():
        assert (result.model_dir / info["file"]).is_file(), name
    for name, floor in (("tflite-float16", 0.995), ("tflite-int8", 0.98), ("savedmodel", 0.999)):
        if name in exports:
            assert exports[name]["top1_agreement"] >= floor
            assert 0 < exports[name]["test_accuracy"] <= 1
        else:
            assert not list(result.model_dir.glob(f"*{name.split('-')[-1]}*"))  # a failed export ships no file
    if "tflite-int8" in exports:
        assert exports["tflite-int8"]["bytes"] <= 0.35 * exports["tflite"]["bytes"]
    # The SavedModel loads as TF Serving would, takes raw uint8 images and predicts like the service.
    assert "savedmodel" in exports, failures
    x_test, _ = _test_subset(module_settings, TRANSFER)
    target = result.model_dir.parent.parent / "savedmodel-check"
    with tarfile.open(result.model_dir / exports["savedmodel"]["file"]) as archive:
        archive.extractall(target, filter="data")
    serving = tf.saved_model.load(str(target / "1")).signatures["serving_default"]
    probs = serving(image=tf.constant(x_test[:50], dtype=tf.uint8))["probabilities"].numpy()
    lite = run_batches(result.model_dir / TFLITE_FILE, x_test[:50].astype(np.float32), batch_size=50)
    assert np.mean(probs.argmax(axis=1) == lite.argmax(axis=1)) >= 0.98


@pytest.mark.parametrize(("name", "floor", "max_share", "dtype"), [("tflite-float16", 0.995, 0.55, np.float32),
                                                                ("tflite-int8", 0.98, 0.35, np.uint8)])
def test_quantized_export_agrees_on_images_the_job_never_saw(transfer_run: tuple[TrainResult, Any],
                                                             module_settings: Settings, name: str, floor: float,
                                                             max_share: float, dtype: Any) -> None:
    """The downloaded export, run by LiteRT on raw pixels as a client sends them, against model.keras on 300
    CIFAR-10 test images outside the job's subset (issue 14, item 4: float16 at least 99.5 %, int8 at least 98 %
    and at most 35 % of the float32 file)."""
    result, _ = transfer_run
    exports = result.metadata["exports"]
    assert name in exports, result.metadata["export_failures"]
    assert exports[name]["bytes"] <= max_share * exports["tflite"]["bytes"]
    dataset = load_cifar10(module_settings)
    _, test_subset = draw_subsets(dataset, TRANSFER.train_samples, TRANSFER.test_samples, TRANSFER.seed)
    unseen = np.setdiff1d(np.arange(len(dataset.test.x)), test_subset.indices)[:300]
    x = dataset.test.x[unseen]
    model = keras.saving.load_model(str(result.model_dir / KERAS_FILE), compile=False)
    keras_top1 = model.predict(x.astype(np.float32), verbose=0).argmax(axis=1)
    lite = run_batches(result.model_dir / exports[name]["file"], x.astype(dtype), batch_size=64)
    assert np.mean(lite.argmax(axis=1) == keras_top1) >= floor
