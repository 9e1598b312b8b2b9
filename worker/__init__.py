"""The training side: Celery worker, training engine and the job record shared with the API.

Modules that the API imports (`config`, `spec`, `jobs`, `errors`, `artifacts`, `celery_app`) never
import TensorFlow; the engine modules (`data`, `models`, `training`, `export`) do, and are only
imported inside the worker's child process or the command line.
"""
