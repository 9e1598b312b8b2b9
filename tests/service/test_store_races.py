"""The model store under races and damage: concurrent deletes, aliases set while their model is deleted, and
malformed metadata.json files next to good models. A real store on disk (models are metadata.json only:
listing, deleting and aliasing never read the model files); the API through TestClient."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from svc_helpers import assert_problem

from worker.store import METADATA_FILE, ModelStore
from worker.store.local import ModelGone

ROUNDS = 30
METRICS = {"train_accuracy": 0.6, "test_accuracy": 0.5, "test_loss": 1.2, "params_total": 10,
           "params_trainable": 10, "params_non_trainable": 0, "train_seconds": 1.0}


def install(artifact_dir: Path, model_id: str, created_at: str = "2026-01-01T00:00:00.000Z",
            **overrides: Any) -> Path:
    """A model directory whose metadata.json makes a valid Model (no model files: nothing here serves it)."""
    meta: dict[str, Any] = {"id": model_id, "name": None, "kind": "baseline", "job_id": f"j_{model_id}",
                            "created_at": created_at, "classes": ["cat", "dog"], "spec": {"model": "baseline"},
                            "metrics": METRICS}
    meta.update(overrides)
    path = artifact_dir / "models" / model_id
    path.mkdir(parents=True)
    (path / METADATA_FILE).write_text(json.dumps(meta))
    return path


def run_together(*targets: Callable[[], object]) -> list[BaseException]:
    """Start every target at the same instant (a barrier); the exceptions they raised."""
    barrier = threading.Barrier(len(targets))
    errors: list[BaseException] = []

    def wrap(target: Callable[[], object]) -> None:
        barrier.wait()
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(t,)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return errors


# ----- two deletes of one model -----

def test_the_loser_of_two_deletes_is_told_there_is_no_model(artifact_dir: Path) -> None:
    """Deterministic: the loser saw the model (model_dir) before the winner renamed it away."""
    store = ModelStore(artifact_dir)
    install(artifact_dir, "m_twice")
    stale = store.model_dir("m_twice")
    assert store.delete("m_twice") is True
    loser = ModelStore(artifact_dir)
    loser.model_dir = lambda model_id: stale  # type: ignore[method-assign]  # as it saw the store a moment ago
    assert loser.delete("m_twice") is False


def test_concurrent_deletes_of_one_model_one_wins_the_rest_find_nothing(artifact_dir: Path) -> None:
    store = ModelStore(artifact_dir)
    for round_ in range(ROUNDS):
        model_id = f"m_del{round_:04d}"
        install(artifact_dir, model_id)
        results: list[bool] = []

        def delete(model_id: str = model_id, results: list[bool] = results) -> None:
            results.append(store.delete(model_id))

        errors = run_together(*[delete] * 6)
        assert errors == [], errors
        assert sorted(results) == [False] * 5 + [True], results
        assert not (artifact_dir / "models" / model_id).exists()
    assert list((artifact_dir / "models" / ".trash").iterdir()) == []


def test_concurrent_deletes_through_the_api_are_one_204_and_404s(client: TestClient, artifact_dir: Path) -> None:
    for round_ in range(ROUNDS // 3):
        model_id = f"m_api{round_:04d}"
        install(artifact_dir, model_id)
        codes: list[int] = []

        def delete(model_id: str = model_id, codes: list[int] = codes) -> None:
            codes.append(client.delete(f"/v1/models/{model_id}").status_code)

        errors = run_together(*[delete] * 4)
        assert errors == [], errors
        assert sorted(codes) == [204, 404, 404, 404], codes
    assert client.get("/v1/models").json() == {"items": []}


# ----- an alias set while its model is deleted -----

def test_set_alias_on_a_deleted_model_is_model_gone(artifact_dir: Path) -> None:
    store = ModelStore(artifact_dir)
    install(artifact_dir, "m_gone")
    store.delete("m_gone")
    with pytest.raises(ModelGone):
        store.set_alias("prod", "m_gone")
    assert store.read_aliases() == {}


def test_aliases_set_in_a_loop_while_the_model_is_deleted_never_dangle(artifact_dir: Path) -> None:
    store = ModelStore(artifact_dir)
    install(artifact_dir, "m_keep", created_at="2025-01-01T00:00:00.000Z")
    store.set_alias("keep", "m_keep")
    for round_ in range(ROUNDS):
        model_id = f"m_alias{round_:04d}"
        install(artifact_dir, model_id)
        gone = threading.Event()

        def setter(model_id: str = model_id, gone: threading.Event = gone) -> None:
            for _ in range(200):
                try:
                    ModelStore(artifact_dir).set_alias("prod", model_id)  # a store of its own, as another request
                except ModelGone:
                    gone.set()
                    return

        def deleter(model_id: str = model_id) -> None:
            store.delete(model_id)

        errors = run_together(setter, deleter)
        assert errors == [], errors
        aliases = store.read_aliases()
        dangling = {a: m for a, m in aliases.items() if store.model_dir(m) is None}
        assert dangling == {}, f"round {round_}: {dangling}"
        assert aliases["keep"] == "m_keep"
        assert gone.is_set(), "the setter never saw the model deleted"


def test_put_alias_for_a_model_deleted_in_between_is_404(client: TestClient, artifact_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    install(artifact_dir, "m_between")
    original = ModelStore.set_alias

    def delete_first(self: ModelStore, alias: str, model_id: str) -> None:
        self.delete(model_id)  # the registry's own check passed; the model goes before the alias lock
        original(self, alias, model_id)

    monkeypatch.setattr(ModelStore, "set_alias", delete_first)
    assert_problem(client.put("/v1/aliases/prod", json={"model_id": "m_between"}), 404, "m_between")
    assert client.get("/v1/aliases").json() == {"items": []}


# ----- malformed metadata.json -----

BROKEN: dict[str, str | None] = {
    "m_notjson": "{this is not json",
    "m_empty": "",
    "m_list": "[1, 2, 3]",
    "m_string": '"a model"',
    "m_nofields": "{}",
    "m_nocreated": None,   # built below: fields missing
    "m_badtypes": None,    # built below: wrong types
    "m_binary": None,      # not UTF-8: written as raw bytes below
}


def install_broken(artifact_dir: Path) -> None:
    for model_id, text in BROKEN.items():
        path = artifact_dir / "models" / model_id
        if model_id == "m_nocreated":
            install(artifact_dir, model_id)
            meta = json.loads((path / METADATA_FILE).read_text())
            del meta["created_at"], meta["classes"]
            (path / METADATA_FILE).write_text(json.dumps(meta))
        elif model_id == "m_badtypes":
            install(artifact_dir, model_id, created_at=20270101, classes="cat,dog",  # type: ignore[arg-type]
                    spec=None, metrics=[1])
        else:
            path.mkdir(parents=True)
            raw = b"\xff\xfe\x00garbage" if model_id == "m_binary" else (text or "").encode()
            (path / METADATA_FILE).write_bytes(raw)


def test_malformed_metadata_is_skipped_and_logged_once(artifact_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    install(artifact_dir, "m_good", created_at="2026-01-01T00:00:00.000Z")
    install_broken(artifact_dir)
    store = ModelStore(artifact_dir)
    with caplog.at_level(logging.WARNING, logger="worker.store.local"):
        for _ in range(3):
            assert [m.id for m in store.list()] == ["m_good"]
            assert store.list_ids() == ["m_good"]
            assert store.resolve("latest") == "m_good"
    warned = [r for r in caplog.records if "ignoring it" in r.getMessage()]
    assert sorted({r.getMessage().split(":")[0] for r in warned}) == sorted(f"model {m}" for m in BROKEN)
    assert len(warned) == len(BROKEN), "each malformed file is logged once, not on every listing"
    for model_id in BROKEN:
        assert store.info(model_id) is None
        assert store.metadata(model_id) is None


def test_a_malformed_model_never_breaks_the_api(client: TestClient, artifact_dir: Path) -> None:
    install(artifact_dir, "m_good", created_at="2026-01-01T00:00:00.000Z")
    install_broken(artifact_dir)
    response = client.get("/v1/models")
    assert response.status_code == 200, response.text
    assert [m["id"] for m in response.json()["items"]] == ["m_good"]
    assert client.get("/v1/models/latest").json()["id"] == "m_good"
    assert_problem(client.get("/v1/models/m_badtypes"), 404)
    assert client.delete("/v1/models/m_badtypes").status_code == 204  # a broken model can still be removed
    assert not (artifact_dir / "models" / "m_badtypes").exists()
    # repaired in place: listed again (the cache goes by the file's mtime and size)
    install(artifact_dir / "repaired", "m_notjson", created_at="2027-01-01T00:00:00.000Z")
    (artifact_dir / "models" / "m_notjson" / METADATA_FILE).write_bytes(
        (artifact_dir / "repaired" / "models" / "m_notjson" / METADATA_FILE).read_bytes())
    assert [m["id"] for m in client.get("/v1/models").json()["items"]] == ["m_notjson", "m_good"]


def test_a_failed_fsync_of_the_parent_after_the_rename_still_publishes(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.store import local

    store = ModelStore(tmp_path)
    real = local.fsync_dir

    def failing_for_the_parent(path: Path) -> None:
        if path == store.models_dir:
            raise OSError(5, "Input/output error")
        real(path)

    monkeypatch.setattr(local, "fsync_dir", failing_for_the_parent)
    with store.staging("m_fsync") as staging:
        (staging / "metadata.json").write_text("{}")
        final = store.publish(staging, "m_fsync")
    assert final == store.models_dir / "m_fsync" and (final / "metadata.json").is_file()
