# syntax=docker/dockerfile:1
# Three images from one file, each installing exactly the versions in uv.lock (docker-compose.yml builds them):
#   docker build --target api         -t tl-service:api .          # the API: no TensorFlow (it serves LiteRT exports)
#   docker build --target worker      -t tl-service:worker .       # a CPU training worker: + TensorFlow, matplotlib
#   docker build --target worker-cuda -t tl-service:worker-cuda .  # a GPU worker: + TensorFlow's CUDA wheels
# (`tensorflow[and-cuda]`, the `cuda` extra: the CUDA/cuDNN libraries come as wheels, so the base image stays
# python:3.11-slim; the host needs only the NVIDIA driver and the NVIDIA Container Toolkit.)
# Without --target, `docker build .` builds the last stage, the API.
#
# Layers: each image's dependencies are installed from pyproject.toml + uv.lock alone, so editing the code or
# README.md reuses them; the sources are copied last. The project itself is not installed: /app is on
# PYTHONPATH (uvicorn, celery and `python -m` all import service/ and worker/ from there).
# After changing dependencies in pyproject.toml, run `make lock`: the build stops (`uv sync --locked`) when
# uv.lock does not match pyproject.toml.

# ----- build stages: uv (from PyPI) makes /opt/venv; none of this is in the final images -----

FROM python:3.11-slim AS uv
# Keep UV_VERSION the same as the Makefile's (tests/test_compose.py checks).
ARG UV_VERSION=0.13.9
RUN pip install --no-cache-dir --disable-pip-version-check "uv==${UV_VERSION}"
ENV UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy
WORKDIR /app
COPY pyproject.toml uv.lock ./

FROM uv AS api-deps
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-dev --no-install-project

FROM uv AS worker-deps
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-dev --no-install-project --extra train

FROM worker-deps AS worker-cuda-deps
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-dev --no-install-project --extra train --extra cuda

# ----- the images -----

FROM python:3.11-slim AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    TL_ARTIFACT_DIR=/artifacts \
    TL_DATA_DIR=/data
WORKDIR /app
RUN mkdir -p /artifacts /data /root/.keras
EXPOSE 8000

FROM runtime AS worker-cuda
COPY --from=worker-cuda-deps /opt/venv /opt/venv
COPY service ./service
COPY worker ./worker
CMD ["celery", "-A", "worker.tasks:app", "worker", "-Q", "training", "-c", "1", "--pool", "prefork", "-l", "INFO"]

FROM runtime AS worker
COPY --from=worker-deps /opt/venv /opt/venv
COPY service ./service
COPY worker ./worker
CMD ["celery", "-A", "worker.tasks:app", "worker", "-Q", "training", "-c", "1", "--pool", "prefork", "-l", "INFO"]

FROM runtime AS api
COPY --from=api-deps /opt/venv /opt/venv
COPY service ./service
COPY worker ./worker
# Health checks are per service in docker-compose.yml (the API's /readyz, the worker's Celery ping).
CMD ["uvicorn", "service.main:app", "--host", "0.0.0.0", "--port", "8000", "--timeout-graceful-shutdown", "5"]
