"""docker-compose.yml, docker-compose.gpu.yml, .env.example, the Dockerfile and uv.lock, checked without Docker.

The compose files are parsed with PyYAML and interpolated as compose would with the required variables
(`${VAR:?message}`) set to test values; commands are parsed with the real command-line definitions of Celery
and uvicorn (so an option that does not exist, or a bad value, fails here), the modules and objects they name
are imported, every `TL_*` variable is a Settings field whose value Settings accepts, the Redis and S3
addresses name the services (or the main host) that serve them, and every cache is on a volume of its own.
Redis's command and health check are run against the bundled redis-server. The Dockerfile's targets are read
as text and the packages each installs are followed through uv.lock (so the API image carries no TensorFlow).
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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
from worker.store.s3 import parse_url

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.gpu.yml")
RAW = {name: (ROOT / name).read_text() for name in COMPOSE_FILES}
COMPOSE = yaml.safe_load(RAW["docker-compose.yml"])
SERVICES: dict[str, Any] = COMPOSE["services"]
GPU_COMPOSE = yaml.safe_load(RAW["docker-compose.gpu.yml"])
GPU_SERVICES: dict[str, Any] = GPU_COMPOSE["services"]
WORKERS = ("worker", "worker-cpu")
APP_SERVICES = ("api", "datasets", *WORKERS)
#: Every Celery service: its app and the one queue it consumes.
CELERY_SERVICES = {"worker": ("worker.tasks:app", TRAINING_QUEUE), "worker-cpu": ("worker.tasks:app", TRAINING_QUEUE),
                   "datasets": ("worker.dataset_tasks:app", DATASETS_QUEUE)}
GPU_WORKER = re.compile(r"worker-gpu(\d+)")
#: The variables compose must refuse to start without (`${VAR:?message}`), and the values the tests give them.
REQUIRED = {"REDIS_PASSWORD": "test0redis0password", "MINIO_ROOT_USER": "test-minio-user",
            "MINIO_ROOT_PASSWORD": "test-minio-password", "MAIN_HOST": "10.0.0.5"}
#: `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?message}`, `${VAR?message}`.
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
AWS_VARIABLES = {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"}
OFFICIAL_MINIO = re.compile(r"minio/(minio|mc):RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ")


def _substitute(match: re.Match[str]) -> str:
    name, operator, argument = match.groups()
    if name in REQUIRED:
        return REQUIRED[name]
    if operator and operator.endswith("?"):
        raise AssertionError(f"{name} is required (`{match.group(0)}`) but has no test value in REQUIRED")
    return argument if operator else ""  # unset: the default, or empty


def interpolate(value: str) -> str:
    """What compose makes of `value` when only the REQUIRED variables are set: `${VAR:-default}` -> default,
    `${VAR:?message}` -> the test value, `$$` -> `$`."""
    return "$".join(INTERPOLATION.sub(_substitute, part) for part in value.split("$$"))


def variables(text: str) -> list[tuple[str, str, str]]:
    """(name, operator, argument) of every interpolation in `text` (`$${...}` is no interpolation)."""
    return [m.groups(default="") for part in text.split("$$") for m in INTERPOLATION.finditer(part)]


def parse(command: click.Command, args: list[str], obj: Any = None) -> dict[str, Any]:
    """Parse `args` with the real CLI definition; unknown options and bad values raise."""
    ctx = click.Context(command, obj=obj)
    command.parse_args(ctx, list(args))
    return ctx.params


def imported(target: str) -> Any:
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def environment(service: str, services: dict[str, Any] = SERVICES) -> dict[str, str]:
    return {k: interpolate(str(v)) for k, v in (services[service].get("environment") or {}).items()}


def mounts(service: str, services: dict[str, Any] = SERVICES) -> dict[str, str]:
    """Container path -> source (volume name or host path) of a service's volumes."""
    out = {}
    for entry in services[service].get("volumes", []):
        source, target, *_ = interpolate(entry).split(":")
        out[target] = source
    return out


def named(source: str) -> bool:
    return not source.startswith((".", "/", "~"))


