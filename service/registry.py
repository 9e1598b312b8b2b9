"""The model registry: which models exist and what they are called, as one object over the artifact store.

Routes and every serving protocol ask it, never each other. Refs are a model id, an alias or `latest`;
anything that is not a valid id is a 404 before the store is touched, and every file served comes from
the store's own paths, never from the ref. Store calls run in a worker thread; an unreadable store is a 503.
Only the store's `catalog_version` (two stats) is read on the event loop, by `resolve_for_predict`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool

from service.errors import (
    AliasNotFound,
    ArtifactStoreUnavailable,
    InvalidInput,
    ModelNotFound,
    NoModelYet,
    NotFound,
)
from service.serving.cache import ModelCache
from worker.store import ALIAS_PATTERN, RESERVED_ALIASES, ModelInfo, ModelStore, valid_id
from worker.store.local import ModelGone

T = TypeVar("T")

#: The alias `POST /v1/predict` uses; without it, the newest model.
DEFAULT_ALIAS = "default"
#: A predict ref's resolution is kept at most this long, even while the store's catalog version stays the same
#: (that version misses only a metadata.json edited in place, which no writer here does).
RESOLVED_MAX_AGE_SECONDS = 2.0
RESOLVED_MAX_ENTRIES = 1024


async def store_call(func: Callable[..., T], *args: Any) -> T:
    """Run an artifact-store call in a worker thread; a store that cannot be read is a 503."""
    try:
        return await run_in_threadpool(func, *args)
    except PermissionError as exc:
        raise ArtifactStoreUnavailable(f"the artifact store cannot be read: {exc}") from exc
    except OSError as exc:
        raise ArtifactStoreUnavailable(f"the artifact store is unavailable: {exc.strerror or exc}") from exc


class ModelRegistry:
    """Models and aliases over a `ModelStore`; deleting a model also drops it from the serving cache."""

    def __init__(self, store: ModelStore, cache: ModelCache) -> None:
        self.store = store
        self._cache = cache
        #: ref (None: the default) -> (model id, the store's catalog version then, when) for predict requests.
        self._resolved: dict[str | None, tuple[str, Hashable, float]] = {}

    async def _call(self, func: Callable[..., T], *args: Any) -> T:
        return await store_call(func, *args)

    async def resolve(self, ref: str) -> str:
        """The model id a ref names (id, alias or `latest`), or 404."""
        model_id = await self._call(self.store.resolve, ref) if valid_id(ref) else None
        if model_id is None:
            raise ModelNotFound(ref)
        return model_id

    async def resolve_for_predict(self, ref: str | None) -> str:
        """Like `resolve`; `None` means the default alias, else the newest model. With no model at all the
        404 says to train one first.

        What a ref resolved to is kept while the store's `catalog_version` (two stats, read here on the event
        loop: cheaper than the hand-off to a thread) is the same and for at most `RESOLVED_MAX_AGE_SECONDS`, so
        a predict request for a known model touches no thread and lists nothing; a model published or deleted,
        or an alias written, by any process, changes the version, and is seen by the next request."""
        version = self._catalog_version()
        now = time.monotonic()
        if version is not None:
            hit = self._resolved.get(ref)
            if hit is not None and hit[1] == version and now - hit[2] < RESOLVED_MAX_AGE_SECONDS:
                return hit[0]
        model_id = await self._resolve_for_predict(ref)
        if version is not None:
            if len(self._resolved) >= RESOLVED_MAX_ENTRIES:
                self._resolved.clear()
            self._resolved[ref] = (model_id, version, now)
        return model_id

    def _catalog_version(self) -> Hashable | None:
        try:
            return self.store.catalog_version()
        except OSError:  # resolved the slow way, which answers the 503
            return None

    async def _resolve_for_predict(self, ref: str | None) -> str:
        try:
            if ref is None:
                try:
                    return await self.resolve(DEFAULT_ALIAS)
                except ModelNotFound:
                    return await self.resolve("latest")
            return await self.resolve(ref)
        except ModelNotFound:
            if not await self._call(self.store.list_ids):
                raise NoModelYet() from None
            raise

    async def info(self, ref: str) -> ModelInfo:
        model_id = await self.resolve(ref)
        info = await self._call(self.store.info, model_id)
        if info is None:  # deleted in between
            raise ModelNotFound(ref)
        return info

    async def list(self) -> list[ModelInfo]:
        return await self._call(self.store.list)

    async def check(self) -> None:
        """Raise `ArtifactStoreUnavailable` (503) unless the artifact store can be read (models can be served)."""
        await self._call(self.store.list_ids)

    async def delete(self, model_id: str) -> None:
        """Delete a model and the aliases pointing at it; 404 if there is none."""
        if not valid_id(model_id) or not await self._call(self.store.delete, model_id):
            raise ModelNotFound(model_id)
        self._resolved.clear()
        self._cache.evict(model_id)

    async def file(self, ref: str, name: str, missing: str) -> tuple[str, Path]:
        """The model id and the path of one of its files; 404 saying the model has no `missing`."""
        model_id = await self.resolve(ref)
        model_dir = await self._call(self.store.model_dir, model_id)
        path = model_dir / name if model_dir is not None else None
        if path is None or not await self._call(path.is_file):
            raise NotFound(f"model {model_id!r} has no {missing}")
        return model_id, path

    async def aliases(self) -> dict[str, str]:
        return await self._call(self.store.read_aliases)

    async def set_alias(self, alias: str, model_id: str) -> None:
        """Point `alias` at `model_id` (created or moved); 422 for a bad alias, 404 for an unknown model."""
        _check_alias(alias)
        if not valid_id(model_id) or await self._call(self.store.model_dir, model_id) is None:
            raise ModelNotFound(model_id)
        try:
            await self._call(self.store.set_alias, alias, model_id)
        except ModelGone:  # deleted between the check above and the alias lock
            raise ModelNotFound(model_id) from None
        finally:
            self._resolved.clear()

    async def delete_alias(self, alias: str) -> None:
        if not ALIAS_PATTERN.fullmatch(alias):
            raise AliasNotFound(alias)
        try:
            deleted = await self._call(self.store.delete_alias, alias)
        finally:
            self._resolved.clear()
        if not deleted:
            raise AliasNotFound(alias)


def _check_alias(alias: str) -> None:
    if alias in RESERVED_ALIASES:
        msg = f"{alias!r} is reserved (it always means the newest model)"
    elif not ALIAS_PATTERN.fullmatch(alias):
        msg = "an alias is 1-32 characters: a lowercase letter, then lowercase letters, digits, '_' or '-'"
    else:
        return
    raise InvalidInput.at(["path", "alias"], msg, detail=f"alias {alias!r}: {msg}")
