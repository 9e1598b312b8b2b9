"""The Celery app factory and task names, configured for long TensorFlow jobs; no app is built at import.

The API builds its app in its lifespan (to send tasks by name); the worker's is `worker.tasks:app`.
Nothing here imports TensorFlow: the worker's parent process must never have it loaded before it forks
its pool child (TensorFlow's threads do not survive a fork). The child imports it itself
(`worker.tasks`, on `worker_process_init`).

Choices for long jobs:
- concurrency 1 per worker and no prefetch (`worker_disable_prefetch`): one job at a time per worker (per GPU),
  and no job waits reserved by a busy worker while another is idle;
- `worker_max_tasks_per_child=1`: the child process is replaced after every job, so host and GPU memory
  come back;
- early ack + a heartbeat in the job record + a reaper: a job whose worker dies is failed within
  `TL_JOB_LOST_SECONDS` and never runs twice; the Redis `visibility_timeout` is longer than the longest job
  (`TL_JOB_MAX_SECONDS`), so a slow job is never redelivered to a second worker while it runs.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from worker.config import Settings

TRAIN_TASK = "tl.train"
TRAINING_QUEUE = "training"
#: Dataset processing has a queue (and a worker) of its own: uploads never wait behind a long training job,
#: and training never waits behind an upload. It imports no TensorFlow.
DATASET_TASK = "tl.process_dataset"
DATASETS_QUEUE = "datasets"


def make_celery(settings: Settings) -> Celery:
    """A Celery app for `settings` (broker, result backend and job store are the same Redis)."""
    app = Celery("tl", broker=settings.redis_url, backend=settings.redis_url)
    app.conf.update(
        task_queues=[Queue(TRAINING_QUEUE), Queue(DATASETS_QUEUE)],
        task_default_queue=TRAINING_QUEUE,
        task_routes={TRAIN_TASK: {"queue": TRAINING_QUEUE}, DATASET_TASK: {"queue": DATASETS_QUEUE}},
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=False,
        task_track_started=True,
        task_time_limit=settings.job_max_seconds + 300,
        task_soft_time_limit=settings.job_max_seconds,
        result_expires=7 * 24 * 3600,
        worker_prefetch_multiplier=1,
        # Take a message only with a process free to run it: a busy worker holds no second job that another,
        # idle worker could run now (with early acks, prefetch 1 would still reserve one more).
        worker_disable_prefetch=True,
        worker_concurrency=1,
        worker_max_tasks_per_child=1,
        # A new pool child imports TensorFlow in a background thread (`worker.tasks.warm_start`); should a
        # slow start ever hold its readiness, Celery's default 4 s would have the parent kill the child.
        worker_proc_alive_timeout=120,
        worker_send_task_events=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": settings.job_max_seconds + 3600},
        result_backend_transport_options={"visibility_timeout": settings.job_max_seconds + 3600},
        broker_connection_timeout=5,
        redis_socket_connect_timeout=5,
        redis_socket_timeout=30,
    )
    return app



