"""The kernels' loader: unavailable → a reason and the reference, never an exception; RLMEM_KERNELS=0;
``rlmem kernels build`` and ``rlmem bench kernels`` without a GPU."""

from __future__ import annotations

import re

import pytest
import torch

import kernels
from kernels import loader
from rlmem import rtrl
from rlmem.rtrl import ParamGroup, RTRLCell, WindowCoefficients

HAS_GPU_KERNELS = torch.cuda.is_available() and torch.version.cuda is not None


class Diagonal(RTRLCell):
    form, block_size = "real", 1
    param_names = ("W", "b")
    groups = (ParamGroup("W", u="u", v="x", matrix=True), ParamGroup("b", u="u"))


def window(device: str = "cpu"):
    g = torch.Generator().manual_seed(0)
    T, B, N, D = 3, 2, 4, 5
    coefficients = WindowCoefficients(
        torch.rand(T, B, N, generator=g).to(device),
        {"u": torch.randn(T, B, N, generator=g).to(device), "x": torch.randn(T, B, D, generator=g).to(device)},
    )
    S = {"W": torch.randn(B, N, D, generator=g).to(device), "b": torch.randn(B, N, generator=g).to(device)}
    return Diagonal(), S, coefficients


def test_turned_off_by_the_environment(monkeypatch):
    for value in ("0", "false", "off", "no", " OFF "):
        monkeypatch.setenv(loader.ENV_VAR, value)
        assert not kernels.enabled()
        assert kernels.available() is False
        assert loader.ENV_VAR in kernels.unavailable_reason()
    monkeypatch.setenv(loader.ENV_VAR, "1")
    assert kernels.enabled()


@pytest.mark.skipif(HAS_GPU_KERNELS, reason="checks the behaviour without a GPU")
def test_unavailable_without_a_gpu_says_why(monkeypatch):
    monkeypatch.delenv(loader.ENV_VAR, raising=False)
    assert kernels.available() is False  # a CPU build of torch, or no device: no exception
    reason = kernels.unavailable_reason()
    assert reason and ("CUDA" in reason or "nvcc" in reason or "ninja" in reason)
    with pytest.raises(RuntimeError, match=re.escape(reason)):
        loader.load()


def test_missing_prerequisites_are_reasons_not_errors(monkeypatch):
    """Each missing piece gives a one-line reason (checked in the order a user would fix them)."""
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "no CUDA support" in loader._missing_prerequisite(require_device=True)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loader._missing_prerequisite(require_device=True) == "no CUDA device is visible"
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    assert "nvcc" in loader._missing_prerequisite(require_device=False)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/opt/cuda")
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    assert "ninja" in loader._missing_prerequisite(require_device=False)


def test_a_failed_build_is_reported_once_and_falls_back(monkeypatch):
    monkeypatch.delenv(loader.ENV_VAR, raising=False)
    monkeypatch.setattr(loader, "_module", None)
    monkeypatch.setattr(loader, "_build_failure", None)
    monkeypatch.setattr(loader, "_warned", False)
    monkeypatch.setattr(loader, "_missing_prerequisite", lambda require_device: None)

    def failing_build(verbose):
        raise OSError("error: identifier 'foo' is undefined\nmore compiler output")

    monkeypatch.setattr(loader, "_build", failing_build)
    with pytest.warns(UserWarning, match="using the PyTorch reference"):
        assert kernels.available() is False
    assert kernels.unavailable_reason() == "the build failed: error: identifier 'foo' is undefined"
    assert kernels.available() is False  # not rebuilt, not warned again


def test_engine_runs_the_reference_on_cpu(monkeypatch):
    """CPU tensors never reach the kernels (nor the loader), whatever the environment says."""
    monkeypatch.delenv(loader.ENV_VAR, raising=False)

    def forbidden(*args, **kwargs):
        raise AssertionError("the kernels were called for CPU tensors")

    for name in ("advance", "gradients", "adjoint", "available"):
        monkeypatch.setattr(kernels, name, forbidden)
    cell, S, coefficients = window()
    S_T = rtrl.advance(cell, S, coefficients)
    errors = torch.randn(3, 2, 4)
    delta = rtrl._adjoint(cell, coefficients.jacobians, errors)
    grads = rtrl.gradients(cell, S, coefficients, delta)
    assert S_T["W"].shape == (2, 4, 5) and grads["W"].shape == (4, 5) and grads["b"].shape == (4,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_engine_reference_on_cuda_with_kernels_off(monkeypatch):
    """RLMEM_KERNELS=0: CUDA tensors take the reference, and the kernels are never called."""
    monkeypatch.setenv(loader.ENV_VAR, "0")
    monkeypatch.setattr(loader, "load", lambda *a, **k: pytest.fail("the extension was loaded"))
    cell, S, coefficients = window("cuda")
    S_T = rtrl.advance(cell, S, coefficients)
    assert S_T["W"].is_cuda


@pytest.mark.skipif(HAS_GPU_KERNELS, reason="checks the behaviour without a GPU")
def test_build_command_without_cuda_fails_with_one_line(capsys, monkeypatch):
    monkeypatch.setattr(loader, "_module", None)
    monkeypatch.setattr(loader, "_build_failure", None)
    assert kernels.build_command([]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlmem kernels build: cannot build the CUDA kernels: ")
    assert "Traceback" not in captured.err + captured.out


def test_build_command_reports_what_it_built(capsys, monkeypatch, tmp_path):
    class Built:
        __file__ = str(tmp_path / "rlmem_sensitivity_kernels.so")

    monkeypatch.setattr(loader, "load", lambda verbose=False, require_device=True: Built())
    assert kernels.build_command(["--verbose"]) == 0
    out = capsys.readouterr().out
    assert f"built {loader.EXTENSION_NAME}: {Built.__file__}" in out
    for name in ("forward.cu", "backward.cu", "reduce.cu", "binding.cpp", "architectures:"):
        assert name in out


def test_sources_are_packaged():
    for path in loader.sources():
        assert path.is_file(), path
    assert (loader.CSRC / "sensitivity.h").is_file() and (loader.CSRC / "common.cuh").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_bench_without_a_gpu_prints_one_line(capsys):
    from rlmem.bench import kernels as bench

    bench.run([])
    captured = capsys.readouterr()
    assert len(captured.out.strip().splitlines()) == 1
    assert "no CUDA device" in captured.out
    assert captured.err == ""
