"""The two architectures. Preprocessing lives inside each model, so a saved model takes raw 0..255 RGB.

- `build_baseline`: 32x32x3 in, Rescaling(1/255) -> Conv32 -> MaxPool -> Conv64 -> MaxPool -> Flatten -> Dense32
  -> Dense(classes) (93,482 parameters on CIFAR-10's ten classes).
- `build_transfer`: 32x32x3 in on CIFAR-10 (resized inside the model to image_size), image_size x image_size on
  uploaded datasets; Rescaling to -1..1 (MobileNetV2's own preprocessing) -> frozen MobileNetV2(include_top=False,
  ImageNet) called with training=False -> Flatten -> Dropout -> relu Dense per `dense_units` -> Dense(classes,
  softmax). 3,741,578 parameters for CIFAR-10 at 96px, alpha 1.0, [128, 64].

The head of the transfer model is built by one function, used both on the base's output inside the full model
and on cached features (`build_head`), so weights move between the two by layer name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import keras

from worker.engine.weights import WeightsFile
from worker.imaging import INPUT_SHAPE
from worker.spec import JobCreate


def count_params(model: keras.Model) -> dict[str, int]:
    """Total, trainable and non-trainable parameter counts of `model`."""
    trainable = sum(math.prod(w.shape) for w in model.trainable_weights)
    non_trainable = sum(math.prod(w.shape) for w in model.non_trainable_weights)
    return {"total": trainable + non_trainable, "trainable": trainable, "non_trainable": non_trainable}


def build_baseline(num_classes: int) -> keras.Model:
    """The small CNN trained from scratch (scaling to 0..1 inside the model), 32x32x3 in."""
    inputs = keras.Input(INPUT_SHAPE, dtype="float32", name="image")
    x = keras.layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    x = keras.layers.Conv2D(32, 3, activation="relu", name="conv1")(x)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(64, 3, activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(name="pool2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(32, activation="relu", name="dense")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions")(x)
    return keras.Model(inputs, outputs, name="baseline_cnn")


def head_layer_names(spec: JobCreate) -> list[str]:
    """Names of the head's layers that carry weights (shared by the full model and the feature head)."""
    return [f"head_dense_{i + 1}" for i in range(len(spec.dense_units))] + ["predictions"]


def head_layers(features: Any, spec: JobCreate, num_classes: int) -> Any:
    """The transfer head applied to `features` (a Keras tensor of the base's output): probabilities."""
    x = keras.layers.Flatten(name="head_flatten")(features)
    x = keras.layers.Dropout(spec.dropout, seed=spec.seed, name="head_dropout")(x)
    for i, units in enumerate(spec.dense_units):
        x = keras.layers.Dense(units, activation="relu", name=f"head_dense_{i + 1}")(x)
    return keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions")(x)


def build_head(spec: JobCreate, feature_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """The transfer head alone, taking the base's output (the frozen-base fast path trains this)."""
    inputs = keras.Input(feature_shape, dtype="float32", name="features")
    return keras.Model(inputs, head_layers(inputs, spec, num_classes), name="transfer_head")


@dataclass
class TransferModel:
    model: keras.Model  # image -> probabilities: what is trained (fine-tuning), evaluated and saved
    base: keras.Model  # the MobileNetV2 part
    extractor: keras.Model  # image -> base features (same layers as `model`, not saved)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.base.output.shape[1:])


def build_base(spec: JobCreate, weights: WeightsFile) -> keras.Model:
    """The frozen MobileNetV2 base (no top) for the job's image size and alpha, loaded from `weights`."""
    base = keras.applications.MobileNetV2(
        input_shape=(spec.image_size, spec.image_size, 3),
        alpha=spec.alpha,
        include_top=False,
        weights=weights.path,
    )
    base.trainable = False
    return base


def build_transfer(spec: JobCreate, weights: WeightsFile, num_classes: int,
                   input_shape: tuple[int, ...] = INPUT_SHAPE) -> TransferModel:
    """The reference transfer model; the base is frozen and called with training=False. An input smaller or
    larger than `image_size` is resized inside the model."""
    base = build_base(spec, weights)
    inputs = keras.Input(input_shape, dtype="float32", name="image")
    x = inputs
    if tuple(input_shape[:2]) != (spec.image_size, spec.image_size):
        x = keras.layers.Resizing(spec.image_size, spec.image_size, interpolation="bilinear", name="resize")(x)
    # mobilenet_v2.preprocess_input is x / 127.5 - 1; as a layer it serialises without a Lambda.
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocess")(x)
    features = base(x, training=False)
    outputs = head_layers(features, spec, num_classes)
    model = keras.Model(inputs, outputs, name="transfer_mobilenetv2")
    extractor = keras.Model(inputs, features, name="feature_extractor")
    return TransferModel(model, base, extractor)


def copy_head_weights(source: keras.Model, target: keras.Model, spec: JobCreate) -> None:
    """Copy the head's weights from `source` to `target` (the full model or the feature head; matched by name)."""
    for name in head_layer_names(spec):
        target.get_layer(name).set_weights(source.get_layer(name).get_weights())


def unfreeze_top(base: keras.Model, layers: int) -> int:
    """Make the top `layers` layers of the base trainable, BatchNormalization excluded; returns how many."""
    base.trainable = True
    cut = max(len(base.layers) - layers, 0)
    unfrozen = 0
    for i, layer in enumerate(base.layers):
        trainable = i >= cut and not isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = trainable
        unfrozen += int(trainable and bool(layer.weights))
    return unfrozen
