"""`make run`'s supervisor as a user runs it: no Redis at TL_REDIS_URL, a job with plain HTTP, Ctrl-C, again
(the bundled Redis' append-only file keeps the jobs); children killed on their own are restarted while the
others keep serving."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from testkit import REPO, data_dir

from service.launcher import free_port

from .harness import BASELINE_SMALL, TERMINAL, wait_for, wait_job

pytestmark = pytest.mark.integration


class Launcher:
    """`python -m service.launcher` in the background, its output collected line by line."""

    def __init__(self, env: dict[str, str], port: int) -> None:
        self.port = port
        self.lines: list[str] = []
        self.process = subprocess.Popen([sys.executable, "-m", "service.launcher"], cwd=REPO, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_line(self, pattern: str, timeout: float) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            assert self.process.poll() is None or any(re.search(pattern, x) for x in self.lines), self.output()
            return next((m for line in list(self.lines) if (m := re.search(pattern, line))), None)

        try:
            return wait_for(found, timeout, what=pattern)
        except AssertionError:
            print(self.output())
            raise

    def child_pids(self) -> list[int]:
        return list(self.pids().values())

    def pids(self, verb: str = "started") -> dict[str, int]:
        """The pid of each child as `launch | started NAME (pid N)` (or `restarted`) lines said; the latest."""
        pattern = rf"^launch \| {verb} (\w+) \(pid (\d+)\)"
        return {m.group(1): int(m.group(2)) for line in list(self.lines) if (m := re.search(pattern, line))}

    def stop(self, sig: int) -> int:
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=60)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
            self._reader.join(timeout=5)


def group_members(pgids: set[int]) -> list[int]:
    """Pids of live (non-zombie) processes whose process group is one of `pgids`."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) in pgids:
            members.append(int(stat.parent.name))
    return members


@pytest.fixture
def launcher_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TL_")}
    env.update({
        "TL_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there: the bundled Redis starts
        "TL_PORT": str(free_port()),
        "TL_ARTIFACT_DIR": str(tmp_path / "artifacts"),
        "TL_DATA_DIR": str(data_dir() or tmp_path / "no-data"),
        "TL_ALLOW_DOWNLOAD": "false",
    })
    return env


IDEMPOTENCY_KEY = "launcher-restart-1"


def test_launcher_serves_trains_and_stops_cleanly_twice_keeping_its_jobs(launcher_env: dict[str, str]) -> None:
    port = int(launcher_env["TL_PORT"])
    base = f"http://127.0.0.1:{port}"
    redis_dir = Path(launcher_env["TL_ARTIFACT_DIR"]) / "redis"
    body = {**BASELINE_SMALL, "train_samples": 100}
    remembered: dict[str, object] = {}
    for attempt, sig in ((1, signal.SIGTERM), (2, signal.SIGINT)):
        launcher = Launcher(launcher_env, port)
        try:
            started = launcher.wait_line(r"started the bundled redis-server at \S+ \(append-only file in (\S+):",
                                         timeout=30)
            assert started.group(1) == str(redis_dir)
            docs = launcher.wait_line(r"ready: API docs at (\S+/docs)", timeout=180)
            assert docs.group(1) == f"{base}/docs"
            assert httpx.get(docs.group(1), timeout=10).status_code == 200
            for name in ("redis", "worker", "api"):
                assert any(line.startswith(f"{name:<6} | ") for line in launcher.lines), name
            ready = wait_for(lambda: (r := httpx.get(f"{base}/readyz", timeout=10)).json().get("workers", 0) >= 1
                             and r.json(), timeout=120, what="a worker in /readyz")
            assert ready["redis"] == "ok"
            with httpx.Client(base_url=base, timeout=30) as client:
                if attempt == 1:
                    response = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": IDEMPOTENCY_KEY})
                    assert response.status_code == 202
                    job = wait_job(client, response.json()["id"], timeout=300)
                    if data_dir() is not None:
                        assert job["status"] == "succeeded", job
                    assert job["status"] in TERMINAL
                    remembered.update(job)
                else:  # a new Redis process read the append-only file: the job, its history, its key
                    job = client.get(f"/v1/jobs/{remembered['id']}").json()
                    for name in ("id", "status", "created_at", "finished_at", "model_id", "history", "error"):
                        assert job.get(name) == remembered.get(name), (name, job, remembered)
                    assert remembered["id"] in [j["id"] for j in client.get("/v1/jobs").json()["items"]]
                    again = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": IDEMPOTENCY_KEY})
                    assert again.status_code in (200, 202) and again.json()["id"] == remembered["id"], again.text
            pids = launcher.child_pids()
            assert len(pids) == 4  # redis, worker, datasets, api
        except BaseException:
            print(launcher.output())
            launcher.stop(signal.SIGKILL)
            raise

        started_at = time.monotonic()
        status = launcher.stop(sig)
        print(f"run {attempt}: stopped by {signal.Signals(sig).name} in {time.monotonic() - started_at:.1f} s")
        assert status == 0, launcher.output()
        assert group_members(set(pids)) == [], "a child process outlived the launcher"
        assert "api    | " in launcher.output() and "launch | worker stopped" in launcher.output()
        aof = sorted(p.name for p in redis_dir.iterdir() if p.name.startswith("appendonly"))
        assert aof, sorted(p.name for p in redis_dir.iterdir())  # appendonly.aof, or appendonlydir/ (Redis 7)


