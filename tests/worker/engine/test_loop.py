"""worker.engine.loop.TrainingLoop trains exactly as Keras' `fit` does, in compiled chunks of batches."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from worker.engine.loop import TrainingLoop, epoch_order
from worker.errors import JobCancelled

BATCH = 16


def _model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((24,))
    x = keras.layers.Dropout(0.3, seed=seed)(inputs)
    x = keras.layers.Dense(32, activation="relu")(x)
    return keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(x))


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 24)).astype(np.float32)
    y = (x[:, :4].argmax(axis=1) + (rng.random(n) < 0.2)) % 4  # learnable, with some label noise
    return x, y.astype(np.int64)


def test_epoch_order_is_a_seeded_permutation_per_epoch() -> None:
    first = epoch_order(7, 1, 100)
    assert sorted(first.tolist()) == list(range(100))
    assert np.array_equal(first, epoch_order(7, 1, 100))
    assert not np.array_equal(first, epoch_order(7, 2, 100))
    assert not np.array_equal(first, epoch_order(8, 1, 100))


@pytest.mark.parametrize("chunk_batches", [1, 3, 50])
def test_the_loop_trains_what_fit_trains_in_the_same_order(chunk_batches: int) -> None:
    """Same initial weights, Dropout seed, order and optimizer: the same history and weights, whatever the chunk.

    200 samples in batches of 16 leave a partial last batch of 8, which both must handle alike.
    """
    x, y = _data(200, seed=1)
    x_val, y_val = _data(60, seed=2)
    epochs = 3

    ours = _model(5)
    records = []
    result = TrainingLoop(ours, keras.optimizers.Adam(1e-2), BATCH, chunk_batches=chunk_batches).fit(
        x, y, x_val, y_val, epochs=epochs, seed=9, on_epoch=records.append)

    plain = _model(5)
    plain.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    fitted = []
    for epoch in range(1, epochs + 1):
        order = epoch_order(9, epoch, len(x))
        fitted.append(plain.fit(x[order], y[order], batch_size=BATCH, epochs=epoch, initial_epoch=epoch - 1,
                                shuffle=False, validation_data=(x_val, y_val), verbose=0).history)

    assert records == result.history and [r.epoch for r in records] == [1, 2, 3]
    for record, history in zip(result.history, fitted, strict=True):
        assert record.loss == pytest.approx(history["loss"][0], rel=1e-5)
        assert record.accuracy == pytest.approx(history["accuracy"][0], abs=1e-6)
        assert record.val_loss == pytest.approx(history["val_loss"][0], rel=1e-5)
        assert record.val_accuracy == pytest.approx(history["val_accuracy"][0], abs=1e-6)
    for a, b in zip(ours.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.val_probs, plain.predict(x_val, verbose=0), atol=1e-6)
    # It learned (chance is 0.25), so the agreement above is not between two runs that did nothing.
    assert result.history[-1].accuracy > result.history[0].accuracy + 0.1 and result.history[-1].val_accuracy > 0.4


def test_after_chunk_reports_progress_and_its_exception_stops_training() -> None:
    x, y = _data(200, seed=3)
    model = _model(1)
    before = [w.copy() for w in model.get_weights()]
    seen: list[float] = []

    def after_chunk(fraction: float) -> None:
        seen.append(fraction)
        if len(seen) == 2:
            raise JobCancelled("asked to stop")

    with pytest.raises(JobCancelled):
        TrainingLoop(model, keras.optimizers.Adam(1e-2), BATCH, chunk_batches=4).fit(
            x, y, x, y, epochs=2, seed=0, after_chunk=after_chunk)
    # 200 samples = 13 batches = 4 chunks per epoch; it stopped after the second, in the first epoch.
    assert seen == pytest.approx([64 / 200 / 2, 128 / 200 / 2])
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))


def test_progress_reaches_one_through_every_chunk_and_validation_batch() -> None:
    x, y = _data(100, seed=4)
    seen: list[float] = []
    TrainingLoop(_model(2), keras.optimizers.Adam(1e-3), BATCH, chunk_batches=2, validation_batch=40).fit(
        x, y, x, y, epochs=2, seed=0, after_chunk=seen.append)
    # per epoch: 7 batches -> 4 chunks, then 3 validation batches of at most 40
    assert len(seen) == 2 * (4 + 3)
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0)


def test_under_mixed_precision_the_optimizer_gets_a_loss_scale() -> None:
    """As compile() does: float16 gradients need a dynamic loss scale, or small ones vanish."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        x, y = _data(64, seed=5)
        model = _model(3)
        loop = TrainingLoop(model, keras.optimizers.Adam(1e-2), BATCH)
        assert isinstance(loop.optimizer, keras.optimizers.LossScaleOptimizer)
        before = [w.copy() for w in model.get_weights()]
        result = loop.fit(x, y, x, y, epochs=1, seed=0)
        assert np.isfinite(result.history[0].loss)
        assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))
    finally:
        keras.config.set_dtype_policy(previous)
    assert not isinstance(TrainingLoop(_model(3), keras.optimizers.Adam(), BATCH).optimizer,
                          keras.optimizers.LossScaleOptimizer)
