"""Real processes for the integration tests: Redis, the Celery workers and uvicorn, as `make run` starts them.

- Redis: the session's server (the `redis_server` fixture of tests/conftest.py; database `TEST_DB`, flushed
  before and after), or one of the stack's own (`private_redis`, or no URL given, as bench/ starts it);
- one training worker (prefork, concurrency 1), one dataset worker and uvicorn `service.main:app` on a free port;
- artifacts in a temporary directory; the real data and weights where `testkit` finds them; short
  heartbeat and lost-worker times so the lost-worker test finishes in seconds; an API key, so every
  request also goes through authentication.

One stack serves the whole session (`shared_stack`): starting a worker costs a TensorFlow import. Every
process is stopped at the end of the session, on failure and Ctrl-C included (a session finalizer, run
before the session's Redis stops), and dies with the test process if that is killed (`die_with_parent`).
Each child's output is in `<tmp>/logs/<name>.log`; a failing test prints their tails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from service.launcher import (
    Child,
    celery_worker_argv,
    dataset_worker_argv,
    free_port,
    start_local_redis,
    uvicorn_argv,
)

try:
    import testkit
except ImportError:  # imported as `tests.integration.harness` (bench/), without pytest's sys.path
    from tests import testkit

TEST_DB = testkit.INTEGRATION_DB
API_KEY = "integration-test-key"
HEARTBEAT_SECONDS = 2
LOST_SECONDS = 15
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})

#: Small jobs: enough to learn something, quick on 2 CPU cores.
BASELINE_SMALL: dict[str, Any] = {"model": "baseline", "train_samples": 300, "test_samples": 100,
                                  "epochs": 1, "batch_size": 32, "seed": 1}


class Stack:
    """Redis + worker + API for tests; `client()` talks to the API with the key."""

    def __init__(self, private_redis: bool = False, extra_env: dict[str, str] | None = None,
                 redis_url: str | None = None) -> None:
        #: Start a Redis server of our own (one a test may stop, restart or wipe) rather than use `redis_url`.
        self.private_redis = private_redis or redis_url is None
        self.extra_env = dict(extra_env or {})  # more TL_* settings for the children (benchmarks)
        self.tmp = Path(tempfile.mkdtemp(prefix="tl-it-"))
        self.logs = self.tmp / "logs"
        self.logs.mkdir()
        self.artifact_dir = self.tmp / "artifacts"
        self.redis_child: Child | None = None
        self.workers: list[Child] = []
        self.dataset_worker: Child | None = None
        self.api: Child | None = None
        self.redis_url = redis_url or ""
        self.base_url = ""
        self.env: dict[str, str] = {}

    # ----- start / stop -----

    def start(self) -> Stack:
        try:
            self._start_redis()
            self.env = self._child_env()
            self.start_worker()
            self.dataset_worker = self._spawn("datasets", dataset_worker_argv(f"itds-{uuid.uuid4().hex[:6]}@%h"))
            port = free_port()
            self.base_url = f"http://127.0.0.1:{port}"
            self.api = self._spawn("api", uvicorn_argv("127.0.0.1", port, "info"))
            self.wait_ready(min_workers=1)
        except BaseException:
            print(self.log_tails())
            self.stop()
            raise
        return self

    def _start_redis(self) -> None:
        if self.private_redis:
            self.redis_child, self.redis_url = start_local_redis(
                f"redis://127.0.0.1:6379/{TEST_DB}", self.tmp, log_file=self.logs / "redis.log")
        self.redis().flushdb()

    def _child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TL_")}
        env.update({
            "TL_REDIS_URL": self.redis_url,
            "TL_ARTIFACT_DIR": str(self.artifact_dir),
            # No data given: point at an empty directory (never the developer's ./data) and never download.
            "TL_DATA_DIR": str(testkit.data_dir() or self.tmp / "no-data"),
            "TL_ALLOW_DOWNLOAD": "false",
            "TL_API_KEY": API_KEY,
            "TL_JOB_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS),
            "TL_JOB_LOST_SECONDS": str(LOST_SECONDS),
            "TL_LOG_LEVEL": "INFO",
            # Quantized and SavedModel exports cost a transfer job tens of seconds; the engine's tests check them.
            "TL_EXPORTS": "",
            "PYTHONUNBUFFERED": "1",
        })
        weights = testkit.weights_dir()
        if weights is not None:
            env["TL_WEIGHTS_DIR"] = str(weights)
        env.update(self.extra_env)
        return env

    def _spawn(self, name: str, argv: list[str]) -> Child:
        return Child(name, argv, self.env, die_with_parent=True).start(log_file=self.logs / f"{name}.log")

    def start_worker(self) -> Child:
        """Start one more Celery worker (a unique node name, so several can share the broker)."""
        index = len(self.workers) + 1
        worker = self._spawn(f"worker{index}", celery_worker_argv(f"it{index}-{uuid.uuid4().hex[:6]}@%h"))
        self.workers.append(worker)
        return worker

    @property
    def worker(self) -> Child:
        """The newest worker."""
        return self.workers[-1]

    def stop(self) -> None:
        for child in [self.api, self.dataset_worker, *reversed(self.workers)]:
            if child is not None:
                child.stop(grace=10)
        if self.redis_child is None:
            with contextlib.suppress(redis.RedisError):
                self.redis().flushdb()
        else:
            self.redis_child.stop(grace=5)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ----- helpers -----

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, decode_responses=True)

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=timeout,
                            headers={"Authorization": f"Bearer {API_KEY}"})

    def wait_ready(self, min_workers: int = 1, timeout: float = 180.0) -> dict[str, Any]:
        """Wait until /readyz is 200 and reports at least `min_workers` workers."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            for child in [self.api, *self.workers[-1:]]:
                if child is not None and not child.running():
                    raise RuntimeError(f"{child.name} exited ({child.process.returncode if child.process else '?'})"
                                       f"\n{self.log_tails()}")
            with contextlib.suppress(httpx.HTTPError):
                response = httpx.get(f"{self.base_url}/readyz", timeout=5)
                last = (response.status_code, response.text)
                if response.status_code == 200 and response.json().get("workers", 0) >= min_workers:
                    return dict(response.json())
            time.sleep(0.5)
        raise TimeoutError(f"the stack was not ready in {timeout:.0f} s (last /readyz: {last})\n{self.log_tails()}")

    def log_tails(self, lines: int = 40) -> str:
        return log_tails(self.logs, lines)

    def pool_children(self, worker: Child | None = None) -> list[int]:
        """Pids of the Celery pool processes of `worker` (the processes that run the jobs)."""
        parent = (worker or self.worker).pid
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == parent:  # field 4 of /proc/pid/stat: ppid
                    children.append(int(stat.parent.name))
        return children

    def kill_worker(self, worker: Child | None = None) -> None:
        """`kill -9` the worker: its parent process and its pool child (the whole process group)."""
        (worker or self.worker).signal_group(signal.SIGKILL)
        (worker or self.worker).stop(grace=5)


