"""The artifact store: models written completely or not at all, and the aliases that name them.

No TensorFlow here: the API reads the store through this package. `local` keeps everything under
`TL_ARTIFACT_DIR`.
"""

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

__all__ = [
    "ALIAS_PATTERN", "CONFUSION_FILE", "CURVES_FILE", "EXPORT_FILES", "ID_PATTERN", "KERAS_FILE", "METADATA_FILE",
    "RESERVED_ALIASES", "TFLITE_FILE",
    "ModelInfo", "ModelStore", "valid_id", "write_atomic", "write_json_atomic",
]
