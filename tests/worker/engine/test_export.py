"""TFLite templates: a model that differs from an earlier one only in its head's weights is patched, not converted.

Real transfer models (MobileNetV2 with the real ImageNet weights at 32 px, head [32]); each full conversion takes a
few seconds, so the conversions of the two heads used throughout (A and B) are made once per module.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from worker.config import Settings
from worker.engine.data import draw_subsets, load_cifar10, take
from worker.engine.export import (
    CHECK_BATCH,
    TEMPLATE_PATCH,
    ExportTemplate,
    TemplateUnusable,
    TfliteTemplates,
    convert_tflite,
    export_tflite,
)
from worker.engine.models import build_transfer, head_layer_names
from worker.engine.runtime import configure_tensorflow
from worker.engine.weights import resolve_weights
from worker.litert import run_batches
from worker.spec import JobCreate
from worker.store import TFLITE_FILE

pytestmark = pytest.mark.realdata

SPEC = JobCreate(model="transfer", image_size=32, dense_units=[32])
LAYERS = head_layer_names(SPEC)
KEY = "mobilenetv2 32px alpha 1.0, head [32]"
HEAD_A, HEAD_B = 1, 2


def set_head(model: keras.Model, seed: int) -> None:
    """Random head weights (biases too, so every value is distinctive), the same for the same seed."""
    rng = np.random.default_rng(seed)
    for name in LAYERS:
        layer = model.get_layer(name)
        layer.set_weights([rng.normal(0, 0.1, w.shape).astype(np.float32) for w in layer.get_weights()])


def keras_probs(model: keras.Model, images: np.ndarray) -> np.ndarray:
    return np.asarray(model(images, training=False))


def read_template(path: Path) -> tuple[dict[str, Any], bytes]:
    header, _, content = path.read_bytes().partition(b"\n")
    return json.loads(header), content


def write_template(path: Path, manifest: dict[str, Any], content: bytes) -> None:
    manifest = {**manifest, "content_sha256": hashlib.sha256(content).hexdigest(), "content_bytes": len(content)}
    path.write_bytes(json.dumps(manifest).encode() + b"\n" + content)


def export_head_b(model: keras.Model, images: np.ndarray, templates: Path, out: Path) -> dict[str, Any]:
    """The second job: `model` with head B, exported against the template store `templates`."""
    set_head(model, HEAD_B)
    return export_tflite(model, images, keras_probs(model, images), out,
                         template=ExportTemplate(templates, KEY, tuple(LAYERS)))


def assert_shipped_by_full_conversion(record: dict[str, Any], out: Path, converted_b: bytes) -> None:
    """No patch shipped: a full conversion passed, was written, and replaced the template."""
    assert record["conversion"] == "frozen_concrete_function" and record["passed"]
    assert (out / TFLITE_FILE).read_bytes() == converted_b
    assert record["template"]["stored"] is True


@pytest.fixture(scope="module")
def model(shared_settings: Settings) -> keras.Model:
    configure_tensorflow(shared_settings)
    return build_transfer(SPEC, resolve_weights(shared_settings, SPEC.alpha, SPEC.image_size), 10).model


@pytest.fixture(scope="module")
def images(shared_settings: Settings) -> np.ndarray:
    dataset = load_cifar10(shared_settings)
    _, test_subset = draw_subsets(dataset, 100, 100, seed=0)
    return take(dataset.test, test_subset)[0].astype(np.float32)


@pytest.fixture(scope="module")
def exported_a(model: keras.Model, images: np.ndarray, tmp_path_factory: pytest.TempPathFactory,
               ) -> tuple[dict[str, Any], Path]:
    """Head A exported with an empty template directory: its record and that directory."""
    root = tmp_path_factory.mktemp("exported_a")
    set_head(model, HEAD_A)
    record = export_tflite(model, images, keras_probs(model, images), root,
                           template=ExportTemplate(root / "templates", KEY, tuple(LAYERS)))
    return record, root / "templates"


@pytest.fixture(scope="module")
def converted_b(model: keras.Model) -> bytes:
    """A full conversion of head B."""
    set_head(model, HEAD_B)
    return convert_tflite(model)[0]


@pytest.fixture
def templates(exported_a: tuple[dict[str, Any], Path], tmp_path: Path) -> Path:
    """A copy of the template directory holding head A's template (tests may damage it)."""
    return Path(shutil.copytree(exported_a[1], tmp_path / "templates"))


