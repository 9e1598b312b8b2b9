"""A bounded soak run against `make run` with faults on a schedule: is anything lost, stuck, orphaned or 5xx?

    .venv/bin/python bench/soak.py [--minutes 10] [--clients 4] [--streams 20] [--kill-every 120]
                                   [--redis-every 180] [--job-every 5] [--log FILE] [--keep]

Starts `python -m service.launcher` itself (a free port, a temporary TL_ARTIFACT_DIR, an API key, TL_EXPORTS=""
so jobs stay small, and TL_REDIS_URL at a port nothing listens on, so the launcher starts its bundled Redis
with its append-only file under the artifact directory), waits for a worker in /readyz, then for `--minutes`
runs, all at once and only against 127.0.0.1:

- a stream of small baseline jobs (200 training / 100 test images, 1 epoch): one `POST /v1/jobs` every
  `--job-every` seconds (each with its own Idempotency-Key, retried with the same key on a 5xx or a broken
  connection), held back while `--max-active` of them are still queued or running, so the backlog stays
  within what the drain can finish;
- `--clients` predict clients (threads), each a loop of single-image multipart `POST /v1/predict` with a real
  CIFAR-10 test image (PNG), from the moment the first model exists;
- `--streams` event streams (threads), each `GET /v1/jobs/{id}/events` on one of the newest jobs (an active
  one when there is one), reopened when it ends;
- faults: `kill -9` of the training worker's process group every `--kill-every` s (the launcher's child
  running `celery -A worker.tasks:app`, found through /proc), and `kill -9` of the bundled redis-server every
  `--redis-every` s (the launcher restarts it on the same port with the same append-only file). Each fault
  is timed until the launcher has a new process up (and, for the worker, /readyz counts a worker again).

Then the load stops and a drain of up to `--drain` s (default 120) waits for every submitted job to end. It
prints requests by kind and status, the 5xx count (and those outside a fault's window: from the fault until
5 s after it recovered) with a sample of bodies, each timed relative to the nearest earlier fault, 429s of
the event streams, the jobs submitted / succeeded / failed (by error type) / cancelled / `lost` (record gone)
/ `stuck` (still queued or running after the drain), orphaned models (a model whose job is not `succeeded`),
succeeded jobs whose model is missing, and the API's peak RSS (VmHWM of /proc/<api pid>/status, sampled
every few seconds; the highest over the API's processes if it was restarted). A table and one JSON line, as
the other benchmarks; it asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from _common import ROOT, percentiles, png, print_json, print_table, shared_dir, test_images

JOB_BODY: dict[str, Any] = {"model": "baseline", "train_samples": 200, "test_samples": 100, "epochs": 1}
ACTIVE = {"queued", "running", "cancelling"}
TERMINAL = {"succeeded", "failed", "cancelled"}
#: A 5xx this long after a fault's process is back still counts as inside that fault's window.
FAULT_WINDOW_AFTER_S = 5.0
SAMPLES_KEPT = 20


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ----- processes, through /proc -----

def proc_children(ppid: int) -> list[tuple[int, list[str]]]:
    """(pid, argv) of the live processes whose parent is `ppid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[0] == "Z" or int(fields[1]) != ppid:
                continue
            argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        found.append((int(stat.parent.name), [a.decode(errors="replace") for a in argv if a]))
    return found


def process_group(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, ValueError, IndexError):
        return None


def find_child(launcher_pid: int, what: str) -> int | None:
    """The launcher's child that is the training worker, the bundled Redis or the API (None if none now)."""
    for pid, argv in proc_children(launcher_pid):
        if what == "worker" and "celery" in " ".join(argv) and "worker.tasks:app" in argv:
            return pid
        if what == "redis" and argv and Path(argv[0].split()[0]).name == "redis-server":
            return pid  # Redis rewrites its title: "/path/redis-server 127.0.0.1:PORT"
        if what == "api" and any("uvicorn" in a for a in argv) and "service.main:app" in argv:
            return pid
    return None


def vm_hwm_kib(pid: int) -> int | None:
    """Peak resident set size (VmHWM, KiB) of `pid` so far."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


# ----- what was seen -----

@dataclass
class Fault:
    kind: str  # "worker" or "redis"
    index: int
    at: float  # seconds since the soak started
    wall: float  # time.time() of the kill, to compare with the job records' timestamps
    pid: int | None
    running_job: str | None = None  # the job the worker held when it was killed
    back_after: float | None = None  # seconds until the launcher had it up again (worker: in /readyz)
    note: str = ""

    def window_end(self) -> float:
        return self.at + (self.back_after if self.back_after is not None else 60.0) + FAULT_WINDOW_AFTER_S


@dataclass
class Tally:
    """Every response and broken request, by kind; the 5xx and errors with their time."""

    t0: float
    faults: list[Fault]
    lock: threading.Lock = field(default_factory=threading.Lock)
    by_kind: dict[str, Counter[str]] = field(default_factory=dict)
    bad: list[dict[str, Any]] = field(default_factory=list)  # 5xx and broken connections
    bad_total: Counter[str] = field(default_factory=Counter)
    predict_latency: list[float] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def record(self, kind: str, outcome: int | str, request: str, body: str = "") -> None:
        t = self.now()
        with self.lock:
            self.by_kind.setdefault(kind, Counter())[str(outcome)] += 1
            if isinstance(outcome, str) or outcome >= 500:
                self.bad_total[kind] += 1
                if len(self.bad) < 2000:
                    self.bad.append({"t": round(t, 2), "kind": kind, "request": request, "status": outcome,
                                     "body": body[:400]})

    def call(self, client: httpx.Client, kind: str, method: str, path: str, **kwargs: Any) -> httpx.Response | None:
        """One request, tallied; None when no response came (the error is tallied)."""
        try:
            response = client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            self.record(kind, type(exc).__name__, f"{method} {path}", repr(exc))
            return None
        self.record(kind, response.status_code, f"{method} {path}",
                    response.text if response.status_code >= 500 else "")
        return response


def relative_to_faults(t: float, faults: list[Fault]) -> str:
    """Where `t` falls: in the window of each fault it is in, else after the latest fault before it."""

    def describe(f: Fault) -> str:
        back = f"back after {f.back_after:.1f} s" if f.back_after is not None else "not seen back"
        return f"+{t - f.at:.1f} s after {f.kind} kill #{f.index} (t={f.at:.1f}, {back})"

    inside = [f for f in faults if f.at <= t <= f.window_end()]
    if inside:
        return "inside the window of " + "; ".join(describe(f) for f in inside)
    before = [f for f in faults if f.at <= t]
    if not before:
        return "before any fault"
    return "outside every fault window: " + describe(max(before, key=lambda f: f.at))


def in_fault_window(t: float, faults: list[Fault]) -> bool:
    return any(f.at <= t <= f.window_end() for f in faults)


# ----- the soak -----

class Soak:
    def __init__(self, args: argparse.Namespace, base: str, api_key: str, launcher: subprocess.Popen[bytes]) -> None:
        self.args = args
        self.base = base
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.launcher = launcher
        self.faults: list[Fault] = []
        self.tally = Tally(time.monotonic(), self.faults)
        self.stop_load = threading.Event()
        self.first_model = threading.Event()
        self.lock = threading.Lock()
        self.jobs: dict[str, dict[str, Any]] = {}  # id -> last seen record (or {"status": "missing"})
        self.submitted_at: dict[str, float] = {}
        self.submit_failures = 0  # submissions that never got a job after every retry
        self.held_back = 0  # submission ticks skipped because --max-active jobs were active
        self.seen_missing: dict[str, float] = {}  # a job's record gone (404) during the run, first seen when
        self.streams = Counter[str]()
        self.api_hwm: dict[int, int] = {}
        run = secrets.token_hex(3)
        self.run_id = run

    def client(self, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers=self.headers, timeout=timeout)

    def until(self) -> float:
        return self.args.minutes * 60.0

    # --- jobs ---

    def active_ids(self) -> list[str]:
        with self.lock:
            return [i for i, j in self.jobs.items() if j.get("status") in ACTIVE]

    def submitter(self) -> None:
        max_jobs = int(self.until() / self.args.job_every) + 1
        with self.client() as api:
            for n in range(max_jobs):
                tick = n * self.args.job_every
                while self.tally.now() < tick and not self.stop_load.is_set():
                    time.sleep(min(0.2, tick - self.tally.now()))
                if self.stop_load.is_set():
                    return
                if len(self.active_ids()) >= self.args.max_active:
                    self.held_back += 1
                    continue
                key = f"soak-{self.run_id}-{n}"
                body = {**JOB_BODY, "seed": n}
                for attempt in range(5):
                    response = self.tally.call(api, "job_submit", "POST", "/v1/jobs", json=body,
                                               headers={"Idempotency-Key": key})
                    if response is not None and response.status_code in (200, 202):
                        job = response.json()
                        with self.lock:
                            if job["id"] not in self.jobs:
                                self.jobs[job["id"]] = job
                                self.submitted_at[job["id"]] = self.tally.now()
                        break
                    if response is not None and response.status_code < 500:
                        break  # a 4xx: nothing to retry
                    time.sleep(1.0 + attempt)
                else:
                    self.submit_failures += 1

    def monitor(self) -> None:
        """Every 2 s: each active submitted job (its status, for the streams and the hold-back), and the
        API's VmHWM."""
        with self.client() as api:
            while not self.stop_load.wait(2.0):
                self.sample_rss()
                for job_id in self.active_ids():
                    self.refresh(api, job_id, "job_read")

    def refresh(self, api: httpx.Client, job_id: str, kind: str) -> None:
        response = self.tally.call(api, kind, "GET", f"/v1/jobs/{job_id}")
        if response is None:
            return
        if response.status_code == 404:
            with self.lock:
                self.jobs[job_id] = {"id": job_id, "status": "missing"}
                self.seen_missing.setdefault(job_id, self.tally.now())
        elif response.status_code == 200:
            job = response.json()
            with self.lock:
                self.jobs[job_id] = job
            if job["status"] == "succeeded":
                self.first_model.set()

    def sample_rss(self) -> None:
        pid = find_child(self.launcher.pid, "api")
        if pid is not None and (hwm := vm_hwm_kib(pid)) is not None:
            self.api_hwm[pid] = max(hwm, self.api_hwm.get(pid, 0))

    # --- predict clients ---

    def predict_client(self, index: int, files: list[bytes]) -> None:
        while not self.first_model.wait(1.0):
            if self.stop_load.is_set():
                return
        max_requests = int(self.until() * 1000)
        with self.client() as api:
            for n in range(max_requests):
                if self.stop_load.is_set():
                    return
                image = files[(index * 7919 + n) % len(files)]
                sent = time.perf_counter()
                response = self.tally.call(api, "predict", "POST", "/v1/predict",
                                           files=[("file", ("img.png", image, "image/png"))])
                if response is not None and response.status_code == 200:
                    with self.tally.lock:
                        self.tally.predict_latency.append(time.perf_counter() - sent)
                elif response is not None and response.status_code != 200:
                    time.sleep(0.5)
                if self.args.predict_pause:
                    time.sleep(self.args.predict_pause)

    # --- event streams ---

    def pick_job(self, rng: random.Random) -> str | None:
        with self.lock:
            newest = sorted(self.submitted_at, key=self.submitted_at.__getitem__)[-8:]
            active = [i for i in newest if self.jobs.get(i, {}).get("status") in ACTIVE]
        pool = active or newest
        return rng.choice(pool) if pool else None

    def stream_client(self, index: int) -> None:
        rng = random.Random(index)
        max_streams = int(self.until())  # at most one a second on average
        timeout = httpx.Timeout(10.0, read=40.0)  # the server sends a keep-alive every 15 s
        with httpx.Client(base_url=self.base, headers=self.headers, timeout=timeout) as api:
            for _ in range(max_streams):
                if self.stop_load.is_set():
                    return
                job_id = self.pick_job(rng)
                if job_id is None:
                    self.stop_load.wait(1.0)
                    continue
                opened = time.monotonic()
                self.stream_once(api, job_id)
                if time.monotonic() - opened < 2.0:  # a finished job's stream ends at once: do not spin
                    self.stop_load.wait(rng.uniform(1.0, 3.0))

    def count_stream(self, outcome: str) -> None:
        with self.tally.lock:
            self.streams[outcome] += 1

    def stream_once(self, api: httpx.Client, job_id: str) -> None:
        path = f"/v1/jobs/{job_id}/events"
        last_status = None
        try:
            with api.stream("GET", path) as response:
                if response.status_code != 200:
                    body = response.read().decode(errors="replace")
                    self.tally.record("events", response.status_code, f"GET {path}", body)
                    if response.status_code == 429:
                        self.stop_load.wait(float(response.headers.get("Retry-After", "5")))
                    return
                self.tally.record("events", 200, f"GET {path}")
                self.count_stream("opened")
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        self.count_stream("events")
                        with contextlib.suppress(ValueError, KeyError):
                            last_status = json.loads(line[5:])["status"]
                    if self.stop_load.is_set():
                        self.count_stream("closed_by_soak")
                        return
        except httpx.HTTPError as exc:
            self.count_stream("broken")
            self.tally.record("events_read", type(exc).__name__, f"GET {path}", repr(exc))
            return
        self.count_stream("ended_terminal" if last_status in TERMINAL else "ended_not_terminal")

    # --- faults ---

    def fault_loop(self, kind: str, every: float) -> None:
        if every <= 0:
            return
        with self.client(timeout=10) as api:
            for index in itertools.count(1):
                at = index * every
                if at >= self.until():
                    return
                while self.tally.now() < at:
                    if self.stop_load.wait(min(0.5, at - self.tally.now())):
                        return
                self.inject(api, kind, index)

    def inject(self, api: httpx.Client, kind: str, index: int) -> None:
        pid = find_child(self.launcher.pid, kind)
        fault = Fault(kind, index, self.tally.now(), time.time(), pid)
        with self.lock:
            self.faults.append(fault)
        if pid is None:
            fault.note = f"no {kind} process to kill (the launcher was restarting it)"
            return
        if kind == "worker":
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
                running = api.get("/v1/jobs", params={"status": "running", "limit": 5}).json()["items"]
                fault.running_job = running[0]["id"] if running else None
            if fault.running_job is None:  # Redis may be down too: what the monitor saw last
                with self.lock:
                    fault.running_job = next((i for i, j in self.jobs.items() if j.get("status") == "running"), None)
            if process_group(pid) != pid:  # the launcher starts each child in its own group; never signal another
                fault.note = f"pid {pid} does not lead its process group; killed alone"
                os.kill(pid, signal.SIGKILL)
            else:
                os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            new = find_child(self.launcher.pid, kind)
            if new is not None and new != pid:
                if kind == "redis" or self.readyz_workers() > 0:
                    fault.back_after = self.tally.now() - fault.at
                    return
            time.sleep(0.25)

    def readyz_workers(self) -> int:
        try:
            response = httpx.get(f"{self.base}/readyz", timeout=5)
            return int(response.json().get("workers", 0)) if response.status_code == 200 else 0
        except (httpx.HTTPError, ValueError):
            return 0

    # --- the run ---

    def run(self) -> dict[str, Any]:
        x, _ = test_images(256, seed=11)
        files = [png(image) for image in x]
        threads = [threading.Thread(target=self.submitter, name="jobs", daemon=True),
                   threading.Thread(target=self.monitor, name="monitor", daemon=True),
                   threading.Thread(target=self.fault_loop, args=("worker", self.args.kill_every), daemon=True),
                   threading.Thread(target=self.fault_loop, args=("redis", self.args.redis_every), daemon=True)]
        threads += [threading.Thread(target=self.predict_client, args=(i, files), daemon=True)
                    for i in range(self.args.clients)]
        threads += [threading.Thread(target=self.stream_client, args=(i,), daemon=True)
                    for i in range(self.args.streams)]
        for thread in threads:
            thread.start()
        while self.tally.now() < self.until() and self.launcher.poll() is None:
            time.sleep(0.5)
        load_s = self.tally.now()
        self.stop_load.set()
        for thread in threads:
            thread.join(timeout=60)
        return self.drain(load_s)

    def drain(self, load_s: float) -> dict[str, Any]:
        drain_start = time.monotonic()
        with self.client() as api:
            while time.monotonic() - drain_start < self.args.drain and self.launcher.poll() is None:
                for job_id in self.active_ids():
                    self.refresh(api, job_id, "drain")
                if not self.active_ids():
                    break
                time.sleep(2.0)
            drain_s = time.monotonic() - drain_start
            self.sample_rss()
            # The final word on every job, then every model against its job.
            for job_id in list(self.jobs):
                self.refresh(api, job_id, "final")
            models_response = self.tally.call(api, "final", "GET", "/v1/models")
            models = models_response.json()["items"] if models_response is not None and \
                models_response.status_code == 200 else None
            orphans = []
            for model in models or []:
                job = self.jobs.get(model.get("job_id") or "")
                if job is None and model.get("job_id"):
                    response = self.tally.call(api, "final", "GET", f"/v1/jobs/{model['job_id']}")
                    job = response.json() if response is not None and response.status_code == 200 else \
                        {"status": "missing"}
                status = job.get("status") if job else "no job_id"
                if status != "succeeded":
                    orphans.append({"model_id": model["id"], "job_id": model.get("job_id"), "job_status": status})
            ready = self.readyz_workers()
        return self.report(load_s, drain_s, models, orphans, ready)

    def report(self, load_s: float, drain_s: float, models: list[dict[str, Any]] | None,
               orphans: list[dict[str, Any]], ready_workers: int) -> dict[str, Any]:
        jobs = list(self.jobs.values())
        status = Counter(j.get("status") for j in jobs)
        failed = Counter((j.get("error") or {}).get("type", "?") for j in jobs if j.get("status") == "failed")
        lost = sorted(j["id"] for j in jobs if j.get("status") == "missing")
        stuck = sorted(f"{j['id']} ({j['status']}/{(j.get('progress') or {}).get('stage')})"
                       for j in jobs if j.get("status") in ACTIVE)
        model_ids = {m["id"] for m in models or []}
        missing_models = sorted(j["id"] for j in jobs if j.get("status") == "succeeded"
                                and j.get("model_id") not in model_ids) if models is not None else ["(no list)"]
        killed_jobs = {f.running_job for f in self.faults if f.running_job}
        for job in jobs:  # a job that was running (by its own record) when its worker was killed
            with contextlib.suppress(TypeError, ValueError, KeyError):
                started = datetime.fromisoformat(job["started_at"]).timestamp()
                finished = datetime.fromisoformat(job["finished_at"]).timestamp()
                if any(f.kind == "worker" and started <= f.wall <= finished for f in self.faults):
                    killed_jobs.add(job["id"])
        failed_other = sorted(f"{j['id']}: {(j.get('error') or {}).get('type')}: "
                              f"{(j.get('error') or {}).get('message', '')[:160]}"
                              for j in jobs if j.get("status") == "failed" and j["id"] not in killed_jobs)
        bad = self.tally.bad
        fivexx = [b for b in bad if isinstance(b["status"], int)]
        broken = [b for b in bad if isinstance(b["status"], str)]
        fivexx_outside = [b for b in fivexx if not in_fault_window(b["t"], self.faults)]
        requests = {kind: dict(sorted(counts.items())) for kind, counts in sorted(self.tally.by_kind.items())}
        served = {kind: sum(v for k, v in counts.items() if k.isdigit()) for kind, counts in requests.items()}
        samples = []
        for b in (fivexx_outside + [b for b in fivexx if b not in fivexx_outside] + broken)[:SAMPLES_KEPT]:
            samples.append({**b, "when": relative_to_faults(b["t"], self.faults)})
        hwm = max(self.api_hwm.values(), default=0)
        result: dict[str, Any] = {
            "minutes": self.args.minutes, "load_s": round(load_s, 1), "drain_s": round(drain_s, 1),
            "clients": self.args.clients, "streams": self.args.streams, "kill_every_s": self.args.kill_every,
            "redis_every_s": self.args.redis_every, "job_every_s": self.args.job_every,
            "max_active": self.args.max_active,
            "requests_served": served, "requests": requests,
            "5xx": len(fivexx), "5xx_outside_fault_windows": len(fivexx_outside),
            "5xx_by_kind": dict(Counter(b["kind"] for b in fivexx)),
            "no_response": len(broken), "no_response_by_kind": dict(Counter(b["kind"] for b in broken)),
            "stream_429": self.tally.by_kind.get("events", Counter()).get("429", 0),
            "stream_outcomes": dict(self.streams),
            "jobs_submitted": len(jobs), "jobs_held_back": self.held_back, "submit_failures": self.submit_failures,
            "jobs_succeeded": status.get("succeeded", 0), "jobs_failed": sum(failed.values()),
            "jobs_failed_by_type": dict(failed), "jobs_cancelled": status.get("cancelled", 0),
            "jobs_lost": len(lost), "lost": lost, "jobs_stuck": len(stuck), "stuck": stuck,
            "jobs_missing_during_run": {k: round(v, 1) for k, v in self.seen_missing.items()},
            "failed_not_held_by_a_killed_worker": failed_other,
            "models": len(models) if models is not None else None, "orphaned_models": len(orphans),
            "orphans": orphans, "succeeded_without_model": missing_models,
            "api_peak_rss_mib": round(hwm / 1024, 1), "api_pids": len(self.api_hwm),
            "ready_workers_at_end": ready_workers,
            "predict_latency": (percentiles(self.tally.predict_latency) if self.tally.predict_latency else None),
            "faults": [{"kind": f.kind, "index": f.index, "at_s": round(f.at, 1),
                        "at": datetime.fromtimestamp(f.wall, UTC).isoformat(timespec="milliseconds"), "pid": f.pid,
                        "running_job": f.running_job, "running_job_ended": self.ending(f.running_job),
                        "back_after_s": None if f.back_after is None else round(f.back_after, 1),
                        **({"note": f.note} if f.note else {})} for f in self.faults],
            "bad_samples": samples,
        }
        return result

    def ending(self, job_id: str | None) -> str | None:
        """How the job a killed worker held ended (`failed/WorkerLost`, or `succeeded` if it had just ended)."""
        if job_id is None:
            return None
        job = self.jobs.get(job_id) or {}
        error = (job.get("error") or {}).get("type")
        return f"{job.get('status')}/{error}" if error else str(job.get("status"))


def print_report(result: dict[str, Any]) -> None:
    rows: list[list[Any]] = []
    for kind, counts in result["requests"].items():
        rows.append([f"requests: {kind}", ", ".join(f"{k}: {v}" for k, v in counts.items())])
    lat = result["predict_latency"]
    rows += [
        ["predict latency p50 / p95 / p99 ms", f"{lat['p50_ms']:.1f} / {lat['p95_ms']:.1f} / {lat['p99_ms']:.1f}"
         if lat else "-"],
        ["5xx (outside fault windows)", f"{result['5xx']} ({result['5xx_outside_fault_windows']})"],
        ["no response (connection errors)", result["no_response"]],
        ["event streams: 429", result["stream_429"]],
        ["event streams", ", ".join(f"{k}: {v}" for k, v in sorted(result["stream_outcomes"].items()))],
        ["jobs submitted (held back ticks)", f"{result['jobs_submitted']} ({result['jobs_held_back']})"],
        ["jobs succeeded", result["jobs_succeeded"]],
        ["jobs failed", f"{result['jobs_failed']} {result['jobs_failed_by_type'] or ''}".strip()],
        ["jobs cancelled", result["jobs_cancelled"]],
        ["jobs lost (record gone)", result["jobs_lost"]],
        ["jobs stuck (active after the drain)", result["jobs_stuck"]],
        ["models / orphaned models", f"{result['models']} / {result['orphaned_models']}"],
        ["succeeded jobs without their model", len(result["succeeded_without_model"])],
        ["API peak RSS (VmHWM) MiB", f"{result['api_peak_rss_mib']} ({result['api_pids']} API process(es))"],
        ["load s / drain s", f"{result['load_s']} / {result['drain_s']}"],
        ["load average (1 min) start / end", " / ".join(map(str, result.get("load_average_start_end", [])))],
    ]
    print_table("soak", ["figure", "value"], rows)
    print_table("faults", ["fault", "at s", "pid", "job running at the kill", "it ended", "back after s"],
                [[f"{f['kind']} #{f['index']}", f["at_s"], f["pid"], f["running_job"] or "-",
                  f["running_job_ended"] or "-", "-" if f["back_after_s"] is None else f["back_after_s"]]
                 for f in result["faults"] if f["kind"] == "worker"]
                + [[f"{f['kind']} #{f['index']}", f["at_s"], f["pid"], "-", "-",
                    "-" if f["back_after_s"] is None else f["back_after_s"]]
                   for f in result["faults"] if f["kind"] != "worker"])
    for name in ("lost", "stuck", "orphans", "succeeded_without_model", "failed_not_held_by_a_killed_worker"):
        if result[name]:
            print(f"\n{name}:", *result[name], sep="\n  ")
    if result["bad_samples"]:
        print("\n5xx and broken requests (first ones outside fault windows first):")
        for b in result["bad_samples"]:
            print(f"  t={b['t']:.1f} s [{b['when']}] {b['request']} -> {b['status']}: {b['body'][:300]}")


# ----- the launcher -----

def start_launcher(workdir: Path, port: int, api_key: str, log_path: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TL_")}
    env.update({
        "TL_PORT": str(port),
        "TL_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # nothing listens: the bundled, persisted Redis
        "TL_ARTIFACT_DIR": str(workdir / "artifacts"),
        "TL_DATA_DIR": str(shared_dir("data")),
        "TL_WEIGHTS_DIR": str(shared_dir("weights")),
        "TL_ALLOW_DOWNLOAD": "false",
        "TL_API_KEY": api_key,
        "TL_EXPORTS": "",
        "TL_LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    })
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "service.launcher", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def wait_ready(base: str, launcher: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if launcher.poll() is not None:
            raise RuntimeError(f"the launcher exited with status {launcher.returncode}")
        with contextlib.suppress(httpx.HTTPError, ValueError):
            response = httpx.get(f"{base}/readyz", timeout=5)
            if response.status_code == 200 and response.json().get("workers", 0) >= 1:
                return
        time.sleep(1.0)
    raise TimeoutError(f"no worker in /readyz after {timeout:.0f} s")


def stop_launcher(launcher: subprocess.Popen[bytes]) -> int | None:
    if launcher.poll() is None:
        launcher.send_signal(signal.SIGTERM)
        try:
            launcher.wait(timeout=90)
        except subprocess.TimeoutExpired:
            launcher.kill()  # its children die with it (PR_SET_PDEATHSIG)
            launcher.wait(timeout=30)
    return launcher.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--minutes", type=float, default=10.0, help="how long the load and the faults run")
    add("--clients", type=int, default=4, help="predict clients")
    add("--streams", type=int, default=20, help="event streams open at once")
    add("--kill-every", type=float, default=120.0, help="kill -9 the training worker every N s (0: never)")
    add("--redis-every", type=float, default=180.0, help="kill -9 Redis every N s (0: never)")
    add("--job-every", type=float, default=5.0, help="submit a job every N s")
    add("--max-active", type=int, default=3, help="hold submissions back while this many jobs are active")
    add("--predict-pause", type=float, default=0.05, help="seconds each predict client waits between requests")
    add("--drain", type=float, default=120.0, help="most seconds to wait for the jobs to end after the load")
    add("--ready-timeout", type=float, default=300.0, help="most seconds to wait for the stack to start")
    add("--log", type=Path, help="copy the launcher's output (every child's lines) here")
    add("--keep", action="store_true", help="keep the temporary artifact directory and say where")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="tl-soak-"))
    log_path = workdir / "launcher.log"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    api_key = secrets.token_urlsafe(24)
    launcher = start_launcher(workdir, port, api_key, log_path)
    try:
        print(f"launcher pid {launcher.pid} on {base}, artifacts in {workdir}; waiting for a worker ...",
              file=sys.stderr, flush=True)
        started = time.monotonic()
        wait_ready(base, launcher, args.ready_timeout)
        ready_after = time.monotonic() - started
        print(f"ready after {ready_after:.1f} s; soaking for {args.minutes:g} min", file=sys.stderr, flush=True)
        load_before = os.getloadavg()
        result = Soak(args, base, api_key, launcher).run()
        result["ready_after_s"] = round(ready_after, 1)
        result["load_average_start_end"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
        result["cpus"] = os.cpu_count()
    except BaseException:
        print(log_path.read_text(errors="replace")[-6000:], file=sys.stderr)
        raise
    finally:
        launcher_alive = launcher.poll() is None
        status = stop_launcher(launcher)
        log_text = log_path.read_text(errors="replace")
        if args.log:
            args.log.write_text(log_text)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    result["launcher_alive_at_end"] = launcher_alive
    result["launcher_exit_status"] = status
    result["jobs_resent_by_api"] = sum("with no message on the queue; sent again" in line
                                       for line in log_text.splitlines())
    result["launcher_restarts"] = dict(Counter(line.split("restarted ", 1)[1].split(" ", 1)[0]
                                               for line in log_text.splitlines() if "| restarted " in line))
    print_report(result)
    print(f"\nlauncher: alive at the end {launcher_alive}, exit status {status}, "
          f"restarts {result['launcher_restarts']}; "
          f"queued jobs the API sent again (lost queue messages): {result['jobs_resent_by_api']}"
          + (f", artifacts kept in {workdir}" if args.keep else ""))
    print_json("soak", result)


if __name__ == "__main__":
    main()
