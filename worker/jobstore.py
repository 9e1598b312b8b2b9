"""The job record in Redis: the job table shared by the API and the worker (no TensorFlow here).

Layout (prefix `tl:`):
- `tl:job:{id}`          hash, one field per Job attribute (JSON-encoded where structured), so that
                         writers touching different fields never clobber each other;
- `tl:jobs`              sorted set of `"{created_ns:020d}:{id}"` members (lexicographic, newest last),
                         the index behind `GET /v1/jobs` and its stable cursors;
- `tl:cancel:{id}`       present once a cancel was asked for; the engine's per-batch check reads it;
- `tl:idem:{sha256}`     Idempotency-Key -> job id (24 h);
- `tl:events:{id}`       pub/sub channel: a notice on every change, for the SSE stream.

Status changes go through one Lua script that checks the current status first, so the API's cancel,
the worker's progress and the reaper's "worker lost" can race without losing a terminal state.
`JobStore` (sync, for the worker) and `AsyncJobStore` (asyncio, for the API) share all of this.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import json
import secrets
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Literal

import redis
import redis.asyncio as aioredis
import redis.exceptions
from pydantic import BaseModel, ConfigDict, Field

from worker.spec import JobCreate

JobStatus = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
Stage = Literal[
    "queued", "loading_data", "extracting_features", "training", "fine_tuning", "evaluating", "saving", "done"
]
ACTIVE: frozenset[str] = frozenset({"queued", "running", "cancelling"})
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
STATUSES: tuple[str, ...] = ("queued", "running", "cancelling", "succeeded", "failed", "cancelled")

#: What a Redis that does not answer raises (down, restarting, unreachable); everything else is a bug.
REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

PREFIX = "tl:"
INDEX_KEY = f"{PREFIX}jobs"
IDEMPOTENCY_TTL_SECONDS = 24 * 3600

WORKER_LOST_MESSAGE = (
    "the worker running this job stopped sending heartbeats for {seconds:.0f} s (killed, out of memory "
    "or its machine lost); submit the job again"
)


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def cancel_key(job_id: str) -> str:
    return f"{PREFIX}cancel:{job_id}"


def events_channel(job_id: str) -> str:
    return f"{PREFIX}events:{job_id}"


def idempotency_key(key: str) -> str:
    return f"{PREFIX}idem:{hashlib.sha256(key.encode()).hexdigest()}"


def new_job_id() -> str:
    return f"j_{secrets.token_hex(8)}"


def new_model_id() -> str:
    return f"m_{secrets.token_hex(8)}"


def utc_now() -> str:
    """RFC 3339 UTC with a `Z`, to the millisecond."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Progress(BaseModel):
    stage: Stage = "queued"
    epoch: int = 0
    epochs: int = 0
    fraction: float = 0.0


class EpochRecord(BaseModel):
    epoch: int
    loss: float
    accuracy: float
    val_loss: float
    val_accuracy: float
    seconds: float


class ClassMetrics(BaseModel):
    """One class's scores on the test subset."""

    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)

    class_: str = Field(alias="class", serialization_alias="class")
    precision: float
    recall: float
    f1: float
    support: int


class Metrics(BaseModel):
    """A succeeded job's figures; the evaluation fields are absent on jobs recorded before they existed."""

    train_accuracy: float
    test_accuracy: float
    test_loss: float
    params_total: int
    params_trainable: int
    params_non_trainable: int
    train_seconds: float
    macro_f1: float | None = None
    per_class: list[ClassMetrics] | None = None
    confusion_matrix: list[list[int]] | None = Field(None, description="row = true class, column = predicted")


class JobError(BaseModel):
    type: str
    message: str


class Job(BaseModel):
    """A job as the API shows it (shared/API.md's Job object)."""

    id: str
    status: JobStatus
    spec: dict[str, Any]
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    progress: Progress = Field(default_factory=Progress)
    history: list[EpochRecord] = Field(default_factory=list)
    metrics: Metrics | None = None
    model_id: str | None = None
    error: JobError | None = None


_JSON_FIELDS = {"spec", "progress", "history", "metrics", "error"}
_INTERNAL_FIELDS = {"heartbeat_at", "worker", "attempts", "task_id", "created_ns", "idempotency_key"}


