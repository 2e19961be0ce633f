# Two commands do all set-up: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned first so pip keeps the CPU build on disk instead of pulling CUDA wheels.
TORCH ?= torch==2.13.0

$(BIN)/vlmtune: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

.PHONY: install demo test lint
install: $(BIN)/vlmtune

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/vlmtune demo

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check src tests bench
