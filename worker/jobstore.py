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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import redis
import redis.asyncio as aioredis
import redis.exceptions
from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from worker.spec import JobCreate, JobSpec

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
#: The same members for queued, running and cancelling jobs only: what the reaper and the re-sender look at.
ACTIVE_KEY = f"{PREFIX}active"
#: A field value the scripts replace by Redis' own clock (seconds), so no host's clock matters.
NOW = "__now__"
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


class DocumentedAs:
    """`Annotated` metadata: the field's JSON schema is `model`'s (a reference to it), its value stays as it is."""

    def __init__(self, model: type[BaseModel]) -> None:
        self.model = model

    def __get_pydantic_json_schema__(self, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        # Through the generator's own entry point, so the model becomes a shared definition (a `$ref`) rather
        # than a copy; `handler(...)` alone would inline it.
        generator = getattr(handler, "generate_json_schema", None)
        if generator is not None:
            return generator.generate_inner(self.model.__pydantic_core_schema__)
        return handler(self.model.__pydantic_core_schema__)


class Job(BaseModel):
    """A job as the API shows it (shared/API.md's Job object)."""

    id: str
    status: JobStatus
    # A dict at run time (the runner validates it as a JobCreate, and a damaged record must still load),
    # documented as the `JobSpec` it holds.
    spec: Annotated[dict[str, Any], DocumentedAs(JobSpec)]
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    progress: Progress = Field(default_factory=Progress)
    history: list[EpochRecord] = Field(default_factory=list)
    metrics: Metrics | None = None
    model_id: str | None = None
    error: JobError | None = None


_JSON_FIELDS = {"spec", "progress", "history", "metrics", "error"}
_INTERNAL_FIELDS = {"heartbeat_at", "worker", "attempts", "task_id", "created_ns", "idempotency_key",
                    "pending_model_id", "enqueued_at", "idempotency_body"}


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


# Shared by the scripts: Redis' clock in seconds, and the job's member of the index sets.
_LUA_HELPERS = """
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function member(key)
  local ns = redis.call('HGET', key, 'created_ns') or '0'
  return string.rep('0', 20 - #ns) .. ns .. ':' .. (redis.call('HGET', key, 'id') or '')
end
local function set_fields(key, fields)
  local clock = nil
  for k, v in pairs(fields) do
    if v == '__now__' then clock = clock or string.format('%.3f', now()); v = clock end
    redis.call('HSET', key, k, v)
  end
  local status = fields['status']
  if status == 'succeeded' or status == 'failed' or status == 'cancelled' then
    redis.call('ZREM', KEYS[3], member(key))
  end
end
"""

# KEYS[1] job hash, KEYS[2] events channel, KEYS[3] active index; ARGV[1] comma list of allowed current statuses
# ("*" any), ARGV[2] JSON object of fields to set ("__now__" = Redis' clock). Returns the previous status, or
# false when not allowed/missing.
_TRANSITION_LUA = _LUA_HELPERS + """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return false end
if ARGV[1] ~= '*' then
  local ok = false
  for s in string.gmatch(ARGV[1], '[^,]+') do if s == current then ok = true end end
  if not ok then return false end
end
set_fields(KEYS[1], cjson.decode(ARGV[2]))
redis.call('PUBLISH', KEYS[2], current)
return current
"""

# Reaper: a running/cancelling job whose heartbeat (Redis' clock) is older than ARGV[1] seconds is lost. With
# ARGV[2] empty, only says so: {status, pending_model_id}; otherwise sets the fields ARGV[2] (JSON) as well.
_REAP_LUA = _LUA_HELPERS + """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'running' and status ~= 'cancelling' then return false end
local hb = tonumber(redis.call('HGET', KEYS[1], 'heartbeat_at') or '0') or 0
if hb >= now() - tonumber(ARGV[1]) then return false end
if ARGV[2] == '' then return {status, redis.call('HGET', KEYS[1], 'pending_model_id') or ''} end
set_fields(KEYS[1], cjson.decode(ARGV[2]))
redis.call('PUBLISH', KEYS[2], status)
return {status, ''}
"""

# Heartbeat: stamp Redis' clock on a job that still exists (never recreate a record that was removed).
_HEARTBEAT_LUA = _LUA_HELPERS + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'heartbeat_at', string.format('%.3f', now()), 'worker', ARGV[1])
return 1
"""


@dataclass(frozen=True)
class Reaped:
    """What the reaper did to a lost job: its new status, and a published model it must remove (a job that
    was being cancelled when its worker died published nothing the user wants)."""

    status: str
    discard_model: str | None = None


#: Reads a published model's metadata.json by id (None when there is no complete model).
Published = Callable[[str], dict[str, Any] | None]


def _reaped_fields(status: str, pending_model_id: str, meta: dict[str, Any] | None,
                   lost_seconds: float) -> tuple[dict[str, Any], Reaped]:
    """A lost job's end: `succeeded` from its model's metadata when the model was published (the worker died
    between publishing and recording success), `cancelled` when it was being cancelled, else `failed`."""
    if meta is not None and status == "running":
        history = meta.get("history") or []
        fields = {"status": "succeeded", "finished_at": meta.get("created_at") or utc_now(),
                  "metrics": meta.get("metrics"), "model_id": pending_model_id, "history": history, "error": None,
                  "progress": Progress(stage="done", epoch=len(history), epochs=len(history), fraction=1.0)}
        return fields, Reaped("succeeded")
    if status == "cancelling":
        return ({"status": "cancelled", "finished_at": utc_now()},
                Reaped("cancelled", pending_model_id if meta is not None else None))
    return failure("WorkerLost", WORKER_LOST_MESSAGE.format(seconds=lost_seconds)), Reaped("failed")


def _allowed(from_statuses: Iterable[str] | None) -> str:
    return "*" if from_statuses is None else ",".join(from_statuses)


def failure(error_type: str, message: str) -> dict[str, Any]:
    """The fields that end a job `failed` now, with an error of `error_type` a user can act on."""
    return {"status": "failed", "finished_at": utc_now(), "error": JobError(type=error_type, message=message)}


def _active(members: list[str], client: redis.Redis) -> list[str]:
    pipe = client.pipeline()
    for member in members:
        pipe.hget(job_key(member.split(":", 1)[1]), "status")
    statuses = pipe.execute()
    stale = [m for m, status in zip(members, statuses, strict=True) if status not in ACTIVE]
    if stale:  # expired or removed records, or ended by an older version without the index
        client.zrem(ACTIVE_KEY, *stale)
    return [m.split(":", 1)[1] for m, status in zip(members, statuses, strict=True) if status in ACTIVE]


class JobStore:
    """Synchronous job store for the worker and the command line."""

    def __init__(self, client: redis.Redis, ttl_seconds: int = 30 * 24 * 3600) -> None:
        self.redis = client
        self.ttl_seconds = ttl_seconds
        self._transition = client.register_script(_TRANSITION_LUA)
        self._reap = client.register_script(_REAP_LUA)
        self._heartbeat = client.register_script(_HEARTBEAT_LUA)

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
        pipe.zadd(ACTIVE_KEY, {index_member(fields): 0})
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
        result = self._transition(keys=[job_key(job_id), events_channel(job_id), ACTIVE_KEY],
                                  args=[_allowed(from_statuses), json.dumps(encode_fields(fields))])
        if result and fields.get("status") in TERMINAL:
            self.redis.expire(job_key(job_id), self.ttl_seconds)
            self.redis.delete(cancel_key(job_id))
        return result or None

    def heartbeat(self, job_id: str, worker: str) -> bool:
        """Stamp the job's heartbeat with Redis' clock; False when the record is gone."""
        return bool(self._heartbeat(keys=[job_key(job_id)], args=[worker]))

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.exists(cancel_key(job_id)))

    def reap(self, job_id: str, lost_seconds: float, published: Published | None = None) -> Reaped | None:
        """End the job if it is running with a heartbeat older than `lost_seconds` (see `_reaped_fields`)."""
        keys = [job_key(job_id), events_channel(job_id), ACTIVE_KEY]
        found = self._reap(keys=keys, args=[str(lost_seconds), ""])
        if not found:
            return None
        status, pending = found
        meta = published(pending) if published is not None and pending else None
        fields, reaped = _reaped_fields(status, pending, meta, lost_seconds)
        if not self._reap(keys=keys, args=[str(lost_seconds), json.dumps(encode_fields(fields))]):
            return None
        self.redis.expire(job_key(job_id), self.ttl_seconds)
        self.redis.delete(cancel_key(job_id))
        return reaped

    def active_ids(self) -> list[str]:
        """Every queued, running or cancelling job, newest first (the active index; records gone are dropped)."""
        return _active(self.redis.zrevrange(ACTIVE_KEY, 0, -1), self.redis)


class AsyncJobStore:
    """The same store over redis.asyncio, for the API (never blocks the event loop)."""

    def __init__(self, client: aioredis.Redis, ttl_seconds: int = 30 * 24 * 3600) -> None:
        self.redis = client
        self.ttl_seconds = ttl_seconds
        self._transition = client.register_script(_TRANSITION_LUA)
        self._reap = client.register_script(_REAP_LUA)
        self._heartbeat = client.register_script(_HEARTBEAT_LUA)

    async def create(self, spec: JobCreate, idempotency: str | None = None) -> tuple[Job, bool]:
        """Create a queued job; with an Idempotency-Key already used, return that job and False. A key whose job
        record is gone (expired, flushed, or its first request died before writing it) is bound to the new job,
        so every later retry finds that one instead of making a job of its own."""
        # Set KEYS[1] to ARGV[2] only while it still names ARGV[1] (two retries must not bind two new jobs).
        rebind = ("if redis.call('GET', KEYS[1]) == ARGV[1] then "
                  "redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) return 1 end return 0")
        job_id = new_job_id()
        if idempotency is not None:
            key = idempotency_key(idempotency)
            for _ in range(3):  # more only when other retries rebind the key at the same moment
                if await self.redis.set(key, job_id, nx=True, ex=IDEMPOTENCY_TTL_SECONDS):
                    break
                existing_id = await self.redis.get(key)
                if existing_id is None:
                    continue  # it expired in between: claim it again
                for _ in range(100):  # the first POST may still be writing its record
                    existing = await self.get(existing_id)
                    if existing is not None:
                        return existing, False
                    await asyncio.sleep(0.02)
                if await self.redis.eval(rebind, 1, key, existing_id, job_id, str(IDEMPOTENCY_TTL_SECONDS)):
                    break
        fields = new_job_fields(job_id, spec, idempotency)
        pipe = self.redis.pipeline()
        pipe.hset(job_key(job_id), mapping=fields)
        pipe.zadd(INDEX_KEY, {index_member(fields): 0})
        pipe.zadd(ACTIVE_KEY, {index_member(fields): 0})
        await pipe.execute()
        return decode_job(fields), True

    async def get(self, job_id: str) -> Job | None:
        raw = await self.redis.hgetall(job_key(job_id))
        return decode_job(raw) if raw else None

    async def update(self, job_id: str, fields: dict[str, Any],
                     from_statuses: Iterable[str] | None = None) -> str | None:
        result = await self._transition(keys=[job_key(job_id), events_channel(job_id), ACTIVE_KEY],
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

    async def reap(self, job_id: str, lost_seconds: float, published: Published | None = None) -> Reaped | None:
        """End the job if it is running with a heartbeat older than `lost_seconds` (see `_reaped_fields`)."""
        keys = [job_key(job_id), events_channel(job_id), ACTIVE_KEY]
        found = await self._reap(keys=keys, args=[str(lost_seconds), ""])
        if not found:
            return None
        status, pending = found
        meta = published(pending) if published is not None and pending else None
        fields, reaped = _reaped_fields(status, pending, meta, lost_seconds)
        if not await self._reap(keys=keys, args=[str(lost_seconds), json.dumps(encode_fields(fields))]):
            return None
        await self.redis.expire(job_key(job_id), self.ttl_seconds)
        await self.redis.delete(cancel_key(job_id))
        return reaped

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

    async def active_ids(self) -> builtins.list[str]:
        """Every queued, running or cancelling job, newest first (the active index)."""
        members = await self.redis.zrevrange(ACTIVE_KEY, 0, -1)
        pipe = self.redis.pipeline()
        for member in members:
            pipe.hget(job_key(member.split(":", 1)[1]), "status")
        statuses = await pipe.execute()
        stale = [m for m, status in zip(members, statuses, strict=True) if status not in ACTIVE]
        if stale:  # expired or removed records, or ended by an older version without the index
            await self.redis.zrem(ACTIVE_KEY, *stale)
        return [m.split(":", 1)[1] for m, status in zip(members, statuses, strict=True) if status in ACTIVE]

    async def queued_longer_than(self, seconds: float) -> builtins.list[str]:
        """Queued jobs created (or last sent) more than `seconds` ago by Redis' clock, oldest first."""
        members = await self.redis.zrange(ACTIVE_KEY, 0, -1)
        pipe = self.redis.pipeline()
        for member in members:
            pipe.hmget(job_key(member.split(":", 1)[1]), "status", "enqueued_at")
        rows = await pipe.execute()
        now = await self.server_time()
        stale = []
        for member, (status, enqueued_at) in zip(members, rows, strict=True):
            if status != "queued":
                continue
            created = int(member.split(":", 1)[0]) / 1e9
            try:
                since = max(created, float(enqueued_at or 0))
            except ValueError:
                since = created
            if now - since > seconds:
                stale.append(member.split(":", 1)[1])
        return stale

    async def server_time(self) -> float:
        """Redis' clock, in unix seconds."""
        seconds, micros = await self.redis.time()
        return float(seconds) + micros / 1e6

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
