# Two commands from a fresh machine: `make run` (the service) and `make test` (the whole suite).
# Both share `make install`, which creates .venv at the repository root and installs exactly the versions in
# uv.lock (with their hashes); it reruns only when pyproject.toml or uv.lock changes (the stamp file below),
# so a second `make run` starts at once. After editing the dependencies in pyproject.toml, run `make lock`.

SHELL := /bin/bash
.DEFAULT_GOAL := help

# The first Python 3.11..3.13 on PATH (TensorFlow 2.21 has wheels for these); override with PYTHON=...
PYTHON ?= $(shell for p in python3.11 python3.12 python3.13 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] <= (3, 13)))' \
	2>/dev/null && { echo $$p; break; }; done)
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# uv (from PyPI, into the venv with the venv's pip) installs from uv.lock and writes it. Keep UV_VERSION the
# same as the Dockerfile's (tests/test_compose.py checks). uv reads no pip.conf: it fetches what uv.lock names.
UV_VERSION := 0.13.9
UV := $(VENV)/bin/uv
UV_STAMP := $(VENV)/.uv-$(UV_VERSION)
export UV_PROJECT_ENVIRONMENT := $(VENV)
export UV_PYTHON_DOWNLOADS := never
# --locked: fail (rather than re-resolve) when uv.lock does not match pyproject.toml; --inexact: keep what the
# lock does not name (pip, uv itself, anything installed by hand such as tensorflow[and-cuda]);
# --compile-bytecode: write the .pyc files now, as pip did (with PYTHONDONTWRITEBYTECODE set, an uncompiled
# venv imports TensorFlow in 15 s instead of 9 s on every start).
SYNC_FLAGS := --locked --inexact --compile-bytecode --extra train --extra redis-server --group dev
# The API's interface for `make run` and `make api` (HOST=0.0.0.0: every interface, as behind a load balancer).
HOST ?= 127.0.0.1
# `make lock LOCK_FLAGS=--upgrade` moves every pin to the newest release that pyproject.toml allows.
LOCK_FLAGS ?=

# `worker` is also a folder here: every target is phony, or make would find `worker` up to date.
.PHONY: help install install-cuda lock run api worker test test-fast lint config-table clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv with the service, its training extras, a Redis server and the dev tools

$(STAMP): pyproject.toml uv.lock | $(UV_STAMP)
	$(UV) sync --quiet $(SYNC_FLAGS)
	@touch $@

$(UV_STAMP):
	@if [ -z "$(PYTHON)" ]; then echo "Python 3.11, 3.12 or 3.13 is needed (python3.11 on PATH, or PYTHON=...)"; exit 1; fi
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet "uv==$(UV_VERSION)"
	@rm -f $(VENV)/.uv-* && touch $@

install-cuda: install  ## add TensorFlow's locked CUDA wheels to .venv (a GPU worker without Docker; Linux)
	$(UV) sync --quiet $(SYNC_FLAGS) --extra cuda

lock: | $(UV_STAMP)  ## rewrite uv.lock from pyproject.toml (then `make install` installs it)
	$(UV) lock $(LOCK_FLAGS)

run: install  ## start Redis (if none answers), one Celery worker and the API on TL_PORT; Ctrl-C stops all
	$(VPY) -m service.launcher --host $(HOST)

api: install  ## only the API and the dataset worker (another host's part: TL_REDIS_URL, TL_ARTIFACT_URL)
	$(VPY) -m service.launcher --role api --host $(HOST)

worker: install  ## only one training worker (a GPU host: one `make worker` per GPU, CUDA_VISIBLE_DEVICES=N)
	$(VPY) -m service.launcher --role worker

test: install  ## the whole test suite, integration tests included
	$(VENV)/bin/pytest

test-fast: install  ## the suite without the tests that start processes
	$(VENV)/bin/pytest -m "not integration"

lint: install  ## ruff and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

config-table: install  ## print the README's configuration table from the Settings fields
	$(VPY) -m service.launcher --config-table

clean:  ## remove the virtual environment and caches (models under ./artifacts are kept)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
