"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

The compose file is parsed with PyYAML; commands are parsed with the real command-line definitions of
Celery and uvicorn (so an option that does not exist, or a bad value, fails here), the modules and objects
they name are imported, every `TL_*` variable is a Settings field whose value Settings accepts, and the
volumes line up with the directories the settings point at.
"""

from __future__ import annotations

import importlib
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from celery.bin.base import CLIContext
from celery.bin.celery import celery as celery_cli
from celery.bin.control import inspect as celery_inspect_cli
from celery.bin.worker import worker as celery_worker_cli
from uvicorn.main import main as uvicorn_cli

from worker.config import Settings
from worker.queue import TRAINING_QUEUE
from worker.tasks import app as celery_app

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
WORKERS = ("worker", "worker-cpu")
INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+)(?::?-([^}]*))?\}")


def interpolate(value: str) -> str:
    """`${VAR:-default}` -> default, as compose does when VAR is unset."""
    return INTERPOLATION.sub(lambda m: m.group(2) or "", value)


def parse(command: click.Command, args: list[str], obj: Any = None) -> dict[str, Any]:
    """Parse `args` with the real CLI definition; unknown options and bad values raise."""
    ctx = click.Context(command, obj=obj)
    command.parse_args(ctx, list(args))
    return ctx.params


def imported(target: str) -> Any:
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def environment(service: str) -> dict[str, str]:
    return {k: interpolate(str(v)) for k, v in (SERVICES[service].get("environment") or {}).items()}


def mounts(service: str) -> dict[str, str]:
    """Container path -> source (volume name or host path) of a service's volumes."""
    out = {}
    for entry in SERVICES[service].get("volumes", []):
        source, target, *_ = interpolate(entry).split(":")
        out[target] = source
    return out


def test_the_services_exist() -> None:
    assert set(SERVICES) == {"redis", "api", "worker", "worker-cpu"}


def test_redis_persists_append_only_on_a_volume_and_is_not_published() -> None:
    redis = SERVICES["redis"]
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert mounts("redis")["/data"] in COMPOSE["volumes"]
    assert "ports" not in redis
    assert [str(port) for port in redis["expose"]] == ["6379"]
    assert "redis-cli" in redis["healthcheck"]["test"] and "ping" in redis["healthcheck"]["test"]


def test_api_command_names_the_app_and_real_uvicorn_options() -> None:
    api = SERVICES["api"]
    assert api["command"][0] == "uvicorn"
    params = parse(uvicorn_cli, api["command"][1:])
    assert params["app"] == "service.main:app"
    from fastapi import FastAPI

    assert isinstance(imported(params["app"]), FastAPI)
    published = [str(p) for p in api["ports"]]
    assert len(published) == 1
    host_ip, _, container_port = interpolate(published[0]).rpartition(":")
    assert int(container_port) == params["port"]
    assert host_ip.startswith("127.0.0.1"), "the API is published on the host's loopback only"
    health = " ".join(api["healthcheck"]["test"])
    assert f"127.0.0.1:{params['port']}/readyz" in health
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"


@pytest.mark.parametrize("service", WORKERS)
def test_worker_command_names_the_app_and_real_celery_options(service: str) -> None:
    command = SERVICES[service]["command"]
    assert command[0] == "celery"
    split = command.index("worker")
    global_params = parse(celery_cli, command[1:split])
    assert imported(global_params["app"]) is celery_app
    params = parse(celery_worker_cli, command[split + 1:],
                   obj=CLIContext(app=celery_app, no_color=True, workdir=None, quiet=True))
    assert params["queues"] == [TRAINING_QUEUE]
    assert params["concurrency"] == 1
    assert params["pool"].__module__ == "celery.concurrency.prefork"
    assert SERVICES[service]["depends_on"]["redis"]["condition"] == "service_healthy"


@pytest.mark.parametrize("service", WORKERS)
def test_worker_healthcheck_pings_this_worker(service: str) -> None:
    kind, line = SERVICES[service]["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    argv = shlex.split(line.replace("$$HOSTNAME", "abc123"))
    assert argv[0] == "celery"
    split = argv.index("inspect")
    assert imported(parse(celery_cli, argv[1:split])["app"]) is celery_app
    params = parse(celery_inspect_cli, argv[split + 1:],
                   obj=CLIContext(app=celery_app, no_color=True, workdir=None, quiet=True))
    assert params["command"] == "ping"
    # The worker's command sets no node name, so Celery names it celery@<container hostname>.
    assert "-n" not in SERVICES[service]["command"] and "--hostname" not in SERVICES[service]["command"]
    assert params["destination"] == ["celery@abc123"]


def test_gpu_worker_reserves_one_nvidia_gpu_and_the_cpu_one_is_a_profile() -> None:
    devices = SERVICES["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "profiles" not in SERVICES["worker"]
    assert SERVICES["worker-cpu"]["profiles"] == ["cpu"]
    assert "deploy" not in SERVICES["worker-cpu"]
    assert SERVICES["worker"]["build"]["args"]["TF_EXTRA"] == "and-cuda"


@pytest.mark.parametrize("service", ["api", *WORKERS])
def test_environment_names_are_settings_and_their_values_valid(service: str) -> None:
    env = environment(service)
    fields = {f"TL_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= fields, f"not a setting: {sorted(set(env) - fields)}"
    settings = Settings(**{key[3:].lower(): value for key, value in env.items()})  # values Settings accepts
    assert settings.redis_url == "redis://redis:6379/0"
    assert "redis" in SERVICES and "6379" in [str(p) for p in SERVICES["redis"]["expose"]]


@pytest.mark.parametrize("service", ["api", *WORKERS])
def test_artifacts_volume_is_shared_at_the_artifact_dir(service: str) -> None:
    env = environment(service)
    assert mounts(service)[env["TL_ARTIFACT_DIR"]] == "artifacts"


@pytest.mark.parametrize("service", WORKERS)
def test_workers_mount_the_keras_cache_data_and_weights_where_settings_look(service: str) -> None:
    env, volumes = environment(service), mounts(service)
    assert volumes["/root/.keras"] == "keras-cache"
    assert env["TL_DATA_DIR"] in volumes and env["TL_WEIGHTS_DIR"] in volumes


def test_every_named_volume_is_declared_and_used() -> None:
    declared = set(COMPOSE["volumes"])
    used = {source for name in SERVICES for source in mounts(name).values()
            if not source.startswith((".", "/"))}
    assert used == declared


def test_dockerfile_provides_what_compose_builds() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for service in SERVICES.values():
        build = service.get("build")
        if build is None:
            continue
        assert (ROOT / build["context"] / build.get("dockerfile", "Dockerfile")).is_file()
        for arg in build.get("args", {}):
            assert re.search(rf"^ARG {arg}\b", dockerfile, re.MULTILINE), f"Dockerfile has no ARG {arg}"
    copied = set(re.findall(r"^COPY (\S+) ", dockerfile, re.MULTILINE))
    assert {"service", "worker"} <= copied
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "artifacts" in ignored and "data" in ignored


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker CLI")
def test_docker_compose_accepts_the_file() -> None:
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("the docker CLI has no compose plugin")
    result = subprocess.run(["docker", "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
