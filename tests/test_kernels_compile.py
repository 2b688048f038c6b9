"""Compile checks of the CUDA sources where a GPU is not needed: every ``.cu`` file with ``nvcc -c``
for one architecture (sm_90) wherever nvcc is on PATH, and the torch binding (``binding.cpp``) with
the host compiler against the installed torch headers where they and the CUDA headers are present.
Warnings count as failures."""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from kernels import loader

NVCC = shutil.which("nvcc")
CUDA_SOURCES = sorted(path.name for path in loader.CSRC.glob("*.cu"))


def test_every_cu_file_is_built_by_the_loader():
    assert sorted(loader.CUDA_SOURCES) == CUDA_SOURCES


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", CUDA_SOURCES)
def test_cu_compiles_with_nvcc(source, tmp_path):
    command = [
        NVCC, "-c", "-std=c++17", "-arch=sm_90", "-O3", "-Werror", "all-warnings", "-Xcompiler", "-Wall",
        "-I", str(loader.CSRC), str(loader.CSRC / source), "-o", str(tmp_path / (source + ".o")),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"nvcc failed on {source}:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / (source + ".o")).stat().st_size > 0


def _cuda_include() -> Path | None:
    if NVCC is not None:
        for root in (Path(NVCC).resolve().parent.parent, Path("/usr/local/cuda")):
            if (root / "include" / "cuda_runtime_api.h").is_file():
                return root / "include"
    return None


def test_binding_compiles_against_torch_headers(tmp_path):
    compiler = shutil.which("g++") or shutil.which("c++")
    torch_include = Path(torch.__file__).parent / "include"
    cuda_include = _cuda_include()
    if compiler is None or cuda_include is None or not (torch_include / "c10" / "cuda" / "CUDAGuard.h").is_file():
        pytest.skip("needs a C++ compiler, the CUDA headers and torch's c10/cuda headers")
    # CPU builds of torch ship c10/cuda without the header CMake generates for CUDA builds; an empty
    # stand-in is enough to check the binding's own code.
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file():
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    command = [
        compiler, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
        "-I", str(loader.CSRC), "-isystem", str(torch_include),
        "-isystem", str(torch_include / "torch" / "csrc" / "api" / "include"), "-isystem", str(tmp_path / "stub"),
        "-isystem", str(cuda_include), "-isystem", sysconfig.get_paths()["include"],
        f"-DTORCH_EXTENSION_NAME={loader.EXTENSION_NAME}", str(loader.CSRC / loader.BINDING_SOURCE),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"binding.cpp does not compile:\n{result.stderr[-6000:]}"
