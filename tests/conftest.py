"""Fixtures every test folder shares: the session's one Redis server (see testkit for the rest)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import testkit  # first: it puts the repository ahead of tests/ on sys.path
from s3kit import SeaweedS3, aws_environment, seaweed_s3

from service.launcher import ensure_redis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[testkit.RedisServer]:
    """The local Redis on 127.0.0.1:6379 (or `TL_TEST_REDIS_URL`) when it answers, else a throwaway bundled
    redis-server (stopped at the end of the session). Suites use a database index of their own on it
    (`testkit.*_DB`); two pytest sessions run at once on one machine need a Redis each (`TL_TEST_REDIS_URL`)."""
    workdir = tmp_path_factory.mktemp("redis")
    wanted = os.environ.get("TL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    child, url = ensure_redis(wanted, workdir, log_file=workdir / "redis.log")
    yield testkit.RedisServer.from_url(url)
    if child is not None:
        child.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A real S3 endpoint (SeaweedFS), started on first use and stopped at the end of the session, with the
    AWS_* variables pointing boto3 at it meanwhile."""
    with seaweed_s3(tmp_path_factory.mktemp("seaweedfs")) as server, aws_environment(server.endpoint):
        yield server


@pytest.fixture(scope="module")
def bucket(s3_server: SeaweedS3) -> str:
    """A bucket of the test module's own on the session's S3 endpoint."""
    return s3_server.new_bucket()