def settings_of(env: dict[str, str]) -> Settings:
    """Settings from a service's environment: every TL_ name a field, every value accepted."""
    fields = {f"TL_{name.upper()}" for name in Settings.model_fields}
    tl = {key: value for key, value in env.items() if key.startswith("TL_")}
    assert set(tl) <= fields, f"not a setting: {sorted(set(tl) - fields)}"
    assert set(env) - set(tl) <= AWS_VARIABLES, f"neither a setting nor boto3's: {sorted(set(env) - set(tl))}"
    return Settings(**{key[3:].lower(): value for key, value in tl.items()})


def published(service: dict[str, Any]) -> dict[int, str]:
    """Container port -> the raw (uninterpolated) host address it is published on."""
    out = {}
    for entry in service.get("ports", []):
        host, _, container = str(entry).rpartition(":")
        address, _, _ = host.rpartition(":") if host.count(":") else ("", "", host)
        out[int(container)] = address
    return out


def check_celery_command(service: dict[str, Any], app_name: str, queue: str) -> None:
    command = service["command"]
    assert command[0] == "celery"
    split = command.index("worker")
    global_params = parse(celery_cli, command[1:split])
    assert global_params["app"] == app_name
    app = imported(app_name)
    params = parse(celery_worker_cli, command[split + 1:],
                   obj=CLIContext(app=app, no_color=True, workdir=None, quiet=True))
    assert params["queues"] == [queue]
    assert params["concurrency"] == 1
    assert params["pool"].__module__ == "celery.concurrency.prefork"


