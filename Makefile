# Two commands do all set-up: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned first so pip keeps the CPU build on disk instead of pulling CUDA wheels; the rest comes
# from constraints.txt, the set the suite last passed on (docs/dependencies.md says how to move it).
TORCH ?= torch==2.13.0

$(BIN)/vlmtune: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $@

.PHONY: install browser demo test lint
install: $(BIN)/vlmtune

# The report test renders report.html in a real headless Chromium (Debian's package).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null \
	  || echo "chromium could not be installed: the report rendering test will be skipped"; }

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/vlmtune demo

test: install browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check src tests bench
