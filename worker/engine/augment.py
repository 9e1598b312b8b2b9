"""Random augmentation of training images, as a fixed number of seeded views computed once per job.

Each view is the whole training subset put through Keras' random preprocessing layers (flip, rotate, zoom,
translate, contrast) with its own seed; epoch e trains on view e mod `views`. Because the views are plain
arrays, the frozen-base fast path still applies: each view goes through the base once, and its features are
cached like any split's. The saved model never contains these layers, so predict never augments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

#: Views per job (capped by the epochs): more views means more variety and more feature extraction.
MAX_VIEWS = 3
#: Images augmented per call.
BATCH = 256


def view_count(augment: Sequence[str], epochs: int) -> int:
    """How many augmented views a job trains on (0 without augmentation)."""
    return min(MAX_VIEWS, max(1, epochs)) if augment else 0


def _layers(augment: Sequence[str], seed: int) -> list[object]:
    import keras

    made: dict[str, object] = {
        "flip": keras.layers.RandomFlip("horizontal", seed=seed),
        "rotate": keras.layers.RandomRotation(0.08, fill_mode="reflect", seed=seed + 1),
        "zoom": keras.layers.RandomZoom((-0.15, 0.15), fill_mode="reflect", seed=seed + 2),
        "translate": keras.layers.RandomTranslation(0.1, 0.1, fill_mode="reflect", seed=seed + 3),
        "contrast": keras.layers.RandomContrast(0.2, seed=seed + 4),
    }
    return [made[name] for name in ("flip", "rotate", "zoom", "translate", "contrast") if name in augment]


def augmented_view(images: np.ndarray, augment: Sequence[str], seed: int, view: int,
                   between: Callable[[int, int], None] | None = None) -> np.ndarray:
    """One seeded augmented copy of uint8 `images` (N, H, W, 3), as uint8; `between(done, total)` after each batch."""
    import keras
    import tensorflow as tf

    pipeline = keras.Sequential(_layers(augment, seed * 1009 + view * 7919))
    out = np.empty(images.shape, dtype=np.uint8)
    total = len(images)
    for start in range(0, total, BATCH):
        batch = tf.constant(np.asarray(images[start:start + BATCH]), dtype=tf.float32)
        augmented = pipeline(batch, training=True)
        out[start:start + BATCH] = np.clip(np.rint(np.asarray(augmented)), 0, 255).astype(np.uint8)
        if between is not None:
            between(min(start + BATCH, total), total)
    return out
