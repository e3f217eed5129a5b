# hemaflow: the two commands a fresh clone needs are `make run` and `make test`.
# Both create the virtualenv and install the pinned dependencies first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

export PATH := $(BIN):$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: run test test-fast data repro bench clean help

help:
	@echo "make run    - set up, fetch the embedded dataset, run the whole pipeline (Prefect flow, CPU)"
	@echo "make test   - set up and run the test suite (slow and real-data tests included)"
	@echo "make repro  - run the same pipeline through 'dvc repro'"
	@echo "make bench  - run the benchmarks in benchmarks/ on ../shared/data"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,infra]'
	touch $@

# The embedded synthetic dataset is tracked by data.dvc and stored in the in-repo DVC
# remote infra/dvc-remote, so this works offline. `hemaflow generate` rebuilds it.
data: $(STAMP)
	$(BIN)/dvc pull --quiet data.dvc

run: data
	$(BIN)/hemaflow run

repro: data
	$(BIN)/dvc repro

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

bench: $(STAMP)
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf data/manifest.parquet data/labels data/crops data/split.parquet data/augmented reports dvc.lock; if [ -d models ]; then find models -mindepth 1 -maxdepth 1 ! -name registry -exec rm -rf {} +; fi  # models/registry (the default model store) is kept
