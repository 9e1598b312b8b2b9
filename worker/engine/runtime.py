"""TensorFlow process set-up for training: GPU memory growth, mixed precision, deterministic ops.

`configure_tensorflow` must run before the first TensorFlow op of the process (memory growth can only be
set on devices that are not initialised yet); it is idempotent, so every entry point calls it.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

from worker.config import Settings

log = logging.getLogger(__name__)

_lock = threading.Lock()
_state: RuntimeInfo | None = None


@dataclass(frozen=True)
class RuntimeInfo:
    """What `configure_tensorflow` set up (recorded in each model's metadata)."""

    gpus: int
    mixed_precision: bool
    deterministic: bool
    tensorflow_version: str
    keras_version: str


def _quiet_tensorflow_logs() -> None:
    # TensorFlow's C++ start-up chatter (CUDA probing, oneDNN notes) goes to stderr before Python logging
    # exists; keep warnings and errors only. setdefault: an operator's own TF_CPP_MIN_LOG_LEVEL wins.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


def configure_tensorflow(settings: Settings) -> RuntimeInfo:
    """Configure TensorFlow and Keras once per process; later calls return the first result."""
    global _state
    with _lock:
        if _state is not None:
            return _state
        _quiet_tensorflow_logs()
        import keras
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        for gpu in gpus:
            try:
                tf.config.experimental.set_memory_growth(gpu, True)
            except RuntimeError as exc:  # already initialised by someone else: keep going, say so
                log.warning("could not enable memory growth on %s: %s", gpu.name, exc)
        if len(gpus) > 1:
            # One job uses one GPU; the others belong to other workers (CUDA_VISIBLE_DEVICES per worker).
            tf.config.set_visible_devices(gpus[:1], "GPU")

        mixed = bool(settings.mixed_precision and gpus)
        if settings.mixed_precision and not gpus:
            log.warning("TL_MIXED_PRECISION is set but no GPU is visible: training in float32")
        keras.mixed_precision.set_dtype_policy("mixed_float16" if mixed else "float32")

        # Deterministic kernels are cheap on the CPU; on a GPU they force slower cuDNN algorithms and some
        # ops refuse to run, so there seeded runs agree closely but not bit for bit.
        deterministic = bool(settings.deterministic and not gpus)
        if deterministic:
            tf.config.experimental.enable_op_determinism()

        _state = RuntimeInfo(
            gpus=len(gpus[:1]),
            mixed_precision=mixed,
            deterministic=deterministic,
            tensorflow_version=tf.__version__,
            keras_version=keras.__version__,
        )
        log.info("tensorflow %s, keras %s, gpus=%d, mixed_precision=%s, deterministic=%s",
                 _state.tensorflow_version, _state.keras_version, _state.gpus, mixed, deterministic)
        return _state
