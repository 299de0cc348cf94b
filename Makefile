# kbtune developer commands. `make help` lists them.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 lies on disk here; installing it first keeps pip from pulling a CUDA build.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: help install install-dev train test test-fast lint bench bench-table ui

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed  ## create .venv and install kbtune

install-dev: $(VENV)/.installed-dev  ## install kbtune with the test and lint tools

train: install  ## install, then train model=small for 3 epochs on the sample KB (ingested on first run)
	$(PY) scripts/train.py model=small trainer.max_epochs=3

test: install-dev  ## install, then run the whole test suite (installs Chromium for the browser tests)
	bash scripts/test-deps.sh
	MLFLOW_DISABLE_TELEMETRY=true $(PY) -m pytest $(PYTEST_ARGS)

test-fast: install-dev  ## the suite without tests marked slow, browser or server
	$(PY) -m pytest -m "not slow and not browser and not server" $(PYTEST_ARGS)

lint: install-dev  ## ruff lint and format check
	$(VENV)/bin/ruff check src tests scripts benchmarks
	$(VENV)/bin/ruff format --check src tests scripts benchmarks

bench: install-dev  ## run the performance benchmarks (prints a table, writes benchmarks/results/<date>-<machine>.json)
	$(PY) benchmarks/run.py

bench-table: install  ## write the README's performance table from the newest results JSON
	$(PY) benchmarks/readme_table.py

ui: install  ## open the MLflow UI on the project's store (http://127.0.0.1:5000)
	$(VENV)/bin/kbtune ui
