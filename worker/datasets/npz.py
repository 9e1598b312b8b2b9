"""An .npz dataset: arrays `x`, `y`, optional `class_names`, optional `x_test` + `y_test`.

`x` (and `x_test`) is N x H x W (grayscale), N x H x W x 1, x 3 (RGB) or x 4 (RGBA) uint8; each image goes
through the same conversion and resize as a decoded file. `y` holds integers 0..C-1. Class names come from
`class_names` (C strings) or are the indices ("0".."9", zero-padded past 10 classes); they are then sorted and
the labels renumbered to that order. Arrays are read as .npy with `allow_pickle=False`: an array of Python
objects (a pickle) is refused, never loaded. The images are streamed a chunk at a time, never held whole,
after their shape and size are checked from the .npy header. Other arrays in the file are skipped (reported).
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from worker.datasets.archives import Archive, archive_errors
from worker.datasets.collect import ImageStaging, Reporter, Sample, Skips, pixels_to_stored
from worker.datasets.errors import DatasetError
from worker.datasets.layout import Split
from worker.datasets.limits import Limits, MiB

KNOWN_ARRAYS = ("x", "y", "class_names", "x_test", "y_test")
_IMAGE_CHUNK_BYTES = 16 * MiB


@dataclass(frozen=True)
class _Header:
    key: str
    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def read_npz(archive: Archive, staging: ImageStaging, skips: Skips, reporter: Reporter,
             limits: Limits) -> tuple[list[Sample], list[str]]:
    """Stage the images of an npz; returns its samples (given split if it has x_test) and its sorted classes."""
    assert archive.zip_file is not None
    headers: dict[str, _Header] = {}
    for info in archive.zip_file.infolist():
        if info.is_dir():
            continue
        key = info.filename.removesuffix(".npy")
        if key not in KNOWN_ARRAYS:
            skips.add(info.filename, f"not one of the arrays read ({', '.join(KNOWN_ARRAYS)})")
            continue
        headers[key] = _read_header(archive.zip_file, info, key)
    for key in ("x", "y"):
        if key not in headers:
            raise DatasetError(f"the npz has no array {key!r}: it needs x (the images, N x H x W x 3 uint8) "
                               "and y (their labels, N integers 0..C-1)")
    if ("x_test" in headers) != ("y_test" in headers):
        raise DatasetError("the npz has only one of x_test and y_test; give both (or neither: the split is drawn)")
    declared = sum(h.nbytes for h in headers.values())
    if declared > limits.max_unpacked_bytes:
        raise archive.budget.exceeded()
    splits: list[tuple[str, str, Split | None]] = [("x", "y", None)]
    if "x_test" in headers:
        splits = [("x", "y", "train"), ("x_test", "y_test", "test")]
    images = 0
    for x_key, y_key, _ in splits:
        images += _check_images(headers[x_key], limits)
        _check_labels(headers[y_key], headers[x_key].shape[0])
    if images > limits.max_files:
        raise DatasetError(f"the npz holds {images} images, more than the {limits.max_files} accepted; "
                           "split it into several datasets")

    labels = {y_key: _read_small(archive, headers[y_key]).reshape(-1) for _, y_key, _ in splits}
    names = _class_names(archive, headers.get("class_names"), labels, limits)
    order = sorted(range(len(names)), key=names.__getitem__)
    rank = {old: new for new, old in enumerate(order)}
    sorted_names = [names[i] for i in order]

    samples: list[Sample] = []
    done = 0
    for x_key, y_key, split in splits:
        y = labels[y_key]
        for i, pixels in enumerate(_stream_images(archive, headers[x_key])):
            reporter.check_cancelled()
            index, digest = staging.add(pixels_to_stored(pixels, staging.size))
            samples.append(Sample(f"{x_key}[{i}]", sorted_names[rank[int(y[i])]], split, index, digest))
            done += 1
            reporter.progress(0.9 * done / max(images, 1))
    return samples, sorted_names


def _read_header(zip_file: zipfile.ZipFile, info: zipfile.ZipInfo, key: str) -> _Header:
    with archive_errors(), zip_file.open(info) as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
        except ValueError as exc:
            raise DatasetError(f"{info.filename} in the npz is not a readable .npy array ({exc}); "
                               "save the arrays with np.savez or np.savez_compressed") from exc
    if dtype.hasobject:
        raise DatasetError(f"array {key!r} of the npz holds Python objects (a pickle), which are never loaded: "
                           "save plain arrays (x uint8, y integers, class_names strings: np.array(names, dtype=str))")
    return _Header(key, info, tuple(int(n) for n in shape), dtype, bool(fortran_order))


def _check_images(header: _Header, limits: Limits) -> int:
    shape = header.shape
    if header.dtype != np.uint8:
        raise DatasetError(f"array {header.key!r} is {header.dtype}, not uint8: give the images as 0..255 uint8 "
                           "(for example (x * 255).round().astype(np.uint8) for floats in 0..1)")
    channels_ok = len(shape) == 3 or (len(shape) == 4 and shape[3] in (1, 3, 4))
    if not channels_ok or shape[1] < 1 or shape[2] < 1:
        raise DatasetError(f"array {header.key!r} has shape {shape}; it must be N x H x W x 3 (RGB), N x H x W x 4 "
                           "(RGBA) or N x H x W (grayscale)")
    if shape[1] * shape[2] > limits.max_image_pixels:
        raise DatasetError(f"the images of {header.key!r} are {shape[2]}x{shape[1]} pixels, more than the "
                           f"{limits.max_image_pixels} accepted; resize them")
    if header.fortran_order and shape[0] > 1:
        raise DatasetError(f"array {header.key!r} is stored in Fortran order; save np.ascontiguousarray(x)")
    return shape[0]


def _check_labels(header: _Header, count: int) -> None:
    if header.dtype.kind not in "iu" or header.shape not in ((count,), (count, 1)):
        raise DatasetError(f"array {header.key!r} must hold one integer label per image ({count}), "
                           f"got {header.dtype} with shape {header.shape}")


def _read_small(archive: Archive, header: _Header) -> np.ndarray:
    assert archive.zip_file is not None
    archive.budget.take(header.nbytes)
    with archive_errors(), archive.zip_file.open(header.info) as f:
        return np.lib.format.read_array(f, allow_pickle=False)


def _class_names(archive: Archive, header: _Header | None, labels: dict[str, np.ndarray],
                 limits: Limits) -> list[str]:
    top = max((int(y.max()) for y in labels.values() if y.size), default=-1)
    lowest = min((int(y.min()) for y in labels.values() if y.size), default=0)
    if lowest < 0:
        raise DatasetError(f"the labels include {lowest}; they must be class indices 0..C-1")
    if header is None:
        count = top + 1
        if count > limits.max_classes:
            raise DatasetError(f"the labels go up to {top}: {count} classes, more than the {limits.max_classes} "
                               "accepted")
        width = len(str(max(count - 1, 0)))
        return [str(i).zfill(width) for i in range(count)]
    if header.dtype.kind not in "US" or len(header.shape) != 1:
        raise DatasetError("class_names must be a 1-D array of strings (np.array(names, dtype=str))")
    if header.shape[0] > limits.max_classes:
        raise DatasetError(f"class_names has {header.shape[0]} names, more than the {limits.max_classes} accepted")
    raw = _read_small(archive, header)
    try:
        names = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in raw.tolist()]
    except UnicodeDecodeError as exc:
        raise DatasetError(f"class_names is not UTF-8 text ({exc})") from exc
    if top >= len(names):
        raise DatasetError(f"the labels go up to {top} but class_names has only {len(names)} names; give one name "
                           "per class index")
    if len(set(names)) != len(names):
        raise DatasetError("class_names has the same name twice; give each class a name of its own")
    return names


def _stream_images(archive: Archive, header: _Header) -> Iterator[np.ndarray]:
    """The images of one array, read a chunk at a time past the .npy header (already checked)."""
    assert archive.zip_file is not None
    count, image_shape = header.shape[0], header.shape[1:]
    image_bytes = int(np.prod(image_shape))
    per_chunk = max(1, _IMAGE_CHUNK_BYTES // image_bytes)
    with archive_errors(), archive.zip_file.open(header.info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            np.lib.format.read_array_header_1_0(f)
        else:
            np.lib.format.read_array_header_2_0(f)
        for start in range(0, count, per_chunk):
            n = min(per_chunk, count - start)
            want = n * image_bytes
            data = f.read(want)
            archive.budget.take(len(data))
            if len(data) != want:
                raise DatasetError(f"array {header.key!r} ends early ({start + len(data) // image_bytes} of "
                                   f"{count} images): the npz is truncated; save it again")
            yield from np.frombuffer(data, dtype=np.uint8).reshape((n, *image_shape))