@pytest.fixture
def out(tmp_path: Path) -> Path:
    directory = tmp_path / "model"
    directory.mkdir()
    return directory


def test_a_passing_full_conversion_is_kept_as_a_template(exported_a: tuple[dict[str, Any], Path]) -> None:
    record, directory = exported_a
    assert record["passed"] and record["file"] == TFLITE_FILE
    assert record["conversion"] == "frozen_concrete_function"
    assert record["template"]["status"] == "missing" and record["template"]["stored"] is True
    (path,) = TfliteTemplates(directory).entries()
    manifest, content = read_template(path)
    assert manifest["key"] == KEY
    # FULLY_CONNECTED keeps the kernel as [out, in]: the converter stores Keras' [in, out] kernel transposed.
    assert [(p["layer"], p["weight"], p["shape"], p["transposed"]) for p in manifest["patches"]] == [
        ("head_dense_1", "kernel", [1280, 32], True), ("head_dense_1", "bias", [32], False),
        ("predictions", "kernel", [32, 10], True), ("predictions", "bias", [10], False)]
    assert content == (directory.parent / TFLITE_FILE).read_bytes()


def test_patching_the_template_gives_the_bytes_of_a_full_conversion(model: keras.Model, templates: Path,
                                                                     converted_b: bytes) -> None:
    set_head(model, HEAD_B)
    patched = TfliteTemplates(templates).patch(KEY, model, LAYERS)
    assert patched is not None
    assert patched == converted_b
    _, template = read_template(TfliteTemplates(templates).path(KEY))
    assert patched != template


def test_a_second_export_patches_the_template_and_passes_the_check(model: keras.Model, images: np.ndarray,
                                                                   templates: Path, converted_b: bytes,
                                                                   out: Path) -> None:
    record = export_head_b(model, images, templates, out)
    assert record["conversion"] == TEMPLATE_PATCH and record["template"] == {"status": "patched"}
    assert record["passed"] and record["max_prob_diff"] <= 1e-5
    assert (out / TFLITE_FILE).read_bytes() == converted_b


def test_a_template_is_not_used_for_a_head_of_other_shapes(shared_settings: Settings, templates: Path) -> None:
    spec = SPEC.model_copy(update={"dense_units": [16]})  # same key: the caller forgot the head layout
    other = build_transfer(spec, resolve_weights(shared_settings, spec.alpha, spec.image_size), 10).model
    with pytest.raises(TemplateUnusable, match="head weights differ"):
        TfliteTemplates(templates).patch(KEY, other, head_layer_names(spec))


def test_a_template_is_not_used_when_the_frozen_weights_differ(model: keras.Model, templates: Path) -> None:
    set_head(model, HEAD_B)
    variable = model.get_layer("mobilenetv2_1.00_32").get_layer("Conv1").kernel
    original = variable.numpy()
    try:
        variable.assign(original * 1.01)  # e.g. a fine-tuned base under the same key
        with pytest.raises(TemplateUnusable, match="frozen_weights_sha256 differs"):
            TfliteTemplates(templates).patch(KEY, model, LAYERS)
    finally:
        variable.assign(original)
    assert TfliteTemplates(templates).patch(KEY, model, LAYERS) is not None


def test_no_template_is_made_or_used_for_a_model_with_a_trainable_base(model: keras.Model, templates: Path) -> None:
    set_head(model, HEAD_A)
    _, content = read_template(TfliteTemplates(templates).path(KEY))
    base = model.get_layer("mobilenetv2_1.00_32")
    base.trainable = True
    try:
        with pytest.raises(TemplateUnusable, match="trainable weight"):
            TfliteTemplates(templates).store("another key", model, LAYERS, content, "frozen_concrete_function")
        with pytest.raises(TemplateUnusable, match="trainable weight"):
            TfliteTemplates(templates).patch(KEY, model, LAYERS)
    finally:
        base.trainable = False


def test_no_template_is_made_when_a_head_value_is_not_unique(model: keras.Model, templates: Path) -> None:
    set_head(model, HEAD_A)
    _, content = read_template(TfliteTemplates(templates).path(KEY))
    bias = model.get_layer("predictions").bias.numpy().astype("<f4").tobytes()
    with pytest.raises(TemplateUnusable, match="more than once"):
        TfliteTemplates(templates).store("another key", model, LAYERS, content + bias, "frozen_concrete_function")
    assert not TfliteTemplates(templates).path("another key").exists()


