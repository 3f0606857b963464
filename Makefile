# irn: one entry point. `make figures` regenerates every figure, `make test` checks everything.
# Every target bootstraps .venv on first use (pinned dependencies, see requirements.lock).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export SOURCE_DATE_EPOCH := 0
export PYTHONHASHSEED := 0

.PHONY: help venv test unit figures smoke bench lab clean
.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

venv: $(STAMP) ## create .venv with the pinned dependencies

unit: $(STAMP) ## run the unit tests only
	$(BIN)/python -m pytest -q tests

test: $(STAMP) ## run the unit tests and the notebook regression
	$(BIN)/python -m pytest -q tests

lab: $(STAMP) ## open the notebooks in JupyterLab
	$(BIN)/jupyter lab notebooks

clean: ## remove build outputs (keeps .venv and figures/)
	rm -rf build .pytest_cache
