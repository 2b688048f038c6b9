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
# Extras installed into the venv: the test suite exercises the Atari, POPGym and ProcGen adapters for real.
EXTRAS ?= dev,atari,popgym,procgen
# ProcGen and gym3 declare numpy < 2 in their metadata, which their compiled code does not need (it runs
# with numpy 2), so they are installed without resolving it, after the `procgen` extra has installed
# their actual runtime dependencies (gym, cffi, imageio).
PROCGEN_NO_DEPS ?= gym3==0.3.3 "procgen==0.10.7; python_version < '3.11'" "procgen-mirror==0.10.7; python_version >= '3.11'"
PYTEST_ARGS ?=
comma := ,

.PHONY: install train test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
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
ifneq ($(filter procgen,$(subst $(comma), ,$(EXTRAS))),)
	$(PY) -m pip install --no-deps $(PROCGEN_NO_DEPS)
endif
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
