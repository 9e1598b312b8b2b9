"""Reading an uploaded archive safely: members one at a time, in memory, never extracted to disk by name.

The format comes from the content (magic bytes), never from the file name: zip (an .npz is a zip of .npy
members), tar, and gzip-compressed tar. Every entry is checked before its bytes are used:
- its path must stay inside the archive: no `..` component, no absolute path (`/x`, `C:x`), no NUL;
- it must be a regular file or a folder: symbolic and hard links, devices, FIFOs and sockets refuse the archive;
- at most `Limits.max_files` entries; at most `Limits.max_unpacked_bytes` decompressed bytes, counted as they
  are actually read (a zip's sizes and a tar's headers may only make it refuse sooner, never accept more);
- a zip's central directory is sized from its end record before `zipfile` parses it, and a tar's metadata
  (pax / GNU long-name headers, which `tarfile` reads whole) is bounded, so memory stays bounded too.
A tar is read as a stream (`r|`), never seeking back; a zip member is read in 1 MiB chunks.
"""

from __future__ import annotations

import gzip
import lzma
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Generator, Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, BinaryIO, Literal, cast

from worker.datasets.errors import DatasetError
from worker.datasets.limits import Limits, MiB

ArchiveFormat = Literal["zip", "npz", "tar", "tar.gz"]

NOT_AN_ARCHIVE = "not a zip, tar, tar.gz or npz archive"
_CHUNK = MiB
#: pax and GNU long-name headers are read whole by tarfile; a longer one is refused.
_MAX_TAR_METADATA = 16 * MiB
#: A central directory entry is 46 bytes plus its name, extra field and comment; this is generous for real zips.
_MAX_DIRECTORY_BYTES_PER_ENTRY = 512
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}


def human_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1024 * MiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


@contextmanager
def archive_errors() -> Iterator[None]:
    """Turn what zipfile, tarfile, gzip and zlib raise for damaged data into a DatasetError."""
    try:
        yield
    except DatasetError:
        raise
    except NotImplementedError as exc:  # zipfile: a compression method it cannot decode
        raise DatasetError(f"the archive uses a compression method that cannot be read ({exc}); "
                           "re-create it with ordinary (deflate) compression") from exc
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError, struct.error,
            ValueError) as exc:
        raise DatasetError(f"the archive is truncated or corrupt ({exc or type(exc).__name__}); "
                           "upload it again, or re-create it") from exc


class UnpackBudget:
    """Decompressed bytes actually read, across the whole archive; refuses the archive past the limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    @property
    def remaining(self) -> int:
        return self.limit - self.used

    def take(self, n: int) -> None:
        self.used += n
        if self.used > self.limit:
            raise self.exceeded()

    def exceeded(self) -> DatasetError:
        return DatasetError(f"the archive unpacks to more than {human_bytes(self.limit)}, the most accepted: "
                            "upload fewer or smaller images, or split them into several datasets")


@dataclass
class Member:
    """One regular file of the archive. Read it before asking for the next member (a tar is a stream)."""

    path: str
    #: What the archive's own header says; used to refuse early and to report progress, never trusted.
    size: int
    #: How much of the archive file had been read when this member came up (0..1).
    fraction: float
    _open: Callable[[], IO[bytes]]
    #: Counts the bytes read (zip); a tar's stream counts every byte itself.
    _budget: UnpackBudget | None = field(default=None, repr=False)

    def read(self, cap: int) -> bytes | None:
        """The member's bytes, or None when it holds more than `cap` (then no more than `cap + 1` are read)."""
        chunks: list[bytes] = []
        total = 0
        with archive_errors(), self._open() as f:
            while chunk := f.read(min(_CHUNK, cap + 1 - total)):
                total += len(chunk)
                if self._budget is not None:
                    self._budget.take(len(chunk))
                if total > cap:
                    return None
                chunks.append(chunk)
        return b"".join(chunks)


def detect_format(path: Path) -> Literal["zip", "tar", "tar.gz"]:
    """zip, tar or tar.gz, from the first bytes; refuses anything else (an npz is a zip: see `is_npz`)."""
    with open(path, "rb") as f:
        head = f.read(1024)
        if not head:
            raise DatasetError("the archive is empty (0 bytes)")
        if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
            return "zip"
        if _is_tar_header(head):
            return "tar"
        if head[:2] == b"\x1f\x8b":
            f.seek(0)
            with archive_errors(), gzip.GzipFile(fileobj=f, mode="rb") as unzipped:
                inner = unzipped.read(1024)
            if _is_tar_header(inner):
                return "tar.gz"
            raise DatasetError(f"{NOT_AN_ARCHIVE}: it is gzip-compressed but what it holds is not a tar archive")
    raise DatasetError(f"{NOT_AN_ARCHIVE}; upload one of those")


