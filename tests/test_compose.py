"""docker-compose.yml, the Dockerfile and uv.lock, checked without a Docker engine.

The compose file is parsed with PyYAML; commands are parsed with the real command-line definitions of
Celery and uvicorn (so an option that does not exist, or a bad value, fails here), the modules and objects
they name are imported, every `TL_*` variable is a Settings field whose value Settings accepts, and the
volumes line up with the directories the settings point at. The Dockerfile's targets are read as text and
the packages each installs are followed through uv.lock (so the API image is shown to carry no TensorFlow).
"""

from __future__ import annotations

import importlib
import re
import shlex
import shutil
import subprocess
import tomllib
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
from worker.queue import DATASETS_QUEUE, TRAINING_QUEUE

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
WORKERS = ("worker", "worker-cpu")
#: Every Celery service: its app and the one queue it consumes.
CELERY_SERVICES = {"worker": ("worker.tasks:app", TRAINING_QUEUE), "worker-cpu": ("worker.tasks:app", TRAINING_QUEUE),
                   "datasets": ("worker.dataset_tasks:app", DATASETS_QUEUE)}
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
    assert set(SERVICES) == {"redis", "api", "worker", "worker-cpu", "datasets"}


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


@pytest.mark.parametrize("service", CELERY_SERVICES)
def test_worker_command_names_the_app_and_real_celery_options(service: str) -> None:
    command = SERVICES[service]["command"]
    assert command[0] == "celery"
    split = command.index("worker")
    global_params = parse(celery_cli, command[1:split])
    app_name, queue = CELERY_SERVICES[service]
    assert global_params["app"] == app_name
    app = imported(app_name)
    params = parse(celery_worker_cli, command[split + 1:],
                   obj=CLIContext(app=app, no_color=True, workdir=None, quiet=True))
    assert params["queues"] == [queue]
    assert params["concurrency"] == 1
    assert params["pool"].__module__ == "celery.concurrency.prefork"
    assert SERVICES[service]["depends_on"]["redis"]["condition"] == "service_healthy"