def encode_fields(fields: dict[str, Any]) -> dict[str, str]:
    """Job attributes -> hash fields (JSON for structured values, "" for None)."""
    out: dict[str, str] = {}
    for name, value in fields.items():
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        elif isinstance(value, list):
            value = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
        if name in _JSON_FIELDS:
            out[name] = json.dumps(value)
        else:
            out[name] = "" if value is None else str(value)
    return out


def decode_job(raw: dict[str, str]) -> Job:
    data: dict[str, Any] = {}
    for name, value in raw.items():
        if name in _INTERNAL_FIELDS:
            continue
        if name in _JSON_FIELDS:
            data[name] = json.loads(value) if value else None
        else:
            data[name] = value or None
    data["history"] = data.get("history") or []
    if data.get("progress") is None:
        data.pop("progress", None)  # the model's default
    return Job.model_validate(data)


def new_job_fields(job_id: str, spec: JobCreate, idempotency: str | None = None) -> dict[str, str]:
    created_ns = time.time_ns()
    return encode_fields({
        "id": job_id,
        "status": "queued",
        "spec": spec.public(),
        "created_at": utc_now(),
        "created_ns": created_ns,
        "progress": Progress(stage="queued", epochs=spec.total_epochs),
        "history": [],
        "attempts": 0,
        "idempotency_key": idempotency,
    })


def index_member(fields: dict[str, str]) -> str:
    return f"{int(fields['created_ns']):020d}:{fields['id']}"


# KEYS[1] job hash, KEYS[2] events channel; ARGV[1] comma list of allowed current statuses ("*" any),
# ARGV[2] JSON object of fields to set. Returns the previous status, or false when not allowed/missing.
_TRANSITION_LUA = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return false end
if ARGV[1] ~= '*' then
  local ok = false
  for s in string.gmatch(ARGV[1], '[^,]+') do if s == current then ok = true end end
  if not ok then return false end
end
local fields = cjson.decode(ARGV[2])
for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
redis.call('PUBLISH', KEYS[2], current)
return current
"""

# Reaper: fail a running/cancelling job whose heartbeat is older than ARGV[1] (unix seconds).
_REAP_LUA = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'running' and status ~= 'cancelling' then return false end
local hb = tonumber(redis.call('HGET', KEYS[1], 'heartbeat_at') or '0') or 0
if hb >= tonumber(ARGV[1]) then return false end
local fields = cjson.decode(ARGV[2])
for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
redis.call('PUBLISH', KEYS[2], status)
return status
"""


def _allowed(from_statuses: Iterable[str] | None) -> str:
    return "*" if from_statuses is None else ",".join(from_statuses)


def failure(error_type: str, message: str) -> dict[str, Any]:
    """The fields that end a job `failed` now, with an error of `error_type` a user can act on."""
    return {"status": "failed", "finished_at": utc_now(), "error": JobError(type=error_type, message=message)}


def _lost_fields(lost_seconds: float) -> dict[str, str]:
    return encode_fields(failure("WorkerLost", WORKER_LOST_MESSAGE.format(seconds=lost_seconds)))