def _is_tar_header(block: bytes) -> bool:
    if len(block) < 512:
        return False
    # POSIX, GNU and pax tars all carry "ustar" at 257; an empty tar is nothing but zero blocks.
    return block[257:262] == b"ustar" or (len(block) >= 1024 and not any(block[:1024]))


def safe_path(name: str) -> str:
    """The entry's path, normalised ("a//./b/" -> "a/b"); refuses one that could point outside the archive."""
    posix = name.replace("\\", "/")
    parts = [part for part in posix.split("/") if part not in ("", ".")]
    drive = len(posix) >= 2 and posix[0].isalpha() and posix[1] == ":"  # C:x, C:/x (Windows)
    if "\x00" in name or posix.startswith("/") or drive or ".." in parts:
        raise DatasetError(f"archive entry {name!r} points outside the archive (an absolute path or '..'): "
                           "path traversal is refused; create the archive from inside its folder so that every "
                           "entry is a relative path such as roses/001.jpg")
    return "/".join(parts)


def _refuse_link(name: str, kind: str) -> DatasetError:
    return DatasetError(f"archive entry {name!r} is a {kind}; links are refused: put the file itself in the "
                        "archive instead (tar -h stores what a link points to; so does zip, unless given -y)")


def _refuse_special(name: str) -> DatasetError:
    return DatasetError(f"archive entry {name!r} is a device, FIFO or socket, not a regular file; remove it")


def _too_many_entries(limits: Limits) -> DatasetError:
    return DatasetError(f"the archive has more than {limits.max_files} entries, the most accepted: "
                        "upload fewer files, or split them into several datasets")


@dataclass
class Archive:
    """An open archive: its format and its regular files, one after another (iterate `members` once)."""

    format: ArchiveFormat
    members: Iterator[Member]
    #: The open zip (for an npz, whose arrays are read from it directly); None for a tar.
    zip_file: zipfile.ZipFile | None
    budget: UnpackBudget


@contextmanager
def open_archive(path: Path, limits: Limits) -> Iterator[Archive]:
    """Open `path` for reading; a zip's entries are all checked here, a tar's as the stream reaches them."""
    fmt = detect_format(path)
    budget = UnpackBudget(limits.max_unpacked_bytes)
    with open(path, "rb") as raw:
        if fmt == "zip":
            with _open_zip(raw, limits) as zip_file:
                infos = [info for info in zip_file.infolist() if not _zip_is_dir(info)]
                npz = bool(infos) and all(info.filename.endswith(".npy") for info in infos)
                members = _zip_members(zip_file, infos, budget)
                with closing(members):
                    yield Archive("npz" if npz else "zip", members, zip_file, budget)
        else:
            members = _tar_members(raw, path.stat().st_size, fmt == "tar.gz", limits, budget)
            with closing(members):  # closes the tar stream even when reading stopped half-way
                yield Archive(fmt, members, None, budget)


def _zip_directory(raw: BinaryIO) -> tuple[int, int]:
    """(entries, central directory bytes) from the end-of-central-directory record, zip64 included."""
    raw.seek(0, 2)
    end = raw.tell()
    tail_len = min(end, 22 + 0xFFFF + 20)  # the record, its longest comment, a zip64 locator before it
    raw.seek(end - tail_len)
    tail = raw.read(tail_len)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        raise DatasetError("the zip archive is truncated or corrupt (its end record, the table of contents, is "
                           "missing); upload it again, or re-create it")
    entries, directory_bytes, offset = struct.unpack("<HII", tail[at + 10:at + 20])
    if entries == 0xFFFF or 0xFFFFFFFF in (directory_bytes, offset):
        locator = tail[at - 20:at] if at >= 20 else b""
        if locator[:4] == b"PK\x06\x07":
            (record_at,) = struct.unpack("<Q", locator[8:16])
            raw.seek(record_at)
            record = raw.read(56)
            if record[:4] == b"PK\x06\x06" and len(record) == 56:
                entries, directory_bytes = struct.unpack("<QQ", record[32:48])
    return entries, directory_bytes


