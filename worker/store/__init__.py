"""The artifact store: models written completely or not at all, and the aliases that name them.

No TensorFlow here: the API reads the store through this package. `local` keeps everything under
`TL_ARTIFACT_DIR`; `s3` keeps models in S3-compatible object storage when `TL_ARTIFACT_URL` is set
(`open_model_store` picks one; every process builds its model store through it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Union, cast

from worker.store.datasets import DatasetStore
from worker.store.local import (
    ALIAS_PATTERN,
    CONFUSION_FILE,
    CURVES_FILE,
    EXPORT_FILES,
    ID_PATTERN,
    KERAS_FILE,
    METADATA_FILE,
    RESERVED_ALIASES,
    TFLITE_FILE,
    ModelInfo,
    ModelStore,
    valid_id,
    write_atomic,
    write_json_atomic,
)

if TYPE_CHECKING:
    from worker.config import Settings
    from worker.store.s3_datasets import S3DatasetStore

#: Either dataset store (the local directory or the bucket): one interface.
AnyDatasetStore = Union[DatasetStore, "S3DatasetStore"]


def open_model_store(settings: Settings, *, check: bool = False) -> ModelStore:
    """The model store `settings` name: `S3ModelStore` when `TL_ARTIFACT_URL` is set, else the local directory
    (exactly as before). `check` fails at once, naming the bucket, when the bucket does not exist (start-up)."""
    if not settings.artifact_url:
        return ModelStore(settings.artifact_dir)
    from worker.store.s3 import S3ModelStore  # boto3 is imported only in S3 mode

    store = S3ModelStore(settings.artifact_url, settings.cache_dir, max_bytes=settings.cache_max_bytes)
    if check:
        store.check()
    # S3ModelStore offers ModelStore's public interface (tests/store/test_s3.py drives both the same way).
    return cast(ModelStore, store)


def open_dataset_store(settings: Settings, *, check: bool = False) -> AnyDatasetStore:
    """The dataset store of `settings`: `S3DatasetStore` (beside the models in the bucket) when
    `TL_ARTIFACT_URL` is set, else the local directory."""
    if not settings.artifact_url:
        return DatasetStore(settings.artifact_dir)
    from worker.store.s3_datasets import S3DatasetStore

    store = S3DatasetStore(settings.artifact_url, settings.cache_dir, max_bytes=settings.cache_max_bytes)
    if check:
        store.check()
    return store


def require_artifact_store(settings: Settings) -> None:
    """A worker's start-up check: with TL_ARTIFACT_URL set, its bucket must exist and answer. SystemExit (status
    1, the message naming the bucket, never a credential) when it does not, so the worker stops at once rather
    than fail every job at its end."""
    if not settings.artifact_url:
        return
    from worker.store.s3 import StoreConfigError

    try:
        open_model_store(settings, check=True)
    except StoreConfigError as exc:
        raise SystemExit(f"cannot start: {exc}") from None


__all__ = [
    "open_model_store", "open_dataset_store", "require_artifact_store", "AnyDatasetStore", "DatasetStore",
    "ALIAS_PATTERN", "CONFUSION_FILE", "CURVES_FILE", "EXPORT_FILES", "ID_PATTERN", "KERAS_FILE", "METADATA_FILE",
    "RESERVED_ALIASES", "TFLITE_FILE",
    "ModelInfo", "ModelStore", "valid_id", "write_atomic", "write_json_atomic",
]
