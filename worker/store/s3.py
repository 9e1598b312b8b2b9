"""The artifact store in S3-compatible object storage (`TL_ARTIFACT_URL=s3://bucket/prefix`), through boto3.

Layout under `s3://bucket/prefix/`:
    models/{model_id}/{file}           every file of the model directory (model.keras, model.tflite, ...)
    models/{model_id}/manifest.json    written LAST: {"files": {name: {"bytes", "sha256"}}, "metadata": {...}}
    aliases/{alias}                    one object per alias, holding the model id

A model exists when its manifest exists: publish uploads every file first and the manifest last, so a model
half-uploaded (a worker killed mid-upload) is never listed; delete removes the manifest first, so a model is
never half-deleted from a reader's point of view. `model_dir` downloads a model once into
`TL_CACHE_DIR/models/{id}/`, checking every file's size and sha256 against the manifest, and returns that
local path, so serving and downloads read files as with the local store.

Aliases are one object each, so two writers of different aliases never touch the same object, and two writers
of the same alias are "last writer wins", as with the local store. We rely on no conditional write
(If-None-Match / If-Match on PUT): AWS S3 (since 2024) and MinIO support them; SeaweedFS had them on GET/HEAD
only until 3.97 (seaweedfs/seaweedfs#6433, added by #7154 in 2025) and 4.16 still let concurrent
`If-None-Match: *` PUTs all succeed (seaweedfs/seaweedfs#8800), so the store uses plain PUT/GET/DELETE and
works the same on all three. A `set_alias` racing a `delete` re-checks the manifest after its PUT and takes
the alias back when the model went meanwhile. Without a conditional DELETE, two hosts deleting one model at the
same moment may both see it and both answer that they deleted it (204 twice rather than 204 and 404); the
model is gone either way.

Downloaded copies are bounded by `max_bytes` (TL_CACHE_MAX_BYTES): after a download or a publish, the least
recently used copies go until the rest fit; a copy removed is downloaded again when next needed.

The endpoint and credentials come from the standard AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_REGION, read by boto3 itself; no message here ever contains a credential.
Every failure to reach the store is a `StoreUnavailable` (an OSError: the registry answers 503). While the
store is down, what a host already knew of a model or of the aliases still holds (so a model it has cached
keeps being served); listing, downloading, saving and deleting fail until the store is back.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from worker.errors import ArtifactWriteError
from worker.store.local import (
    METADATA_FILE,
    SWEEP_MAX_AGE_SECONDS,
    ModelCatalog,
    ModelGone,
    _valid_metadata,
    sweep_entries,
    valid_id,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

MANIFEST_FILE = "manifest.json"
#: How long a manifest's existence, the listing and the aliases are trusted before asking the store again:
#: a model deleted by another host stops being resolved (and served) within this long.
FRESH_SECONDS = 2.0
_CHUNK = 1024 * 1024


class StoreUnavailable(OSError):
    """The object store cannot be reached or answered an error (the API maps OSError to 503)."""


class StoreConfigError(RuntimeError):
    """The store named in TL_ARTIFACT_URL cannot be used (no such bucket, access denied): a start-up error."""


class StoreIntegrityError(StoreUnavailable):
    """A downloaded file does not match the manifest (size or sha256)."""


def parse_url(url: str) -> tuple[str, str]:
    """(bucket, prefix without slashes at either end) of `s3://bucket/prefix`."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StoreConfigError(f"TL_ARTIFACT_URL must look like s3://bucket/prefix, not {parsed.scheme}://...")
    return parsed.netloc, parsed.path.strip("/")


