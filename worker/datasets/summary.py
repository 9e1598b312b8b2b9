"""What processing found, as the Dataset object of shared/API.md shows it (also written as summary.json)."""

from __future__ import annotations

from pydantic import BaseModel
from typing_extensions import TypedDict  # pydantic needs this one, not typing's, before Python 3.12

#: `skipped` lists at most this many files; `skipped_count` counts them all.
MAX_SKIPPED_LISTED = 50


class SkippedFile(TypedDict):
    path: str
    reason: str


class Duplicates(TypedDict):
    #: Images identical (at the stored size) to an earlier one of the same split; they are kept.
    within_split: int
    #: Test images identical to a training image; they are removed from test.
    train_test: int


class DatasetSummary(BaseModel):
    """The checked, normalised dataset: its classes (sorted; labels index them), counts and content hash."""

    classes: list[str]
    image_shape: list[int]
    #: {"train": {class: n}, "test": {class: n}}, every class in both.
    counts: dict[str, dict[str, int]]
    skipped: list[SkippedFile]
    skipped_count: int
    duplicates: Duplicates
    #: Size of the stored arrays (x_train, y_train, x_test, y_test), headers excluded.
    bytes: int
    #: SHA-256 of the class names and the stored arrays (shapes and bytes): the same content gives the same hash.
    sha256: str