def _open_zip(raw: BinaryIO, limits: Limits) -> zipfile.ZipFile:
    entries, directory_bytes = _zip_directory(raw)
    if entries > limits.max_files:
        raise _too_many_entries(limits)
    if directory_bytes > limits.max_files * _MAX_DIRECTORY_BYTES_PER_ENTRY + MiB:
        # zipfile reads the whole central directory into memory and makes an object per entry: refuse first.
        raise DatasetError(f"the zip archive's table of contents is {directory_bytes} bytes, more than "
                           f"{limits.max_files} entries can need; re-create the archive")
    raw.seek(0)
    with archive_errors():
        zip_file = zipfile.ZipFile(raw)
    infos = zip_file.infolist()
    if len(infos) > limits.max_files:
        zip_file.close()
        raise _too_many_entries(limits)
    try:
        declared = 0
        for info in infos:
            _check_zip_entry(info)
            declared += info.file_size
        if declared > limits.max_unpacked_bytes:
            raise UnpackBudget(limits.max_unpacked_bytes).exceeded()
    except BaseException:
        zip_file.close()
        raise
    return zip_file


def _zip_is_dir(info: zipfile.ZipInfo) -> bool:
    return info.is_dir() or stat.S_ISDIR(info.external_attr >> 16)


def _check_zip_entry(info: zipfile.ZipInfo) -> None:
    safe_path(info.filename)
    mode = info.external_attr >> 16  # the Unix mode, where the zip was made on Unix (0 otherwise)
    if stat.S_ISLNK(mode):
        raise _refuse_link(info.filename, "symbolic link")
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        raise _refuse_special(info.filename)
    if _zip_is_dir(info):
        return
    if info.flag_bits & 0x1:
        raise DatasetError(f"archive entry {info.filename!r} is encrypted; zip the files again without a password")
    if info.compress_type not in _ZIP_METHODS:
        raise DatasetError(f"archive entry {info.filename!r} uses compression method {info.compress_type}, which "
                           "cannot be read; re-create the zip with ordinary (deflate) compression")


def _zip_members(zip_file: zipfile.ZipFile, infos: list[zipfile.ZipInfo],
                 budget: UnpackBudget) -> Generator[Member, None, None]:
    total = sum(info.compress_size for info in infos) or 1
    done = 0
    for info in infos:
        yield Member(safe_path(info.filename), info.file_size, done / total, partial(zip_file.open, info), budget)
        done += info.compress_size


class _BoundedStream:
    """The decompressed tar stream, counting every byte read against the budget and bounding metadata."""

    def __init__(self, inner: IO[bytes], budget: UnpackBudget) -> None:
        self._inner = inner
        self._budget = budget
        self.position = 0
        self.stop_at = _MAX_TAR_METADATA

    def read(self, n: int = -1) -> bytes:
        data = self._inner.read(n)
        self.position += len(data)
        self._budget.take(len(data))
        if self.position > self.stop_at:
            raise DatasetError(f"the tar archive holds a header (pax or GNU long name) over "
                               f"{human_bytes(_MAX_TAR_METADATA)}; re-create the archive")
        return data


def _tar_members(raw: BinaryIO, archive_size: int, compressed: bool, limits: Limits,
                 budget: UnpackBudget) -> Generator[Member, None, None]:
    with archive_errors(), ExitStack() as stack:
        inner: IO[bytes] = raw
        if compressed:
            inner = cast(IO[bytes], stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb")))
        stream = _BoundedStream(inner, budget)
        tar = stack.enter_context(tarfile.open(fileobj=cast(IO[bytes], stream), mode="r|"))
        entries = 0
        while True:
            member = tar.next()
            if member is None:
                break
            tar.members.clear()  # type: ignore[attr-defined]  # a plain list (not in the stubs) of every header seen
            entries += 1
            if entries > limits.max_files:
                raise _too_many_entries(limits)
            path = safe_path(member.name)
            if member.issym():
                raise _refuse_link(member.name, "symbolic link")
            if member.islnk():
                raise _refuse_link(member.name, "hard link")
            if member.ischr() or member.isblk() or member.isfifo():
                raise _refuse_special(member.name)
            # Reading (or skipping) this member's data may move the stream up to its end, plus the next headers.
            padded = -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            stream.stop_at = member.offset_data + padded + _MAX_TAR_METADATA + 2 * tarfile.RECORDSIZE
            if member.isdir():
                continue
            if not member.isreg():
                raise DatasetError(f"archive entry {member.name!r} is not a regular file or folder (tar type "
                                   f"{member.type!r}); re-create the archive with plain files")
            if member.size > budget.remaining:
                raise budget.exceeded()
            fraction = min(raw.tell() / max(archive_size, 1), 1.0)
            yield Member(path, member.size, fraction, partial(_extract, tar, member))


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes]:
    f = tar.extractfile(member)
    if f is None:  # only for non-regular members, which never get here
        raise DatasetError(f"archive entry {member.name!r} has no data")
    return f
