# kat — the two contract commands are `make train` and `make test`.
# Each bootstraps .venv on a fresh machine (scripts/bootstrap.sh) and is a no-op set-up when .venv is current.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.kat-installed
# Keep CPU runs to the cores we have; override e.g. `make test KAT_THREADS=8`.
KAT_THREADS ?= 2
export OMP_NUM_THREADS := $(KAT_THREADS)
export MKL_NUM_THREADS := $(KAT_THREADS)
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export MLFLOW_ENABLE_ASYNC_LOGGING := false
# Extra Hydra overrides for `make train` / `make reproduce`, e.g. `make reproduce ARGS=seed=1`.
ARGS ?=

.PHONY: help setup train reproduce test test-all test-gpu clean

help:  ## list targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

$(STAMP): pyproject.toml setup.py scripts/bootstrap.sh
	./scripts/bootstrap.sh
	@touch $(STAMP)

setup: $(STAMP)  ## create or refresh .venv (done by every target)

train: $(STAMP)  ## the whole recipe on the embedded default (teacher → distill → coldstart → rl → eval)
	$(PY) -m kat.pipeline $(ARGS)

reproduce: $(STAMP)  ## the AutoThink run of docs/rl.md §5.2b (recipe=reproduce_hard, ~50 min on 2 CPU cores)
	$(PY) -m kat.pipeline recipe=reproduce_hard $(ARGS)

test: $(STAMP)  ## fast test tier (everything not marked slow; gpu tests skip without CUDA)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)  ## every test, slow ones included
	$(PY) -m pytest -q

test-gpu: $(STAMP)  ## GPU tests only (needs CUDA)
	$(PY) -m pytest -q -m gpu

clean:  ## remove run outputs (keeps .venv)
	rm -rf outputs multirun mlflow.db mlartifacts .pytest_cache