@pytest.mark.parametrize("service", CELERY_SERVICES)
def test_worker_healthcheck_pings_this_worker(service: str) -> None:
    kind, line = SERVICES[service]["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    argv = shlex.split(line.replace("$$HOSTNAME", "abc123"))
    assert argv[0] == "celery"
    split = argv.index("inspect")
    app_name, _ = CELERY_SERVICES[service]
    assert parse(celery_cli, argv[1:split])["app"] == app_name
    app = imported(app_name)
    params = parse(celery_inspect_cli, argv[split + 1:],
                   obj=CLIContext(app=app, no_color=True, workdir=None, quiet=True))
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


def test_each_service_builds_its_own_dockerfile_target() -> None:
    targets = {name: SERVICES[name]["build"]["target"] for name in ("api", *WORKERS)}
    assert targets == {"api": "api", "worker": "worker-cuda", "worker-cpu": "worker"}
    images = {SERVICES[name]["image"] for name in targets}
    assert len(images) == len(targets), "two different builds under one image name"


@pytest.mark.parametrize("service", ["api", *CELERY_SERVICES])
def test_environment_names_are_settings_and_their_values_valid(service: str) -> None:
    env = environment(service)
    fields = {f"TL_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= fields, f"not a setting: {sorted(set(env) - fields)}"
    settings = Settings(**{key[3:].lower(): value for key, value in env.items()})  # values Settings accepts
    assert settings.redis_url == "redis://redis:6379/0"
    assert "redis" in SERVICES and "6379" in [str(p) for p in SERVICES["redis"]["expose"]]


@pytest.mark.parametrize("service", ["api", *CELERY_SERVICES])
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
        if "target" in build:
            assert build["target"] in STAGES, f"the Dockerfile has no stage {build['target']}"
    copied = set(re.findall(r"^COPY (\S+) ", dockerfile, re.MULTILINE))
    assert {"service", "worker"} <= copied
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "artifacts" in ignored and "data" in ignored
    assert "uv.lock" not in ignored and "pyproject.toml" not in ignored


# ----- the Dockerfile's stages and what each installs from uv.lock -----

def dockerfile_stages() -> dict[str, tuple[str, list[str]]]:
    """Stage name -> (the image or stage it starts FROM, its instructions with continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    stages: dict[str, tuple[str, list[str]]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"FROM (\S+) AS (\S+)", line)
        if match:
            current = []
            stages[match.group(2)] = (match.group(1), current)
        else:
            current.append(line)
    return stages


STAGES = dockerfile_stages()
LOCK = tomllib.loads((ROOT / "uv.lock").read_text())
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
TENSORFLOW = {"tensorflow", "keras", "tf-keras", "tensorflow-cpu"}


def lineage(stage: str) -> list[str]:
    """The stage and the stages it is built FROM, oldest first."""
    chain = []
    while stage in STAGES:
        chain.insert(0, stage)
        stage = STAGES[stage][0]
    return chain


def installed_by(target: str) -> tuple[str, list[list[str]]]:
    """(the stage whose /opt/venv the target copies, the `uv sync` argument lists that made it)."""
    copies = [line.split() for line in STAGES[target][1] if line.startswith("COPY --from=")]
    sources = [words[1].removeprefix("--from=") for words in copies if words[2] == "/opt/venv"]
    assert len(sources) == 1, f"{target} should copy one /opt/venv"
    syncs = [shlex.split(line)[1:] for stage in lineage(sources[0]) for line in STAGES[stage][1]
             if line.startswith("RUN") and " uv sync " in line]
    return sources[0], [args[args.index("sync") + 1:] for args in syncs]


def extras(sync_args: list[str]) -> set[str]:
    return {sync_args[i + 1] for i, arg in enumerate(sync_args) if arg == "--extra"}


def locked_closure(extra_names: set[str]) -> set[str]:
    """Every package uv.lock can install for the project with these extras (all platforms: a superset)."""
    packages = {p["name"]: p for p in LOCK["package"]}
    seen: set[str] = set()
    todo = [(PROJECT["project"]["name"], frozenset(extra_names))]
    while todo:
        name, wanted = todo.pop()
        key = f"{name}[{','.join(sorted(wanted))}]"
        if key in seen:
            continue
        seen.add(key)
        package = packages[name]
        deps = list(package.get("dependencies", []))
        for extra in wanted:
            deps += package.get("optional-dependencies", {}).get(extra, [])
        todo += [(dep["name"], frozenset(dep.get("extra", []))) for dep in deps]
    return {key.split("[", 1)[0] for key in seen} - {PROJECT["project"]["name"]}


def test_images_install_from_the_lock_dependencies_before_sources() -> None:
    for target in ("api", "worker", "worker-cuda"):
        deps_stage, syncs = installed_by(target)
        assert syncs, f"{target}: no `uv sync` makes its venv"
        for args in syncs:
            # --locked: the build fails when uv.lock is stale; the project itself is not installed (PYTHONPATH).
            assert {"--locked", "--no-dev", "--no-install-project"} <= set(args), args
        for stage in lineage(deps_stage):
            copies = [line for line in STAGES[stage][1] if line.startswith("COPY")]
            assert all(line.split()[1:-1] == ["pyproject.toml", "uv.lock"] for line in copies), \
                f"{stage}: the dependency layers see only pyproject.toml and uv.lock, not {copies}"
        # The sources come after the venv, in the image's own stage.
        lines = STAGES[target][1]
        venv = next(i for i, line in enumerate(lines) if line.startswith("COPY --from="))
        assert all(lines.index(f"COPY {d} ./{d}") > venv for d in ("service", "worker"))
        assert any("PYTHONPATH=/app" in line for stage in lineage(target) for line in STAGES[stage][1])


def test_the_api_image_carries_no_tensorflow_and_the_workers_do() -> None:
    wanted = {target: set().union(*map(extras, installed_by(target)[1])) for target in ("api", "worker", "worker-cuda")}
    assert wanted == {"api": set(), "worker": {"train"}, "worker-cuda": {"train", "cuda"}}
    api = locked_closure(wanted["api"])
    assert not api & TENSORFLOW, f"the API image would install {sorted(api & TENSORFLOW)}"
    assert {"fastapi", "uvicorn", "ai-edge-litert", "celery", "redis", "pillow"} <= api
    worker = locked_closure(wanted["worker"])
    assert {"tensorflow", "keras", "matplotlib"} <= worker and not any(n.startswith("nvidia-") for n in worker)
    assert any(n.startswith("nvidia-cudnn") for n in locked_closure(wanted["worker-cuda"]))


def test_the_dockerfile_and_the_makefile_pin_the_same_uv() -> None:
    dockerfile = re.search(r"^ARG UV_VERSION=(\S+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    makefile = re.search(r"^UV_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert dockerfile and makefile and dockerfile.group(1) == makefile.group(1)


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "uv").exists(), reason="no .venv/bin/uv (make install puts it there)")
def test_the_lock_matches_pyproject() -> None:
    result = subprocess.run([str(ROOT / ".venv" / "bin" / "uv"), "lock", "--locked", "--offline"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, f"uv.lock is stale: run `make lock`\n{result.stderr}"


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker CLI")
def test_docker_compose_accepts_the_file() -> None:
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("the docker CLI has no compose plugin")
    result = subprocess.run(["docker", "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