def test_a_corrupt_template_means_a_full_conversion(model: keras.Model, images: np.ndarray, templates: Path,
                                                    converted_b: bytes, out: Path) -> None:
    path = TfliteTemplates(templates).path(KEY)
    path.write_bytes(path.read_bytes()[:-1000])  # truncated, e.g. by a full disk
    record = export_head_b(model, images, templates, out)
    assert record["template"]["status"] == "unusable" and "corrupt" in record["template"]["reason"]
    assert_shipped_by_full_conversion(record, out, converted_b)
    assert TfliteTemplates(templates).patch(KEY, model, LAYERS) == converted_b


def test_a_patched_model_that_fails_the_check_is_not_shipped(model: keras.Model, images: np.ndarray,
                                                             templates: Path, converted_b: bytes, out: Path) -> None:
    from ai_edge_litert.interpreter import Interpreter

    # Damage the template's base (negate the largest convolution kernel) behind a consistent manifest: the
    # patch itself is then valid, only the check can tell.
    path = TfliteTemplates(templates).path(KEY)
    manifest, content = read_template(path)
    interpreter = Interpreter(model_content=content)
    largest = max((d for d in interpreter.get_tensor_details() if d["dtype"] == np.float32 and "Conv_1" in d["name"]),
                  key=lambda d: int(np.prod(d["shape"])))
    kernel = interpreter.get_tensor(largest["index"]).astype("<f4")
    assert content.count(kernel.tobytes()) == 1
    damaged = content.replace(kernel.tobytes(), (-kernel).tobytes())
    write_template(path, manifest, damaged)

    record = export_head_b(model, images, templates, out)
    assert record["template"]["status"] == "rejected" and "disagrees" in record["template"]["reason"]
    assert_shipped_by_full_conversion(record, out, converted_b)
    assert read_template(path)[1] != damaged


def test_a_head_with_a_single_unit_layer_is_patched(tmp_path: Path) -> None:
    """A [n, 1] kernel has the same bytes transposed or not; it must still be found (once) and patched."""
    inputs = keras.Input((8, 8, 3), name="image")
    base = keras.layers.Conv2D(4, 3, name="conv", trainable=False)
    x = keras.layers.Flatten()(base(inputs))
    x = keras.layers.Dense(1, activation="relu", name="narrow")(x)
    tiny = keras.Model(inputs, keras.layers.Dense(10, activation="softmax", name="out")(x))
    layers = ["narrow", "out"]
    rng = np.random.default_rng(0)

    def set_tiny_head(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for name in layers:
            layer = tiny.get_layer(name)
            layer.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) for w in layer.get_weights()])

    set_tiny_head(1)
    store = TfliteTemplates(tmp_path)
    store.store("tiny", tiny, layers, convert_tflite(tiny)[0], "frozen_concrete_function")
    set_tiny_head(2)
    patched = store.patch("tiny", tiny, layers)
    assert patched == convert_tflite(tiny)[0]
    images = rng.uniform(0, 255, (16, 8, 8, 3)).astype(np.float32)
    assert np.max(np.abs(run_batches(patched, images, batch_size=CHECK_BATCH) - keras_probs(tiny, images))) < 1e-5


def test_the_newest_templates_are_kept(model: keras.Model, templates: Path) -> None:
    set_head(model, HEAD_A)
    store = TfliteTemplates(templates, max_entries=3)
    _, content = read_template(store.path(KEY))
    stale, fresh = (templates / f".x.tflite-template.{n}.tmp" for n in ("dead", "live"))
    stale.write_bytes(b"left by a writer that died")
    fresh.write_bytes(b"being written right now")
    os.utime(stale, (time.time() - 2 * 3600, time.time() - 2 * 3600))
    for key in ("k1", "k2"):
        store.store(key, model, LAYERS, content, "frozen_concrete_function")
    assert store.patch(KEY, model, LAYERS) is not None  # using KEY makes it the newest: k1 is now the oldest
    store.store("k3", model, LAYERS, content, "frozen_concrete_function")
    assert sorted(p.name for p in store.entries()) == sorted(store.path(k).name for k in (KEY, "k2", "k3"))
    assert store.patch("k1", model, LAYERS) is None
    assert list(templates.glob(".*.tmp")) == [fresh]
