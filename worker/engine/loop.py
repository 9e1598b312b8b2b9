"""The training loop: what `model.fit` does, a compiled chunk of batches per Python call.

Keras' `fit` runs one compiled step per batch, then its Python side (callbacks, metric objects, the tf.data
pipeline's threads) before the next; for a step as small as the transfer head's on a CPU, that overhead
dominates. Here a chunk of `CHUNK_BATCHES` batches runs inside one `tf.function` (a `tf.while_loop` over the
batches of a host-gathered chunk), and Python only checks for a cancel and reports progress between chunks.

The semantics are `fit`'s: per batch, the model called with `training=True` (so Dropout draws from its own
seed generator exactly as it would under `fit`), the mean sparse categorical cross-entropy, one optimizer
update; per epoch, the loss and accuracy averaged over samples as the batches saw them, then the validation
loss and accuracy with `training=False`. The only difference is the shuffle: each epoch's order is
`epoch_order(seed, epoch, n)`, a NumPy permutation, so a plain `fit(x[order], y[order], shuffle=False)`
per epoch reproduces a run to float rounding (tests/worker/engine/test_loop.py checks that).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.jobstore import EpochRecord

#: Batches per compiled call: large enough to amortise the Python round trip, small enough that a cancel is seen
#: soon (bench/README.md has the measurements).
CHUNK_BATCHES = 16
VALIDATION_BATCH = 1024  # for the head's features; models on images pass a smaller one


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The sample order of 1-based `epoch` for a job's `seed`: independent of chunking and of other epochs."""
    return np.random.default_rng([seed, epoch]).permutation(n)


@dataclass(frozen=True)
class LoopResult:
    history: list[EpochRecord]
    val_probs: np.ndarray  # the model's probabilities on the validation data after the last epoch


