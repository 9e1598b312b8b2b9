"""The Celery side of a worker: the `tl.train` task and the worker's signal hooks, all thin.

`celery -A worker.tasks:app worker` runs this. The task hands the job id to `worker.runner.run_job`; the
parent process records a pool child that died mid-job (`TrainRequest.on_failure`); each new pool child
imports TensorFlow before it takes a job (`warm_start`); a starting worker fails jobs whose worker was lost.
TensorFlow is imported only inside the pool child, never in the parent, which forks the child.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from celery import Task
from celery.exceptions import TimeLimitExceeded, WorkerLostError
from celery.signals import worker_init, worker_process_init, worker_ready, worker_shutting_down
from celery.worker.request import Request

from worker.config import get_settings
from worker.jobstore import failure
from worker.queue import TRAIN_TASK, make_celery
from worker.runner import ACTIVE_RUN, job_store, run_job
from worker.store import open_model_store, require_artifact_store
from worker.store.sweep import sweep_artifacts

log = logging.getLogger(__name__)

app = make_celery(get_settings())


class TrainRequest(Request):
    """Records the job as failed when the pool child running it dies (killed, out of memory, hard limit).

    This runs in the worker's parent process, which outlives the child; without it the job would wait
    for the reaper (`TL_JOB_LOST_SECONDS`).
    """

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> None:
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        exc = exc_info.exception
        exc = getattr(exc, "exc", exc)  # ExceptionWithTraceback
        if not isinstance(exc, WorkerLostError | TimeLimitExceeded):
            return
        job_id = self.args[0] if self.args else self.id
        if isinstance(exc, TimeLimitExceeded):
            fields = failure("TimeLimitExceeded", "the job exceeded its hard time limit (TL_JOB_MAX_SECONDS + 300 s) "
                                                  "and its process was killed; use fewer samples or epochs")
        else:
            fields = failure("WorkerLost", f"the worker process running this job died ({exc}); if it was killed "
                                           "for lack of memory, use a smaller batch_size or image_size, then submit "
                                           "the job again")
        try:
            store = job_store(get_settings())
            if store.update(job_id, fields, from_statuses=ACTIVE_RUN):
                log.error("job %s: %s: %s", job_id, fields["error"].type, fields["error"].message)
        except Exception:
            log.exception("job %s: could not record the lost worker; the reaper will", job_id)


class TrainTask(Task):
    Request = TrainRequest


@app.task(name=TRAIN_TASK, bind=True, base=TrainTask)
def train(self: Task, job_id: str) -> dict[str, str]:
    """Run one training job (`job_id` of a queued record in the job store)."""
    worker_name = self.request.hostname or socket.gethostname()
    return {"job_id": job_id, "status": run_job(job_id, worker_name)}


@worker_process_init.connect
def warm_start(**_: Any) -> None:
    """In each new pool child: import TensorFlow and the engine at once, in a background thread.

    The child is recycled after every job (memory and GPU memory come back), so the import runs in the gap
    between jobs. In a thread, the child reports ready at once: a job that arrives meanwhile is claimed
    (`running`) immediately, and its own import of the engine waits for the one under way instead of
    starting again.
    """
    threading.Thread(target=_warm_up, name="tl-warm-up", daemon=True).start()


def _warm_up() -> None:
    started = time.monotonic()
    try:
        from worker.engine.runtime import configure_tensorflow

        configure_tensorflow(get_settings())
        import worker.engine.pipeline  # noqa: F401 - the import is the warm-up
    except Exception:
        log.exception("warm start failed; each job will import TensorFlow itself")
        return
    log.info("pool child ready: TensorFlow and the engine loaded in %.1f s", time.monotonic() - started)


@worker_init.connect
def check_artifact_store(**_: Any) -> None:
    """Before the pool starts: a missing or unusable bucket (TL_ARTIFACT_URL) stops the worker, naming it."""
    require_artifact_store(get_settings())


@worker_ready.connect
def sweep_lost_jobs(**_: Any) -> None:
    """On worker start: end running jobs whose worker stopped sending heartbeats (a crash before this start);
    a job whose model had been published is recorded `succeeded`, a model of a cancelled job removed."""
    settings = get_settings()
    from worker.engine.caches import cache_sweeps

    # What a killed process left: staging, trash, temporary files, caches past their bounds (never raises).
    sweep_artifacts(settings, more=cache_sweeps(settings))
    models = open_model_store(settings)
    try:
        store = job_store(settings)
        ended = {job_id: outcome for job_id in store.active_ids()
                 if (outcome := store.reap(job_id, settings.job_lost_seconds, models.metadata)) is not None}
    except Exception:
        log.exception("start-up sweep of lost jobs failed")
        return
    for job_id, outcome in ended.items():
        log.warning("job %s: its worker was lost; marked %s", job_id, outcome.status)
        if outcome.discard_model:
            models.delete(outcome.discard_model)


@worker_shutting_down.connect
def stop_running_job(sig: str | None = None, how: str | None = None, **_: Any) -> None:
    """In the parent, on a warm shutdown (SIGTERM to the parent alone, as `docker stop` sends): pass SIGTERM on
    to the pool children, so a running job stops at its next cancel check and ends `failed` (WorkerStopped)
    instead of running on until the container is killed."""
    if how == "Cold":
        return
    for pid in _children(os.getpid()):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)


def _children(parent: int) -> list[int]:
    """Pids of `parent`'s direct children (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(stat.parent.name))
    return found