def _error_text(exc: BaseException) -> str:
    """What went wrong, without anything a botocore message might carry besides the code (never credentials)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"{type(exc).__name__} {code}"
    return type(exc).__name__


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def evict_copies(directory: Path, max_bytes: int, keep: str) -> builtins.list[Path]:
    """Remove the least recently used copies (subdirectories, by mtime) under `directory` until the others fit in
    `max_bytes`; never `keep`, the copy just used. The paths removed (they are downloaded again when needed)."""
    entries = []
    try:
        for child in directory.iterdir():
            if child.is_dir() and not child.name.startswith(".") and child.name != keep:
                with contextlib.suppress(OSError):
                    size = sum(f.stat().st_size for f in child.iterdir() if f.is_file())
                    entries.append((child.stat().st_mtime, size, child))
        kept = sum(f.stat().st_size for f in (directory / keep).iterdir() if f.is_file())
    except OSError:
        return []
    total = kept + sum(size for _, size, _ in entries)
    removed = []
    for _, size, path in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes:
            break
        shutil.rmtree(path, ignore_errors=True)
        total -= size
        removed.append(path)
    if removed:
        log.info("cache %s: removed %d least recently used copies to stay within %d bytes", directory, len(removed),
                 max_bytes)
    return removed


def touch(path: Path) -> None:
    """Mark a cached copy as just used (its mtime orders `evict_copies`)."""
    with contextlib.suppress(OSError):
        os.utime(path)


class S3Bucket:
    """One bucket and key prefix: the S3 calls both stores make, each failure a `StoreUnavailable`, and the
    "files first, manifest last" upload and the verified download of a directory."""

    def __init__(self, url: str, client: Any = None) -> None:
        import boto3  # here, not at import time: only S3 mode pays for it
        from botocore.config import Config

        self.url = url
        self.name, prefix = parse_url(url)
        self.prefix = f"{prefix}/" if prefix else ""
        self.client = client or boto3.client("s3", config=Config(
            connect_timeout=3, read_timeout=30, retries={"max_attempts": 2, "mode": "standard"}))

    def key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)

    def call(self, method: Callable[..., T], **kwargs: Any) -> T:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return method(Bucket=self.name, **kwargs)
        except ClientError as exc:
            raise StoreUnavailable(f"the artifact store (bucket {self.name!r}) answered {_error_text(exc)}") from exc
        except BotoCoreError as exc:
            raise StoreUnavailable(f"the artifact store (bucket {self.name!r}) is unreachable: "
                                   f"{_error_text(exc)}") from exc

    def get(self, key: str) -> bytes | None:
        """The object's content, or None when there is none."""
        from botocore.exceptions import ClientError

        try:
            body: bytes = self.call(self.client.get_object, Key=key)["Body"].read()
            return body
        except StoreUnavailable as exc:
            if isinstance(exc.__cause__, ClientError) and \
                    exc.__cause__.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise

    def put(self, key: str, body: bytes, content_type: str = "application/octet-stream") -> None:
        self.call(self.client.put_object, Key=key, Body=body, ContentType=content_type)

    def delete(self, key: str) -> None:
        self.call(self.client.delete_object, Key=key)

    def upload_file(self, path: Path, key: str) -> None:
        with open(path, "rb") as f:
            self.call(self.client.upload_fileobj, Fileobj=f, Key=key)

    def download_file(self, key: str, path: Path) -> None:
        with open(path, "wb") as f:
            self.call(self.client.download_fileobj, Key=key, Fileobj=f)

    def keys(self, prefix: str, delimiter: str | None = None) -> Iterator[dict[str, Any]]:
        """Every object under `prefix` (with `delimiter`, only those not below a further delimiter)."""
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Prefix": prefix}
            if delimiter:
                kwargs["Delimiter"] = delimiter
            if token:
                kwargs["ContinuationToken"] = token
            page = self.call(self.client.list_objects_v2, **kwargs)
            yield from page.get("Contents", [])
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def remove_prefix(self, prefix: str) -> None:
        """Delete every object under `prefix` (best effort: an unreachable store leaves them to the sweep)."""
        with contextlib.suppress(OSError):
            for obj in list(self.keys(prefix)):
                self.delete(obj["Key"])

    def check(self) -> None:
        """Fail with a clear StoreConfigError naming the bucket when it does not exist or cannot be used."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.name)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code"))
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise StoreConfigError(f"the bucket {self.name!r} of TL_ARTIFACT_URL does not exist at the S3 "
                                       "endpoint (AWS_ENDPOINT_URL); create it first") from None
            raise StoreConfigError(f"the bucket {self.name!r} of TL_ARTIFACT_URL cannot be used: S3 answered "
                                   f"{code} (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)") from None
        except BotoCoreError as exc:
            raise StoreConfigError(f"the S3 endpoint of TL_ARTIFACT_URL (bucket {self.name!r}) is unreachable: "
                                   f"{_error_text(exc)}") from None

    def upload_tree(self, directory: Path, prefix: str, extra: dict[str, Any]) -> dict[str, Any]:
        """Upload every file of `directory` under `prefix`, then `prefix + MANIFEST_FILE` (last) holding each
        file's size and sha256 plus `extra`; returns the manifest. On failure the files already uploaded are
        removed (best effort) and the error raised: without its manifest nothing of it is ever read."""
        files: dict[str, dict[str, Any]] = {}
        try:
            for child in sorted(directory.iterdir()):
                files[child.name] = {"bytes": child.stat().st_size, "sha256": _sha256(child)}
                self.upload_file(child, prefix + child.name)
            manifest = {**extra, "files": files}
            self.put(prefix + MANIFEST_FILE, json.dumps(manifest, sort_keys=True).encode("utf-8"),
                     "application/json")
        except BaseException:
            self.remove_prefix(prefix)
            raise
        return manifest

    def read_manifest(self, prefix: str, what: str) -> dict[str, Any] | None:
        """The manifest under `prefix` (None when absent or not a manifest)."""
        raw = self.get(prefix + MANIFEST_FILE)
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            log.warning("%s: ignoring it, its manifest is not JSON", what)
            return None
        return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None

    def download_tree(self, manifest: dict[str, Any], prefix: str, final: Path, what: str) -> None:
        """Download every file `manifest` names into a fresh directory renamed to `final` once each file's size
        and sha256 match; StoreIntegrityError when one does not."""
        tmp = final.parent / f".{final.name}-{secrets.token_hex(4)}"
        tmp.mkdir(parents=True)
        try:
            for name, entry in manifest["files"].items():
                if "/" in name or name.startswith("."):
                    raise StoreIntegrityError(f"{what}: manifest names a bad file {name!r}")
                target = tmp / name
                self.download_file(prefix + name, target)
                size, digest = target.stat().st_size, _sha256(target)
                if size != entry["bytes"] or digest != entry["sha256"]:
                    raise StoreIntegrityError(f"{what}: {name} does not match its manifest "
                                              f"({size} bytes, sha256 {digest[:12]}...; expected {entry['bytes']} "
                                              f"bytes, {str(entry['sha256'])[:12]}...)")
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def complete(path: Path, manifest: dict[str, Any]) -> bool:
        """The local copy has every file at the manifest's size (its hashes were checked when downloaded)."""
        try:
            return all((path / name).stat().st_size == entry["bytes"] for name, entry in manifest["files"].items())
        except (OSError, KeyError, TypeError):
            return False

    def sweep_unmanifested(self, prefix: str, max_age_seconds: float, what: str) -> None:
        """Delete the objects of every `prefix{name}/` that has no manifest, when all are older than
        `max_age_seconds` (an upload killed before its manifest)."""
        by_name: dict[str, list[dict[str, Any]]] = {}
        for obj in self.keys(prefix):
            rest = obj["Key"][len(prefix):]
            if "/" in rest:
                by_name.setdefault(rest.split("/")[0], []).append(obj)
        cutoff = time.time() - max_age_seconds
        for name, objects in by_name.items():
            if any(o["Key"].endswith("/" + MANIFEST_FILE) for o in objects):
                continue
            if all(o["LastModified"].timestamp() < cutoff for o in objects):
                log.info("swept %d files of %s %s from %s (no manifest: a killed upload)",
                         len(objects), what, name, self.url)
                for obj in objects:
                    self.delete(obj["Key"])


