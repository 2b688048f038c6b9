"""Building and loading the CUDA extension of the sensitivity kernels.

The extension (``csrc/*.cu`` + ``csrc/binding.cpp``) is compiled on first use with
``torch.utils.cpp_extension.load``, which caches the build in torch's extension directory
(``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) and rebuilds only when a source
changes; ``rlmem kernels build`` does that ahead of time. The target architectures are torch's
choice: ``TORCH_CUDA_ARCH_LIST`` if set, else those of the visible GPUs.

:func:`available` says whether the kernels can run here and never raises: without a CUDA build of
torch, a GPU, nvcc or ninja, when the build fails, or with ``RLMEM_KERNELS=0`` it is False and
:func:`unavailable_reason` says why; the engine (``rlmem/rtrl.py``) then runs its PyTorch reference.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

ENV_VAR = "RLMEM_KERNELS"
EXTENSION_NAME = "rlmem_sensitivity_kernels"
CSRC = Path(__file__).resolve().parent / "csrc"
CUDA_SOURCES = ("forward.cu", "backward.cu", "reduce.cu")
BINDING_SOURCE = "binding.cpp"
_OFF = ("0", "false", "off", "no")

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_module: ModuleType | None = None
_build_failure: str | None = None  # why the build failed in this process (not retried)


def sources() -> list[Path]:
    """The files the extension is built from."""
    return [CSRC / name for name in (*CUDA_SOURCES, BINDING_SOURCE)]


def enabled() -> bool:
    """False when the environment variable ``RLMEM_KERNELS`` turns the kernels off (0/false/off/no)."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in _OFF


def _missing_prerequisite(require_device: bool) -> str | None:
    """Why the extension cannot be built (or used, with ``require_device``) here, or None."""
    if torch.version.cuda is None:
        return f"this PyTorch build has no CUDA support (torch {torch.__version__})"
    if require_device and not torch.cuda.is_available():
        return "no CUDA device is visible"
    from torch.utils import cpp_extension  # imported on use: it pulls in setuptools, needed only to build

    if cpp_extension.CUDA_HOME is None:
        return "the CUDA toolkit (nvcc) was not found; set CUDA_HOME"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def _build(verbose: bool) -> ModuleType:
    from torch.utils import cpp_extension  # imported on use, as above

    return cpp_extension.load(
        name=EXTENSION_NAME,
        sources=[str(path) for path in sources()],
        extra_include_paths=[str(CSRC)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3"],
        verbose=verbose,
    )


def load(verbose: bool = False, require_device: bool = True) -> ModuleType:
    """The compiled extension, building it on the first call of the process (cached on disk across
    processes). Raises RuntimeError saying why when it cannot be built or used here."""
    global _module, _build_failure
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        if _build_failure is not None:
            raise RuntimeError(_build_failure)
        missing = _missing_prerequisite(require_device)
        if missing is not None:
            raise RuntimeError(missing)
        _log.info("building the CUDA sensitivity kernels (once per machine; cached by torch)")
        try:
            _module = _build(verbose)
        except Exception as exc:  # a compiler error, a missing header: fall back to the reference
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            _build_failure = f"the build failed: {first_line}"
            raise RuntimeError(_build_failure) from exc
        return _module


def unavailable_reason() -> str:
    """Why the kernels cannot run here ("" when they can). Builds the extension if needed."""
    if not enabled():
        return f"turned off by {ENV_VAR}={os.environ.get(ENV_VAR)}"
    if _module is not None:
        return ""
    try:
        load()
    except Exception as exc:
        return str(exc)
    return ""


_warned = False


def available() -> bool:
    """True when the CUDA kernels can run here (they are then used for CUDA tensors). Never raises.

    The first call on a machine with a GPU builds the extension (or loads torch's cached build); a
    failed build is reported once as a warning and the PyTorch reference is used from then on."""
    global _warned
    if not enabled():
        return False
    if _module is not None:
        return True
    try:
        load()
        return True
    except Exception as exc:
        if _build_failure is not None and not _warned:
            _warned = True
            warnings.warn(f"rlmem CUDA kernels unavailable, using the PyTorch reference: {exc}", stacklevel=2)
        return False


def _architectures() -> str:
    listed = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if listed:
        return f"{listed} (TORCH_CUDA_ARCH_LIST)"
    if torch.cuda.is_available():
        capabilities = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ", ".join(f"sm_{major}{minor}" for major, minor in capabilities) + " (the visible GPUs)"
    return "torch's default for this CUDA version (no GPU visible, TORCH_CUDA_ARCH_LIST unset)"


def build_command(argv: list[str] | None = None) -> int:
    """``rlmem kernels build``: compile the extension now and report what was built. Returns the exit
    status: 0 when built (or already cached), 1 with a one-line reason when it cannot be built here."""
    parser = argparse.ArgumentParser(
        prog="rlmem kernels build",
        description="Compile the CUDA sensitivity kernels into torch's extension cache, so that the first "
        "training run does not wait for the compiler.",
    )
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands and output")
    ns = parser.parse_args(argv if argv is not None else [])
    try:
        module = load(verbose=ns.verbose, require_device=False)
    except RuntimeError as exc:
        print(f"rlmem kernels build: cannot build the CUDA kernels: {exc}", file=sys.stderr)
        return 1
    print(f"built {EXTENSION_NAME}: {getattr(module, '__file__', '?')}")
    print(f"  sources: {', '.join(path.name for path in sources())} (in {CSRC})")
    print(f"  architectures: {_architectures()}")
    print(f"  CUDA {torch.version.cuda}, torch {torch.__version__}")
    print("  kernels: window forward / per-step update (+ gradient), window gradient, adjoint;")
    print("  unit forms real, complex, block k = 2..4; matrix, vector and fan-out groups; float32")
    if not enabled():
        print(f"  note: {ENV_VAR}={os.environ.get(ENV_VAR)} keeps them turned off at run time")
    elif not torch.cuda.is_available():
        print("  note: no CUDA device is visible here; they will be used on a machine with one")
    return 0
