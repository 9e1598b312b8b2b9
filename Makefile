# Two commands from a fresh machine: `make run` (the service) and `make test` (the whole suite).
# Both share `make install`, which creates .venv at the repository root; it reruns only when pyproject.toml
# changes (the stamp file below), so a second `make run` starts at once.

SHELL := /bin/bash
.DEFAULT_GOAL := help

# The first Python 3.11..3.13 on PATH (TensorFlow 2.21 has wheels for these); override with PYTHON=...
PYTHON ?= $(shell for p in python3.11 python3.12 python3.13 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] <= (3, 13)))' \
	2>/dev/null && { echo $$p; break; }; done)
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help install run test test-fast lint config-table clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv with the service, its training extras, a Redis server and the dev tools

$(STAMP): pyproject.toml
	@if [ -z "$(PYTHON)" ]; then echo "Python 3.11, 3.12 or 3.13 is needed (python3.11 on PATH, or PYTHON=...)"; exit 1; fi
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade "pip>=25.1"
	$(VPY) -m pip install --quiet -e ".[train,redis-server]" --group dev
	@touch $@

run: install  ## start Redis (if none answers), one Celery worker and the API on TL_PORT; Ctrl-C stops all
	$(VPY) -m service.launcher

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