class CopyCache:
    """The manifests under one key prefix and this host's verified copies of what they list (one directory per
    name under `directory`): a manifest is trusted for `fresh_seconds`, and while the store is down the last one
    read still holds; a copy is downloaded once, and copies beyond `max_bytes` go least recently used first."""

    def __init__(self, bucket: S3Bucket, prefix: str, directory: Path, what: str, fresh_seconds: float,
                 max_bytes: int | None) -> None:
        self._bucket, self._prefix, self.directory, self._what = bucket, prefix, directory, what
        self._fresh, self._max_bytes = fresh_seconds, max_bytes
        self._lock = threading.Lock()
        self._download_lock = threading.Lock()
        self._manifests: dict[str, tuple[float, dict[str, Any] | None]] = {}  # name -> (read at, manifest)

    def remember(self, name: str, manifest: dict[str, Any] | None) -> None:
        """What this host just wrote or deleted: trusted as if read now."""
        with self._lock:
            self._manifests[name] = (time.monotonic(), manifest)

    def forget(self, name: str) -> None:
        """Ask the store again next time."""
        with self._lock:
            self._manifests.pop(name, None)

    def manifest(self, name: str) -> dict[str, Any] | None:
        """The manifest of `name` (None when absent; this host's copy then goes too)."""
        now = time.monotonic()
        with self._lock:
            cached = self._manifests.get(name)
        if cached is not None and now - cached[0] < self._fresh:
            return cached[1]
        try:
            manifest = self._bucket.read_manifest(f"{self._prefix}{name}/", f"{self._what} {name}")
        except StoreUnavailable:
            if cached is None:
                raise
            # The store is down: what this host last knew still holds (a cached model keeps being served),
            # and the store is asked again only after another `fresh_seconds`.
            self.remember(name, cached[1])
            return cached[1]
        self.remember(name, manifest)
        if manifest is None:
            shutil.rmtree(self.directory / name, ignore_errors=True)  # deleted elsewhere: drop our copy
        return manifest

    def local_copy(self, name: str) -> Path | None:
        """This host's verified copy of `name` (downloaded on first use), or None when there is no such thing."""
        manifest = self.manifest(name)
        if manifest is None:
            return None
        final = self.directory / name
        if S3Bucket.complete(final, manifest):
            touch(final)
            return final
        with self._download_lock:
            if not S3Bucket.complete(final, manifest):
                self.directory.mkdir(parents=True, exist_ok=True)
                self._bucket.download_tree(manifest, f"{self._prefix}{name}/", final, f"{self._what} {name}")
                self.bound(keep=name)
        return final

    def place(self, staging: Path, name: str) -> Path:
        """Make a just-published staging directory this host's copy of `name` (or drop it when it cannot be)."""
        final = self.directory / name
        self.directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(final, ignore_errors=True)
        try:
            staging.rename(final)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)  # the store has it; this host downloads it when asked
        self.bound(keep=name)
        return final

    def drop(self, name: str) -> None:
        shutil.rmtree(self.directory / name, ignore_errors=True)

    def bound(self, keep: str) -> None:
        if self._max_bytes is not None:
            evict_copies(self.directory, self._max_bytes, keep=keep)


