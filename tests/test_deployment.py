"""The pieces of a deployment on several hosts that need no stack: `make api` and `make worker` (phony, so a
`worker/` folder never makes them "up to date"), the launcher's roles, Redis URLs with a password or TLS (the
password never shown), and Celery and redis-py both taking a `rediss://` URL as Settings leaves it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import redis
from celery.backends.redis import RedisBackend

from service.launcher import main as launcher_main
from worker.config import Settings, redacted, with_tls_defaults
from worker.queue import make_celery

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
@pytest.mark.parametrize(("target", "role"), [("api", "api"), ("worker", "worker")])
def test_make_api_and_make_worker_run_their_launcher_role_even_beside_a_folder_of_that_name(
        target: str, role: str) -> None:
    assert (ROOT / target).is_dir() or target == "api"  # `worker/` is the package: make must not see a file
    out = subprocess.run(["make", "-n", "-W", "pyproject.toml", target], cwd=ROOT, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert f"-m service.launcher --role {role}" in out.stdout
    assert "Nothing to be done" not in out.stdout + out.stderr


def test_the_launcher_knows_its_roles() -> None:
    with pytest.raises(SystemExit) as caught:
        launcher_main(["--role", "gpu"])
    assert caught.value.code == 2  # argparse: not a choice


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:s3cr3t@redis:6379/0", "redis://:***@redis:6379/0"),
    ("rediss://user:p%40ss@10.0.0.5:6380/1?ssl_cert_reqs=required",
     "rediss://user:***@10.0.0.5:6380/1?ssl_cert_reqs=required"),
    ("redis://[::1]:6379/0", "redis://[::1]:6379/0"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
])
def test_a_redis_url_is_shown_without_its_password(url: str, shown: str) -> None:
    assert redacted(url) == shown


def test_rediss_verifies_the_certificate_unless_told_otherwise() -> None:
    assert with_tls_defaults("rediss://:pw@h:6380/0") == "rediss://:pw@h:6380/0?ssl_cert_reqs=required"
    assert with_tls_defaults("rediss://h/0?ssl_ca_certs=/ca.pem") == (
        "rediss://h/0?ssl_ca_certs=/ca.pem&ssl_cert_reqs=required")
    assert with_tls_defaults("rediss://h/0?ssl_cert_reqs=none") == "rediss://h/0?ssl_cert_reqs=none"
    assert with_tls_defaults("redis://h/0") == "redis://h/0"
    assert Settings(redis_url="rediss://:pw@h:6380/0").redis_url.endswith("ssl_cert_reqs=required")


def test_celery_and_redis_py_accept_the_rediss_url_settings_give() -> None:
    settings = Settings(redis_url="rediss://:tl-secret-pw@redis.internal:6380/0?ssl_ca_certs=/etc/ssl/ca.pem")
    client = redis.Redis.from_url(settings.redis_url)
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["ssl_cert_reqs"] == "required" and kwargs["ssl_ca_certs"] == "/etc/ssl/ca.pem"
    assert kwargs["password"] == "tl-secret-pw"
    app = make_celery(settings)
    backend = app.backend
    assert isinstance(backend, RedisBackend)  # built without "A rediss:// URL must have parameter ssl_cert_reqs"
    assert backend.connparams["ssl_cert_reqs"] is not None
    shown = app.conf.humanize(with_defaults=False, censored=True)
    assert "redis.internal" in shown and "tl-secret-pw" not in shown
