# Two commands do everything: `make run` (the default experiment) and `make test`.
# Both create the virtual environment in .venv on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The rules call `leti`, so the environment's commands must be on PATH.
export PATH := $(abspath $(BIN)):$(PATH)
CORES ?= 2
# Another experiment file, e.g. `make run CONFIG=configs/eae.yaml` (default: config.yaml).
CONFIG ?=
SNAKEMAKE_ARGS := --cores $(CORES) $(if $(CONFIG),--configfile $(CONFIG))
SNAKEMAKE := $(BIN)/snakemake $(SNAKEMAKE_ARGS)
# The CPU build of torch. On a GPU machine, install your CUDA build of torch into
# .venv first (any 2.x from 2.5 on); setup keeps a torch that is already there.
TORCH_SPEC ?= torch==2.13.0
# Use local data copies when they sit beside the checkout, or beside the local checkout this one
# was cloned from (`git clone . /tmp/x`); otherwise the workflow downloads the pinned public files
# and checks their sha256s.
CLONED_FROM := $(shell git config --get remote.origin.url 2>/dev/null)
SHARED_DATA := $(firstword $(wildcard $(abspath ../shared/data) \
	$(if $(filter /%,$(CLONED_FROM)),$(abspath $(CLONED_FROM)/../shared/data))))
export LETI_MBPP_PATH ?= $(wildcard $(SHARED_DATA)/mbpp/mbpp.jsonl)
# GENEVA (event argument extraction; CC BY 3.0): a folder laid out as its repository.
export LETI_GENEVA_DIR ?= $(wildcard $(SHARED_DATA)/geneva)

.PHONY: setup run dry-run test lint clean docker-engine slurm

setup: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[dev]"
	touch $@

# `leti snakemake` removes the lock a killed Snakemake left here (never one a live Snakemake holds).
run: setup docker-engine
	$(BIN)/leti snakemake $(SNAKEMAKE_ARGS)
	$(SNAKEMAKE) --report results/report.html
	$(BIN)/leti timings benchmarks
	$(BIN)/leti summary results
	@echo "report: results/report.html"

dry-run: setup
	$(SNAKEMAKE) --dry-run

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/snakemake --lint

test: lint docker-engine slurm
	$(BIN)/pytest

# A one-node SLURM cluster on 127.0.0.1 for tests/test_slurm.py (root, Debian); a no-op when one is up.
slurm:
	bash tests/services/slurm.sh

# The Docker engine for the sandbox: installed and started if missing (as root on Debian),
# a quick no-op when it runs. The sandbox image itself is built by the workflow and the tests.
docker-engine:
	bash tests/services/docker-engine.sh

clean:
	rm -rf results/* resources logs benchmarks .snakemake