class TrainingLoop:
    """Trains `model` in place with `optimizer` on (x, y), validating on (x_val, y_val) after each epoch."""

    def __init__(self, model: Any, optimizer: Any, batch_size: int, *, validation_batch: int = VALIDATION_BATCH,
                 chunk_batches: int = CHUNK_BATCHES) -> None:
        import keras
        import tensorflow as tf

        self.batch_size = batch_size
        self.validation_batch = validation_batch
        self.chunk_batches = chunk_batches
        if keras.config.dtype_policy().name == "mixed_float16" and not isinstance(
                optimizer, keras.optimizers.LossScaleOptimizer):
            # What compile() does under mixed precision: float16 gradients need a dynamic loss scale.
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        self.optimizer = optimizer
        variables = model.trainable_variables
        optimizer.build(variables)
        # One trace each: a fixed signature with an open batch dimension (a chunk's last batch, an epoch's last
        # chunk and the validation batches all differ in size; each new size would otherwise cost a retrace).
        images = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)
        labels = tf.TensorSpec([None], tf.int32)
        sample_weights = tf.TensorSpec([None], tf.float32)

        def step(x: tf.Tensor, y: tf.Tensor, w: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            with tf.GradientTape() as tape:
                probs = tf.cast(model(x, training=True), tf.float32)  # float16 outputs under mixed precision
                # Keras' sample-weight semantics ("sum over batch size"); all ones without class weights.
                loss = tf.reduce_mean(w * keras.losses.sparse_categorical_crossentropy(y, probs))
                scaled = optimizer.scale_loss(loss)  # the loss itself unless a LossScaleOptimizer
            optimizer.apply(tape.gradient(scaled, variables), variables)
            correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(probs, axis=1, output_type=tf.int32), y), tf.float32))
            return loss * tf.cast(tf.shape(y)[0], tf.float32), correct

        @tf.function(input_signature=[images, labels, sample_weights])
        def run_chunk(x: tf.Tensor, y: tf.Tensor, w: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            n = tf.shape(y)[0]
            steps = (n + batch_size - 1) // batch_size

            def body(i: tf.Tensor, loss_sum: tf.Tensor, correct: tf.Tensor) -> tuple[tf.Tensor, ...]:
                start = i * batch_size
                stop = tf.minimum(start + batch_size, n)
                loss, right = step(x[start:stop], y[start:stop], w[start:stop])
                return i + 1, loss_sum + loss, correct + right

            _, loss_sum, correct = tf.while_loop(lambda i, *_: i < steps, body,
                                                 (tf.constant(0), tf.constant(0.0), tf.constant(0.0)))
            return loss_sum, correct

        @tf.function(input_signature=[images])
        def infer(x: tf.Tensor) -> tf.Tensor:
            return tf.cast(model(x, training=False), tf.float32)

        self._run_chunk = run_chunk
        self._infer = infer

    def predict(self, x: np.ndarray, between: Callable[[], None] | None = None) -> np.ndarray:
        """Probabilities in batches of `validation_batch`, calling `between()` after each (a cancel check)."""
        import tensorflow as tf

        out = []
        for start in range(0, len(x), self.validation_batch):
            out.append(self._infer(tf.constant(x[start:start + self.validation_batch], dtype=tf.float32)).numpy())
            if between is not None:
                between()
        return np.concatenate(out).astype(np.float32)

    def fit(self, x: np.ndarray | Sequence[np.ndarray], y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, *,
            epochs: int, seed: int, first_epoch: int = 1, class_weights: np.ndarray | None = None,
            after_chunk: Callable[[float], None] | None = None,
            on_epoch: Callable[[EpochRecord], None] | None = None) -> LoopResult:
        """Run `epochs` epochs numbered from `first_epoch`.

        `x` is the training inputs, or a list of views of them (augmented copies, same order): epoch `e` trains
        on view `(e - first_epoch) % len(views)`. `class_weights[c]` weights the loss of each class-c sample.
        `after_chunk(fraction_done)` runs between chunks (the place for a cancel check: it may raise),
        `on_epoch(record)` after each epoch's validation.
        """
        import tensorflow as tf

        views: list[np.ndarray] = list(x) if isinstance(x, list | tuple) else [np.asarray(x)]
        n = len(views[0])
        labels = np.asarray(y, dtype=np.int32)
        weights = (np.ones(n, dtype=np.float32) if class_weights is None
                   else np.asarray(class_weights, dtype=np.float32)[labels])
        chunk = self.chunk_batches * self.batch_size
        history: list[EpochRecord] = []
        val_probs = np.empty((0,), dtype=np.float32)
        for index in range(epochs):
            epoch = first_epoch + index
            started = time.perf_counter()
            order = epoch_order(seed, epoch, n)
            inputs = views[index % len(views)]
            loss_sum = correct = 0.0
            for start in range(0, n, chunk):
                picked = order[start:start + chunk]
                chunk_loss, chunk_correct = self._run_chunk(tf.constant(inputs[picked], dtype=tf.float32),
                                                            tf.constant(labels[picked]), tf.constant(weights[picked]))
                loss_sum += float(chunk_loss)
                correct += float(chunk_correct)
                if after_chunk is not None:
                    after_chunk((index + min(start + chunk, n) / n) / epochs)
            val_probs = self.predict(x_val, between=None if after_chunk is None else
                                     functools.partial(after_chunk, (index + 1) / epochs))
            val_loss, val_accuracy = loss_and_accuracy(val_probs, np.asarray(y_val))
            record = EpochRecord(epoch=epoch, loss=loss_sum / n, accuracy=correct / n, val_loss=val_loss,
                                 val_accuracy=val_accuracy, seconds=round(time.perf_counter() - started, 3))
            history.append(record)
            if on_epoch is not None:
                on_epoch(record)
        return LoopResult(history, val_probs)


def loss_and_accuracy(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Sparse categorical cross-entropy (Keras' clipping) and accuracy of predicted probabilities."""
    eps = 1e-7  # keras.config.epsilon(), as Keras' cross-entropy clips
    picked = np.clip(probs[np.arange(len(labels)), labels].astype(np.float64), eps, 1 - eps)
    return float(-np.mean(np.log(picked))), float(np.mean(probs.argmax(axis=1) == labels))
