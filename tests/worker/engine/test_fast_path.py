"""The frozen-base fast path trains the same model as a plain `fit` of the whole model."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import pytest

from worker.config import Settings
from worker.engine.data import draw_subsets, load_cifar10, take
from worker.engine.features import extract_features
from worker.engine.loop import epoch_order
from worker.engine.models import build_transfer
from worker.engine.pipeline import train_job
from worker.engine.runtime import configure_tensorflow
from worker.engine.weights import resolve_weights
from worker.spec import JobCreate

pytestmark = pytest.mark.realdata

SPEC = JobCreate(model="transfer", train_samples=600, test_samples=300, epochs=3, seed=11)


def test_head_on_features_equals_the_full_model_on_images(shared_settings: Settings) -> None:
    configure_tensorflow(shared_settings)
    dataset = load_cifar10(shared_settings)
    _, test_subset = draw_subsets(dataset, 100, 100, seed=0)
    images, _ = take(dataset.test, test_subset)
    keras.utils.set_random_seed(0)
    transfer = build_transfer(SPEC, resolve_weights(shared_settings, SPEC.alpha, SPEC.image_size), 10)
    features = extract_features(transfer.extractor, images, batch_size=64)
    head = keras.Model(transfer.model.get_layer("head_flatten").input, transfer.model.output)
    via_features = head.predict(features, verbose=0)
    via_images = transfer.model.predict(images.astype("float32"), batch_size=32, verbose=0)
    assert np.array_equal(via_features.argmax(1), via_images.argmax(1))
    assert np.max(np.abs(via_features - via_images)) < 1e-5


def test_fast_path_matches_plain_fit_of_the_whole_model(settings: Settings, recording_reporter: Any) -> None:
    """Same seed, head, epochs, batch size and learning rate: the same training, up to float rounding.

    The plain side is Keras' own `fit` of the whole model on the images, one epoch per call in the engine's
    order (`epoch_order`, shuffle off). Both start from the same initial weights (the engine copies the full
    model's initial head) with the same Dropout seed, so the only differences are float rounding of the base
    features (batch size and graph differ) and of the fused Adam kernel. The tolerances (1 point = 3 of 300
    images, losses 0.1 %) leave room for a near-tie prediction to flip on other CPUs, and are far tighter than
    any real difference in training would give.
    """
    fast = train_job(SPEC, settings, recording_reporter())

    dataset = load_cifar10(settings)
    train_subset, test_subset = draw_subsets(dataset, SPEC.train_samples, SPEC.test_samples, SPEC.seed)
    (x_train, y_train), (x_test, y_test) = take(dataset.train, train_subset), take(dataset.test, test_subset)
    keras.utils.set_random_seed(SPEC.seed)
    transfer = build_transfer(SPEC, resolve_weights(settings, SPEC.alpha, SPEC.image_size), 10)
    model = transfer.model
    model.compile(optimizer=keras.optimizers.Adam(SPEC.learning_rate), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    plain_losses = []
    for epoch in range(1, SPEC.epochs + 1):
        order = epoch_order(SPEC.seed, epoch, len(x_train))
        history = model.fit(x_train[order].astype("float32"), y_train[order], batch_size=SPEC.batch_size,
                            epochs=epoch, initial_epoch=epoch - 1, shuffle=False,
                            validation_data=(x_test.astype("float32"), y_test), verbose=0)
        plain_losses.append(history.history["loss"][-1])
    plain_accuracy = history.history["val_accuracy"][-1]
    assert abs(fast.metrics.test_accuracy - plain_accuracy) <= 0.01, (fast.metrics.test_accuracy, plain_accuracy)
    fast_losses = [h["loss"] for h in fast.metadata["history"]]
    assert fast_losses == pytest.approx(plain_losses, rel=1e-3)
