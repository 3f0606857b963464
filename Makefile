# irn: one entry point. `make figures` regenerates every figure, `make test` checks everything.
# Every target bootstraps .venv on first use (pinned dependencies, see requirements.lock).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export SOURCE_DATE_EPOCH := 0
export PYTHONHASHSEED := 0
# One code path for PyTorch's CPU kernels, MKL and oneDNN on x86-64 (AVX2, which AVX-512 CPUs
# also run): otherwise each picks its own by CPU model, and the examples' training, which
# amplifies rounding (notebook 2), prints different digits on different machines.
ifeq ($(shell uname -m),x86_64)
export ATEN_CPU_CAPABILITY ?= avx2
export MKL_CBWR ?= AVX2
export ONEDNN_MAX_CPU_ISA ?= AVX2
endif

.PHONY: help venv test unit figures pilot plan smoke references bench docs lab clean clean-cache
.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[examples,dev,compiled,docs]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

venv: $(STAMP) ## create .venv with the pinned dependencies

# ------------------------------------------------------------------------ notebooks
# A profile (params/<profile>.yaml) is split into one parameter file per notebook, rewritten
# only when it changes: editing one section re-runs only that notebook. An executed notebook
# depends on its source, its parameters, the irn/ sources and the runner.
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))
NAMES := $(notdir $(basename $(NOTEBOOKS)))
IRN_SRC := $(wildcard irn/*.py irn/paper/*.py)
RUNNER := scripts/run_notebook.py
# trained models are cached in $(CACHE) (`make figures CACHE=` turns it off); DASK_SCHEDULER
# (tcp://127.0.0.1:8786 on one machine, tls://HEAD:8786 across machines: see the README) sends
# the notebooks' training jobs to a Dask cluster
CACHE ?= build/cache
DASK_SCHEDULER ?=
REFERENCE_RUN := $(BIN)/python $(RUNNER) --timeout 3600
RUN := $(REFERENCE_RUN) $(if $(CACHE),--cache $(CACHE)) \
	$(if $(DASK_SCHEDULER),--dask-scheduler $(DASK_SCHEDULER))

# The paper profile's executed notebooks are also kept, for readers, in notebooks/executed/.
define PROFILE_RULES
build/$(1)/params.stamp: $(wildcard params/*.yaml) scripts/split_params.py | $$(STAMP)
	@$$(BIN)/python scripts/split_params.py params/$(1).yaml build/$(1)/params
	@touch $$@
build/$(1)/params/%.yaml: build/$(1)/params.stamp ;
build/$(1)/%.ipynb: notebooks/%.ipynb build/$(1)/params/%.yaml $$(IRN_SRC) $$(RUNNER) | $$(STAMP)
	$$(RUN) $$< --params build/$(1)/params/$$*.yaml --output $$@ --figures $(2) $(3)
endef
$(eval $(call PROFILE_RULES,paper,figures,--copy notebooks/executed/$$*.ipynb))
$(eval $(call PROFILE_RULES,half,build/half/figures,))
$(eval $(call PROFILE_RULES,pilot,figures/pilot,))
$(eval $(call PROFILE_RULES,pilot_half,build/pilot_half/figures,))
$(eval $(call PROFILE_RULES,smoke,build/smoke/figures,))
.SECONDARY:

# The confirmatory run (params/paper.yaml: the seeds params/plan.yaml fixed from the pilot) and
# the same runs trained half as long (params/half.yaml), whose differing verdicts the table
# marks budget-dependent; the README gets the table, its headline and where the pilot and the
# confirmation agree.
figures: figures/claims.csv ## regenerate every figure of the paper into figures/ (the confirmatory run)

figures/claims.csv: $(NAMES:%=build/paper/%.ipynb) $(NAMES:%=build/half/%.ipynb) scripts/claims_table.py
	$(BIN)/python scripts/claims_table.py build/half/figures
	$(BIN)/python scripts/claims_table.py figures --half build/half/figures --plan params/plan.yaml \
	  --pilot figures/pilot --readme README.md

# The pilot: the same settings on seeds 0-9 (params/pilot.yaml), from which the plan was made.
pilot: figures/pilot/claims.csv ## the pilot (seeds 0-9) the analysis plan was computed from -> figures/pilot/
figures/pilot/claims.csv: $(NAMES:%=build/pilot/%.ipynb) $(NAMES:%=build/pilot_half/%.ipynb) scripts/claims_table.py
	$(BIN)/python scripts/claims_table.py build/pilot_half/figures
	$(BIN)/python scripts/claims_table.py figures/pilot --half build/pilot_half/figures --plan params/plan.yaml

# The analysis plan is written once, from the committed pilot, and then frozen: the
# confirmatory seeds derive from its bytes (scripts/plan.py refuses to overwrite it).
plan: $(STAMP) ## write the analysis plan params/plan.yaml from figures/pilot/ (once; it is then frozen)
	$(BIN)/python scripts/plan.py figures/pilot params/plan.yaml

smoke: $(NAMES:%=build/smoke/%.ipynb) ## run every notebook with the tiny smoke profile (build/smoke/)

references: $(STAMP) ## regenerate the nbval references tests/notebooks/ (smoke profile)
	@$(BIN)/python scripts/split_params.py params/smoke.yaml build/references/params
	@for name in $(NAMES); do \
	  $(REFERENCE_RUN) notebooks/$$name.ipynb --params build/references/params/$$name.yaml \
	    --output tests/notebooks/$$name.ipynb --figures build/references/figures || exit 1; \
	done

NBVAL := --nbval-lax --nbval-current-env --nbval-cell-timeout=600 -p no:cacheprovider
# the tests run on WORKERS processes (pytest-xdist), a notebook's cells (one kernel, in order)
# on one of them
WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(WORKERS)
NOTEBOOKS_TEST := $(PYTEST) --dist loadfile $(NBVAL) tests/notebooks

unit: $(STAMP) ## run the unit tests only (the inner loop)
	$(PYTEST) tests

# The references must hold on any CPU, not only the one that wrote them: the notebooks are
# checked again under PyTorch's and numpy's generic kernels (scripts/code_paths.py), which round
# differently, as another machine would; checked cells carry measured tolerances.
test: $(STAMP) ## run the unit tests and the notebook regression (nbval), on two CPU code paths
	$(PYTEST) tests
	$(NOTEBOOKS_TEST)
	$(BIN)/python scripts/code_paths.py with generic $(NOTEBOOKS_TEST)
	@rm -rf tests/notebooks/.staging-*

bench: $(STAMP) ## benchmarks: print tables, write benchmarks/results*.md and auto's crossover
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[examples,bench]"
	$(BIN)/python benchmarks/bench.py
	$(BIN)/python benchmarks/crossover.py

docs: $(STAMP) ## the API reference from the docstrings (Sphinx) -> docs/_build/html/index.html
	$(BIN)/python -m sphinx -W --keep-going -q -b html docs docs/_build/html

# JupyterLab where users run it: as root in a container or cloud VM it needs --allow-root, and
# without a display --no-browser (it prints the URL with its token); it listens on localhost
# only. LAB_ARGS passes more options (e.g. LAB_ARGS=--port=8890).
LAB_FLAGS = $(if $(filter 0,$(shell id -u)),--allow-root) \
	$(if $(DISPLAY)$(WAYLAND_DISPLAY),,--no-browser) --ServerApp.ip=127.0.0.1
LAB_ARGS ?=
$(VENV)/.lab-installed: $(STAMP)
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[examples,lab]"
	touch $@

lab: $(VENV)/.lab-installed ## open the executed notebooks in JupyterLab (sources one folder up)
	cd notebooks && ../$(BIN)/jupyter lab $(LAB_FLAGS) --ServerApp.root_dir=. $(LAB_ARGS) \
	  executed/01_linear_stability.ipynb

clean: ## remove build outputs (keeps .venv, figures/ and the cache of trained models)
	find build -mindepth 1 -maxdepth 1 ! -name cache -exec rm -rf {} + 2>/dev/null || true
	rm -rf .pytest_cache tests/notebooks/.staging-*

clean-cache: ## remove the cache of trained models (build/cache)
	rm -rf $(CACHE)
