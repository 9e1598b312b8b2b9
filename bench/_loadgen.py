"""A load generator for the predict benchmarks: each client is its own process (so the clients do not share
one interpreter lock and measure themselves instead of the server), started before the clock and released
together.

It also accounts for the CPU the load cost (Linux `/proc`): the server processes' user + system time over
the run, each client's own CPU time over its requests (`time.process_time`, taken inside the client), and
the rest of the machine's busy time (the other stack processes, the benchmark itself, other users). With
`cores` CPUs, no setup can exceed `cores / (CPU seconds per request)` requests per second.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (all its threads), from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / _TICKS_PER_S


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy so far, summed over its cores (/proc/stat, `cpu` line)."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]  # guest time is inside user
    return (user + nice + system + irq + softirq + steal) / _TICKS_PER_S


@dataclass
class CpuUse:
    """CPU seconds spent during a load run, split by who spent them."""

    server_s: float
    clients_s: float
    machine_s: float  # every core of the machine, busy for anyone
    cores: int
    wall_s: float

    @property
    def busy_cores(self) -> float:
        """Cores kept busy on average (by anyone); `cores` means the machine was saturated."""
        return self.machine_s / self.wall_s if self.wall_s else 0.0

    @property
    def other_s(self) -> float:
        """Neither the server nor the clients: the rest of the stack, the benchmark, other users."""
        return max(0.0, self.machine_s - self.server_s - self.clients_s)

    def per_request(self, requests: int) -> dict[str, float]:
        """CPU milliseconds per request by whom, and the request rate the machine's cores could sustain
        at that cost (`ceiling`: everything counted; `ceiling_server_clients`: if nothing else ran)."""
        n = max(1, requests)
        server, clients, other = self.server_s / n, self.clients_s / n, self.other_s / n
        total = server + clients + other
        return {"server_cpu_ms": 1000 * server, "clients_cpu_ms": 1000 * clients, "other_cpu_ms": 1000 * other,
                "total_cpu_ms": 1000 * total, "busy_cores": self.busy_cores,
                "ceiling_requests_per_s": self.cores / total if total else float("inf"),
                "ceiling_server_clients_requests_per_s": (self.cores / (server + clients) if server + clients
                                                          else float("inf"))}


@dataclass
class LoadResult:
    clients: int
    requests: int
    wall_s: float
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    correct: int = 0
    cpu: CpuUse | None = None

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
        start, cpu_start = time.perf_counter(), time.process_time()
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
        out.put((start, time.perf_counter(), time.process_time() - cpu_start, latencies, errors, correct))


def run_clients(base_url: str, headers: dict[str, str], files: list[bytes], clients: int, total: int,
                labels: list[int] | None = None, server_pids: Sequence[int] = ()) -> LoadResult:
    """`total` single-image multipart requests spread over `clients` concurrent client processes.

    With `server_pids` (the API's processes, on this machine), the result's `cpu` splits the CPU time spent
    during the run between them, the clients and everything else."""
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
    server_before = sum(process_cpu_s(pid) for pid in server_pids)
    machine_before, cpu_window_start = machine_busy_s(), time.perf_counter()
    go.set()
    parts = [out.get(timeout=3600) for _ in procs]
    machine_after, cpu_window = machine_busy_s(), time.perf_counter() - cpu_window_start
    server_after = sum(process_cpu_s(pid) for pid in server_pids)
    for p in procs:
        p.join(timeout=30)
    start = min(p[0] for p in parts)
    end = max(p[1] for p in parts)
    result = LoadResult(clients=clients, requests=total, wall_s=end - start)
    clients_cpu = 0.0
    for _, _, cpu_s, latencies, errors, correct in parts:
        clients_cpu += cpu_s
        result.latencies += latencies
        result.errors += errors
        result.correct += correct
    if server_pids:
        result.cpu = CpuUse(server_s=server_after - server_before, clients_s=clients_cpu,
                            machine_s=machine_after - machine_before, cores=os.cpu_count() or 1, wall_s=cpu_window)
    return result