def test_a_second_launcher_on_the_same_artifact_dir_is_refused(launcher_env: dict[str, str]) -> None:
    first = Launcher(launcher_env, int(launcher_env["TL_PORT"]))
    try:
        first.wait_line(r"started the bundled redis-server", timeout=30)
        other = {**launcher_env, "TL_PORT": str(free_port())}
        second = subprocess.run([sys.executable, "-m", "service.launcher"], cwd=REPO, env=other, timeout=60,
                                capture_output=True, text=True)
        assert second.returncode == 1, second.stdout + second.stderr
        assert "another `make run` uses" in second.stdout, second.stdout
    finally:
        assert first.stop(signal.SIGTERM) == 0, first.output()


class Prober:
    """GET /healthz every 0.2 s in a thread; every status (None: no answer) with its time."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: list[tuple[float, int | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.wait(0.2):
                try:
                    status: int | None = client.get(self.url).status_code
                except httpx.HTTPError:
                    status = None
                self.seen.append((time.monotonic(), status))

    def stop(self) -> list[tuple[float, int | None]]:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.seen


def test_launcher_restarts_what_dies_and_keeps_serving(launcher_env: dict[str, str]) -> None:
    """kill -9 of the worker's process group mid-job, then of the API, then of Redis: each comes back (same
    port), the API answers /healthz throughout the worker's death, the job the worker held ends failed
    (WorkerLost) and the next job runs."""
    env = {**launcher_env, "TL_JOB_LOST_SECONDS": "10", "TL_JOB_HEARTBEAT_SECONDS": "2"}
    port = int(env["TL_PORT"])
    base = f"http://127.0.0.1:{port}"
    launcher = Launcher(env, port)
    client = httpx.Client(base_url=base, timeout=30)
    try:
        launcher.wait_line(r"/readyz reports 1 worker\(s\)", timeout=240)
        pids = launcher.pids()
        assert set(pids) == {"redis", "worker", "datasets", "api"}, pids

        # 1. the worker, while it holds a job
        held = None
        if data_dir() is not None:
            response = client.post("/v1/jobs", json={"model": "baseline", "train_samples": 5000,
                                                     "test_samples": 500, "epochs": 30, "seed": 41})
            assert response.status_code == 202, response.text
            held = wait_job(client, response.json()["id"], timeout=180, until=lambda j: j["status"] == "running")
        prober = Prober(f"{base}/healthz")
        time.sleep(1)
        os.killpg(pids["worker"], signal.SIGKILL)
        killed = time.monotonic()
        launcher.wait_line(rf"worker \(pid {pids['worker']}\) was killed by SIGKILL .* restarting it in 1 s",
                           timeout=10)
        launcher.wait_line(r"^launch \| restarted worker \(pid \d+\)", timeout=15)
        assert group_members({pids["worker"]}) == [], "the dead worker's pool process was left running"
        wait_for(lambda: httpx.get(f"{base}/readyz", timeout=10).json().get("workers", 0) >= 1, timeout=180,
                 what="a new worker in /readyz")
        print(f"a new worker answered {time.monotonic() - killed:.1f} s after the kill")
        if held is not None:
            failed = wait_job(client, held["id"], timeout=60)
            assert failed["status"] == "failed" and failed["error"]["type"] == "WorkerLost", failed
        seen = prober.stop()
        assert len(seen) > 20 and all(status == 200 for _, status in seen), \
            f"/healthz did not answer 200 throughout: {[s for s in seen if s[1] != 200][:5]}"
        assert launcher.process.poll() is None
        assert pids["api"] == launcher.pids()["api"], "the API was not restarted"

        # 2. the API: back on the same port
        os.killpg(pids["api"], signal.SIGKILL)
        launcher.wait_line(r"^launch \| restarted api \(pid \d+\)", timeout=15)
        wait_for(lambda: http_ok(f"{base}/healthz"), timeout=60, what="the restarted API on the same port")
        launcher.wait_line(r"the API answers again at", timeout=30)

        # 3. Redis: same port, same append-only file (what was written more than a second ago is there)
        listed = client.get("/v1/jobs").json()["items"]
        time.sleep(1.5)
        os.killpg(pids["redis"], signal.SIGKILL)
        launcher.wait_line(r"^launch \| restarted redis \(pid \d+\)", timeout=15)
        wait_for(lambda: http_ok(f"{base}/readyz"), timeout=60, what="/readyz with Redis back")
        assert [j["id"] for j in client.get("/v1/jobs").json()["items"]] == [j["id"] for j in listed]
        if data_dir() is not None:  # the workers reconnected: the next job runs
            wait_for(lambda: httpx.get(f"{base}/readyz", timeout=10).json().get("workers", 0) >= 1, timeout=120,
                     what="the worker back in /readyz after Redis came back")
            response = client.post("/v1/jobs", json=BASELINE_SMALL)
            assert response.status_code == 202, response.text
            assert wait_job(client, response.json()["id"], timeout=300)["status"] == "succeeded"
        everyone = set(pids.values()) | set(launcher.pids("restarted").values())
    except BaseException:
        print(launcher.output())
        launcher.stop(signal.SIGKILL)
        raise
    finally:
        client.close()
    assert launcher.stop(signal.SIGTERM) == 0, launcher.output()
    assert group_members(everyone) == [], "a child process outlived the launcher"


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
