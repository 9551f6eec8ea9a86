# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (what CI runs).
# Both create ./.venv on first use and install torch 2.13.0 first, on its own line, so you see which build you get.
# `make demo` installs only what speculor needs to run; `make test` adds the test tools (pytest, ruff, the openai
# client, and Triton for the fused kernels' CPU tests, about 1 GB), each install remembered by a stamp file.
# Where pip finds no local torch 2.13.0 (a wheel in your find-links, a mirror), the torch step adds the PyTorch CPU
# index (TORCH_INDEX) as an extra index, so a CPU machine downloads the ~200 MB CPU wheel and not the public index's
# CUDA build (several GB). On a GPU machine pass `make demo TORCH_INDEX=` (public index: the default CUDA build) or
# the index of your CUDA version, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu128; any 2.11–2.14 works.
PYTHON ?= python3
VENV ?= .venv
RUNTIME_STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
TORCH ?= torch==2.13.0
# auto: none when pip finds $(TORCH) without an index (a local wheel), else the PyTorch CPU index.
TORCH_INDEX ?= auto
CPU_TORCH_INDEX := https://download.pytorch.org/whl/cpu

.PHONY: demo test lint

$(RUNTIME_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	@index="$(TORCH_INDEX)"; \
	if [ "$$index" = auto ]; then \
		$(VENV)/bin/pip install --ignore-installed --no-index --no-deps --dry-run --quiet "$(TORCH)" >/dev/null 2>&1 \
			&& index= || index=$(CPU_TORCH_INDEX); \
	fi; \
	echo "installing $(TORCH) from the configured package sources$${index:+ plus $$index}"; \
	$(VENV)/bin/pip install --quiet "$(TORCH)" $${index:+--extra-index-url $$index}
	$(VENV)/bin/pip install --quiet -e .
	@$(VENV)/bin/python -c "import torch; print('installed torch', torch.__version__, \
	f'(CUDA {torch.version.cuda})' if torch.version.cuda else '(CPU build)')"
	touch $(RUNTIME_STAMP)

$(TEST_STAMP): $(RUNTIME_STAMP)
	$(VENV)/bin/pip install --quiet -e ".[test]"
	touch $(TEST_STAMP)

demo: $(RUNTIME_STAMP)
	$(VENV)/bin/speculor demo

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check speculor tests benchmarks
	$(VENV)/bin/ruff format --check speculor tests benchmarks

test: lint
	$(VENV)/bin/pytest
