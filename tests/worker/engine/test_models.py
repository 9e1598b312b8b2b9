"""The architectures: parameter counts, preprocessing inside the model, fine-tuning's frozen BatchNorm."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from worker.config import Settings
from worker.engine.models import build_baseline, build_transfer, count_params, unfreeze_top
from worker.engine.weights import resolve_weights
from worker.spec import JobCreate


def test_baseline_has_the_reference_parameter_count() -> None:
    model = build_baseline(10)
    assert count_params(model) == {"total": 93482, "trainable": 93482, "non_trainable": 0}
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 10)


@pytest.mark.realdata
def test_reference_transfer_model_has_exact_parameter_counts(shared_settings: Settings) -> None:
    spec = JobCreate(model="transfer")  # 96px, alpha 1.0, [128, 64]
    transfer = build_transfer(spec, resolve_weights(shared_settings, spec.alpha, spec.image_size), 10)
    assert count_params(transfer.model) == {"total": 3741578, "trainable": 1483594, "non_trainable": 2257984}
    assert transfer.feature_shape == (3, 3, 1280)
    names = [layer.name for layer in transfer.model.layers]
    assert names[:3] == ["image", "resize", "preprocess"]
    assert names[4:] == ["head_flatten", "head_dropout", "head_dense_1", "head_dense_2", "predictions"]


@pytest.mark.realdata
def test_preprocessing_is_mobilenet_v2s_own(shared_settings: Settings) -> None:
    spec = JobCreate(model="transfer", image_size=32)
    transfer = build_transfer(spec, resolve_weights(shared_settings, spec.alpha, spec.image_size), 10)
    pixels = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3)).astype("float32")
    ours = keras.Model(transfer.model.input, transfer.model.get_layer("preprocess").output)(pixels)
    theirs = keras.applications.mobilenet_v2.preprocess_input(pixels.copy())
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-6)


@pytest.mark.realdata
def test_unfreezing_keeps_batch_normalization_frozen(shared_settings: Settings) -> None:
    spec = JobCreate(model="transfer", image_size=32, fine_tune_layers=30, fine_tune_epochs=1)
    transfer = build_transfer(spec, resolve_weights(shared_settings, spec.alpha, spec.image_size), 10)
    unfreeze_top(transfer.base, 30)
    top = transfer.base.layers[-30:]
    assert any(layer.trainable and layer.weights for layer in top)
    assert all(not layer.trainable for layer in transfer.base.layers
               if isinstance(layer, keras.layers.BatchNormalization))
    assert all(not layer.trainable for layer in transfer.base.layers[:-30] if layer.weights)