class JobStore:
    """Synchronous job store for the worker and the command line."""

    def __init__(self, client: redis.Redis, ttl_seconds: int = 30 * 24 * 3600) -> None:
        self.redis = client
        self.ttl_seconds = ttl_seconds
        self._transition = client.register_script(_TRANSITION_LUA)
        self._reap = client.register_script(_REAP_LUA)

    @classmethod
    def from_url(cls, url: str, ttl_seconds: int = 30 * 24 * 3600) -> JobStore:
        return cls(redis.Redis.from_url(url, decode_responses=True, socket_timeout=10,
                                        socket_connect_timeout=5, health_check_interval=30), ttl_seconds)

    def create(self, spec: JobCreate, job_id: str | None = None) -> Job:
        job_id = job_id or new_job_id()
        fields = new_job_fields(job_id, spec)
        pipe = self.redis.pipeline()
        pipe.hset(job_key(job_id), mapping=fields)
        pipe.zadd(INDEX_KEY, {index_member(fields): 0})
        pipe.execute()
        return decode_job(fields)

    def get(self, job_id: str) -> Job | None:
        raw = self.redis.hgetall(job_key(job_id))
        return decode_job(raw) if raw else None

    def get_raw(self, job_id: str) -> dict[str, str]:
        return self.redis.hgetall(job_key(job_id))

    def update(self, job_id: str, fields: dict[str, Any],
               from_statuses: Iterable[str] | None = None) -> str | None:
        """Set fields if the job's status is one of `from_statuses` (any when None); returns the old status."""
        result = self._transition(keys=[job_key(job_id), events_channel(job_id)],
                                  args=[_allowed(from_statuses), json.dumps(encode_fields(fields))])
        if result and fields.get("status") in TERMINAL:
            self.redis.expire(job_key(job_id), self.ttl_seconds)
            self.redis.delete(cancel_key(job_id))
        return result or None

    def heartbeat(self, job_id: str, worker: str) -> None:
        self.redis.hset(job_key(job_id), mapping={"heartbeat_at": f"{time.time():.3f}", "worker": worker})

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.exists(cancel_key(job_id)))

    def reap(self, job_id: str, lost_seconds: float) -> bool:
        """Fail the job if it is running with a heartbeat older than `lost_seconds`."""
        result = self._reap(keys=[job_key(job_id), events_channel(job_id)],
                            args=[f"{time.time() - lost_seconds:.3f}",
                                  json.dumps(_lost_fields(lost_seconds))])
        if result:
            self.redis.expire(job_key(job_id), self.ttl_seconds)
        return bool(result)

    def active_ids(self, limit: int = 1000) -> list[str]:
        ids = [m.split(":", 1)[1] for m in self.redis.zrevrange(INDEX_KEY, 0, limit - 1)]
        statuses = self.redis.pipeline()
        for job_id in ids:
            statuses.hget(job_key(job_id), "status")
        return [job_id for job_id, status in zip(ids, statuses.execute(), strict=True) if status in ACTIVE]


