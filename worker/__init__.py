"""The training side, and the contract both sides share.

Shared with the API (no TensorFlow): `config` (Settings), `spec` (the job request), `jobstore` (the job
record in Redis), `store` (the artifact store), `queue` (Celery app factory and task names), `imaging`
(image decoding), `litert` (LiteRT interpreters), `errors`.
The worker alone: `tasks` (the Celery task, thin), `runner` (one job's life), `cli` (one job without
Redis or Celery), and `engine/`, the only package that imports TensorFlow or Keras.
"""
