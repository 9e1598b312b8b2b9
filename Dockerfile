# syntax=docker/dockerfile:1
# One image for the API and the worker (docker-compose.yml builds it twice, from the cache).
#   docker build -t tl-service .                                  # CPU (API, CPU worker)
#   docker build -t tl-service:gpu --build-arg TF_EXTRA=and-cuda . # + CUDA libraries for an NVIDIA GPU worker
# The API serves the TensorFlow Lite export of each model with LiteRT; TensorFlow is in the image too, for
# the worker and for serving a model that has no TFLite file.

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TL_ARTIFACT_DIR=/artifacts \
    TL_DATA_DIR=/data
WORKDIR /app

# Dependencies first (a layer that changes only with pyproject.toml), then the code.
ARG TF_EXTRA=""
COPY pyproject.toml README.md ./
RUN mkdir -p service worker && touch service/__init__.py worker/__init__.py \
    && pip install ".[train]" \
    && if [ -n "$TF_EXTRA" ]; then pip install "tensorflow[$TF_EXTRA]>=2.16,<2.22"; fi \
    && pip uninstall -y tl-service

COPY service ./service
COPY worker ./worker
RUN pip install --no-deps . && mkdir -p /artifacts /data /root/.keras

EXPOSE 8000
# Health checks are per service in docker-compose.yml (the API's /readyz, the worker's Celery ping).
CMD ["uvicorn", "service.main:app", "--host", "0.0.0.0", "--port", "8000", "--timeout-graceful-shutdown", "5"]
