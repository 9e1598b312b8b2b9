"""This service side by side with BentoML and LitServe, all serving the same `.tflite` with the same LiteRT.

    bench/peers/setup.sh                                  # once: the peers' venvs (bench/peers/.venvs/)
    .venv/bin/python bench/side_by_side.py [--model-dir DIR] [--runs 3] [--quick]
    .venv/bin/python bench/side_by_side.py --servers litserve --litserve w1b1 w2b1 w1b8t2 --runs 1   # compare configs

For each server in turn (one at a time on the machine, the order rotated from run to run): start it, let the
machine settle, warm it up, check its answers, then the same single-image PNG workload as
bench/predict_latency.py (real CIFAR-10 test images as PNG, `bench/_loadgen.run_clients`: each client its
own process, requests back to back) with 1 and then 16 concurrent clients; then stop it. Per server and
client count: requests/s, p50/p99 latency, and the CPU time per request of the server's process tree (from
/proc: the service's API process; every process of a peer), of the clients and of everything else.

- `service`: this repository's real stack (`_common.start_stack`: Redis, a Celery worker, uvicorn), its model
  directory copied in, as predict_latency.py runs it; the server is the API process.
- `litserve` / `bentoml`: bench/peers/litserve_server.py and bench/peers/bentoml_service.py in their own
  venvs, loading the model directory's `model.tflite` with `ai_edge_litert.interpreter.Interpreter` (the
  versions of ai-edge-litert, numpy and Pillow that the service's .venv has; bench/peers/setup.sh pins
  them), taking the same multipart upload at the same path and answering in the same JSON shape.
  A peer configuration is named `w<workers>b<max batch>[t<batch wait ms>][z]`: `w2b1` is two inference worker
  processes and no batching, `w1b8t2` one worker batching up to 8 requests, waiting at most 2 ms (LitServe's
  batch_timeout; for BentoML the max_latency_ms budget of its adaptive batching, which answers 503 to what it
  predicts would miss it, so give it hundreds of ms), `z` LitServe's `fast_queue` (ZeroMQ between its API
  server and its workers). Several configurations of one peer are several servers; the ratio takes the best.

Agreement: before the load, every server classifies the same images one request each; the top-1 classes
must agree (they run the same file), and the largest difference of the top-1 probability is printed.
The summary is the ratio of this service's 16-client throughput to the best peer's (goal, issue 14: >= 1.2x),
per run and over the runs, and the same ratio of the CPU ceilings, cores / (server + clients CPU ms per
request): on a machine others are using, the throughput also measures how much CPU their work left each
server while it was measured, which changes from one server to the next; the CPU per request depends much
less on it. Printed, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from _common import ROOT, ensure_model, percentiles, png, print_json, print_table, start_stack, test_images
from _loadgen import machine_busy_s, process_cpu_s, run_clients

PEERS = ROOT / "bench" / "peers"
PREDICT = "/v1/models/latest/predict"
CLIENT_COUNTS = (1, 16)
#: The configurations measured by default: each peer's two best on this 2-core machine (bench/README.md has the
#: others tried); the ratio is taken against the best of them in each run.
DEFAULT_LITSERVE = ("w1b1", "w2b1")
DEFAULT_BENTOML = ("w2b1", "w2b16t1000")
CONFIG = re.compile(r"w(\d+)b(\d+)(?:t(\d+(?:\.\d+)?))?(z?)")


def descendants(root: int) -> list[int]:
    """`root` and every live process below it (from each process's ppid in /proc/<pid>/stat)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cpu_of(pids: list[int]) -> float:
    """CPU seconds the live processes among `pids` have used so far."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += process_cpu_s(pid)
    return total


def settle(pids: list[int], max_s: float = 60.0, below_cores: float = 0.05) -> dict[str, float]:
    """Wait (at most `max_s`) until `pids` (a server and the processes it started: for the service also its
    worker, which imports TensorFlow in the background once it is ready) use under `below_cores` of a core
    over a second, so no start-up work is measured. Returns how long it took and how many cores the machine
    as a whole kept busy in that last second (other people's work included)."""
    start = time.monotonic()
    while True:
        cpu, machine, t0 = cpu_of(pids), machine_busy_s(), time.perf_counter()
        time.sleep(1.0)
        wall = time.perf_counter() - t0
        mine, busy = (cpu_of(pids) - cpu) / wall, (machine_busy_s() - machine) / wall
        if mine < below_cores or time.monotonic() - start > max_s:
            return {"settle_s": time.monotonic() - start, "settled_server_cores": mine, "machine_busy_cores": busy}


@dataclass
class Server:
    """One server to measure: `service`, or a peer in one configuration."""

    kind: str  # service | litserve | bentoml
    config: str = ""  # w<workers>b<batch>[t<ms>] for a peer
    label: str = field(init=False)

    def __post_init__(self) -> None:
        self.label = self.kind if self.kind == "service" else f"{self.kind} {self.config}"

    def peer_env(self) -> dict[str, str]:
        match = CONFIG.fullmatch(self.config)
        if match is None:
            raise SystemExit(f"bad {self.kind} configuration {self.config!r}: expected w<workers>b<batch>[t<ms>][z]")
        workers, batch, wait, zmq = match.groups()
        if zmq and self.kind != "litserve":
            raise SystemExit(f"{self.config!r}: 'z' (LitServe's fast_queue) is for LitServe only")
        return {"PEER_WORKERS": workers, "PEER_MAX_BATCH": batch, "PEER_BATCH_WAIT_MS": wait or "5",
                "PEER_THREADS": "1", "PEER_FAST_QUEUE": "1" if zmq else "0"}


class Running:
    """A started server: its base URL, the pids to charge CPU to, and how to stop it."""

    def __init__(self, server: Server, model_dir: Path, work: Path) -> None:
        self.server = server
        self.stack: Any = None
        self.process: subprocess.Popen[bytes] | None = None
        self.log = work / f"{server.label.replace(' ', '-')}.log"
        if server.kind == "service":
            self.stack = start_stack([model_dir])
            self.base_url = self.stack.base_url
            return
        python = PEERS / ".venvs" / server.kind / "bin" / "python"
        if not python.is_file():
            raise SystemExit(f"{python} is missing: run bench/peers/setup.sh first")
        from service.launcher import free_port

        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        meta = json.loads((model_dir / "metadata.json").read_text())
        env = {**os.environ, **server.peer_env(), "PEER_TFLITE": str(model_dir / "model.tflite"),
               "PEER_CLASSES": json.dumps(meta.get("classes") or []), "PEER_MODEL_ID": model_dir.name,
               "BENTOML_HOME": str(work / "bentoml-home"), "BENTOML_DO_NOT_TRACK": "True",
               "PYTHONUNBUFFERED": "1"}
        if server.kind == "litserve":
            argv = [str(python), "litserve_server.py", "--port", str(port)]
        else:
            argv = [str(python), "-m", "bentoml", "serve", "bentoml_service:Classifier", "--host", "127.0.0.1",
                    "--port", str(port)]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(argv, cwd=PEERS, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        self._wait_ready(model_dir)

    def _wait_ready(self, model_dir: Path, timeout: float = 180.0) -> None:
        assert self.process is not None
        image = png(test_images(1, seed=9)[0][0])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.server.label} exited ({self.process.returncode}):\n{self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                response = httpx.post(self.base_url + PREDICT, files=[("file", ("a.png", image, "image/png"))],
                                      timeout=10)
                if response.status_code == 200:
                    return
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"{self.server.label} did not answer a predict in {timeout:.0f} s:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        if self.stack is not None:
            return str(self.stack.log_tails(lines))
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def server_pids(self) -> list[int]:
        """The processes whose CPU is the server's: the API process (and anything below it) for the service,
        the whole process tree for a peer."""
        root = self.stack.api.pid if self.stack is not None else self.process.pid  # type: ignore[union-attr]
        return descendants(root)

    def quiet_pids(self) -> list[int]:
        """Every process this server started (for the service: its API, workers and Redis)."""
        if self.stack is None:
            return self.server_pids()
        children = [self.stack.api, self.stack.dataset_worker, self.stack.redis_child, *self.stack.workers]
        return [pid for child in children if child is not None for pid in descendants(child.pid)]

    def stop(self) -> None:
        if self.stack is not None:
            self.stack.stop()
            return
        assert self.process is not None
        pids = descendants(self.process.pid)
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        deadline = time.monotonic() + 10
        for pid in pids[1:]:  # a worker its parent did not take down
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            with contextlib.suppress(ProcessLookupError):
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)


def code_state() -> str:
    """The commit the service runs from, and whether its code has uncommitted changes (they are measured too)."""
    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    dirty = git("status", "--porcelain", "--", "service", "worker").splitlines()
    return git("rev-parse", "--short", "HEAD") + (f" + uncommitted changes to {len(dirty)} file(s) of service/ and "
                                                  "worker/" if dirty else "")


def predictions(body: Any) -> list[dict[str, Any]]:
    """The prediction objects of an answer: `{"predictions": [...]}`, or a bare list (BentoML's batchable API)."""
    return list(body["predictions"] if isinstance(body, dict) else body)


def answers(base_url: str, headers: dict[str, str], files: list[bytes]) -> list[tuple[int, float]]:
    """(top-1 class, its probability) for each image, one request per image."""
    out = []
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:
        for data in files:
            response = client.post(PREDICT, files=[("file", ("img.png", data, "image/png"))])
            response.raise_for_status()
            top = predictions(response.json())[0]
            out.append((int(top["class_index"]), float(top["probability"])))
    return out


def measure(running: Running, headers: dict[str, str], files: list[bytes], check_files: list[bytes],
            totals: dict[int, int]) -> dict[str, Any]:
    """Warm-up, the agreement answers, then 1 and 16 clients; figures per client count."""
    result: dict[str, Any] = settle(running.quiet_pids())
    run_clients(running.base_url, headers, files, 16, 160)  # warm-up: connections, thread pools, batch sizes
    result["answers"] = answers(running.base_url, headers, check_files)
    pids = running.server_pids()
    result["server_processes"] = len(pids)
    for count in CLIENT_COUNTS:
        load_before = os.getloadavg()[0]
        load = run_clients(running.base_url, headers, files, count, totals[count], server_pids=pids)
        if load.errors:
            raise RuntimeError(f"{running.server.label}: {len(load.errors)} errors with {count} clients, first: "
                               f"{load.errors[0]}\n{running.tail()}")
        assert load.cpu is not None
        result[f"clients{count}"] = {"requests_per_s": load.requests_per_s, "latency": percentiles(load.latencies),
                                     "loadavg_before": load_before, **load.cpu.per_request(len(load.latencies))}
    lost = [pid for pid in pids if not alive(pid)]
    if lost:  # a process that died mid-run took its CPU figures with it
        result["processes_gone"] = lost
    return result


def run_once(servers: list[Server], model_dir: Path, work: Path, headers: dict[str, str], files: list[bytes],
             check_files: list[bytes], totals: dict[int, int], order_shift: int) -> dict[str, dict[str, Any]]:
    order = servers[order_shift % len(servers):] + servers[:order_shift % len(servers)]
    results: dict[str, dict[str, Any]] = {}
    for server in order:
        print(f"  {server.label} ...", flush=True)
        try:
            running = Running(server, model_dir, work)
            try:
                results[server.label] = result = measure(running, headers, files, check_files, totals)
            finally:
                running.stop()
        except Exception as exc:  # one server failing must not lose the others' figures
            print(f"  {server.label} FAILED: {exc}"[:3000], flush=True)
            results[server.label] = {"error": str(exc)[:3000]}
            continue
        print("  " + ", ".join(f"{count} client(s) {result[f'clients{count}']['requests_per_s']:.0f} req/s, server "
                               f"{result[f'clients{count}']['server_cpu_ms']:.2f} ms CPU, p50 "
                               f"{result[f'clients{count}']['latency']['p50_ms']:.1f} ms" for count in CLIENT_COUNTS)
              + f" (machine {result['machine_busy_cores']:.2f} cores busy before)", flush=True)
    return results


def agreement(results: dict[str, dict[str, Any]], names: list[str], labels: list[int]) -> list[list[Any]]:
    """Per server: top-1 agreement with `names[0]`, accuracy, largest top-1 probability gap."""
    reference = results[names[0]]["answers"]
    rows = []
    for name in names:
        mine = results[name]["answers"]
        same = sum(a[0] == b[0] for a, b in zip(mine, reference, strict=True))
        gap = max(abs(a[1] - b[1]) for a, b in zip(mine, reference, strict=True))
        correct = sum(a[0] == y for a, y in zip(mine, labels, strict=True))
        rows.append([name, f"{same}/{len(mine)}", correct / len(mine), f"{gap:.1e}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="a model directory with model.tflite (else a small one is trained)")
    parser.add_argument("--servers", default="service,litserve,bentoml", help="which, comma-separated")
    parser.add_argument("--litserve", nargs="+", default=list(DEFAULT_LITSERVE), metavar="CONFIG",
                        help=f"LitServe configurations (default {' '.join(DEFAULT_LITSERVE)})")
    parser.add_argument("--bentoml", nargs="+", default=list(DEFAULT_BENTOML), metavar="CONFIG",
                        help=f"BentoML configurations (default {' '.join(DEFAULT_BENTOML)})")
    parser.add_argument("--runs", type=int, default=1, help="repeat the whole round this many times")
    parser.add_argument("--requests", type=int, default=3200, help="requests with 16 clients (1 client: a quarter)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few requests")
    args = parser.parse_args()
    totals = {1: 100, 16: 480} if args.quick else {1: max(100, args.requests // 4), 16: args.requests}

    servers: list[Server] = []
    for kind in [s.strip() for s in args.servers.split(",") if s.strip()]:
        if kind == "service":
            servers.append(Server("service"))
        elif kind in ("litserve", "bentoml"):
            servers += [Server(kind, config) for config in getattr(args, kind)]
        else:
            raise SystemExit(f"unknown server {kind!r}: service, litserve or bentoml")
    for server in servers:
        if server.kind != "service":
            server.peer_env()  # refuse a bad configuration before anything starts

    x, y = test_images(256, seed=3)
    files = [png(image) for image in x]
    check_files, check_labels = files[:64 if args.quick else 200], y[:64 if args.quick else 200].tolist()
    from tests.integration.harness import API_KEY

    headers = {"Authorization": f"Bearer {API_KEY}"}  # the service wants it; the peers ignore it
    runs: list[dict[str, dict[str, Any]]] = []
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    code = code_state()
    with tempfile.TemporaryDirectory(prefix="tl-bench-") as tmp:
        work = Path(tmp)
        model_dir = ensure_model(args.model_dir, work)
        for run in range(args.runs):
            print(f"run {run + 1}/{args.runs} (load average {os.getloadavg()[0]:.2f})", flush=True)
            runs.append(run_once(servers, model_dir, work, headers, files, check_files, totals, run))

    labels = [s.label for s in servers]
    for index, results in enumerate(runs, 1):
        rows = []
        for label in labels:
            r = results[label]
            if "error" in r:
                rows.append([label, "-", "failed (see above)", "", "", "", "", "", "", "", ""])
                continue
            for count in CLIENT_COUNTS:
                c = r[f"clients{count}"]
                rows.append([label, count, c["requests_per_s"], c["latency"]["p50_ms"], c["latency"]["p99_ms"],
                             c["server_cpu_ms"], c["clients_cpu_ms"], c["other_cpu_ms"], c["busy_cores"],
                             c["loadavg_before"], c["ceiling_server_clients_requests_per_s"]])
        print_table(f"run {index}: single-image PNG predict, CPU ms per request by whom "
                    f"({os.cpu_count()} cores; server = its process tree)",
                    ["server", "clients", "req/s", "p50 ms", "p99 ms", "server CPU", "clients CPU", "other CPU",
                     "busy cores", "load avg", "ceiling req/s"], rows)
        print_table(f"run {index}: agreement on {len(check_files)} test images (against {labels[0]})",
                    ["server", "same top-1", "accuracy", "max top-1 prob diff"],
                    agreement(results, [label for label in labels if "error" not in results[label]], check_labels))

    summary: dict[str, Any] = {}
    rows = []
    ok = [label for label in labels if all("error" not in r[label] for r in runs)]
    for label in ok:
        row: list[Any] = [label]
        for count in CLIENT_COUNTS:
            rates = [r[label][f"clients{count}"]["requests_per_s"] for r in runs]
            cpu = [r[label][f"clients{count}"]["server_cpu_ms"] for r in runs]
            p50 = [r[label][f"clients{count}"]["latency"]["p50_ms"] for r in runs]
            summary[f"{label} clients{count}"] = {"requests_per_s": rates, "server_cpu_ms": cpu, "p50_ms": p50}
            row += [f"{min(rates):.0f}-{max(rates):.0f}", f"{min(cpu):.2f}-{max(cpu):.2f}",
                    f"{min(p50):.1f}-{max(p50):.1f}"]
        rows.append(row)
    print_table(f"over {len(runs)} run(s): min-max", ["server", "1 client req/s", "server CPU ms", "p50 ms",
                                                     "16 clients req/s", "server CPU ms", "p50 ms"], rows)
    peers = [s.label for s in servers if s.kind != "service" and s.label in ok]
    ratios: list[float] = []
    ceiling_ratios: list[float] = []
    if "service" in ok and peers:
        for r in runs:
            best = max(peers, key=lambda p: r[p]["clients16"]["requests_per_s"])
            ratios.append(r["service"]["clients16"]["requests_per_s"] / r[best]["clients16"]["requests_per_s"])
            print(f"service / best peer ({best}) at 16 clients: {ratios[-1]:.2f}x")
        print(f"service / best peer at 16 clients over {len(runs)} run(s): median {statistics.median(ratios):.2f}x, "
              f"min {min(ratios):.2f}x (goal >= 1.2x)")
        ceiling = "ceiling_server_clients_requests_per_s"
        for r in runs:
            best = max(peers, key=lambda p: r[p]["clients16"][ceiling])
            ceiling_ratios.append(r["service"]["clients16"][ceiling] / r[best]["clients16"][ceiling])
        print(f"the same for the CPU ceilings at 16 clients (cores / (server + clients CPU per request): what each "
              f"would serve alone on an idle machine): median {statistics.median(ceiling_ratios):.2f}x, "
              f"min {min(ceiling_ratios):.2f}x")
    for r in runs:
        for result in r.values():
            result.pop("answers", None)
    print(f"service code: {code}")
    print_json("side_by_side", {"started": started, "service_code": code, "runs": runs, "summary": summary,
                                "service_over_best_peer_16": ratios,
                                "service_over_best_peer_16_ceiling": ceiling_ratios, "totals": totals})


if __name__ == "__main__":
    main()
