"""The micro-batcher and the model cache, with the real LiteRT runner over an engine-trained model."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from svc_helpers import add_model, cifar_test_images

from service.errors import ModelNotFound
from service.serving.batching import MicroBatcher
from service.serving.cache import ModelCache
from service.serving.runners import MULTI_THREAD_MIN_BATCH, TFLiteRunner, load_runner
from worker.store import TFLITE_FILE, ModelStore

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return cifar_test_images(64, start=2000)[0].astype(np.float32)


def run(coro: object) -> object:
    return asyncio.run(asyncio.wait_for(coro, 60))  # type: ignore[arg-type]


def test_concurrent_requests_are_merged_into_one_batch(trained_model: Path, images: np.ndarray) -> None:
    runner = TFLiteRunner(trained_model / TFLITE_FILE, threads=2)
    alone = [runner.predict(images[i:i + 3]) for i in range(0, 30, 3)]
    batches: list[int] = []

    async def go() -> list[np.ndarray]:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(runner, pool, max_batch=64, window_s=0.05, on_batch=batches.append)
            return await asyncio.gather(*(batcher.predict(images[i:i + 3]) for i in range(0, 30, 3)))

    merged = run(go())
    assert batches == [30]  # ten requests of three images, one model call
    for got, want in zip(merged, alone, strict=True):  # type: ignore[call-overload]
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_batches_never_exceed_max_batch_and_keep_request_boundaries(trained_model: Path,
                                                                   images: np.ndarray) -> None:
    runner = TFLiteRunner(trained_model / TFLITE_FILE, threads=2)
    batches: list[int] = []

    async def go() -> list[np.ndarray]:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(runner, pool, max_batch=64, window_s=0.05, on_batch=batches.append)
            return await asyncio.gather(*(batcher.predict(images[:30]) for _ in range(5)))

    results = run(go())
    assert batches == [60, 60, 30]
    assert all(r.shape == (30, 10) for r in results)  # type: ignore[attr-defined]


def test_without_a_window_a_lone_request_runs_at_once(trained_model: Path, images: np.ndarray) -> None:
    runner = TFLiteRunner(trained_model / TFLITE_FILE, threads=2)
    batches: list[int] = []

    async def go() -> np.ndarray:
        with ThreadPoolExecutor(1) as pool:
            return await MicroBatcher(runner, pool, 64, 0.0, batches.append).predict(images[:1])

    assert run(go()).shape == (1, 10)  # type: ignore[attr-defined]
    assert batches == [1]


def test_a_failing_batch_fails_each_of_its_requests(trained_model: Path) -> None:
    runner = TFLiteRunner(trained_model / TFLITE_FILE, threads=2)

    async def go() -> list[object]:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(runner, pool, 64, 0.02)
            wrong = np.zeros((2, 16, 16, 3), dtype=np.float32)  # not what the interpreter takes
            return await asyncio.gather(batcher.predict(wrong), batcher.predict(wrong), return_exceptions=True)

    results = run(go())
    assert all(isinstance(r, Exception) for r in results)  # type: ignore[attr-defined]


def test_the_runner_is_resized_only_when_the_batch_size_changes(trained_model: Path, images: np.ndarray) -> None:
    runner = TFLiteRunner(trained_model / TFLITE_FILE, threads=2)
    first = runner.predict(images[:5])
    assert runner.interpreter_for(5).batch == 5
    np.testing.assert_allclose(runner.predict(images[:5]), first, atol=1e-6)
    np.testing.assert_allclose(runner.predict(images[:1]), first[:1], atol=1e-5)
    assert runner.interpreter_for(1).batch == 1


def test_small_batches_run_on_one_thread_and_large_ones_on_the_configured_threads(trained_model: Path,
                                                                                  images: np.ndarray) -> None:
    runner = TFLiteRunner(trained_model / TFLITE_FILE, threads=2)
    small, large = MULTI_THREAD_MIN_BATCH - 1, MULTI_THREAD_MIN_BATCH
    assert runner.interpreter_for(1).threads == runner.interpreter_for(small).threads == 1
    assert runner.interpreter_for(large).threads == runner.interpreter_for(64).threads == 2
    together = runner.predict(images[:large])  # one large batch, on two threads
    apart = np.concatenate([runner.predict(images[:small]), runner.predict(images[small:large])])
    np.testing.assert_allclose(together, apart, atol=1e-5)
    assert runner.interpreter_for(large).batch == large and runner.interpreter_for(small).batch == 1


def test_a_single_threaded_runner_uses_one_interpreter_for_every_batch_size(trained_model: Path,
                                                                            images: np.ndarray) -> None:
    runner = TFLiteRunner(trained_model / TFLITE_FILE, threads=1)
    runner.predict(images[:64])
    assert runner.interpreter_for(64) is runner.interpreter_for(1)
    assert runner.interpreter_for(1).threads == 1 and runner.interpreter_for(1).batch == 64


def test_concurrent_first_requests_load_a_model_once(artifact_dir: Path, trained_model: Path,
                                                     images: np.ndarray) -> None:
    add_model(artifact_dir, trained_model, "m_once")
    loads: list[str] = []

    async def go() -> list[object]:
        with ThreadPoolExecutor(2) as pool:
            cache = ModelCache(ModelStore(artifact_dir), pool, size=2, threads=2, max_batch=64, window_ms=2,
                               on_load=lambda backend, seconds: loads.append(backend))
            return await asyncio.gather(*(cache.predict("m_once", images[:2]) for _ in range(8)))

    results = run(go())
    assert loads == ["tflite"]
    assert len(results) == 8  # type: ignore[arg-type]


def test_loading_an_unknown_model_is_not_found(artifact_dir: Path) -> None:
    async def go() -> None:
        with ThreadPoolExecutor(1) as pool:
            await ModelCache(ModelStore(artifact_dir), pool, size=1, threads=1, max_batch=8, window_ms=0).get("m_x")

    with pytest.raises(ModelNotFound):
        run(go())


def test_load_runner_warms_up_and_checks_the_output(trained_model: Path) -> None:
    runner = load_runner(trained_model, threads=1)
    assert runner.backend == "tflite"
    out = runner.predict(np.zeros((2, 32, 32, 3), dtype=np.float32))
    assert out.shape == (2, 10) and np.allclose(out.sum(axis=1), 1, atol=1e-4)


def test_a_forming_batch_waits_for_requests_still_being_read(trained_model: Path, images: np.ndarray) -> None:
    runner = TFLiteRunner(trained_model / TFLITE_FILE, threads=2)
    batches: list[int] = []

    async def go() -> tuple[bool, np.ndarray, np.ndarray]:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(runner, pool, 64, window_s=30.0, on_batch=batches.append)
            with batcher.incoming():  # request B is still decoding its images
                a = asyncio.create_task(batcher.predict(images[:2]))
                await asyncio.sleep(0.2)
                a_waited = not a.done()
            b = await batcher.predict(images[2:5])
            return a_waited, await a, b

    a_waited, a, b = run(go())  # type: ignore[misc]
    assert a_waited and batches == [5]
    assert a.shape == (2, 10) and b.shape == (3, 10)


def test_a_lone_request_does_not_wait_for_the_window(trained_model: Path, images: np.ndarray) -> None:
    runner = TFLiteRunner(trained_model / TFLITE_FILE, threads=2)

    async def go() -> np.ndarray:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(runner, pool, 64, window_s=600.0)
            return await asyncio.wait_for(batcher.predict(images[:1]), 30)  # nothing announced: runs at once

    assert run(go()).shape == (1, 10)  # type: ignore[attr-defined]
