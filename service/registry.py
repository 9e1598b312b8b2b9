"""The model registry: which models exist and what they are called, as one object over the artifact store.

Routes and every serving protocol ask it, never each other. Refs are a model id, an alias or `latest`;
anything that is not a valid id is a 404 before the store is touched, and every file served comes from
the store's own paths, never from the ref. Store calls run in a worker thread; an unreadable store is a 503.
"""

from __future__ import annotations

from collections.abc import Callable
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
        404 says to train one first."""
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

    async def delete_alias(self, alias: str) -> None:
        if not ALIAS_PATTERN.fullmatch(alias) or not await self._call(self.store.delete_alias, alias):
            raise AliasNotFound(alias)


def _check_alias(alias: str) -> None:
    if alias in RESERVED_ALIASES:
        msg = f"{alias!r} is reserved (it always means the newest model)"
    elif not ALIAS_PATTERN.fullmatch(alias):
        msg = "an alias is 1-32 characters: a lowercase letter, then lowercase letters, digits, '_' or '-'"
    else:
        return
    raise InvalidInput.at(["path", "alias"], msg, detail=f"alias {alias!r}: {msg}")
