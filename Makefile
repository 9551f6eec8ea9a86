# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (what CI runs).
# Both create ./.venv on first use. torch 2.13.0 is pinned for the CPU set-up; on a GPU machine install the torch
# build that matches your CUDA first (any 2.11–2.14 works) and then `pip install -e .`.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet "torch==2.13.0" -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/speculor demo

lint: $(STAMP)
	$(VENV)/bin/ruff check speculor tests benchmarks
	$(VENV)/bin/ruff format --check speculor tests benchmarks

test: lint
	$(VENV)/bin/pytest
