"""Training-side errors. Each carries a message a user can act on; the job record shows `type` and `message`.

TrainingError
├── DataNotFound          CIFAR-10 neither in TL_DATA_DIR nor downloadable (names every place looked)
├── WeightsNotFound       MobileNetV2 weights neither in TL_WEIGHTS_DIR, Keras' cache, nor downloadable
├── InvalidSpec           a spec the data cannot satisfy (e.g. more samples than the split holds)
├── ArtifactWriteError    the model directory could not be written (permissions, disk full)
├── TrainingDiverged      the loss became NaN or infinite (usually a learning rate too high)
└── JobCancelled          the cancel flag was seen; nothing is kept
"""

from __future__ import annotations


class TrainingError(Exception):
    """Base of every error the engine raises on purpose."""

    @property
    def type(self) -> str:
        return type(self).__name__

    @property
    def message(self) -> str:
        return str(self)


class DataNotFound(TrainingError):
    pass


class WeightsNotFound(TrainingError):
    pass


class InvalidSpec(TrainingError):
    pass


class ArtifactWriteError(TrainingError):
    pass


class TrainingDiverged(TrainingError):
    pass


class JobCancelled(TrainingError):
    pass
