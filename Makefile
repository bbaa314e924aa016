# synthunlearn: set-up, tests and the main job, from nothing.
#   make demo   set up, then run the paper's experiment in miniature (docs/experiment.md)
#   make test   set up, then run the whole test suite (what CI runs)
# The virtualenv lives in .venv; torch is installed first and pinned to the CPU/CUDA build on the
# machine's local index (2.13.0), so the package's torch range installs nothing more. Every other
# package is held to constraints.txt, so each machine and each day installs the same versions.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export SYNTHUNLEARN_CACHE ?= $(CURDIR)/.cache/synthunlearn
export DS_ACCELERATOR ?= $(shell $(PYTHON) -c "import shutil;print('cuda' if shutil.which('nvidia-smi') else 'cpu')")
PYTEST_ARGS ?=

.PHONY: setup test demo clean

setup: $(STAMP)

$(STAMP): setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

demo: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python launch/experiment.py --config configs/experiment/demo.yaml

clean:
	rm -rf $(VENV) .cache runs
