"""The one place configuration is read: a typed `Settings` from `TL_*` environment variables.

Both sides use it: the API (`service`), the Celery worker and the command line. Bad values stop
start-up with a message naming the variable (pydantic-settings validation).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The exports `TL_EXPORTS` may ask for (model.keras and the served float32 model.tflite are always made).
EXTRA_EXPORTS = ("tflite-float16", "tflite-int8", "savedmodel")


class Settings(BaseSettings):
    """Every `TL_*` variable the service reads; see the README's configuration table."""

    model_config = SettingsConfigDict(env_prefix="TL_", extra="ignore", frozen=True)

    # --- shared/API.md's table ---
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker, result backend and job store "
                           "(`redis://:PASSWORD@host:6379/0`; `rediss://` for TLS, certificate verified; never logged "
                           "with its password)")
    artifact_dir: Path = Field(Path("./artifacts"), description="models and cached features are written here")
    data_dir: Path = Field(Path("./data"), description="looked in first for CIFAR-10")
    artifact_url: str | None = Field(None, description="s3://bucket/prefix: models and datasets in S3-compatible "
                                     "object storage (AWS_ENDPOINT_URL and AWS_* credentials) instead of "
                                     "TL_ARTIFACT_DIR; the bucket must exist")
    cache_dir: Path = Field(Path("./cache"), description="with TL_ARTIFACT_URL, this host's own caches (models and "
                                                        "datasets downloaded from the store, features, decoded "
                                                        "data, export templates); never shared, safe to delete")
    weights_dir: Path | None = Field(None, description="looked in first for MobileNetV2 ImageNet weights")
    api_key: str | None = Field(None, description="bearer token required on /v1 routes when set")
    port: int = Field(8000, ge=1, le=65535, description="API port for the quick-start command")
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="largest predict request body")
    max_batch: int = Field(64, ge=1, le=4096, description="most images in one predict request")
    max_image_pixels: int = Field(16_000_000, ge=1, le=40_000_000,
                                  description="most pixels one predict image may declare (read from its header "
                                              "before decoding); more -> 413")
    max_request_pixels: int = Field(64_000_000, ge=1,
                                    description="most pixels all images of one predict request may declare "
                                                "together; more -> 413")
    max_dataset_bytes: int = Field(2 * 1024**3, ge=1024, description="largest dataset upload (archive bytes)")

    # --- our own ---
    allow_download: bool = Field(True, description="let Keras download CIFAR-10 / weights when no local copy")
    model_cache_size: int = Field(4, ge=1, le=256, description="models kept loaded for predict (LRU)")
    batch_window_ms: float = Field(2.0, ge=0, le=1000, description="micro-batching: wait this long to merge")
    serving_threads: int = Field(2, ge=1, le=256, description="LiteRT threads for batches of 32+ images (1 below)")
    feature_cache_max_bytes: int = Field(2 * 1024**3, ge=0, description="disk bound of the feature cache")
    data_cache: bool = Field(True, description="keep CIFAR-10 decoded (.npy, 184 MB) in the artifact dir")
    job_heartbeat_seconds: float = Field(5.0, gt=0, le=600, description="worker heartbeat interval")
    job_lost_seconds: float = Field(45.0, gt=0, description="a running job silent this long is failed")
    job_max_seconds: int = Field(6 * 3600, ge=60, description="longest job; Redis visibility timeout exceeds it")
    job_ttl_seconds: int = Field(30 * 24 * 3600, ge=60, description="how long finished job records are kept")
    mixed_precision: bool = Field(False, description="mixed_float16 training on a GPU")
    deterministic: bool = Field(True, description="Keras deterministic ops (reproducible runs)")
    log_level: str = Field("INFO", description="logging level of every process")
    exports: str = Field("tflite-float16,tflite-int8,savedmodel", description=(
        "exports made after training besides model.keras and model.tflite, comma-separated: tflite-float16, "
        "tflite-int8, savedmodel (each checked against the Keras model; empty: none)"))
    max_event_streams: int = Field(64, ge=1, le=100_000,
                                   description="open /v1/jobs/{id}/events streams per API process; more answer 429")
    event_stream_max_seconds: float = Field(600.0, gt=0, description="an events stream ends after this long (with "
                                                                     "`retry:`; EventSource reconnects by itself)")
    allowed_hosts: str = Field(
        "localhost,127.0.0.1,::1",
        description="Host names the API answers to, comma-separated (`*`: any; `.example.com`: it and its "
                    "subdomains); this machine's hostname and the address a request came in on are always "
                    "allowed, and `/healthz`, `/readyz`, `/metrics` answer any Host; others get 421 (DNS rebinding)")
    cache_max_bytes: int = Field(20 * 1024**3, ge=0,
                                 description="with TL_ARTIFACT_URL, the disk bound of the models and of the datasets "
                                             "each host downloads into TL_CACHE_DIR (the least recently used go "
                                             "first, and are downloaded again when next needed)")
    data_cache_max_bytes: int = Field(1024**3, ge=0,
                                      description="disk bound of the data cache (decoded CIFAR-10); 0 keeps none")

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return with_tls_defaults(value)

    @field_validator("api_key")
    @classmethod
    def _empty_key_is_none(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("allowed_hosts")
    @classmethod
    def _host_list(cls, value: str) -> str:
        names = [name.strip().lower().rstrip(".") for name in value.split(",") if name.strip()]
        bad = [name for name in names if any(c.isspace() or c in "/@?#" for c in name)]
        if bad:
            raise ValueError(f"not a host name: {bad[0]!r} (give names, no scheme or path, separated by commas)")
        return ",".join(names)

    @field_validator("exports")
    @classmethod
    def _known_exports(cls, value: str) -> str:
        names = [name.strip() for name in value.split(",") if name.strip()]
        unknown = sorted(set(names) - set(EXTRA_EXPORTS))
        if unknown:
            raise ValueError(f"unknown export(s) {', '.join(unknown)}; choose from {', '.join(EXTRA_EXPORTS)}")
        return ",".join(dict.fromkeys(names))

    @property
    def export_formats(self) -> list[str]:
        """The extra export formats to make, in order."""
        return [name for name in self.exports.split(",") if name]

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @property
    def allowed_host_names(self) -> tuple[str, ...]:
        """`TL_ALLOWED_HOSTS` as a tuple of lower-case names."""
        return tuple(name for name in self.allowed_hosts.split(",") if name)

    @property
    def host_cache_root(self) -> Path:
        """Where this host's engine caches live: TL_CACHE_DIR with an S3 store (never shared between hosts),
        TL_ARTIFACT_DIR otherwise (where they always were, so a local setup keeps its caches)."""
        return self.cache_dir if self.artifact_url else self.artifact_dir

    @property
    def feature_cache_dir(self) -> Path:
        return self.host_cache_root / "feature-cache"

    @property
    def data_cache_dir(self) -> Path:
        return self.host_cache_root / "data-cache"

    @property
    def export_template_dir(self) -> Path:
        return self.host_cache_root / "export-templates"


def with_tls_defaults(url: str) -> str:
    """A `rediss://` URL verifies the server's certificate unless it says otherwise: `ssl_cert_reqs=required`
    is added when absent (Celery's result backend refuses a rediss:// URL without it; redis-py and the broker
    read it too). Add `ssl_ca_certs=/path/ca.pem` for a private CA."""
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return url
    if any(key == "ssl_cert_reqs" for key, _ in parse_qsl(parts.query, keep_blank_values=True)):
        return url
    return urlunsplit(parts._replace(query=f"{parts.query}&ssl_cert_reqs=required" if parts.query
                                     else "ssl_cert_reqs=required"))


def redacted(url: str) -> str:
    """`url` without its password (`redis://:***@host:6379/0`): the only form of a URL that may be logged."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