def log_tails(logs: Path, lines: int = 40) -> str:
    """The last `lines` lines of every `*.log` under `logs`, each under its name."""
    out = []
    for log in sorted(logs.glob("*.log")):
        text = log.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"----- {log.name} (last {len(text)} lines) -----\n" + "\n".join(text))
    return "\n".join(out)


# ----- one stack per test session -----

_shared: Stack | None = None


def shared_stack(request: pytest.FixtureRequest, redis_server: testkit.RedisServer) -> Stack:
    """The session's stack on `redis_server`, started on first use and stopped when the session ends.

    Call it from a fixture that requests `redis_server`: the stack is stopped by a session finalizer added after
    that fixture was set up, so before the session's Redis stops (`config.add_cleanup` only if that never ran)."""
    global _shared
    if _shared is None:
        stack = Stack(redis_url=redis_server.url(TEST_DB)).start()
        _shared = stack

        def _stop() -> None:
            global _shared
            if _shared is stack:
                _shared = None
                stack.stop()

        request.session.addfinalizer(_stop)
        request.config.add_cleanup(_stop)
    return _shared


# ----- polling the API -----

def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.25, what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wait_job(client: httpx.Client, job_id: str, timeout: float = 300.0,
             until: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    """Poll GET /v1/jobs/{id} until terminal (or `until(job)`); returns the job."""
    until = until or (lambda job: job["status"] in TERMINAL)
    seen: dict[str, Any] = {}

    def check() -> dict[str, Any] | None:
        response = client.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        seen.update(response.json())
        return seen if until(seen) else None

    try:
        return dict(wait_for(check, timeout, what=f"job {job_id}"))
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen: {seen}") from None


def submit(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return dict(response.json())


def train(client: httpx.Client, body: dict[str, Any], timeout: float = 400.0) -> dict[str, Any]:
    """Submit a job and wait for it to succeed; returns the finished job."""
    job = wait_job(client, submit(client, body)["id"], timeout=timeout)
    assert job["status"] == "succeeded", job
    return job


@contextlib.contextmanager
def logs_on_failure(stack: Stack) -> Iterator[None]:
    try:
        yield
    except BaseException:
        print(stack.log_tails())
        raise


# ----- real CIFAR-10 test images -----

def cifar10_test_images(count: int, seed: int = 0) -> tuple[Any, Any]:
    """`count` images (uint8 Nx32x32x3) and labels drawn from the real CIFAR-10 test split."""
    import numpy as np

    with np.load(testkit.cifar10_npz("test")) as data:
        x, y = data["x"], data["y"].reshape(-1)
    index = np.random.default_rng(seed).choice(len(x), size=count, replace=False)
    return x[index], y[index].astype(int)


def png_bytes(image: Any) -> bytes:
    """One uint8 HxWx3 array as a PNG file."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def train_split_size() -> int:
    """How many images the real training split holds (npz form)."""
    import numpy as np

    with np.load(testkit.cifar10_npz("train")) as data:
        return int(data["y"].shape[0])
