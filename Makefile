# Two set-up commands do everything on a fresh machine: `make serve` and `make test`.
#   make test       installs into .venv, runs `make lint`, then the whole test suite (CI: .ci/run)
#   make lint       ruff (lint rules and formatting) and lint-imports (the layering contracts in pyproject.toml)
#   make test-fast  the suite without the tests marked `slow` (tests/e2e: real server and worker processes)
#   PYTEST_ARGS='-x -k name' passes options on to pytest in test and test-fast.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	command -v chromium >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)  # the dashboard's browser tests
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

.PHONY: install lint test test-fast serve bench
install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -q -ra --durations=25 $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -ra -m "not slow" $(PYTEST_ARGS)

serve: install
	$(VENV)/bin/arborist serve

bench: install
	$(PY) bench/inverse_speed.py && $(PY) bench/grads_speed.py
