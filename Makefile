# The two commands a new user needs: `make demo` (the main job on the shapes world) and `make test`.
# Both create .venv and install the project themselves.
#
# torch: this machine's CPU build is installed first (TORCH=torch==2.13.0, found on local disk), so the
# unpinned `torch>=2.4` in pyproject.toml is already satisfied and no multi-GB CUDA build is pulled.
# GPU users:  make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" demo
# (or install any torch into .venv first: an importable torch is kept as it is).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1
# pip installs without byte-compiling (--no-compile: half of the set-up's minute went to compiling every module
# of torch and transformers); each module is compiled once, the first time a process imports it, so bytecode
# writing stays on for our processes even where the environment turns it off
unexport PYTHONDONTWRITEBYTECODE

.PHONY: venv demo test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --no-compile --progress-bar off $(TORCH)
	$(BIN)/pip install --no-compile --progress-bar off -e ".[dev]"
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m fusion.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf runs artifacts
