"""Uploaded datasets: an archive of labelled images -> checked, normalised arrays (shared/API.md "Datasets").

No TensorFlow, Keras or matplotlib here (numpy, Pillow, pydantic and the standard library): the API process
may import it. Images are decoded by `worker.imaging`, the function that prepares predict inputs, so training
and serving see images the same way.

    summary = process_archive(Path("upload.bin"), Path("out"), test_fraction=0.2, seed=42)
    x_train, y_train, x_test, y_test, classes = load_arrays(Path("out"))

What is accepted (the format is read from the content, never from the file name):
- zip, tar, tar.gz/tgz holding one folder per class (`roses/1.jpg`, optionally wrapped: `flowers/roses/1.jpg`),
  the same under `train/` + `test/` (or `val/`, `validation/`), or a top-level `labels.csv`
  (`filename,label[,split]`): see `layout`. PNG, JPEG, BMP, GIF and WebP files, any size and mode.
- an .npz with `x`, `y`, optional `class_names`, `x_test` + `y_test`: see `npz`.
What happens to the rest:
- skipped and reported (`skipped`, at most 50 listed, `skipped_count`): files that are not decodable images,
  images of more than `Limits.max_image_pixels` (from the header, never decoded), files over
  `Limits.max_file_bytes`, files outside the layout, a path that appears twice (the first is used);
- ignored, not reported: system clutter (`__MACOSX/`, `.DS_Store`, `Thumbs.db`, `desktop.ini`, hidden files);
- refused (DatasetError, nothing kept): see `archives` for the hostile archives (traversal, links, devices,
  bombs, too many entries, truncation); too few or too many classes, badly named classes, a class below
  `min_train_per_class` / `min_test_per_class` after the split, pickled npz arrays, an empty archive.
Duplicates (equal pixels at the stored size) are counted; a test image equal to a training one is removed
from test. The split, the stored order and `sha256` depend on the content and `seed` only: see `split`.
"""

from worker.datasets.arrays import load_arrays
from worker.datasets.errors import DatasetCancelled, DatasetError
from worker.datasets.limits import STORED_SIZE, Limits
from worker.datasets.process import PREVIEW_FILE, SUMMARY_FILE, process_archive
from worker.datasets.summary import DatasetSummary, Duplicates, SkippedFile

__all__ = [
    "PREVIEW_FILE",
    "STORED_SIZE",
    "SUMMARY_FILE",
    "DatasetCancelled",
    "DatasetError",
    "DatasetSummary",
    "Duplicates",
    "Limits",
    "SkippedFile",
    "load_arrays",
    "process_archive",
]