class S3ModelStore(ModelCatalog):
    """The `ModelStore` interface over a bucket: models and aliases in S3, downloaded models in `cache_dir`."""

    def __init__(self, url: str, cache_dir: Path, *, client: Any = None, fresh_seconds: float = FRESH_SECONDS,
                 max_bytes: int | None = None) -> None:
        self._bucket = S3Bucket(url, client)
        self.url = url
        #: The disk bound of this host's downloaded models (None: none).
        self.max_bytes = max_bytes
        self.bucket, self.prefix = self._bucket.name, self._bucket.prefix
        self.cache_dir = Path(cache_dir)
        #: Where models are staged and downloaded on this host (named like the local store's for messages).
        self.models_dir = self.cache_dir / "models"
        self._staging_dir = self.cache_dir / "models-staging"
        self._fresh = fresh_seconds
        self._lock = threading.Lock()
        self._copies = CopyCache(self._bucket, self._key("models", ""), self.models_dir, "model", fresh_seconds,
                                 max_bytes)
        self._listing: tuple[float, list[str]] | None = None
        self._aliases: tuple[float, dict[str, str]] | None = None

    def _key(self, *parts: str) -> str:
        return self._bucket.key(*parts)

    def check(self) -> None:
        """Fail with a clear StoreConfigError naming the bucket when it does not exist or cannot be used."""
        self._bucket.check()

    # ----- writing (the worker) -----

    @contextlib.contextmanager
    def staging(self, model_id: str) -> Iterator[Path]:
        """A fresh local staging directory for `model_id`; removed on any error, left for `publish` otherwise."""
        if not valid_id(model_id):
            raise ValueError(f"invalid model id {model_id!r}")
        staging = self._staging_dir / f"{model_id}-{secrets.token_hex(4)}"
        try:
            staging.mkdir(parents=True, exist_ok=False)
        except OSError as exc:
            raise ArtifactWriteError(f"cannot create a staging directory under {self._staging_dir}: "
                                     f"{exc.strerror or exc}; check TL_CACHE_DIR") from exc
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def publish(self, staging: Path, model_id: str) -> Path:
        """Upload every file of a complete staging directory, then its manifest (last); the staging directory
        becomes this host's cached copy. Nothing is listed unless the manifest was written."""
        try:
            metadata = json.loads((staging / METADATA_FILE).read_bytes())
            manifest = self._bucket.upload_tree(staging, self._key("models", model_id, ""),
                                                {"id": model_id, "metadata": metadata})
        except (OSError, ValueError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise ArtifactWriteError(f"cannot write model {model_id} to {self.url}: {exc}") from exc
        self._copies.remember(model_id, manifest)
        with self._lock:
            self._listing = None
        return self._copies.place(staging, model_id)

    # ----- reading (the API) -----

    def _manifest(self, model_id: str) -> dict[str, Any] | None:
        """The manifest of a complete model (trusted for `fresh_seconds`), or None."""
        if not valid_id(model_id) or model_id.startswith("."):
            return None
        return self._copies.manifest(model_id)

    def model_dir(self, model_id: str) -> Path | None:
        """The local directory of a complete model (downloaded and verified on first use), or None."""
        if not valid_id(model_id) or model_id.startswith("."):
            return None
        return self._copies.local_copy(model_id)

    def metadata(self, model_id: str) -> dict[str, Any] | None:
        """The model's metadata (carried in its manifest), or None when absent or malformed."""
        manifest = self._manifest(model_id)
        if manifest is None:
            return None
        raw = json.dumps(manifest.get("metadata")).encode("utf-8")
        return _valid_metadata(model_id, Path(self._key("models", model_id, MANIFEST_FILE)), raw)

    def list_ids(self) -> list[str]:
        """Ids of every model with a manifest and valid metadata, newest first (the listing is reused for
        `fresh_seconds`; each manifest is fetched once per `fresh_seconds`)."""
        now = time.monotonic()
        with self._lock:
            listing = self._listing
        if listing is None or now - listing[0] >= self._fresh:
            prefix = self._key("models", "")
            ids = [obj["Key"][len(prefix):].split("/")[0] for obj in self._bucket.keys(prefix)
                   if obj["Key"].endswith("/" + MANIFEST_FILE)]
            listing = (now, ids)
            with self._lock:
                self._listing = listing
        dated = []
        for model_id in listing[1]:
            meta = self.metadata(model_id)
            if meta is not None:
                dated.append((str(meta["created_at"]), model_id))
        dated.sort(reverse=True)
        return [model_id for _, model_id in dated]

    def has_model(self, model_id: str) -> bool:
        return self._manifest(model_id) is not None

    def delete(self, model_id: str) -> bool:
        """Remove a model: its manifest first (no longer listed or served), then its aliases and files."""
        self._copies.forget(model_id)
        if self._manifest(model_id) is None:
            return False
        self._bucket.delete(self._key("models", model_id, MANIFEST_FILE))
        self._copies.remember(model_id, None)
        with self._lock:
            self._listing = None
        for alias, target in self._read_aliases_now().items():
            if target == model_id:
                self._bucket.delete(self._key("aliases", alias))
        self._bucket.remove_prefix(self._key("models", model_id, ""))
        self._copies.drop(model_id)
        return True

    def sweep(self, max_age_seconds: float = SWEEP_MAX_AGE_SECONDS) -> builtins.list[Path]:
        """Remove this host's staging leftovers untouched for `max_age_seconds`, and in the bucket the files
        of models that never got a manifest (a worker killed mid-upload) once as old. Local paths removed."""
        removed = sweep_entries(self._staging_dir, max_age_seconds)
        self._bucket.sweep_unmanifested(self._key("models", ""), max_age_seconds, "model")
        return removed

    # ----- aliases -----

    def _read_aliases_now(self) -> dict[str, str]:
        prefix = self._key("aliases", "")
        aliases = {}
        for obj in self._bucket.keys(prefix):
            raw = self._bucket.get(obj["Key"])
            if raw is not None:
                aliases[obj["Key"][len(prefix):]] = raw.decode("utf-8", "replace").strip()
        with self._lock:
            self._aliases = (time.monotonic(), aliases)
        return aliases

    def read_aliases(self) -> dict[str, str]:
        """Every alias (trusted for `fresh_seconds`; while the store is down, the last ones read)."""
        with self._lock:
            cached = self._aliases
        if cached is not None and time.monotonic() - cached[0] < self._fresh:
            return dict(cached[1])
        try:
            return self._read_aliases_now()
        except StoreUnavailable:
            if cached is None:
                raise
            with self._lock:
                self._aliases = (time.monotonic(), cached[1])
            return dict(cached[1])

    def set_alias(self, alias: str, model_id: str) -> None:
        """Point `alias` at `model_id`; ModelGone when the model does not exist (checked again after the
        write, and the alias taken back, so a concurrent delete leaves no alias dangling)."""
        self._copies.forget(model_id)
        if self._manifest(model_id) is None:
            raise ModelGone(model_id)
        self._bucket.put(self._key("aliases", alias), model_id.encode("utf-8"), "text/plain")
        self._copies.forget(model_id)
        with self._lock:
            self._aliases = None
        if self._manifest(model_id) is None:
            self._bucket.delete(self._key("aliases", alias))
            raise ModelGone(model_id)

    def delete_alias(self, alias: str) -> bool:
        if self._bucket.get(self._key("aliases", alias)) is None:
            return False
        self._bucket.delete(self._key("aliases", alias))
        with self._lock:
            self._aliases = None
        return True
