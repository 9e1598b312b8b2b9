"""One job's life on a worker: claim it, heartbeat, report progress, honour cancel, record the outcome.

Testable without a broker: `run_job(job_id, worker_name)` is what the Celery task (`worker.tasks`) calls.

Where a job goes: the API writes a `queued` record (`worker.jobstore`) and sends `tl.train` with the job id;
the worker's pool child picks it up here and
1. moves the record `queued -> running` only if it is still queued (a cancelled job, or a message seen twice,
   never runs), setting the first heartbeat in the same atomic update;
2. keeps a heartbeat thread beating while the job runs (the reaper fails jobs whose heartbeat stops);
3. calls the engine with a `JobReporter` that writes stage, progress and history into the record (throttled)
   and reads the cancel flag;
4. ends the record `succeeded`, `failed` or `cancelled`; nothing leaves a job `running` (try/finally), and a
   pool child that dies mid-job is recorded by the parent process (`TrainRequest.on_failure`).

TensorFlow is imported only inside the pool child (`worker_process_init`, or the task itself), never in the
worker's parent process, which forks the child.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from pydantic import ValidationError

from worker.config import Settings, get_settings
from worker.errors import JobCancelled, TrainingError
from worker.jobstore import (
    NOW,
    EpochRecord,
    Job,
    JobStore,
    Metrics,
    Progress,
    decode_job,
    failure,
    new_model_id,
    utc_now,
)
from worker.spec import JobCreate
from worker.store import open_model_store

log = logging.getLogger(__name__)

RUNNING = ("running",)
ACTIVE_RUN = ("running", "cancelling")

#: Progress writes to Redis at most this often (the engine may report several times a second).
PROGRESS_INTERVAL_SECONDS = 0.5
#: The cancel flag is read from Redis at most this often (the engine asks several times a second).
CANCEL_POLL_SECONDS = 0.2


class WorkerStopped(Exception):
    """The worker process was asked to stop (SIGTERM) while a job ran."""


_stores: dict[str, JobStore] = {}


def job_store(settings: Settings) -> JobStore:
    """One `JobStore` per Redis URL and process (its connection pool is shared by the threads)."""
    store = _stores.get(settings.redis_url)
    if store is None:
        store = _stores[settings.redis_url] = JobStore.from_url(settings.redis_url, settings.job_ttl_seconds)
    return store


class JobReporter:
    """The engine's `Reporter`: writes stage, progress and history into the job record.

    Every write is a status-checked update from `running`/`cancelling`, so a job that was failed by the
    reaper or finished meanwhile is never brought back. When the record is no longer active the reporter
    asks the engine to stop (`cancel_requested` turns true): nobody is waiting for that result any more.
    """

    def __init__(self, store: JobStore, job_id: str, progress: Progress,
                 clock: Any = time.monotonic) -> None:
        self._store = store
        self._job_id = job_id
        self._progress = progress.model_copy()
        self._history: list[EpochRecord] = []
        self._clock = clock
        self._lock = threading.Lock()
        self._last_write = float("-inf")
        self._last_cancel_check = float("-inf")
        self._cancel = False
        self.detached = False
        #: Set by the SIGTERM handler (`_StopOnSigterm`); a plain flag, since a signal handler must not take
        #: the lock the interrupted code may hold.
        self.stop_requested = False

    @property
    def snapshot(self) -> Progress:
        with self._lock:
            return self._progress.model_copy()

    def stage(self, stage: str) -> None:
        with self._lock:
            if stage == self._progress.stage:
                return
            self._progress = self._progress.model_copy(update={"stage": stage})
            self._write({"progress": self._progress})

    def progress(self, fraction: float) -> None:
        with self._lock:
            fraction = min(max(float(fraction), self._progress.fraction), 1.0)  # never goes backwards
            self._progress = self._progress.model_copy(update={"fraction": round(fraction, 4)})
            if self._clock() - self._last_write >= PROGRESS_INTERVAL_SECONDS:
                self._write({"progress": self._progress})

    def epoch_end(self, record: EpochRecord) -> None:
        with self._lock:
            self._history.append(record)
            self._progress = self._progress.model_copy(update={"epoch": record.epoch})
            self._write({"progress": self._progress, "history": list(self._history)})

    def cancel_requested(self) -> bool:
        if self.stop_requested:  # raised here, where the engine asks, so no `except Exception` can swallow it
            raise WorkerStopped("the worker was stopped (SIGTERM) while this job ran; submit the job again")
        with self._lock:
            if self._cancel or self.detached:
                return True
            now = self._clock()
            if now - self._last_cancel_check >= CANCEL_POLL_SECONDS:
                self._last_cancel_check = now
                try:
                    self._cancel = self._store.cancel_requested(self._job_id)
                except Exception:  # a Redis blip must not kill the job; the next check reads again
                    log.warning("job %s: could not read the cancel flag", self._job_id, exc_info=True)
            return self._cancel

    def _write(self, fields: dict[str, Any]) -> None:
        self._last_write = self._clock()
        try:
            applied = self._store.update(self._job_id, fields, from_statuses=ACTIVE_RUN)
        except Exception:  # progress is best effort; the outcome write at the end is not
            log.warning("job %s: could not record progress", self._job_id, exc_info=True)
            return
        if applied is None and not self.detached:
            self.detached = True
            log.warning("job %s: the record is no longer running (reaped or finished elsewhere); stopping",
                        self._job_id)


class Heartbeat:
    """A daemon thread that stamps `heartbeat_at` on the job every `interval` seconds until stopped."""

    def __init__(self, store: JobStore, job_id: str, worker: str, interval: float) -> None:
        self._store = store
        self._job_id = job_id
        self._worker = worker
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._store.heartbeat(self._job_id, self._worker)
            except Exception:
                log.warning("job %s: heartbeat failed", self._job_id, exc_info=True)


class _StopOnSigterm:
    """While a job runs, turn SIGTERM into `WorkerStopped` so the job ends `failed` with a clear reason.

    The handler only flags the reporter; the engine's next cancel check (a fraction of a second later) raises
    `WorkerStopped`. Raising from the handler itself would surface wherever the main thread happened to be,
    e.g. inside a best-effort progress write whose `except Exception` would swallow it and train on.
    Celery resets SIGTERM to its default action in pool children; this handler is installed only for the
    duration of one job and only in the main thread (where signal handlers run).
    """

    def __init__(self, reporter: JobReporter) -> None:
        self._reporter = reporter

    def __enter__(self) -> _StopOnSigterm:
        self._previous: Any = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._flag)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _flag(self, signum: int, frame: FrameType | None) -> None:
        self._reporter.stop_requested = True


def _error_fields(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, TrainingError):
        return failure(exc.type, exc.message)
    if isinstance(exc, WorkerStopped):
        return failure("WorkerStopped", str(exc))
    if isinstance(exc, SoftTimeLimitExceeded):
        return failure("TimeLimitExceeded", "the job ran longer than TL_JOB_MAX_SECONDS and was stopped; "
                                            "use fewer samples or epochs, or raise TL_JOB_MAX_SECONDS")
    return failure(type(exc).__name__, f"{exc or type(exc).__name__}; see the worker log for the traceback")


def _finish(store: JobStore, job_id: str, fields: dict[str, Any], from_statuses: tuple[str, ...]) -> str | None:
    """The terminal write; retried a few times because it is the one write that must not be lost."""
    for attempt in range(5):
        try:
            return store.update(job_id, fields, from_statuses=from_statuses)
        except Exception:
            log.warning("job %s: could not record the outcome (attempt %d)", job_id, attempt + 1, exc_info=True)
            time.sleep(1 + attempt)
    log.error("job %s: outcome %s could not be recorded; the reaper will fail the job", job_id, fields["status"])
    return None


def _discard_model(settings: Settings, job_id: str, model_id: str, why: str) -> None:
    log.warning("job %s: removing model %s (%s)", job_id, model_id, why)
    try:
        open_model_store(settings).delete(model_id)
    except OSError:
        log.exception("job %s: could not remove model %s", job_id, model_id)


def _record_success(store: JobStore, settings: Settings, job: Job, reporter: JobReporter,
                    result: Any) -> str:
    metrics = result.metrics if isinstance(result.metrics, Metrics) else Metrics.model_validate(result.metrics)
    progress = reporter.snapshot.model_copy(update={"stage": "done", "fraction": 1.0})
    fields = {"status": "succeeded", "finished_at": utc_now(), "metrics": metrics,
              "model_id": result.model_id, "progress": progress, "error": None}
    if _finish(store, job.id, fields, RUNNING) is not None:
        log.info("job %s: succeeded, model %s, test accuracy %.4f", job.id, result.model_id, metrics.test_accuracy)
        return "succeeded"
    # Not running any more: a cancel arrived after the engine's last check, the job was reaped (its heartbeat
    # did not reach Redis for a while) or reconciled, or Redis is unreachable. The model is complete and
    # published: only a cancel throws it away; otherwise the job succeeded, whatever the record says now.
    try:
        raw = store.get_raw(job.id)
    except Exception:
        log.warning("job %s: the outcome could not be recorded; the reaper will record `succeeded` from model %s",
                    job.id, result.model_id, exc_info=True)
        return "unrecorded"
    status = raw.get("status")
    if status == "succeeded" and raw.get("model_id") == result.model_id:
        return "succeeded"  # recorded by a reaper from the published model
    if status in ("cancelling", "cancelled"):
        _discard_model(settings, job.id, result.model_id, "the job was cancelled while it was being saved")
        _finish(store, job.id, {"status": "cancelled", "finished_at": utc_now(), "progress": progress},
                ("cancelling",))
        return "cancelled"
    if status == "failed" and _finish(store, job.id, fields, ("failed",)) is not None:
        log.warning("job %s: had been reaped while it finished; recorded succeeded with model %s", job.id,
                    result.model_id)
        return "succeeded"
    log.warning("job %s: record is %s; model %s is kept", job.id, status or "gone", result.model_id)
    return status or "missing"


def run_job(job_id: str, worker_name: str, settings: Settings | None = None) -> str:
    """Run job `job_id` if it is still queued and record its outcome; returns the final status.

    Returns `"skipped"` without doing anything when the job is unknown or no longer queued.
    """
    settings = settings or get_settings()
    store = job_store(settings)
    raw = store.get_raw(job_id)
    if not raw:
        log.warning("job %s: no such job record (expired or deleted); nothing to run", job_id)
        return "skipped"
    job = decode_job(raw)
    if job.status != "queued":
        log.info("job %s: is %s, not queued; not running it", job_id, job.status)
        return "skipped"

    progress = Progress(stage="loading_data", epoch=0, epochs=job.progress.epochs, fraction=0.0)
    model_id = new_model_id()  # recorded at the claim, so a model published by a worker that then died is found
    started = _finish(store, job_id, {
        "status": "running", "started_at": utc_now(), "heartbeat_at": NOW, "pending_model_id": model_id,
        "worker": worker_name, "progress": progress, "attempts": int(raw.get("attempts") or 0) + 1,
    }, ("queued",))
    if started is None:
        log.info("job %s: no longer queued (cancelled meanwhile); not running it", job_id)
        return "skipped"
    log.info("job %s: running on %s: %s", job_id, worker_name, job.spec)

    reporter = JobReporter(store, job_id, progress)
    outcome: str | None = None
    try:
        with Heartbeat(store, job_id, worker_name, settings.job_heartbeat_seconds), _StopOnSigterm(reporter):
            try:
                spec = JobCreate.model_validate(job.spec)
            except ValidationError as exc:
                raise TrainingError(f"the stored job spec is not valid: {exc}") from exc
            from worker.engine.pipeline import train_job  # TensorFlow lives in the pool child only

            result = train_job(spec, settings, reporter, job_id=job_id, model_id=model_id)
            outcome = _record_success(store, settings, job, reporter, result)
    except JobCancelled:
        log.info("job %s: cancelled", job_id)
        _finish(store, job_id, {"status": "cancelled", "finished_at": utc_now(), "progress": reporter.snapshot},
                ACTIVE_RUN)
        outcome = "cancelled"
    except TrainingError as exc:
        log.warning("job %s: failed: %s: %s", job_id, exc.type, exc.message)
        _finish(store, job_id, {**_error_fields(exc), "progress": reporter.snapshot}, ACTIVE_RUN)
        outcome = "failed"
    except BaseException as exc:
        log.exception("job %s: failed with an unexpected error", job_id)
        _finish(store, job_id, {**_error_fields(exc), "progress": reporter.snapshot}, ACTIVE_RUN)
        outcome = "failed"
        if not isinstance(exc, Exception):
            raise  # KeyboardInterrupt / SystemExit: recorded, and the process still stops
    finally:
        if outcome is None:  # a path above did not record anything: never leave the job running
            _finish(store, job_id, failure("InternalError", "the job ended without an outcome; see the worker log"),
                    ACTIVE_RUN)
    return outcome
