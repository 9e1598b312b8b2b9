"""The bounds an uploaded archive must stay within, and the size images are stored at."""

from __future__ import annotations

from dataclasses import dataclass, fields

#: Images are stored as (128, 128, 3) uint8 RGB: enough for MobileNetV2 at 96..128 px, 49 KB an image.
STORED_SIZE = 128

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


@dataclass(frozen=True)
class Limits:
    """Bounds checked while an archive is read; crossing one refuses it (or skips the one file, where noted)."""

    #: Bytes actually decompressed, counted as they are read (headers are never trusted to be small).
    max_unpacked_bytes: int = 4 * GiB
    #: Entries in the archive (files, folders and system files alike); for an .npz, images.
    max_files: int = 200_000
    #: Pixels of one image, from its header, before it is decoded; a larger image is skipped. Values above
    #: `worker.imaging.MAX_PIXELS` (the same 40 million) have no effect: the decoder refuses those itself.
    max_image_pixels: int = 40_000_000
    max_classes: int = 1000
    min_train_per_class: int = 2
    min_test_per_class: int = 1
    #: Class names are 1..max_name_chars printable characters.
    max_name_chars: int = 64
    #: One file larger than this is skipped without being read further (it never sits whole in memory).
    max_file_bytes: int = 256 * MiB

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            lowest = 0 if field.name.startswith("min_") else 1
            if not isinstance(value, int) or value < lowest:
                raise ValueError(f"Limits.{field.name} must be an integer >= {lowest}, got {value!r}")