class AsyncJobStore:
    """The same store over redis.asyncio, for the API (never blocks the event loop)."""

    def __init__(self, client: aioredis.Redis, ttl_seconds: int = 30 * 24 * 3600) -> None:
        self.redis = client
        self.ttl_seconds = ttl_seconds
        self._transition = client.register_script(_TRANSITION_LUA)
        self._reap = client.register_script(_REAP_LUA)

    async def create(self, spec: JobCreate, idempotency: str | None = None) -> tuple[Job, bool]:
        """Create a queued job; with an Idempotency-Key already used, return that job and False."""
        job_id = new_job_id()
        if idempotency is not None:
            claimed = await self.redis.set(idempotency_key(idempotency), job_id, nx=True,
                                           ex=IDEMPOTENCY_TTL_SECONDS)
            if not claimed:
                existing_id = await self.redis.get(idempotency_key(idempotency))
                for _ in range(100):  # the first POST may still be writing its record
                    existing = await self.get(existing_id) if existing_id else None
                    if existing is not None:
                        return existing, False
                    await asyncio.sleep(0.02)
        fields = new_job_fields(job_id, spec, idempotency)
        pipe = self.redis.pipeline()
        pipe.hset(job_key(job_id), mapping=fields)
        pipe.zadd(INDEX_KEY, {index_member(fields): 0})
        await pipe.execute()
        return decode_job(fields), True

    async def get(self, job_id: str) -> Job | None:
        raw = await self.redis.hgetall(job_key(job_id))
        return decode_job(raw) if raw else None

    async def update(self, job_id: str, fields: dict[str, Any],
                     from_statuses: Iterable[str] | None = None) -> str | None:
        result = await self._transition(keys=[job_key(job_id), events_channel(job_id)],
                                        args=[_allowed(from_statuses), json.dumps(encode_fields(fields))])
        if result and fields.get("status") in TERMINAL:
            await self.redis.expire(job_key(job_id), self.ttl_seconds)
            await self.redis.delete(cancel_key(job_id))
        return result or None

    async def release_idempotency(self, key: str) -> None:
        """Forget an Idempotency-Key, so a retry with it creates a fresh job (its first job never ran)."""
        await self.redis.delete(idempotency_key(key))

    async def ping(self) -> None:
        await self.redis.ping()

    async def close(self) -> None:
        await self.redis.aclose()

    def changes(self, job_id: str) -> JobChanges:
        """A subscription to the job's change notices (`async with store.changes(id) as changes`)."""
        return JobChanges(self.redis, job_id)

    async def request_cancel(self, job_id: str) -> None:
        await self.redis.set(cancel_key(job_id), "1", ex=7 * 24 * 3600)

    async def reap(self, job_id: str, lost_seconds: float) -> bool:
        result = await self._reap(keys=[job_key(job_id), events_channel(job_id)],
                                  args=[f"{time.time() - lost_seconds:.3f}",
                                        json.dumps(_lost_fields(lost_seconds))])
        if result:
            await self.redis.expire(job_key(job_id), self.ttl_seconds)
        return bool(result)

    async def list(self, status: str | None = None, model: str | None = None, limit: int = 50,
                   cursor: str | None = None) -> tuple[builtins.list[Job], str | None]:
        """Newest first; `cursor` is the opaque `next_cursor` of the previous page."""
        upper = f"({cursor}" if cursor else "+"
        items: builtins.list[Job] = []
        chunk = max(limit, 50)
        while len(items) < limit:
            members = await self.redis.zrevrangebylex(INDEX_KEY, upper, "-", start=0, num=chunk)
            if not members:
                return items, None
            pipe = self.redis.pipeline()
            for member in members:
                pipe.hgetall(job_key(member.split(":", 1)[1]))
            raws = await pipe.execute()
            for member, raw in zip(members, raws, strict=True):
                upper = f"({member}"
                if not raw:
                    await self.redis.zrem(INDEX_KEY, member)  # record expired
                    continue
                job = decode_job(raw)
                if (status is None or job.status == status) and (model is None or job.spec.get("model") == model):
                    items.append(job)
                    if len(items) == limit:
                        return items, member
            if len(members) < chunk:
                return items, None
        return items, None

    async def active_ids(self, limit: int = 1000) -> builtins.list[str]:
        ids = [m.split(":", 1)[1] for m in await self.redis.zrevrange(INDEX_KEY, 0, limit - 1)]
        pipe = self.redis.pipeline()
        for job_id in ids:
            pipe.hget(job_key(job_id), "status")
        statuses = await pipe.execute()
        return [job_id for job_id, status in zip(ids, statuses, strict=True) if status in ACTIVE]

    async def active_job_ids(self, dataset: str) -> builtins.list[str]:
        """Ids of the queued or running jobs that train on `dataset`."""
        ids = await self.active_ids()
        pipe = self.redis.pipeline()
        for job_id in ids:
            pipe.hget(job_key(job_id), "spec")
        specs = await pipe.execute()
        users = []
        for job_id, spec in zip(ids, specs, strict=True):
            try:
                if spec and json.loads(spec).get("dataset") == dataset:
                    users.append(job_id)
            except (ValueError, AttributeError):
                continue
        return users

    async def count_by_status(self, limit: int = 10000) -> dict[str, int]:
        ids = [m.split(":", 1)[1] for m in await self.redis.zrevrange(INDEX_KEY, 0, limit - 1)]
        pipe = self.redis.pipeline()
        for job_id in ids:
            pipe.hget(job_key(job_id), "status")
        counts = dict.fromkeys(STATUSES, 0)
        for status in await pipe.execute():
            if status in counts:
                counts[status] += 1
        return counts


class JobChanges:
    """Change notices of one job over pub/sub; `wait` returns on a notice or after `timeout` seconds.

    If Redis goes away the subscription is dropped and `wait` only sleeps: callers poll the record
    anyway, so a stream survives a Redis restart without notices.
    """

    def __init__(self, client: aioredis.Redis, job_id: str) -> None:
        self._pubsub = client.pubsub()
        self._channel = events_channel(job_id)
        self.subscribed = False

    async def __aenter__(self) -> JobChanges:
        try:
            await self._pubsub.subscribe(self._channel)
            self.subscribed = True
        except REDIS_ERRORS:
            self.subscribed = False
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self._pubsub.aclose()
        except Exception:  # closing a connection to a Redis that went away
            pass

    async def wait(self, timeout: float) -> None:
        if not self.subscribed:
            await asyncio.sleep(timeout)
            return
        try:
            await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
        except REDIS_ERRORS:
            self.subscribed = False
            await asyncio.sleep(timeout)