def check_celery_healthcheck(service: dict[str, Any], app_name: str) -> None:
    kind, line = service["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    argv = shlex.split(interpolate(line).replace("$HOSTNAME", "abc123"))
    assert argv[0] == "celery"
    split = argv.index("inspect")
    assert parse(celery_cli, argv[1:split])["app"] == app_name
    app = imported(app_name)
    params = parse(celery_inspect_cli, argv[split + 1:],
                   obj=CLIContext(app=app, no_color=True, workdir=None, quiet=True))
    assert params["command"] == "ping"
    # The worker's command sets no node name, so Celery names it celery@<container hostname>.
    assert "-n" not in service["command"] and "--hostname" not in service["command"]
    assert params["destination"] == ["celery@abc123"]


# ----- docker-compose.yml: the main host -----

def test_the_services_exist() -> None:
    assert set(SERVICES) == {"redis", "minio", "minio-init", "api", "worker", "worker-cpu", "datasets"}


def test_interpolation_is_modelled_as_compose_does_it() -> None:
    assert interpolate("${A:-x}/${REDIS_PASSWORD:?say}/${B}/$${C}/$$D") == f"x/{REQUIRED['REDIS_PASSWORD']}//${{C}}/$D"
    with pytest.raises(AssertionError, match="NOT_GIVEN is required"):
        interpolate("${NOT_GIVEN:?set it}")


@pytest.mark.parametrize("file", COMPOSE_FILES)
def test_required_variables_are_required_wherever_they_are_used(file: str) -> None:
    for name, operator, argument in variables(RAW[file]):
        if name in REQUIRED:
            assert operator == ":?" and argument, f"{file}: ${{{name}}} without `:?message` (compose would run " \
                                                  "with it empty)"
        else:
            assert operator in (":-", "-"), f"{file}: ${{{name}}} has no default and is not required"


def test_redis_requires_the_password_and_persists_append_only() -> None:
    redis = SERVICES["redis"]
    raw = redis["command"]
    command = [interpolate(arg) for arg in raw]
    assert command[0] == "redis-server", "the image drops to the redis user only for a redis-server command"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--requirepass") + 1] == REQUIRED["REDIS_PASSWORD"]
    assert raw[raw.index("--requirepass") + 1].startswith("${REDIS_PASSWORD:?")
    assert mounts("redis")["/data"] in COMPOSE["volumes"]


def test_redis_healthcheck_authenticates_without_the_password_on_its_command_line() -> None:
    redis = SERVICES["redis"]
    assert environment("redis")["REDISCLI_AUTH"] == REQUIRED["REDIS_PASSWORD"]
    test = redis["healthcheck"]["test"]
    line = " ".join(test[1:])
    argv = shlex.split(line)
    assert argv[0] == "redis-cli" and "ping" in argv
    assert REQUIRED["REDIS_PASSWORD"] not in interpolate(line) and "PASSWORD" not in line
    assert not {"-a", "--pass", "--askpass", "--user"} & set(argv)
    # redis-cli may exit 0 on an error reply (NOAUTH): the check needs the PONG.
    assert test[0] == "CMD-SHELL" and "grep -q PONG" in line


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "redis-server").exists(), reason="no bundled redis-server")
def test_redis_command_and_healthcheck_work_on_a_real_redis(tmp_path: Path) -> None:
    """The compose command's options on the bundled redis-server: the health check passes with REDISCLI_AUTH
    and fails without it, and the services' TL_REDIS_URL (pointed at this server) is accepted."""
    import redis as redis_py

    venv_bin = ROOT / ".venv" / "bin"
    port = _free_port()
    command = [interpolate(arg) for arg in SERVICES["redis"]["command"]]
    server = subprocess.Popen([str(venv_bin / "redis-server"), *command[1:], "--port", str(port),
                               "--bind", "127.0.0.1", "--dir", str(tmp_path), "--save", ""],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # The health check's redis-cli, aimed at this server's port.
        shim = tmp_path / "bin"
        shim.mkdir()
        (shim / "redis-cli").write_text(f'#!/bin/sh\nexec "{venv_bin / "redis-cli"}" -p {port} "$@"\n')
        (shim / "redis-cli").chmod(0o755)
        line = " ".join(SERVICES["redis"]["healthcheck"]["test"][1:])
        base = {"PATH": f"{shim}:/usr/bin:/bin"}

        def healthy(env: dict[str, str]) -> bool:
            return subprocess.run(["sh", "-c", line], env={**base, **env}, capture_output=True).returncode == 0

        for _ in range(100):
            if healthy(environment("redis")):
                break
            time.sleep(0.05)
        assert healthy(environment("redis")), "the health check fails with REDISCLI_AUTH set"
        assert not healthy({}), "the health check passes without the password: Redis requires none?"
        assert not healthy({"REDISCLI_AUTH": "wrong"})
        url = urlsplit(settings_of(environment("api")).redis_url)
        local = url._replace(netloc=f":{url.password}@127.0.0.1:{port}").geturl()
        client = redis_py.Redis.from_url(local)
        try:
            assert client.ping()
        finally:
            client.close()
    finally:
        server.terminate()
        server.wait(10)


@pytest.mark.parametrize(("service", "port", "variable"), [("redis", 6379, "REDIS_BIND"),
                                                           ("minio", 9000, "MINIO_BIND")])
def test_redis_and_minio_are_published_on_their_bind_address_loopback_by_default(
        service: str, port: int, variable: str) -> None:
    ports = published(SERVICES[service])
    assert ports[port] == f"${{{variable}:-127.0.0.1}}"
    assert all(address == "127.0.0.1" for other, address in ports.items() if other != port), \
        f"{service} publishes {ports}: anything but port {port} stays on the loopback"


def test_minio_is_the_official_image_pinned_with_a_healthcheck_and_a_volume() -> None:
    minio = SERVICES["minio"]
    assert OFFICIAL_MINIO.fullmatch(minio["image"]) and minio["image"].startswith("minio/minio:")
    assert minio["command"][:2] == ["server", "/data"]
    assert minio["command"][minio["command"].index("--console-address") + 1] == ":9001"
    env = environment("minio")
    assert env == {name: REQUIRED[name] for name in ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD")}
    assert mounts("minio")["/data"] in COMPOSE["volumes"]
    # The image ships mc and no curl; `mc ready local` is MinIO's documented probe.
    assert minio["healthcheck"]["test"] == ["CMD", "mc", "ready", "local"]


def _init_steps() -> list[list[str]]:
    init = SERVICES["minio-init"]
    assert init["entrypoint"] == ["/bin/sh", "-c"]
    (script,) = init["command"]
    words = shlex.split(interpolate(script).replace(">/dev/null", ""))
    steps, current = [], []
    for word in words:
        if word == "&&":
            steps.append(current)
            current = []
        else:
            current.append(word)
    return [*steps, current]


def test_minio_init_creates_the_bucket_the_services_use() -> None:
    init = SERVICES["minio-init"]
    assert OFFICIAL_MINIO.fullmatch(init["image"]) and init["image"].startswith("minio/mc:")
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    assert init.get("restart", "no") == "no", "a one-shot: it must exit, not restart"
    alias, make_bucket = _init_steps()
    # The credentials come from its environment ($VAR, expanded by its shell), not from the command line text.
    assert alias == ["mc", "alias", "set", "local", "http://minio:9000", "$MINIO_ROOT_USER", "$MINIO_ROOT_PASSWORD"]
    assert environment("minio-init") == environment("minio")
    assert make_bucket[:3] == ["mc", "mb", "--ignore-existing"]
    bucket = make_bucket[3].removeprefix("local/")
    assert re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket), f"not a valid bucket name: {bucket}"
    for service in APP_SERVICES:
        assert parse_url(environment(service)["TL_ARTIFACT_URL"])[0] == bucket
        assert environment(service)["AWS_ENDPOINT_URL"] == alias[4]


@pytest.mark.parametrize("service", APP_SERVICES)
def test_app_services_wait_for_redis_and_the_bucket(service: str) -> None:
    depends = SERVICES[service]["depends_on"]
    assert depends["redis"]["condition"] == "service_healthy"
    assert depends["minio-init"]["condition"] == "service_completed_successfully"


def test_api_command_names_the_app_and_real_uvicorn_options() -> None:
    api = SERVICES["api"]
    assert api["command"][0] == "uvicorn"
    params = parse(uvicorn_cli, api["command"][1:])
    assert params["app"] == "service.main:app"
    from fastapi import FastAPI

    assert isinstance(imported(params["app"]), FastAPI)
    ports = [str(p) for p in api["ports"]]
    assert len(ports) == 1
    host_ip, _, container_port = interpolate(ports[0]).rpartition(":")
    assert int(container_port) == params["port"]
    assert host_ip.startswith("127.0.0.1"), "the API is published on the host's loopback only"
    health = " ".join(api["healthcheck"]["test"])
    assert f"127.0.0.1:{params['port']}/readyz" in health


@pytest.mark.parametrize("service", CELERY_SERVICES)
def test_worker_command_names_the_app_and_real_celery_options(service: str) -> None:
    check_celery_command(SERVICES[service], *CELERY_SERVICES[service])


@pytest.mark.parametrize("service", CELERY_SERVICES)
def test_worker_healthcheck_pings_this_worker(service: str) -> None:
    check_celery_healthcheck(SERVICES[service], CELERY_SERVICES[service][0])


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


@pytest.mark.parametrize("service", APP_SERVICES)
def test_environment_names_are_settings_and_their_values_valid(service: str) -> None:
    env = environment(service)
    settings = settings_of(env)
    redis_url = urlsplit(settings.redis_url)
    assert (redis_url.scheme, redis_url.hostname, redis_url.port, redis_url.path) == ("redis", "redis", 6379, "/0")
    assert redis_url.password == REQUIRED["REDIS_PASSWORD"], "Redis requires a password: the URL must carry it"
    assert 6379 in published(SERVICES["redis"])
    assert settings.artifact_url and settings.artifact_url.startswith("s3://")
    bucket, prefix = parse_url(settings.artifact_url)
    assert bucket and prefix
    assert set(env) >= AWS_VARIABLES
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000" and 9000 in published(SERVICES["minio"])
    minio = environment("minio")
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (minio["MINIO_ROOT_USER"],
                                                                       minio["MINIO_ROOT_PASSWORD"])
    assert env["AWS_REGION"]


def test_boto3_reads_the_endpoint_and_addresses_the_bucket_by_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """`http://minio:9000/<bucket>`: path-style, since `<bucket>.minio` would not resolve on the network."""
    import boto3

    env = environment("api")
    for name in AWS_VARIABLES:
        monkeypatch.setenv(name, env[name])
    bucket, _ = parse_url(env["TL_ARTIFACT_URL"])
    client = boto3.client("s3")
    seen: list[str] = []

    class Sent(Exception):
        pass

    def capture(request: Any, **_: Any) -> None:
        seen.append(request.url)
        raise Sent

    client.meta.events.register("before-send", capture)
    with pytest.raises(Sent):
        client.head_bucket(Bucket=bucket)
    assert seen == [f"http://minio:9000/{bucket}"]


@pytest.mark.parametrize("service", APP_SERVICES)
def test_each_app_service_keeps_its_caches_on_a_volume_of_its_own(service: str) -> None:
    env, volumes = environment(service), mounts(service)
    cache = volumes.get(env["TL_CACHE_DIR"])
    assert cache and named(cache), f"{service}: TL_CACHE_DIR is not on a named volume"
    assert "TL_ARTIFACT_DIR" not in env, "unused with TL_ARTIFACT_URL: no shared artifact directory"


@pytest.mark.parametrize("service", WORKERS)
def test_workers_mount_the_keras_cache_data_and_weights_where_settings_look(service: str) -> None:
    env, volumes = environment(service), mounts(service)
    assert named(volumes["/root/.keras"])
    assert volumes[env["TL_DATA_DIR"]] == "./data" and volumes[env["TL_WEIGHTS_DIR"]] == "./weights"
    assert all(entry.endswith(":ro") for entry in SERVICES[service]["volumes"] if not named(interpolate(entry)))


@pytest.mark.parametrize("file", COMPOSE_FILES)
def test_every_named_volume_is_declared_used_and_never_shared(file: str) -> None:
    compose = yaml.safe_load(RAW[file])
    services = compose["services"]
    users = Counter(source for name in services for source in set(mounts(name, services).values())
                    if named(source))
    assert set(users) == set(compose["volumes"])
    shared = sorted(volume for volume, count in users.items() if count > 1)
    assert not shared, f"{file}: volumes mounted by more than one service (caches are never shared): {shared}"


# ----- docker-compose.gpu.yml: a GPU host's training workers -----

def test_the_gpu_host_runs_only_training_workers() -> None:
    assert GPU_SERVICES and all(GPU_WORKER.fullmatch(name) for name in GPU_SERVICES), sorted(GPU_SERVICES)
    assert GPU_COMPOSE["name"] != COMPOSE["name"], "its own project name: both files may run on one host"
    for service in GPU_SERVICES.values():
        assert service["build"] == SERVICES["worker"]["build"] and service["image"] == SERVICES["worker"]["image"]
        assert "ports" not in service and "depends_on" not in service and "profiles" not in service


def test_each_gpu_worker_reserves_exactly_its_own_gpu() -> None:
    ids = []
    for name, service in GPU_SERVICES.items():
        deploy = service["deploy"]
        assert set(deploy) == {"resources"}, f"{name}: no replicas or other deploy keys: {deploy}"
        assert set(deploy["resources"]) == {"reservations"}
        (device,) = deploy["resources"]["reservations"]["devices"]
        assert device == {"driver": "nvidia", "device_ids": [device["device_ids"][0]], "capabilities": ["gpu"]}, \
            f"{name}: one device by id, no count: {device}"
        assert device["device_ids"] == [GPU_WORKER.fullmatch(name).group(1)], f"{name} reserves another GPU"
        ids += device["device_ids"]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("service", GPU_SERVICES)
def test_gpu_worker_command_and_healthcheck(service: str) -> None:
    assert GPU_SERVICES[service]["command"] == SERVICES["worker"]["command"]
    check_celery_command(GPU_SERVICES[service], "worker.tasks:app", TRAINING_QUEUE)
    check_celery_healthcheck(GPU_SERVICES[service], "worker.tasks:app")


@pytest.mark.parametrize("service", GPU_SERVICES)
def test_gpu_workers_reach_redis_and_the_store_on_the_main_host(service: str) -> None:
    raw = GPU_SERVICES[service]["environment"]
    assert "${MAIN_HOST:?" in raw["TL_REDIS_URL"] and "${MAIN_HOST:?" in raw["AWS_ENDPOINT_URL"]
    env = environment(service, GPU_SERVICES)
    settings = settings_of(env)
    redis_url = urlsplit(settings.redis_url)
    assert (redis_url.hostname, redis_url.port, redis_url.password) == (REQUIRED["MAIN_HOST"], 6379,
                                                                         REQUIRED["REDIS_PASSWORD"])
    assert 6379 in published(SERVICES["redis"]) and 9000 in published(SERVICES["minio"])
    assert env["AWS_ENDPOINT_URL"] == f"http://{REQUIRED['MAIN_HOST']}:9000"
    # Otherwise exactly the main host's worker settings: the same bucket, credentials, directories.
    main = environment("worker")
    main.pop("TL_API_KEY", None)
    differs = {key for key in main.keys() | env.keys() if main.get(key) != env.get(key)}
    assert differs == {"TL_REDIS_URL", "AWS_ENDPOINT_URL"}
    assert urlsplit(main["TL_REDIS_URL"])._replace(netloc="") == redis_url._replace(netloc="")


@pytest.mark.parametrize("service", GPU_SERVICES)
def test_gpu_workers_mount_their_caches_data_and_weights(service: str) -> None:
    env, volumes = environment(service, GPU_SERVICES), mounts(service, GPU_SERVICES)
    assert named(volumes[env["TL_CACHE_DIR"]]) and named(volumes["/root/.keras"])
    main = mounts("worker")
    for path in (env["TL_DATA_DIR"], env["TL_WEIGHTS_DIR"]):
        assert volumes[path] == main[path]
    assert sorted(e for e in GPU_SERVICES[service]["volumes"] if not named(interpolate(e))) == \
        sorted(e for e in SERVICES["worker"]["volumes"] if not named(interpolate(e)))


# ----- .env.example, .gitignore, .dockerignore -----

def env_example() -> dict[str, str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    assert all(len(pair) == 2 for pair in pairs)
    names = [name for name, _ in pairs]
    assert len(names) == len(set(names)), "a variable listed twice"
    return dict(pairs)


def test_env_example_lists_every_variable_the_compose_files_read() -> None:
    used = {name for file in COMPOSE_FILES for name, _, _ in variables(RAW[file])}
    assert set(env_example()) == used


def test_env_example_defaults_match_the_compose_files_and_secrets_are_blank() -> None:
    example = env_example()
    for file in COMPOSE_FILES:
        for name, operator, argument in variables(RAW[file]):
            if operator.endswith("-"):
                assert example[name] == argument, f"{file}: ${{{name}}} defaults to {argument!r}, " \
                                                  f".env.example says {example[name]!r}"
    # Left empty, so compose refuses to start until they are set (no placeholder password ever runs).
    assert example["REDIS_PASSWORD"] == example["MINIO_ROOT_PASSWORD"] == example["MAIN_HOST"] == ""
    assert len(example["MINIO_ROOT_USER"]) >= 3


def test_env_is_neither_committed_nor_sent_to_docker() -> None:
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    assert ".env" in (ROOT / ".dockerignore").read_text().split()
    assert ".env.example" not in (ROOT / ".gitignore").read_text().split()
    if shutil.which("git") and (ROOT / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT).returncode
        assert ignored == 0, "git does not ignore .env"


def test_dockerfile_provides_what_compose_builds() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for service in [*SERVICES.values(), *GPU_SERVICES.values()]:
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
    assert ".venv" in ignored and "artifacts" in ignored and "data" in ignored and ".env" in ignored
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
@pytest.mark.parametrize("file", COMPOSE_FILES)
def test_docker_compose_accepts_the_file(file: str, tmp_path: Path) -> None:
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("the docker CLI has no compose plugin")
    empty = tmp_path / "empty.env"
    empty.write_text("")
    base = [name for name in os.environ if name not in REQUIRED]
    command = ["docker", "compose", "--env-file", str(empty), "-f", str(ROOT / file), "--profile", "cpu",
               "config", "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                            env={**{name: os.environ[name] for name in base}, **REQUIRED})
    assert result.returncode == 0, result.stderr
    # Without the required variables compose refuses to start, naming one.
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                            env={name: os.environ[name] for name in base})
    assert result.returncode != 0 and any(name in result.stderr for name in REQUIRED), result.stderr
