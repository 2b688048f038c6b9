# Two entry points for a fresh machine: `make train` and `make test`.
# The virtual environment is created on first use. Where no NVIDIA GPU is visible, the CPU build of
# PyTorch is installed first so that pip never pulls a multi-GB CUDA build onto a CPU-only machine;
# a GPU machine gets the default (CUDA) build.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.rlmem-installed
ARGS ?=
# Extras installed into the venv: the test suite exercises the Atari and POPGym adapters for real.
# (ProcGen's wheel pins numpy < 2, so it is left to `pip install -e .[procgen]`; its tests skip without it.)
EXTRAS ?= dev,atari,popgym
PYTEST_ARGS ?=

.PHONY: install train test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if ! $(PY) -c "import torch" >/dev/null 2>&1; then \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    echo "installing PyTorch (CUDA build)"; $(PY) -m pip install "torch"; \
	  else \
	    echo "installing PyTorch $(TORCH_VERSION) (CPU build)"; \
	    $(PY) -m pip install --retries 0 --timeout 10 --extra-index-url $(TORCH_CPU_INDEX) "torch==$(TORCH_VERSION)"; \
	  fi; \
	fi
	$(PY) -m pip install -e ".[$(EXTRAS)]"
	@touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/rlmem train $(ARGS)

test: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(VENV)/bin/rlmem bench $(ARGS)

# The GPU check (rlmem/gpu_check.py, docs/gpu.md): one command under 8 minutes on a machine whose Python
# already has a CUDA build of torch. It needs no venv: `make gpu-check PYTHON=python3 ARGS="--out DIR"`.
.PHONY: gpu-check
gpu-check:
	$(PYTHON) -m rlmem.gpu_check $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
