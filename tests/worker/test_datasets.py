"""worker.datasets: archives of real images (CIFAR-10 test images, scikit-learn's digits) in every accepted layout,
and every hostile archive the contract names, each refused with a message saying what to fix and nothing
written outside the output directory. The archives are built here, in each test (tests/worker/datasets_archives).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
import tarfile
import time
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from datasets_archives import (
    CIFAR10_CLASSES,
    cifar10_test_file,
    encode,
    png_claiming,
    tar_special,
    varied_file,
    write_tar,
    write_tar_entries,
    write_tgz_bomb,
    write_tgz_pax_bomb,
    write_zip,
    write_zip_bomb,
    write_zip_symlink,
)
from PIL import Image

from worker import imaging
from worker.datasets import (
    STORED_SIZE,
    DatasetCancelled,
    DatasetError,
    DatasetSummary,
    Limits,
    load_arrays,
    process_archive,
)

OUTPUTS = {"x_train.npy", "y_train.npy", "x_test.npy", "y_test.npy", "classes.json", "summary.json", "preview.png"}
GiB = 1024**3
Files = dict[str, bytes]


@pytest.fixture(scope="session")
def cifar() -> tuple[np.ndarray, np.ndarray]:
    path = cifar10_test_file()
    if not path.is_file():
        pytest.skip(f"CIFAR-10 test images not found in TL_DATA_DIR nor at {path}")
    with np.load(path) as data:
        return data["x"][:600].copy(), data["y"][:600].astype(np.int64)


def class_images(cifar: tuple[np.ndarray, np.ndarray], label: int, count: int, start: int = 0) -> list[np.ndarray]:
    x, y = cifar
    return [x[i] for i in np.flatnonzero(y == label)[start:start + count]]


def class_files(cifar: tuple[np.ndarray, np.ndarray], per_class: int, classes: int = 3, prefix: str = "",
                start: int = 0) -> Files:
    """`prefix<class>/<n>.<ext>` for the first `classes` CIFAR-10 classes: PNG, 200 px JPEG, grey, palette, RGBA."""
    files: Files = {}
    for label in range(classes):
        for n, pixels in enumerate(class_images(cifar, label, per_class, start)):
            ext, data = varied_file(pixels, n)
            files[f"{prefix}{CIFAR10_CLASSES[label]}/{start + n:03d}{ext}"] = data
    return files


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run(archive: Path, tmp_path: Path, name: str = "dataset", **options: object) -> tuple[DatasetSummary, Path]:
    out = tmp_path / name
    summary = process_archive(archive, out, **options)  # type: ignore[arg-type]
    return summary, out


def refused(archive: Path, tmp_path: Path, match: str, **options: object) -> DatasetError:
    """Processing fails with a DatasetError matching `match`; nothing is left behind and nothing new appears."""
    before = tree(tmp_path)
    out = tmp_path / "dataset"
    with pytest.raises(DatasetError, match=match) as caught:
        process_archive(archive, out, **options)  # type: ignore[arg-type]
    assert not out.exists()
    assert tree(tmp_path) == before
    return caught.value


def assert_labels_match(out: Path, files: Files, class_of: Callable[[str], str], size: int = STORED_SIZE) -> None:
    """Every stored image is the decoded pixels of one file of its class (the predict decoder, same size)."""
    decoded: dict[bytes, set[str]] = {}
    for path, data in files.items():
        try:
            pixels = imaging.decode_image(data, path, size)
        except imaging.ImageError:
            continue
        decoded.setdefault(hashlib.sha256(pixels.tobytes()).digest(), set()).add(class_of(path))
    x_train, y_train, x_test, y_test, classes = load_arrays(out)
    for x, y in ((x_train, y_train), (x_test, y_test)):
        for pixels, label in zip(x, y, strict=True):
            assert classes[label] in decoded[hashlib.sha256(np.asarray(pixels).tobytes()).digest()]


def folder_class(path: str) -> str:
    return path.split("/")[-2]


# --- accepted layouts ---

def test_class_folders_in_a_zip(cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    files = class_files(cifar, per_class=10)
    summary, out = run(write_zip(tmp_path / "a.zip", files), tmp_path)

    assert summary.classes == ["airplane", "automobile", "bird"]
    assert summary.image_shape == [128, 128, 3]
    assert summary.counts == {"train": dict.fromkeys(summary.classes, 8), "test": dict.fromkeys(summary.classes, 2)}
    assert summary.skipped == [] and summary.skipped_count == 0
    assert summary.duplicates == {"within_split": 0, "train_test": 0}
    assert {p.name for p in out.iterdir()} == OUTPUTS
    x_train, y_train, x_test, y_test, classes = load_arrays(out)
    assert x_train.shape == (24, 128, 128, 3) and x_train.dtype == np.uint8
    assert x_test.shape == (6, 128, 128, 3) and y_train.dtype == np.int32 and y_test.dtype == np.int32
    assert classes == summary.classes
    assert summary.bytes == x_train.nbytes + y_train.nbytes + x_test.nbytes + y_test.nbytes
    assert json.loads((out / "classes.json").read_text()) == summary.classes
    assert DatasetSummary.model_validate_json((out / "summary.json").read_text()) == summary
    assert_labels_match(out, files, folder_class)


def test_images_are_stored_as_the_predict_decoder_makes_them(cifar: tuple[np.ndarray, np.ndarray],
                                                             tmp_path: Path) -> None:
    # Grey, palette, RGBA and 200 px JPEG files all become RGB at the stored size through worker.imaging.
    files = class_files(cifar, per_class=5, classes=2)
    summary, out = run(write_zip(tmp_path / "a.zip", files), tmp_path, size=32)
    x_train, _, x_test, _, _ = load_arrays(out)
    assert summary.image_shape == [32, 32, 3] and x_train.shape[1:] == (32, 32, 3)
    stored = {hashlib.sha256(np.asarray(p).tobytes()).digest() for p in [*x_train, *x_test]}
    expected = {hashlib.sha256(imaging.decode_image(d, p, 32).tobytes()).digest() for p, d in files.items()}
    assert stored == expected


def test_a_single_wrapping_folder_in_a_tar_gz(cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    files = class_files(cifar, per_class=4, prefix="flowers/")
    summary, out = run(write_tar(tmp_path / "a.tgz", files, gz=True), tmp_path)
    assert summary.classes == ["airplane", "automobile", "bird"]
    assert sum(summary.counts["train"].values()) + sum(summary.counts["test"].values()) == 12
    assert_labels_match(out, files, folder_class)


@pytest.mark.parametrize("test_folder", ["test", "val", "validation"])
def test_train_and_test_folders_keep_the_given_split(cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path,
                                                     test_folder: str) -> None:
    files = {**class_files(cifar, per_class=5, prefix="train/"),
             **class_files(cifar, per_class=2, prefix=f"{test_folder}/", start=5)}
    summary, out = run(write_tar(tmp_path / "a.tar", files), tmp_path)
    assert summary.counts == {"train": dict.fromkeys(summary.classes, 5), "test": dict.fromkeys(summary.classes, 2)}
    x_train, y_train, x_test, y_test, classes = load_arrays(out)
    train_files = {p: d for p, d in files.items() if p.startswith("train/")}
    train_pixels = {imaging.decode_image(d, p, STORED_SIZE).tobytes() for p, d in train_files.items()}
    assert all(np.asarray(p).tobytes() in train_pixels for p in x_train)
    assert not any(np.asarray(p).tobytes() in train_pixels for p in x_test)


def test_train_folder_alone_is_class_folders_with_a_drawn_split(cifar: tuple[np.ndarray, np.ndarray],
                                                                tmp_path: Path) -> None:
    summary, _ = run(write_zip(tmp_path / "a.zip", class_files(cifar, per_class=5, prefix="train/")), tmp_path)
    assert summary.counts == {"train": dict.fromkeys(summary.classes, 4), "test": dict.fromkeys(summary.classes, 1)}


def test_labels_csv_without_a_split(cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    images = {f"images/{label}_{n}.png": encode(pixels) for label in range(2)
              for n, pixels in enumerate(class_images(cifar, label, 6))}
    rows = [f"{path},{'plane' if '/0_' in path else 'car'}" for path in images]
    files = {**images, "images/unlisted.png": encode(class_images(cifar, 5, 1)[0]),
             "labels.csv": ("filename,label\n" + "\n".join(rows) + "\nimages/missing.png,car\n").encode()}
    summary, out = run(write_zip(tmp_path / "a.zip", files), tmp_path)
    assert summary.classes == ["car", "plane"]
    assert summary.counts == {"train": {"car": 5, "plane": 5}, "test": {"car": 1, "plane": 1}}
    assert {(s["path"], s["reason"]) for s in summary.skipped} == {
        ("images/unlisted.png", "not listed in labels.csv"),
        ("images/missing.png", "listed in labels.csv but not in the archive")}
    assert_labels_match(out, images, lambda p: "plane" if "/0_" in p else "car")


def test_labels_csv_with_a_split_inside_a_wrapping_folder(cifar: tuple[np.ndarray, np.ndarray],
                                                          tmp_path: Path) -> None:
    rows = ["Label , FileName, split"]  # any column order, any case, spaces around
    files: Files = {}
    for label, name in ((0, "plane"), (1, "car")):
        for n, pixels in enumerate(class_images(cifar, label, 5)):
            files[f"data/{name}{n}.png"] = encode(pixels)
            rows.append(f"{name},./{name}{n}.png,{'test' if n == 4 else 'train'}")
    files["data/labels.csv"] = "\r\n".join(rows).encode("utf-8-sig")
    summary, _ = run(write_tar(tmp_path / "a.tar.gz", files, gz=True), tmp_path)
    assert summary.counts == {"train": {"car": 4, "plane": 4}, "test": {"car": 1, "plane": 1}}


def test_npz_of_grayscale_digits_without_a_test_split(tmp_path: Path) -> None:
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = (digits.images * (255 / 16)).round().astype(np.uint8)[:400]  # 8x8 grey, 0..16 in scikit-learn
    y = digits.target[:400]
    np.savez_compressed(tmp_path / "digits.npz", x=x, y=y)
    summary, out = run(tmp_path / "digits.npz", tmp_path, size=32)
    assert summary.classes == [str(i) for i in range(10)]
    per_class = np.bincount(y, minlength=10)
    # Exact copies stay on one side, so the test share is near (not always exactly) 20 % of each class.
    for i, name in enumerate(summary.classes):
        assert summary.counts["train"][name] + summary.counts["test"][name] == per_class[i]
        assert abs(summary.counts["test"][name] - 0.2 * per_class[i]) <= 3
    x_train, y_train, x_test, y_test, _ = load_arrays(out, mmap=False)
    assert x_train.shape[1:] == (32, 32, 3)
    assert np.array_equal(x_train[..., 0], x_train[..., 1]) and np.array_equal(x_train[..., 1], x_train[..., 2])
    stored = dict(zip((p.tobytes() for p in np.concatenate([x_train, x_test])), np.concatenate([y_train, y_test]),
                      strict=True))
    for grey, label in zip(x[:20], y[:20], strict=True):  # each is there, as the predict path converts it
        assert stored[np.asarray(imaging.resize(imaging.to_rgb(Image.fromarray(grey)), 32)).tobytes()] == label


def test_npz_with_x_test_and_class_names_keeps_the_split_and_sorts_the_names(
        cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    x, y = cifar
    names = np.array(["zebra", "apple", "mango"])  # index order; stored sorted: apple, mango, zebra
    keep = y < 3
    x3, y3 = x[keep], y[keep]
    np.savez(tmp_path / "d.npz", x=x3[:60], y=y3[:60], x_test=x3[60:80], y_test=y3[60:80], class_names=names,
             extra=np.zeros(3))
    summary, out = run(tmp_path / "d.npz", tmp_path, size=32)
    assert summary.classes == ["apple", "mango", "zebra"]
    assert sum(summary.counts["train"].values()) == 60 and sum(summary.counts["test"].values()) == 20
    assert summary.skipped == [{"path": "extra.npy", "reason": "not one of the arrays read (x, y, class_names, "
                                                               "x_test, y_test)"}]
    x_train, y_train, _, _, classes = load_arrays(out)
    for pixels, label in zip(x_train, y_train, strict=True):  # size 32 of a 32 px RGB image: the pixels as given
        original = int(np.flatnonzero((x3[:60] == pixels).all(axis=(1, 2, 3)))[0])
        assert classes[label] == names[y3[original]]


def test_npz_rgba_and_single_channel_images(cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    x, y = cifar
    rgba = np.concatenate([x[:30], np.full((30, 32, 32, 1), 255, np.uint8)], axis=3)
    np.savez(tmp_path / "rgba.npz", x=rgba, y=(y[:30] % 2))
    summary, out = run(tmp_path / "rgba.npz", tmp_path, size=32)
    stored = {np.asarray(p).tobytes() for p in load_arrays(out)[0]}
    assert stored <= {p.tobytes() for p in x[:30]}  # opaque alpha: the RGB pixels as they were
    np.savez(tmp_path / "grey.npz", x=x[:30, :, :, :1], y=(y[:30] % 2))
    summary, _ = run(tmp_path / "grey.npz", tmp_path, "grey", size=32)
    assert summary.image_shape == [32, 32, 3]


# --- skipped files, duplicates, split ---

def test_junk_is_ignored_and_undecodable_files_are_skipped_and_reported(cifar: tuple[np.ndarray, np.ndarray],
                                                                        tmp_path: Path) -> None:
    files = class_files(cifar, per_class=4, classes=2)
    good = encode(class_images(cifar, 0, 1)[0])
    files.update({
        "__MACOSX/airplane/._000.png": b"\x00\x05\x16\x07 resource fork",
        "airplane/.DS_Store": b"\x00\x00\x00\x01Bud1", "automobile/Thumbs.db": b"\xd0\xcf\x11\xe0",
        ".hidden/secret.png": good, "airplane/.eye.png": good,
        "airplane/notes.txt": b"these are planes",
        "automobile/truncated.png": good[: len(good) // 2],
        "automobile/empty.jpg": b"",
        "readme.md": b"# my dataset",
    })
    summary, out = run(write_zip(tmp_path / "a.zip", files), tmp_path)
    assert summary.classes == ["airplane", "automobile"]
    reasons = {s["path"]: s["reason"] for s in summary.skipped}
    assert set(reasons) == {"airplane/notes.txt", "automobile/truncated.png", "automobile/empty.jpg", "readme.md"}
    assert summary.skipped_count == 4
    assert reasons["airplane/notes.txt"] == "not an image (not PNG, JPEG, BMP, GIF or WebP)"
    assert "truncated or corrupt" in reasons["automobile/truncated.png"]
    assert "empty" in reasons["automobile/empty.jpg"]
    assert "not an image" in reasons["readme.md"]
    assert sum(summary.counts["train"].values()) + sum(summary.counts["test"].values()) == 8


def test_skipped_lists_fifty_and_counts_all(cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    files = class_files(cifar, per_class=3, classes=2)
    files.update({f"airplane/note{i}.txt": b"text" for i in range(60)})
    summary, _ = run(write_tar(tmp_path / "a.tar", files), tmp_path)
    assert len(summary.skipped) == 50 and summary.skipped_count == 60


def test_duplicates_are_counted_and_a_train_copy_is_removed_from_test(cifar: tuple[np.ndarray, np.ndarray],
                                                                      tmp_path: Path) -> None:
    files = {**class_files(cifar, per_class=4, classes=2, prefix="train/"),
             **class_files(cifar, per_class=2, classes=2, prefix="test/", start=4)}
    plane = files["train/airplane/000.png"]
    files["train/airplane/copy.png"] = plane  # within train: kept, counted
    files["test/airplane/leak.png"] = plane  # also in train: removed from test, counted
    files["test/automobile/a.png"] = files["test/automobile/b.png"] = encode(class_images(cifar, 1, 1, 9)[0])
    summary, out = run(write_zip(tmp_path / "a.zip", files), tmp_path)
    assert summary.duplicates == {"within_split": 2, "train_test": 1}
    assert summary.counts == {"train": {"airplane": 5, "automobile": 4}, "test": {"airplane": 2, "automobile": 4}}
    x_train, _, x_test, _, _ = load_arrays(out)
    train = {np.asarray(p).tobytes() for p in x_train}
    assert not any(np.asarray(p).tobytes() in train for p in x_test)


def test_a_drawn_split_keeps_copies_together(cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    files = class_files(cifar, per_class=6, classes=2)
    for n in range(4):
        files[f"airplane/copy{n}.png"] = files["airplane/000.png"]
    summary, out = run(write_zip(tmp_path / "a.zip", files), tmp_path)
    assert summary.duplicates == {"within_split": 4, "train_test": 0}
    assert sum(summary.counts["train"].values()) + sum(summary.counts["test"].values()) == 16


def test_the_split_and_hash_depend_on_content_and_seed_only(cifar: tuple[np.ndarray, np.ndarray],
                                                            tmp_path: Path) -> None:
    files = class_files(cifar, per_class=10)
    zipped = write_zip(tmp_path / "a.zip", files)
    reordered = write_tar(tmp_path / "b.tgz", dict(reversed(list(files.items()))), gz=True)
    first, out1 = run(zipped, tmp_path, "1")
    again, out2 = run(zipped, tmp_path, "2")
    other_archive, _ = run(reordered, tmp_path, "3")
    other_seed, out4 = run(zipped, tmp_path, "4", seed=7)
    assert first.sha256 == again.sha256 == other_archive.sha256 != other_seed.sha256
    for a, b in zip(load_arrays(out1, mmap=False)[:4], load_arrays(out2, mmap=False)[:4], strict=True):
        assert np.array_equal(a, b)
    assert load_arrays(out1)[4] == load_arrays(out2)[4]
    assert first.counts == other_seed.counts  # the same stratified sizes, other images
    assert not np.array_equal(load_arrays(out1)[2], load_arrays(out4)[2])


def test_the_stored_order_mixes_classes(cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    _, out = run(write_zip(tmp_path / "a.zip", class_files(cifar, per_class=10)), tmp_path)
    y_train = load_arrays(out)[1]
    assert sorted(y_train.tolist()) != y_train.tolist()


@pytest.mark.parametrize(("per_class", "fraction", "expected_test"), [(10, 0.2, 2), (3, 0.2, 1), (10, 0.5, 5),
                                                                      (4, 0.5, 2), (3, 0.5, 1)])
def test_test_fraction_per_class(cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path, per_class: int,
                                 fraction: float, expected_test: int) -> None:
    files = class_files(cifar, per_class=per_class, classes=2)
    summary, _ = run(write_zip(tmp_path / "a.zip", files), tmp_path, test_fraction=fraction, size=32)
    assert summary.counts["test"] == {"airplane": expected_test, "automobile": expected_test}


def test_load_arrays_memory_maps_or_loads(cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    _, out = run(write_zip(tmp_path / "a.zip", class_files(cifar, per_class=3, classes=2)), tmp_path, size=32)
    mapped = load_arrays(out)
    loaded = load_arrays(out, mmap=False)
    assert isinstance(mapped[0], np.memmap) and not isinstance(loaded[0], np.memmap)
    assert all(np.array_equal(a, b) for a, b in zip(mapped[:4], loaded[:4], strict=True))


def test_progress_is_reported_up_to_one(cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    seen: list[float] = []
    run(write_tar(tmp_path / "a.tgz", class_files(cifar, per_class=20), gz=True), tmp_path, progress=seen.append)
    assert seen[0] == 0.0 and seen[-1] == 1.0 and len(seen) > 3
    assert seen == sorted(seen)


def test_cancel_stops_and_removes_the_output(cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    checks = iter(range(1000))
    with pytest.raises(DatasetCancelled, match="cancelled"):
        run(write_zip(tmp_path / "a.zip", class_files(cifar, per_class=5)), tmp_path,
            cancelled=lambda: next(checks) >= 4)
    assert not (tmp_path / "dataset").exists()


def test_the_preview_shows_every_class(cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    _, out = run(write_zip(tmp_path / "a.zip", class_files(cifar, per_class=3, classes=2)), tmp_path, size=32)
    with Image.open(out / "preview.png") as preview:
        assert preview.format == "PNG" and preview.mode == "RGB"
        two_rows = preview.size
    assert two_rows[0] >= 600 and 100 <= two_rows[1] <= 250


def test_the_preview_of_many_classes_draws_the_first_fifty(cifar: tuple[np.ndarray, np.ndarray],
                                                           tmp_path: Path) -> None:
    x, _ = cifar
    np.savez(tmp_path / "many.npz", x=x[:240], y=np.arange(240) % 80)
    summary, out = run(tmp_path / "many.npz", tmp_path, size=16)
    assert len(summary.classes) == 80
    with Image.open(out / "preview.png") as preview:
        width, height = preview.size
    assert 50 * 68 < height < 52 * 68 + 100  # 50 rows of 64 px thumbnails, a header and a note


def test_the_module_imports_no_tensorflow_keras_or_matplotlib() -> None:
    code = ("import sys, worker.datasets\n"
            "bad = [m for m in ('tensorflow', 'keras', 'matplotlib', 'worker.engine') if m in sys.modules]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2], timeout=60)


# --- refused archives ---

def test_not_an_archive(tmp_path: Path) -> None:
    (tmp_path / "a.zip").write_bytes(b"this is just text, whatever its name says\n" * 40)
    refused(tmp_path / "a.zip", tmp_path, "not a zip, tar, tar.gz or npz archive")
    (tmp_path / "b.tgz").write_bytes(encode(np.zeros((8, 8, 3), np.uint8)))  # a PNG named .tgz
    refused(tmp_path / "b.tgz", tmp_path, "not a zip, tar, tar.gz or npz archive")
    (tmp_path / "c.tar.gz").write_bytes(gzip.compress(b"plain text, not a tar" * 100))
    refused(tmp_path / "c.tar.gz", tmp_path, "not a zip, tar, tar.gz or npz archive")


def test_empty_archives(tmp_path: Path) -> None:
    (tmp_path / "zero.zip").write_bytes(b"")
    refused(tmp_path / "zero.zip", tmp_path, "empty")
    refused(write_zip(tmp_path / "e.zip", {}), tmp_path, "empty")
    refused(write_tar(tmp_path / "e.tar", {}), tmp_path, "empty")
    refused(write_tar(tmp_path / "e.tgz", {}, gz=True), tmp_path, "empty")
    refused(write_zip(tmp_path / "junk.zip", {"__MACOSX/._a": b"x", ".DS_Store": b"y"}), tmp_path, "only system files")


def test_an_archive_without_usable_images(tmp_path: Path) -> None:
    files = {"a/notes.txt": b"text", "b/more.txt": b"text"}
    refused(write_zip(tmp_path / "a.zip", files), tmp_path, r"found no usable images: 2 file\(s\) skipped")


@pytest.mark.parametrize("kind", ["zip", "tar.gz", "tar"])
def test_a_truncated_archive(cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path, kind: str) -> None:
    files = class_files(cifar, per_class=5)
    path = tmp_path / "a"
    if kind == "zip":
        write_zip(path, files, compression=zipfile.ZIP_STORED)
    else:
        write_tar(path, files, gz=kind == "tar.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])
    refused(path, tmp_path, "truncated or corrupt")


def test_a_corrupt_zip_member(cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    path = write_zip(tmp_path / "a.zip", class_files(cifar, per_class=3))
    data = bytearray(path.read_bytes())
    data[200:400] = bytes(200)  # inside the first member's deflated data
    path.write_bytes(bytes(data))
    refused(path, tmp_path, "truncated or corrupt")


ESCAPES = ["../x.png", "/etc/x.png", "a/../../x.png", "..\\x.png", "C:/x.png"]


@pytest.mark.parametrize("name", ESCAPES)
@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_paths_escaping_the_archive_are_refused(cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path, name: str,
                                                kind: str) -> None:
    inside = tmp_path / "in"
    inside.mkdir()
    files = {**class_files(cifar, per_class=3), name: encode(class_images(cifar, 0, 1)[0])}
    archive = write_zip(inside / "a.zip", files) if kind == "zip" else write_tar(inside / "a.tar", files)
    error = refused(archive, inside, "points outside the archive")
    assert repr(name) in str(error)
    assert not (tmp_path / "x.png").exists() and not Path("/etc/x.png").exists()


@pytest.mark.parametrize(("kind", "match"), [(tarfile.SYMTYPE, "symbolic link"), (tarfile.LNKTYPE, "hard link"),
                                             (tarfile.CHRTYPE, "device"), (tarfile.BLKTYPE, "device"),
                                             (tarfile.FIFOTYPE, "FIFO")])
def test_tar_links_and_devices_are_refused(cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path, kind: bytes,
                                           match: str) -> None:
    entries: list[tuple[tarfile.TarInfo, bytes | None]] = [
        (tarfile.TarInfo(path), data) for path, data in class_files(cifar, per_class=3).items()]
    entries.insert(2, (tar_special("airplane/link.png", kind, linkname="/etc/passwd"), None))
    refused(write_tar_entries(tmp_path / "a.tgz", entries, gz=True), tmp_path, match)


def test_a_zip_symlink_is_refused(cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    archive = write_zip_symlink(tmp_path / "a.zip", class_files(cifar, per_class=3), "airplane/x.png", "/etc/passwd")
    refused(archive, tmp_path, "symbolic link")


def test_an_encrypted_zip_member_is_refused(cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    path = write_zip(tmp_path / "a.zip", class_files(cifar, per_class=3))
    data = bytearray(path.read_bytes())
    at = data.find(b"PK\x01\x02")  # the first central directory entry: set its "encrypted" flag
    data[at + 8] |= 0x01
    path.write_bytes(bytes(data))
    refused(path, tmp_path, "encrypted")


def _bounded(action: Callable[[], object]) -> tuple[float, int]:
    tracemalloc.start()
    started = time.perf_counter()
    try:
        action()
    finally:
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return elapsed, peak


@pytest.mark.parametrize("writer", [write_zip_bomb, write_tgz_bomb], ids=["zip", "tar.gz"])
def test_a_bomb_of_5_gb_fails_fast_in_bounded_memory(tmp_path: Path, writer: Callable[[Path, str, int], Path]) -> None:
    archive = writer(tmp_path / "bomb", "cats/zeros.png", 5 * GiB)
    assert archive.stat().st_size < 10 * 1024**2
    elapsed, peak = _bounded(lambda: refused(archive, tmp_path, "unpacks to more than 10 MiB",
                                             limits=Limits(max_unpacked_bytes=10 * 1024**2)))
    assert peak < 32 * 1024**2 and elapsed < 10


def test_a_zip_member_unpacking_past_its_declared_size_is_not_read_past_it(tmp_path: Path) -> None:
    # The central directory says 1000 bytes; zipfile stops there and the CRC check fails.
    archive = write_zip_bomb(tmp_path / "liar.zip", "cats/zeros.png", 1 * GiB, honest_sizes=False)
    _, peak = _bounded(lambda: refused(archive, tmp_path, "truncated or corrupt"))
    assert peak < 32 * 1024**2


def test_a_huge_tar_header_fails_fast_in_bounded_memory(tmp_path: Path) -> None:
    archive = write_tgz_pax_bomb(tmp_path / "pax.tgz", 200 * 1024**2)
    _, peak = _bounded(lambda: refused(archive, tmp_path, "header"))
    assert peak < 64 * 1024**2


def test_more_unpacked_bytes_than_allowed(cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    files = class_files(cifar, per_class=5)
    limits = Limits(max_unpacked_bytes=20_000)
    refused(write_zip(tmp_path / "a.zip", files), tmp_path, "unpacks to more than", limits=limits)
    refused(write_tar(tmp_path / "a.tgz", files, gz=True), tmp_path, "unpacks to more than", limits=limits)


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_too_many_files(cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path, kind: str) -> None:
    files = class_files(cifar, per_class=4)
    archive = write_zip(tmp_path / "a", files) if kind == "zip" else write_tar(tmp_path / "a", files)
    refused(archive, tmp_path, "more than 10 entries", limits=Limits(max_files=10))


def test_an_image_bomb_is_skipped_from_its_header(cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    files = {**class_files(cifar, per_class=3), "airplane/bomb.png": png_claiming(100_000, 100_000)}
    _, peak = _bounded(lambda: run(write_zip(tmp_path / "a.zip", files), tmp_path))
    summary = DatasetSummary.model_validate_json((tmp_path / "dataset" / "summary.json").read_text())
    assert summary.skipped[0]["path"] == "airplane/bomb.png"
    assert summary.skipped[0]["reason"].startswith("is too large")
    assert peak < 64 * 1024**2
    # The same with a pixel bound of its own (checked first, from the header, by worker.datasets).
    _, peak = _bounded(lambda: run(write_zip(tmp_path / "a.zip", files), tmp_path, "small",
                                   limits=Limits(max_image_pixels=100_000)))
    summary = DatasetSummary.model_validate_json((tmp_path / "small" / "summary.json").read_text())
    assert summary.skipped[0]["path"] == "airplane/bomb.png" and "too large" in summary.skipped[0]["reason"]
    assert peak < 64 * 1024**2


def test_the_pixel_bound_is_per_limits(cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    files = class_files(cifar, per_class=5, classes=2)  # 32x32 (1024 px), 200x200 JPEGs, 48x40 grey, 200x120 RGBA
    summary, _ = run(write_zip(tmp_path / "a.zip", files), tmp_path, limits=Limits(max_image_pixels=5000))
    big = {s["path"] for s in summary.skipped}
    assert big == {"airplane/001.jpg", "airplane/004.png", "automobile/001.jpg", "automobile/004.png"}
    assert all("at most 5000 are accepted" in s["reason"] for s in summary.skipped)


def test_one_class_is_refused(cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    files = class_files(cifar, per_class=5, classes=1)
    refused(write_zip(tmp_path / "a.zip", files), tmp_path, "only 1 class .'airplane'.; a dataset needs at least 2")
    refused(write_zip(tmp_path / "b.zip", {p.replace("airplane/", ""): d for p, d in files.items()}), tmp_path,
            "found no usable images")


def test_too_many_classes(cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    refused(write_zip(tmp_path / "a.zip", class_files(cifar, per_class=3, classes=4)), tmp_path,
            "found 4 classes, more than the 3 accepted", limits=Limits(max_classes=3))


@pytest.mark.parametrize("name", ["x" * 65, "bell\x07", "tab\there", "   "])
def test_bad_class_names(cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path, name: str) -> None:
    files = class_files(cifar, per_class=3, classes=2)
    files.update({f"{name}/{n}.png": encode(p) for n, p in enumerate(class_images(cifar, 4, 3))})
    refused(write_tar(tmp_path / "a.tar", files), tmp_path, "is not 1..64 printable characters")


def test_a_class_of_64_characters_is_fine(cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    files = {f"{'é' * 64}/{n}.png": encode(p) for n, p in enumerate(class_images(cifar, 4, 3))}
    files.update(class_files(cifar, per_class=3, classes=1))
    summary, _ = run(write_zip(tmp_path / "a.zip", files), tmp_path, size=32)
    assert summary.classes == ["airplane", "é" * 64]


def test_a_class_too_small_for_the_split(cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    files = class_files(cifar, per_class=5, classes=2)
    files["bird/0.png"], files["bird/1.png"] = (encode(p) for p in class_images(cifar, 2, 2))
    files["bird/2.png"] = b"not an image"
    error = refused(write_zip(tmp_path / "a.zip", files), tmp_path, "class 'bird' has 2 usable distinct image")
    assert "1 of its files were skipped" in str(error) and "at least 3" in str(error)


def test_a_class_without_test_images_in_a_given_split(cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    files = {**class_files(cifar, per_class=3, classes=3, prefix="train/"),
             **class_files(cifar, per_class=1, classes=2, prefix="test/", start=5)}
    refused(write_zip(tmp_path / "a.zip", files), tmp_path, "class 'bird' has 0 test image")


def test_a_test_image_that_is_only_a_training_copy_leaves_the_class_without_tests(
        cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    files = class_files(cifar, per_class=3, classes=2, prefix="train/")
    files.update({"test/airplane/a.png": files["train/airplane/000.png"], "test/automobile/b.png": b"",
                  "test/automobile/c.png": files["train/automobile/000.png"]})
    refused(write_zip(tmp_path / "a.zip", files), tmp_path, "0 test image.* once 1 also in training are removed")


def test_test_without_train(cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    refused(write_zip(tmp_path / "a.zip", class_files(cifar, per_class=3, prefix="test/")), tmp_path,
            "no train/ folder")


def test_bad_labels_csv(cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    image = encode(class_images(cifar, 0, 1)[0])
    refused(write_zip(tmp_path / "a.zip", {"a.png": image, "labels.csv": b"a.png,cat\n"}), tmp_path,
            "header row")
    refused(write_zip(tmp_path / "b.zip", {"a.png": image, "labels.csv": b"filename,label,split\na.png,cat,dev\n"}),
            tmp_path, "split is 'dev'")


def test_pickled_npz_arrays_are_refused(tmp_path: Path) -> None:
    objects = np.empty(4, dtype=object)
    objects[:] = [np.zeros((8, 8), np.uint8)] * 4
    np.savez(tmp_path / "x.npz", x=objects, y=np.arange(4) % 2)
    refused(tmp_path / "x.npz", tmp_path, "Python objects .a pickle.")
    np.savez(tmp_path / "n.npz", x=np.zeros((4, 8, 8), np.uint8), y=np.arange(4) % 2,
             class_names=np.array(["a", {"b": 1}], dtype=object))
    refused(tmp_path / "n.npz", tmp_path, "'class_names' of the npz holds Python objects")


@pytest.mark.parametrize(("arrays", "match"), [
    ({"x": np.zeros((6, 8, 8), np.float32), "y": np.arange(6) % 2}, "not uint8"),
    ({"x": np.zeros((6, 8, 8, 2), np.uint8), "y": np.arange(6) % 2}, "has shape"),
    ({"x": np.zeros((6, 8, 8), np.uint8)}, "no array 'y'"),
    ({"x": np.zeros((6, 8, 8), np.uint8), "y": np.arange(5)}, "one integer label per image"),
    ({"x": np.zeros((6, 8, 8), np.uint8), "y": np.arange(6) - 1}, "include -1"),
    ({"x": np.zeros((6, 8, 8), np.uint8), "y": np.arange(6) % 3, "class_names": np.array(["a", "b"])},
     "only 2 names"),
    ({"x": np.zeros((6, 8, 8), np.uint8), "y": np.arange(6) % 2, "x_test": np.zeros((2, 8, 8), np.uint8)},
     "only one of x_test and y_test"),
])
def test_bad_npz_arrays(tmp_path: Path, arrays: dict[str, np.ndarray], match: str) -> None:
    np.savez(tmp_path / "d.npz", **arrays)  # type: ignore[arg-type]
    refused(tmp_path / "d.npz", tmp_path, match)


def test_a_duplicate_path_uses_the_first(cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    files = list(class_files(cifar, per_class=3).items())
    files.append((files[0][0], b"a second entry of the same name"))
    summary, _ = run(write_tar(tmp_path / "a.tar", files), tmp_path)
    assert summary.skipped == [{"path": files[0][0],
                                "reason": "the same path appears twice in the archive; the first one is used"}]


def test_the_output_directory_must_not_exist(cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    (tmp_path / "dataset").mkdir()
    with pytest.raises(FileExistsError):
        run(write_zip(tmp_path / "a.zip", class_files(cifar, per_class=3)), tmp_path)


def test_a_file_over_max_file_bytes_is_skipped_unread(cifar: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    files = class_files(cifar, per_class=5, classes=2)
    files["airplane/huge.bmp"] = encode(np.zeros((300, 300, 3), np.uint8), "BMP")  # 270 KB
    summary, _ = run(write_tar(tmp_path / "a.tgz", files, gz=True), tmp_path, limits=Limits(max_file_bytes=100_000))
    assert summary.skipped == [{"path": "airplane/huge.bmp", "reason": "larger than 97.7 KiB, the most read for one "
                                                                        "file"}]


def test_a_labels_csv_inside_a_class_folder_is_just_a_skipped_file(cifar: tuple[np.ndarray, np.ndarray],
                                                                   tmp_path: Path) -> None:
    files = {**class_files(cifar, per_class=3, classes=2), "airplane/labels.csv": b"filename,label\n"}
    summary, _ = run(write_zip(tmp_path / "a.zip", files), tmp_path, size=32)
    assert summary.classes == ["airplane", "automobile"]
    assert [s["path"] for s in summary.skipped] == ["airplane/labels.csv"]
