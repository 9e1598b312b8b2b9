"""The artifact store: one directory per model, written atomically, and the aliases beside them.

Layout under `TL_ARTIFACT_DIR`:
    models/{model_id}/model.keras      the whole Keras model (raw uint8 RGB 32x32x3 in, 10 probabilities out)
    models/{model_id}/model.tflite     the TensorFlow Lite export served by the API (when the export passed)
    models/{model_id}/metadata.json    spec, metrics, history, parameter counts, data and weights provenance
    models/{model_id}/curves.png       accuracy and loss per epoch, train vs test
    models/{model_id}/confusion.png    the test subset's confusion matrix, labelled with the class names
    models/.staging/                   models being written; renamed into `models/` when complete
    models/.trash/                     models being deleted (renamed here first, then removed)
    aliases.json                       {"alias": "model_id"}, replaced atomically under a file lock
    feature-cache/, data-cache/,       the engine's caches (frozen-base features, decoded CIFAR-10, TFLite
    export-templates/                  templates); safe to delete

A model directory appears under its final name only once every file in it is written and fsynced
(`os.rename` of a complete staging directory), so readers never see a partial model. This module never
imports TensorFlow: the API reads the store through it, and the store on disk is the source of truth
(Redis may lose everything; every model here is still listed and served).

What a killed process leaves behind (a staging or trash directory, a `.{name}.{random}.tmp` of `write_atomic`)
is removed by `sweep_artifacts` once nothing has touched it for `SWEEP_MAX_AGE_SECONDS` (the worker runs it
at start, so does `make run`).
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worker.errors import ArtifactWriteError
from worker.jobstore import Metrics
from worker.spec import JobSpec

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ALIAS_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
RESERVED_ALIASES = frozenset({"latest"})

KERAS_FILE = "model.keras"
TFLITE_FILE = "model.tflite"
METADATA_FILE = "metadata.json"
CURVES_FILE = "curves.png"
CONFUSION_FILE = "confusion.png"
#: Models trained before datasets existed were all trained on CIFAR-10.
CIFAR10_REF: dict[str, Any] = {"id": "cifar10", "name": "CIFAR-10", "sha256": None}
_STAGING = ".staging"
_TRASH = ".trash"
EXPORT_TEMPLATES_DIR = "export-templates"
#: `write_atomic`'s temporary names: `.{name}.{8 hex digits}.tmp`.
TEMP_FILE_PATTERN = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")
#: Leftovers untouched this long are swept: far longer than any write takes (a staging directory's files are
#: written one after the other, each refreshing its mtime; a live upload refreshes its file as it grows).
SWEEP_MAX_AGE_SECONDS = 3600.0


class ModelGone(LookupError):
    """The model named in an alias change was deleted (or never existed) by the time the alias lock was held."""

    def __init__(self, model_id: str) -> None:
        super().__init__(f"model {model_id!r} not found")
        self.model_id = model_id


class DatasetRef(BaseModel):
    """The dataset a model was trained on: its id (`cifar10` or an uploaded dataset's), name and content hash."""

    model_config = ConfigDict(extra="allow")

    id: str
    name: str | None = None
    sha256: str | None = None


class ExportInfo(BaseModel):
    """One downloadable format of a model: its file size and its check against the Keras model on the job's test
    subset (top-1 agreement, and the accuracy the exported file itself reaches)."""

    bytes: int | None = None
    top1_agreement: float | None = None
    test_accuracy: float | None = None


#: `?format=` of /weights -> the file in the model directory (and the download's suffix).
EXPORT_FILES: dict[str, str] = {"keras": KERAS_FILE, "tflite": TFLITE_FILE, "tflite-float16": "model-float16.tflite",
                                "tflite-int8": "model-int8.tflite", "savedmodel": "savedmodel.tar.gz"}


class ModelInfo(BaseModel):
    """The Model object of shared/API.md (aliases filled in by the store)."""

    id: str
    name: str | None = None
    kind: str
    job_id: str | None = None
    created_at: str
    classes: list[str]
    input_shape: list[int] = Field(default_factory=lambda: [32, 32, 3])
    dataset: DatasetRef = Field(default_factory=lambda: DatasetRef.model_validate(CIFAR10_REF),
                                description="the dataset it was trained on")
    spec: JobSpec = Field(description="the spec of the job that trained it")
    metrics: Metrics = Field(description="as in the job")
    aliases: list[str] = Field(default_factory=list)
    exports: dict[str, ExportInfo] = Field(default_factory=dict,
                                           description="every downloadable format (`?format=` of /weights)")
    export_failures: dict[str, str] = Field(default_factory=dict,
                                            description="formats the model does not offer, and why")


def valid_id(value: str) -> bool:
    return bool(ID_PATTERN.fullmatch(value))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_directory(staging: Path, final: Path, what: str) -> Path:
    """Fsync every file of a complete staging directory, then rename it to `final`: readers see all of it or
    nothing. Once renamed it is published; a failed fsync of the parent afterwards only risks the rename across a
    power cut, so it is logged, never reported as a failed write (the job that made it has succeeded)."""
    try:
        for child in staging.iterdir():
            with open(child, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(staging)
        os.rename(staging, final)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ArtifactWriteError(f"cannot write {what} to {final}: {exc.strerror or exc}; "
                                 "check free space and permissions of TL_ARTIFACT_DIR") from exc
    try:
        fsync_dir(final.parent)
    except OSError as exc:
        log.warning("%s is published at %s but its directory could not be fsynced: %s", what, final, exc)
    return final


def write_atomic(path: Path, write: Callable[[BinaryIO], object], *, durable: bool = False) -> None:
    """Write `path` through `write(file)` into `.{name}.{random}.tmp` beside it, then `os.replace`: readers
    see the old file or the whole new one, never a part. `durable` also fsyncs before the rename (for records;
    caches can do without). The temporary file is removed if anything fails."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def is_temp_file(name: str) -> bool:
    """A temporary file of `write_atomic` (complete or crashed, it is never read by anything)."""
    return bool(TEMP_FILE_PATTERN.fullmatch(name))


def last_activity(path: Path) -> float:
    """The newest mtime of `path` and, for a directory, of everything in it (0.0 when it vanished)."""
    try:
        newest = path.lstat().st_mtime
    except FileNotFoundError:
        return 0.0
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def remove_path(path: Path) -> bool:
    """Remove a file or a directory tree; False when it was already gone."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            return not path.exists()
        path.unlink()
        return True
    except FileNotFoundError:
        return False


def sweep_temp_files(directory: Path, max_age_seconds: float, now: float | None = None) -> list[Path]:
    """Remove `write_atomic` temporaries directly in `directory` untouched for `max_age_seconds` (a crash
    between writing and renaming them); the paths removed."""
    now = time.time() if now is None else now
    removed = []
    try:
        entries = [Path(e.path) for e in os.scandir(directory) if e.is_file(follow_symlinks=False)
                   and is_temp_file(e.name)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    for path in entries:
        if now - last_activity(path) >= max_age_seconds and remove_path(path):
            removed.append(path)
    return removed


def sweep_entries(directory: Path, max_age_seconds: float, now: float | None = None,
                  keep: Callable[[Path], bool] | None = None) -> list[Path]:
    """Remove every entry of `directory` (files or trees) untouched for `max_age_seconds`, except those
    `keep(path)` says to keep; the paths removed."""
    now = time.time() if now is None else now
    removed = []
    try:
        entries = [Path(e.path) for e in os.scandir(directory)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    for path in entries:
        if now - last_activity(path) < max_age_seconds or (keep is not None and keep(path)):
            continue
        if remove_path(path):
            removed.append(path)
            log.info("swept %s (untouched for over %.0f s: left by a killed process)", path, max_age_seconds)
    return removed


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to `path` atomically and durably (`write_atomic`)."""
    write_atomic(path, lambda f: f.write(json.dumps(data, indent=2, sort_keys=True).encode("utf-8")), durable=True)


class ModelCatalog:
    """What both store backends derive from their own `metadata`, `read_aliases`, `list_ids` and `has_model`:
    the Model objects, the listing and the resolution of refs."""

    def metadata(self, model_id: str) -> dict[str, Any] | None:
        raise NotImplementedError

    def read_aliases(self) -> dict[str, str]:
        raise NotImplementedError

    def list_ids(self) -> builtins.list[str]:
        raise NotImplementedError

    def has_model(self, model_id: str) -> bool:
        raise NotImplementedError

    def info(self, model_id: str, aliases: dict[str, str] | None = None) -> ModelInfo | None:
        meta = self.metadata(model_id)
        if meta is None:
            return None
        aliases = self.read_aliases() if aliases is None else aliases
        try:
            return _model_info(meta, sorted(a for a, m in aliases.items() if m == model_id))
        except ValidationError:  # the metadata was checked when read; a model never breaks a listing
            return None

    def list(self) -> builtins.list[ModelInfo]:
        aliases = self.read_aliases()
        infos = (self.info(model_id, aliases) for model_id in self.list_ids())
        return [info for info in infos if info is not None]

    def catalog_version(self) -> Hashable | None:
        """A token that changes whenever a model is published or deleted or an alias is written, read without
        listing anything, so a caller may keep what `resolve` answered while the token stays the same; None when
        the backend has no such cheap token (then every ref is resolved again). May raise OSError."""
        return None

    def resolve(self, ref: str) -> str | None:
        """A model id for `ref`: a model id, an alias, or `latest` (newest model)."""
        if ref == "latest":
            ids = self.list_ids()
            return ids[0] if ids else None
        if self.has_model(ref):
            return ref
        target = self.read_aliases().get(ref)
        if target is not None and self.has_model(target):
            return target
        return None


class ModelStore(ModelCatalog):
    """Reads and writes model directories and aliases under one artifact directory."""

    def __init__(self, artifact_dir: Path) -> None:
        self.artifact_dir = Path(artifact_dir)
        self.models_dir = self.artifact_dir / "models"
        self.aliases_file = self.artifact_dir / "aliases.json"
        self._lock_file = self.artifact_dir / ".aliases.lock"
        # model id -> ((mtime_ns, size) of its metadata.json, the parsed metadata or None when malformed)
        self._cache: dict[str, tuple[tuple[int, int], dict[str, Any] | None]] = {}

    # ----- writing (the worker) -----

    @contextlib.contextmanager
    def staging(self, model_id: str) -> Iterator[Path]:
        """A fresh staging directory for `model_id`; removed on any error, left for `publish` otherwise."""
        if not valid_id(model_id):
            raise ValueError(f"invalid model id {model_id!r}")
        staging = self.models_dir / _STAGING / f"{model_id}-{secrets.token_hex(4)}"
        try:
            staging.mkdir(parents=True, exist_ok=False)
        except OSError as exc:
            raise ArtifactWriteError(
                f"cannot create a model directory under {self.models_dir}: {exc.strerror or exc}; "
                "check that TL_ARTIFACT_DIR exists, is writable by the worker and has free space"
            ) from exc
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def publish(self, staging: Path, model_id: str) -> Path:
        """Publish a complete staging directory as `models/{model_id}` (`publish_directory`)."""
        return publish_directory(staging, self.models_dir / model_id, f"model {model_id}")

    # ----- reading (the API) -----

    def model_dir(self, model_id: str) -> Path | None:
        """The directory of a complete model, or None (also for ids that are not valid ids)."""
        if not valid_id(model_id) or model_id.startswith("."):
            return None
        path = self.models_dir / model_id
        return path if (path / METADATA_FILE).is_file() else None

    def metadata(self, model_id: str) -> dict[str, Any] | None:
        """The full metadata.json of a model (cached by file mtime and size), or None: also when it is malformed
        (not JSON, not an object, or without the Model fields in the right types), which is logged once per
        version of the file. A malformed model is never listed; it can still be deleted."""
        path = self.model_dir(model_id)
        if path is None:
            return None
        meta_path = path / METADATA_FILE
        try:
            stat = meta_path.stat()
            version = (stat.st_mtime_ns, stat.st_size)
            cached = self._cache.get(model_id)
            if cached and cached[0] == version:
                return cached[1]
            raw = meta_path.read_bytes()
        except OSError:
            return None
        data = _valid_metadata(model_id, meta_path, raw)
        self._cache[model_id] = (version, data)
        return data

    def list_ids(self) -> list[str]:
        """Ids of every complete model with readable metadata, newest first."""
        try:
            entries = [e.name for e in os.scandir(self.models_dir) if e.is_dir() and not e.name.startswith(".")]
        except FileNotFoundError:
            return []
        dated = []
        for model_id in entries:
            meta = self.metadata(model_id)
            if meta is not None:
                dated.append((str(meta["created_at"]), model_id))
        dated.sort(reverse=True)
        return [model_id for _, model_id in dated]

    def has_model(self, model_id: str) -> bool:
        return self.model_dir(model_id) is not None

    def catalog_version(self) -> Hashable | None:
        """Two stats: `models/` (publishing renames a model directory into it, deleting renames one out: its
        mtime and link count change) and `aliases.json` (replaced atomically: a new inode each write). None
        while there is no `models/` yet."""
        try:
            models = os.stat(self.models_dir)
        except FileNotFoundError:
            return None
        try:
            aliases = os.stat(self.aliases_file)
        except FileNotFoundError:
            alias_version = None
        else:
            alias_version = (aliases.st_ino, aliases.st_mtime_ns, aliases.st_size)
        return models.st_ino, models.st_mtime_ns, models.st_nlink, alias_version

    def delete(self, model_id: str) -> bool:
        """Remove a model (atomically: renamed away first) and every alias pointing at it. False when there is
        no such model, also for the loser of two concurrent deletes (its rename finds nothing)."""
        path = self.model_dir(model_id)
        if path is None:
            return False
        trash = self.models_dir / _TRASH / f"{model_id}-{secrets.token_hex(4)}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(path, trash)
        except FileNotFoundError:  # another delete renamed it first
            return False
        self._cache.pop(model_id, None)
        # Under the aliases lock, after the rename: a `set_alias` either wrote its alias before (removed here)
        # or takes the lock after and finds the model gone (ModelGone), so no alias is left dangling.
        with self._aliases_locked() as aliases:
            for alias in [a for a, m in aliases.items() if m == model_id]:
                del aliases[alias]
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def sweep(self, max_age_seconds: float = SWEEP_MAX_AGE_SECONDS) -> builtins.list[Path]:
        """Remove what killed processes left: staging directories untouched for `max_age_seconds`, every
        trash directory (a delete renamed it there; nothing reads it), and `write_atomic` temporaries (beside
        aliases.json, in model directories, in the export templates) untouched as long. The paths removed."""
        now = time.time()
        removed = sweep_entries(self.models_dir / _STAGING, max_age_seconds, now)
        removed += sweep_entries(self.models_dir / _TRASH, 0.0, now)
        folders = [self.artifact_dir, self.models_dir, self.artifact_dir / EXPORT_TEMPLATES_DIR]
        with contextlib.suppress(FileNotFoundError):
            folders += [Path(e.path) for e in os.scandir(self.models_dir)
                        if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")]
        for folder in folders:
            removed += sweep_temp_files(folder, max_age_seconds, now)
        return removed

    # ----- aliases -----

    def read_aliases(self) -> dict[str, str]:
        try:
            data = json.loads(self.aliases_file.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    @contextlib.contextmanager
    def _aliases_locked(self) -> Iterator[dict[str, str]]:
        """Read-modify-write the aliases under an exclusive lock; written atomically on exit."""
        self.artifact_dir.mkdir(parents=True, exist_ok=True)
        with open(self._lock_file, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            aliases = self.read_aliases()
            before = dict(aliases)
            yield aliases
            if aliases != before:
                write_json_atomic(self.aliases_file, aliases)

    def set_alias(self, alias: str, model_id: str) -> None:
        """Point `alias` at `model_id`; ModelGone when the model does not exist once the lock is held (a
        concurrent delete), so an alias never names a missing model."""
        with self._aliases_locked() as aliases:
            if self.model_dir(model_id) is None:
                raise ModelGone(model_id)
            aliases[alias] = model_id

    def delete_alias(self, alias: str) -> bool:
        with self._aliases_locked() as aliases:
            return aliases.pop(alias, None) is not None


def _model_info(meta: dict[str, Any], aliases: list[str]) -> ModelInfo:
    return ModelInfo.model_validate({
        **{k: meta.get(k) for k in ("id", "name", "kind", "job_id", "created_at", "classes", "spec", "metrics")},
        "input_shape": meta.get("input_shape", [32, 32, 3]),
        "dataset": meta.get("dataset") or dict(CIFAR10_REF),
        "aliases": aliases,
        "exports": _exports(meta),
        "export_failures": meta.get("export_failures") or {},
    })


def _exports(meta: dict[str, Any]) -> dict[str, Any]:
    """The recorded exports; a model from before they were recorded offers Keras, and TFLite if it passed."""
    if isinstance(meta.get("exports"), dict):
        return {name: {k: v for k, v in info.items() if k != "file"} for name, info in meta["exports"].items()
                if name in EXPORT_FILES and isinstance(info, dict)}
    offered: dict[str, Any] = {"keras": {}}
    recorded = meta.get("export")
    tflite: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
    if tflite.get("passed") and tflite.get("file"):
        offered["tflite"] = {"bytes": tflite.get("bytes"), "top1_agreement": tflite.get("top1_agreement")}
    return offered


def _valid_metadata(model_id: str, path: Path, raw: bytes) -> dict[str, Any] | None:
    """The parsed metadata when it is a JSON object that makes a valid Model, else None (logged)."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        log.warning("model %s: ignoring it, %s is not JSON (%s)", model_id, path, exc)
        return None
    if not isinstance(data, dict):
        log.warning("model %s: ignoring it, %s is not a JSON object", model_id, path)
        return None
    try:
        _model_info(data, [])
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        log.warning("model %s: ignoring it, %s lacks Model fields or has wrong types (%s)", model_id, path, problems)
        return None
    return data
