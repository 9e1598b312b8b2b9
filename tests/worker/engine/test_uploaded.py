"""Training on uploaded datasets, end to end in the engine: real images under user class names, an npz of
grayscale digits, augmentation, class weights and fine-tuning; the exports serve the dataset's own classes."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import testkit
from PIL import Image

from worker.config import Settings
from worker.dataset_tasks import process_dataset_now
from worker.engine.datasets import class_weights, stratified_indices
from worker.engine.pipeline import NullReporter, TrainResult, train_job
from worker.imaging import decode_image
from worker.jobstore import utc_now
from worker.litert import run_batches
from worker.spec import JobCreate
from worker.store import CONFUSION_FILE, METADATA_FILE, TFLITE_FILE
from worker.store.datasets import DatasetRecord, DatasetStore, new_dataset_id

pytestmark = pytest.mark.realdata

#: User class names over three CIFAR-10 classes (airplane, frog, truck).
USER_CLASSES = {"jets": 0, "toads": 6, "lorries": 9}


def upload(settings: Settings, archive: bytes, name: str) -> str:
    """Store `archive` as the API would and process it as the dataset worker does; returns the dataset id."""
    store = DatasetStore(settings.artifact_dir)
    dataset_id = new_dataset_id()
    with store.receiving(dataset_id) as path:
        path.write_bytes(archive)
    store.put(DatasetRecord(id=dataset_id, name=name, status="processing", created_at=utc_now()))
    assert process_dataset_now(dataset_id, settings) == "ready", store.get(dataset_id)
    return dataset_id


@pytest.fixture(scope="module")
def cifar_test() -> tuple[np.ndarray, np.ndarray]:
    with np.load(testkit.cifar10_npz("test")) as data:
        return data["x"], data["y"].reshape(-1).astype(np.int64)


@pytest.fixture(scope="module")
def module_settings(shared_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return shared_settings.model_copy(update={"artifact_dir": tmp_path_factory.mktemp("uploaded")})


def _file(pixels: np.ndarray, i: int) -> tuple[str, bytes]:
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    if i % 2:
        image.resize((160 + i % 70, 120 + i % 50), Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=92)
        return ".jpg", buffer.getvalue()
    image.resize((64, 64), Image.Resampling.BICUBIC).save(buffer, format="PNG")
    return ".png", buffer.getvalue()


@pytest.fixture(scope="module")
def folders_dataset(module_settings: Settings, cifar_test: tuple[np.ndarray, np.ndarray]) -> str:
    """A zip of class folders: 60 images per class (the first ones of each class), JPEG and PNG, other sizes."""
    x, y = cifar_test
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, label in USER_CLASSES.items():
            for i, index in enumerate(np.flatnonzero(y == label)[:60]):
                suffix, data = _file(x[index], i)
                archive.writestr(f"my-photos/{name}/{i:03d}{suffix}", data)
        archive.writestr("my-photos/README.txt", b"three kinds of vehicle and animal")
    return upload(module_settings, buffer.getvalue(), "photos")


@pytest.fixture(scope="module")
def transfer_run(module_settings: Settings, folders_dataset: str) -> TrainResult:
    spec = JobCreate(model="transfer", dataset=folders_dataset, epochs=3, image_size=96, seed=3,
                     augment=["flip", "translate"], class_weight="balanced", fine_tune_layers=8, fine_tune_epochs=1)
    return train_job(spec, module_settings, NullReporter(), job_id="j_uploaded")


def test_a_transfer_model_learns_the_users_classes(transfer_run: TrainResult,
                                                   cifar_test: tuple[np.ndarray, np.ndarray]) -> None:
    metadata = transfer_run.metadata
    assert metadata["classes"] == sorted(USER_CLASSES) and metadata["input_shape"] == [96, 96, 3]
    assert metadata["dataset"]["name"] == "photos" and len(metadata["dataset"]["sha256"]) == 64
    assert metadata["data"]["augment"] == {"views": 3, "layers": ["flip", "translate"]}
    assert metadata["history"][-1]["epoch"] == 4  # 3 head epochs, then 1 of fine-tuning
    metrics = transfer_run.metrics
    assert metrics.test_accuracy > 0.6, metrics  # chance is 1/3
    matrix = np.asarray(metrics.confusion_matrix)
    assert matrix.shape == (3, 3) and int(matrix.sum()) == metadata["data"]["test_images"]
    assert [c.class_ for c in metrics.per_class] == sorted(USER_CLASSES)
    assert (transfer_run.model_dir / CONFUSION_FILE).is_file()

    # Images from outside the archive, decoded and resized as predict does, through the served .tflite.
    x, y = cifar_test
    order = sorted(USER_CLASSES)
    picked = [(i, order.index(name)) for name, label in USER_CLASSES.items()
              for i in np.flatnonzero(y == label)[200:240]]
    images = np.stack([decode_image(_file(x[i], 0)[1], f"image {i}", 96) for i, _ in picked]).astype(np.float32)
    probs = run_batches(transfer_run.model_dir / TFLITE_FILE, images, batch_size=32)
    assert probs.shape == (len(picked), 3)
    accuracy = float(np.mean(np.argmax(probs, axis=1) == np.array([label for _, label in picked])))
    assert accuracy > 0.6, accuracy


def test_a_baseline_on_grayscale_digits_from_an_npz(module_settings: Settings) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)  # (1797, 8, 8) grayscale
    buffer = io.BytesIO()
    np.savez(buffer, x=images, y=digits.target.astype(np.int64),
             class_names=np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]))
    dataset_id = upload(module_settings, buffer.getvalue(), "digits")
    spec = JobCreate(model="baseline", dataset=dataset_id, epochs=4, batch_size=32, seed=1, train_samples=800)
    result = train_job(spec, module_settings, NullReporter(), job_id="j_digits")
    metadata = json.loads((result.model_dir / METADATA_FILE).read_text())
    assert metadata["input_shape"] == [32, 32, 3] and len(metadata["classes"]) == 10
    assert metadata["data"]["train_images"] == 800
    assert result.metrics.test_accuracy > 0.5, result.metrics  # chance is 0.1
    assert result.metrics.macro_f1 is not None and result.metrics.macro_f1 > 0.4


def test_stratified_subsets_keep_every_class_and_are_seeded() -> None:
    labels = np.repeat(np.arange(4), [50, 30, 15, 5])
    picked = stratified_indices(labels, 20, seed=1, stream=0)
    assert len(picked) == 20 and len(set(picked.tolist())) == 20
    counts = np.bincount(labels[picked], minlength=4)
    assert counts.tolist() == [10, 6, 3, 1]
    assert np.array_equal(picked, stratified_indices(labels, 20, seed=1, stream=0))
    assert not np.array_equal(picked, stratified_indices(labels, 20, seed=2, stream=0))
    assert np.array_equal(stratified_indices(labels, None, seed=1, stream=0), np.arange(100))
    few = stratified_indices(labels, 4, seed=0, stream=1)
    assert sorted(set(labels[few].tolist())) == [0, 1, 2, 3]


def test_balanced_class_weights_are_n_over_k_times_count() -> None:
    weights = class_weights(np.array([0, 0, 0, 1]), 3)
    assert weights.tolist() == pytest.approx([4 / 9, 4 / 3, 0.0])

