"""Archives for tests/worker/test_datasets.py, built in the tests from real images (CIFAR-10, scikit-learn's digits).

Besides ordinary zip / tar / tar.gz writers, it builds what no well-behaved tool writes: links and devices,
entries escaping the archive, and bombs (a zip or tar.gz member of gigabytes of zeros, written in a few
milliseconds by repeating one compressed block, and a tar.gz whose pax header alone is 200 MB).
"""

from __future__ import annotations

import io
import os
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from PIL import Image

MiB = 1024 * 1024
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

Files = Mapping[str, bytes] | Iterable[tuple[str, bytes]]


def cifar10_test_file() -> Path:
    """CIFAR-10's test.npz: under TL_DATA_DIR when it is there, else in the shared data next to the repository."""
    shared = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10" / "test.npz"
    env = os.environ.get("TL_DATA_DIR")
    if env and (Path(env) / "cifar10" / "test.npz").is_file():
        return Path(env) / "cifar10" / "test.npz"
    return shared


def encode(pixels: np.ndarray, fmt: str = "PNG", **options: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **options)
    return buf.getvalue()


def varied_file(pixels: np.ndarray, i: int) -> tuple[str, bytes]:
    """One CIFAR image as one of five kinds of file: (extension, bytes)."""
    img = Image.fromarray(pixels)
    buf = io.BytesIO()
    kind = i % 5
    if kind == 0:
        img.save(buf, format="PNG")
    elif kind == 1:
        img.resize((200, 200), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=90)
        return ".jpg", buf.getvalue()
    elif kind == 2:
        img.convert("L").resize((48, 40)).save(buf, format="PNG")
    elif kind == 3:
        img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(buf, format="PNG")
    else:
        rgba = img.convert("RGBA")
        rgba.putalpha(Image.new("L", img.size, 160))
        rgba.resize((200, 120)).save(buf, format="PNG")
    return ".png", buf.getvalue()


def _items(files: Files) -> list[tuple[str, bytes]]:
    return list(files.items()) if isinstance(files, Mapping) else list(files)


def write_zip(path: Path, files: Files, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in _items(files):
            zf.writestr(zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0)), data, compress_type=compression)
    return path


def write_tar(path: Path, files: Files, *, gz: bool = False) -> Path:
    with tarfile.open(path, "w:gz" if gz else "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in _items(files):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def write_tar_entries(path: Path, entries: Iterable[tuple[tarfile.TarInfo, bytes | None]], *, gz: bool = False) -> Path:
    """A tar of hand-made headers (links, devices, FIFOs), each with its data or none."""
    with tarfile.open(path, "w:gz" if gz else "w") as tf:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def tar_special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def write_zip_symlink(path: Path, files: Files, link: str, target: str) -> Path:
    """A zip whose entry `link` is a Unix symbolic link (mode S_IFLNK in external_attr) to `target`."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in _items(files):
            zf.writestr(name, data)
        info = zipfile.ZipInfo(link)
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, target)
    return path


def _zeros_deflate(size: int, prefix: bytes = b"") -> bytes:
    """A raw deflate stream of `prefix` and then `size` zero bytes, built in O(size / 1 MiB)."""
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts = [co.compress(prefix) + co.flush(zlib.Z_FULL_FLUSH)] if prefix else []
    block = co.compress(bytes(MiB)) + co.flush(zlib.Z_FULL_FLUSH)
    # After a full flush the compressor starts afresh, so every MiB of zeros compresses to these same bytes.
    assert co.compress(bytes(MiB)) + co.flush(zlib.Z_FULL_FLUSH) == block
    whole, rest = divmod(size, MiB)
    return b"".join([*parts, block * whole, co.compress(bytes(rest)), co.flush()])


def write_zip_bomb(path: Path, name: str, size: int, honest_sizes: bool = True) -> Path:
    """A zip64 archive of one deflated member of `size` zero bytes (a few MB on disk for gigabytes unpacked)."""
    data = _zeros_deflate(size)
    raw_name = name.encode()
    declared = size if honest_sizes else 1000
    local_extra = struct.pack("<HHQQ", 1, 16, declared, len(data))
    local = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 45, 0, 8, 0, 0x21, 0, 0xFFFFFFFF, 0xFFFFFFFF,
                        len(raw_name), len(local_extra)) + raw_name + local_extra
    central_extra = struct.pack("<HHQQ", 1, 16, declared, len(data))
    central = struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 45, 45, 0, 8, 0, 0x21, 0, 0xFFFFFFFF, 0xFFFFFFFF,
                          len(raw_name), len(central_extra), 0, 0, 0, 0, 0) + raw_name + central_extra
    offset = len(local) + len(data)
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 1, 1, len(central), offset, 0)
    path.write_bytes(local + data + central + end)
    return path


def _gzip(deflate: bytes) -> bytes:
    # The trailer's CRC is left 0: a reader that got that far would have unpacked the whole bomb.
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\x03" + deflate + struct.pack("<II", 0, 0)


def write_tgz_bomb(path: Path, name: str, size: int) -> Path:
    """A tar.gz of one member of `size` zero bytes, its header honest about the size."""
    info = tarfile.TarInfo(name)
    info.size = size
    path.write_bytes(_gzip(_zeros_deflate(size, info.tobuf(tarfile.USTAR_FORMAT))))
    return path


def write_tgz_pax_bomb(path: Path, size: int) -> Path:
    """A tar.gz starting with a pax extended header of `size` bytes (tarfile reads a pax header whole)."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = size
    path.write_bytes(_gzip(_zeros_deflate(size, info.tobuf(tarfile.USTAR_FORMAT))))
    return path


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (an image bomb), as tests/service/svc_helpers does."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))
