"""Why an archive cannot become a dataset. Every message says what the user should change.

DatasetError          the archive is refused (shown as the dataset's `error.message`)
└── DatasetCancelled  `cancelled()` answered True; nothing is kept
"""

from __future__ import annotations


class DatasetError(ValueError):
    """An archive that cannot become a dataset; the message says what to fix."""


class DatasetCancelled(DatasetError):
    """Processing stopped because `cancelled()` returned True; the output directory is removed."""

    def __init__(self, message: str = "cancelled") -> None:
        super().__init__(message)
