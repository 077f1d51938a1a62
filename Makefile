# Two set-up commands do everything on a fresh machine: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

.PHONY: install test serve bench
install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

serve: install
	$(VENV)/bin/arborist serve

bench: install
	$(PY) bench/inverse_speed.py && $(PY) bench/grads_speed.py
