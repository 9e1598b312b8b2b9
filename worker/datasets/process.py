"""process_archive: one uploaded archive -> a checked, normalised dataset directory (or a DatasetError).

The steps: detect the format and open it (`archives`), read the members one at a time and decode each image
with `worker.imaging` (the predict path) into a scratch file, place the files in classes (`layout`, or `npz`),
check the classes, split (`split`), gather the arrays (`arrays`), draw the preview (`preview`), write
summary.json. The output directory holds nothing else when it returns, and is removed on any error.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from worker import imaging
from worker.datasets.archives import Archive, human_bytes, open_archive
from worker.datasets.arrays import load_arrays, write_arrays
from worker.datasets.collect import ImageStaging, Reporter, Sample, Skips, decode_file, skip_reason, write_error
from worker.datasets.errors import DatasetError
from worker.datasets.layout import Placement, is_junk, may_be_labels_csv, resolve_layout
from worker.datasets.limits import STORED_SIZE, Limits, MiB
from worker.datasets.npz import read_npz
from worker.datasets.preview import write_preview
from worker.datasets.split import counts, split_samples
from worker.datasets.summary import DatasetSummary

SUMMARY_FILE = "summary.json"
PREVIEW_FILE = "preview.png"
_STAGING_FILE = "images.staging"
_MAX_CSV_BYTES = 64 * MiB
DEFAULT_LIMITS = Limits()


def process_archive(archive: Path, out_dir: Path, *, test_fraction: float = 0.2, seed: int = 42,
                    size: int = STORED_SIZE, limits: Limits = DEFAULT_LIMITS,
                    progress: Callable[[float], None] | None = None,
                    cancelled: Callable[[], bool] | None = None) -> DatasetSummary:
    """Check and normalise the dataset in `archive` into `out_dir` (which must not exist yet); see the package doc.

    Writes x_train.npy, y_train.npy, x_test.npy, y_test.npy, classes.json, summary.json and preview.png.
    Raises DatasetError (DatasetCancelled when `cancelled()` says so) with a message for the user, or
    ArtifactWriteError when `out_dir` cannot be written; `out_dir` is then removed.
    """
    if not 0 < test_fraction < 1:
        raise DatasetError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    if size < 1:
        raise DatasetError(f"size must be a positive number of pixels, got {size}")
    try:
        out_dir.mkdir(parents=True)
    except FileExistsError:
        raise
    except OSError as exc:
        raise write_error(out_dir, exc) from exc
    try:
        return _process(archive, out_dir, test_fraction, seed, size, limits, Reporter(progress, cancelled))
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _process(archive: Path, out_dir: Path, test_fraction: float, seed: int, size: int, limits: Limits,
             reporter: Reporter) -> DatasetSummary:
    reporter.progress(0.0)
    staging = ImageStaging(out_dir / _STAGING_FILE, size)
    skips = Skips()
    try:
        with open_archive(archive, limits) as source:
            if source.format == "npz":
                samples, classes = read_npz(source, staging, skips, reporter, limits)
                given = any(s.split is not None for s in samples)
                skipped_per_class: dict[str, int] = {}
            else:
                samples, classes, given, skipped_per_class = _read_files(source, staging, skips, reporter, limits)
        _check_classes(classes, samples, skips, limits)
        result = split_samples(samples, classes, given=given, test_fraction=test_fraction, seed=seed, limits=limits,
                               skipped_per_class=skipped_per_class)
        index = {name: i for i, name in enumerate(classes)}

        def on_chunk(fraction: float) -> None:
            reporter.check_cancelled()
            reporter.progress(0.9 + 0.08 * fraction)

        stored = [([samples[i].index for i in split], [index[samples[i].label] for i in split])
                  for split in (result.train, result.test)]
        nbytes, sha256 = write_arrays(out_dir, staging.images(), classes, stored[0], stored[1], on_chunk)
    finally:
        staging.remove()
    summary = DatasetSummary(
        classes=list(classes), image_shape=[size, size, 3],
        counts={"train": counts(samples, classes, result.train), "test": counts(samples, classes, result.test)},
        skipped=skips.listed, skipped_count=skips.count,
        duplicates={"within_split": result.within_split, "train_test": result.train_test},
        bytes=nbytes, sha256=sha256)
    try:
        x_train, y_train, x_test, y_test, _ = load_arrays(out_dir)
        write_preview(out_dir / PREVIEW_FILE, classes, x_train, y_train, x_test, y_test)
        del x_train, x_test
        (out_dir / SUMMARY_FILE).write_text(summary.model_dump_json(indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise write_error(out_dir, exc) from exc
    reporter.progress(1.0)
    return summary


def _read_files(source: Archive, staging: ImageStaging, skips: Skips, reporter: Reporter,
                limits: Limits) -> tuple[list[Sample], list[str], bool, dict[str, int]]:
    """Decode every file of a zip or tar as it streams by, then place them: (samples, classes, given split,
    skipped files per class)."""
    staged: dict[str, tuple[int, bytes]] = {}
    failed: set[str] = set()
    paths: list[str] = []  # every file but clutter and labels.csv, in archive order
    csvs: dict[str, bytes] = {}
    entries = 0
    for member in source.members:
        entries += 1
        reporter.check_cancelled()
        reporter.progress(0.9 * member.fraction)
        path = member.path
        if is_junk(path):
            continue
        if path in staged or path in failed or path in csvs:
            skips.add(path, "the same path appears twice in the archive; the first one is used")
            continue
        if may_be_labels_csv(path):
            data = member.read(_MAX_CSV_BYTES)
            if data is None:
                raise DatasetError(f"{path} is larger than {human_bytes(_MAX_CSV_BYTES)}; keep it to "
                                   "filename,label[,split]")
            csvs[path] = data
            continue
        paths.append(path)
        data = member.read(limits.max_file_bytes)
        if data is None:
            reason = f"larger than {human_bytes(limits.max_file_bytes)}, the most read for one file"
        else:
            try:
                staged[path] = staging.add(decode_file(data, path, staging.size, limits))
                continue
            except imaging.ImageError as exc:
                reason = skip_reason(exc, path)
        failed.add(path)
        skips.add(path, reason)
    if entries == 0:
        raise DatasetError("the archive is empty: it holds no files")
    if not paths and not csvs:
        raise DatasetError("the archive holds only system files (__MACOSX/, .DS_Store, hidden files): no images")

    layout = resolve_layout(paths, csvs, limits)
    for path in layout.unused_csvs:
        skips.add(path, "not an image (a labels.csv is only read at the top of the archive)")
    samples: list[Sample] = []
    skipped_per_class: Counter[str] = Counter()
    for path in sorted(paths):
        placement = layout.placements[path]
        if path in failed:
            if isinstance(placement, Placement):
                skipped_per_class[placement.label] += 1
        elif isinstance(placement, str):
            skips.add(path, placement)
        else:
            index, digest = staged[path]
            samples.append(Sample(path, placement.label, placement.split, index, digest))
    for path, reason in layout.extra_skips:
        skips.add(path, reason)
    return samples, sorted(layout.classes), layout.given_split, dict(skipped_per_class)


def _check_classes(classes: Sequence[str], samples: Sequence[Sample], skips: Skips, limits: Limits) -> None:
    if not samples:
        first = f" (first: {skips.listed[0]['path']}: {skips.listed[0]['reason']})" if skips.listed else ""
        raise DatasetError(f"found no usable images: {skips.count} file(s) skipped{first}; images must be PNG, "
                           "JPEG, BMP, GIF or WebP, in one folder per class")
    for name in classes:
        if not 1 <= len(name) <= limits.max_name_chars or not name.isprintable() or not name.strip():
            raise DatasetError(f"class name {name!r} is not 1..{limits.max_name_chars} printable characters: "
                               "rename its folder (or label) to a short name without control characters")
    if len(classes) < 2:
        raise DatasetError(f"found only {len(classes)} class ({', '.join(map(repr, classes))}); a dataset needs at "
                           "least 2: put each class's images in a folder named after it (cats/1.jpg, dogs/2.jpg), "
                           "or list them in labels.csv")
    if len(classes) > limits.max_classes:
        raise DatasetError(f"found {len(classes)} classes, more than the {limits.max_classes} accepted")
