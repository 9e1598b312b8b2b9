"""A load generator for the predict benchmarks: each client is its own process (so the clients do not share
one interpreter lock and measure themselves instead of the server), started before the clock and released
together.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LoadResult:
    clients: int
    requests: int
    wall_s: float
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    correct: int = 0

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies) / self.wall_s if self.wall_s else 0.0


def _client(base_url: str, headers: dict[str, str], files: list[bytes], labels: list[int] | None, count: int,
            offset: int, ready: Any, go: Any, out: Any) -> None:
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    correct = 0
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:
        client.get("/healthz")  # connect before the clock starts
        ready.release()
        go.wait()
        start = time.perf_counter()
        for i in range(offset, offset + count):
            sent = time.perf_counter()
            try:
                response = client.post("/v1/models/latest/predict",
                                       files=[("file", ("img.png", files[i % len(files)], "image/png"))])
            except httpx.HTTPError as exc:
                errors.append(repr(exc))
                continue
            if response.status_code != 200:
                errors.append(f"{response.status_code} {response.text[:200]}")
                continue
            latencies.append(time.perf_counter() - sent)
            if labels is not None:
                correct += int(response.json()["predictions"][0]["class_index"] == labels[i % len(labels)])
        out.put((start, time.perf_counter(), latencies, errors, correct))


def run_clients(base_url: str, headers: dict[str, str], files: list[bytes], clients: int, total: int,
                labels: list[int] | None = None) -> LoadResult:
    """`total` single-image multipart requests spread over `clients` concurrent client processes."""
    ctx = mp.get_context("spawn")  # never fork a process that may hold TensorFlow's threads
    ready, go, out = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    per_client = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]
    procs = []
    offset = 0
    for count in per_client:
        procs.append(ctx.Process(target=_client, args=(base_url, headers, files, labels, count, offset,
                                                        ready, go, out), daemon=True))
        offset += count
    for p in procs:
        p.start()
    for _ in procs:
        if not ready.acquire(timeout=120):
            raise TimeoutError("a load client did not start")
    go.set()
    parts = [out.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    start = min(p[0] for p in parts)
    end = max(p[1] for p in parts)
    result = LoadResult(clients=clients, requests=total, wall_s=end - start)
    for _, _, latencies, errors, correct in parts:
        result.latencies += latencies
        result.errors += errors
        result.correct += correct
    return result
