"""The GPU check's parts that need no GPU: arguments, the step runner (time limits, skips), the readers of
the steps' output, the summary, and the whole check on a machine without CUDA (every GPU step skipped)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kernels import loader
from rlmem import gpu_check
from rlmem.cli import main as rlmem_main
from rlmem.gpu_check import NO_CUDA, Step, StepResult, StepRunner

PYTHON = sys.executable


def _runner(tmp_path: Path, cuda: bool = False, budget: float = 120.0) -> StepRunner:
    return StepRunner(tmp_path / "check.log", budget, cuda=cuda, echo=lambda line: None)


def _python_step(name: str, code: str, limit: float = 20.0, **options) -> Step:
    return Step(name, [PYTHON, "-c", code], limit, needs_cuda=False, **options)


# ----------------------------------------------------------------------------------------------------
# Arguments


@pytest.mark.parametrize("argv", [["--bogus"], ["--only", "nope"], ["--only", ","], ["--train-steps", "0"],
                                  ["--budget", "-1"]])
def test_bad_arguments_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlmem.gpu_check: error:") and "\n" not in err


def test_an_out_folder_that_cannot_be_written_exits_2_before_any_step(tmp_path: Path, capsys):
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    assert gpu_check.main(["--out", str(blocked / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rlmem.gpu_check: error: cannot write in --out {blocked}/out") and "\n" not in err


def test_arguments_defaults_and_choices():
    ns = gpu_check.parse_args([])
    assert ns.out == gpu_check.DEFAULT_OUT and ns.only is None
    assert ns.train_steps == gpu_check.DEFAULT_TRAIN_STEPS and ns.budget == gpu_check.DEFAULT_BUDGET_S
    ns = gpu_check.parse_args(["--only", "train-gru, bench-envs-atari", "--out", "x", "--train-steps", "5"])
    assert ns.only == ["train-gru", "bench-envs-atari"] and ns.out == Path("x") and ns.train_steps == 5


def test_the_steps_fit_in_the_budget_and_eight_minutes(tmp_path):
    steps = [gpu_check.device_step(), *gpu_check.gpu_steps(tmp_path, 1000)]
    assert [s.name for s in steps] == list(gpu_check.STEP_NAMES)
    total = sum(s.limit_s for s in steps)
    assert total <= gpu_check.DEFAULT_BUDGET_S
    # the budget, one interrupt grace and the check's own start fit in 8 minutes
    assert gpu_check.DEFAULT_BUDGET_S + gpu_check.INTERRUPT_GRACE_S + 10 < 8 * 60
    trainings = [s for s in steps if s.name.startswith("train-")]
    assert [s.command[4] for s in trainings] == [f"configs/atari_pong_{c}.yaml"
                                                 for c in ("gru", "elstm", "lru", "elstm", "gru")]
    for step in trainings:
        assert "train.device=cuda" in step.command and "train.total_steps=1000" in step.command
        assert "train.progress=false" in step.command
        assert f"train.run_dir={tmp_path / 'train' / step.name[6:]}" in step.command
    assert trainings[3].command[-1] == "memory.grad=bptt" and trainings[4].command[-1] == "env.num_envs=64"
    for config in {s.command[4] for s in trainings}:
        assert (gpu_check.REPO_ROOT / config).is_file()


def test_the_check_imports_only_the_standard_library():
    code = ("import sys; import rlmem.gpu_check; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'yaml', 'omegaconf'}))")
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=gpu_check.REPO_ROOT,
                            check=True)
    assert result.stdout.strip() == "[]"


def test_the_extension_name_is_the_loaders():
    assert gpu_check.EXTENSION_NAME == loader.EXTENSION_NAME


# ----------------------------------------------------------------------------------------------------
# The step runner


def test_a_step_that_times_out_is_recorded_and_the_next_step_runs(tmp_path):
    runner = _runner(tmp_path)
    started = time.monotonic()
    # the hung step leaves a child of its own behind: the whole group must go
    hung = _python_step("hung", "import subprocess, sys, time; "
                        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                        "print('started', flush=True); time.sleep(60)", limit=1.0)
    first = runner.run(hung)
    second = runner.run(_python_step("next", "print('the next step ran')"))
    assert time.monotonic() - started < 20
    assert first.status == "timeout" and "after 1 s" in first.reason
    assert 1.0 <= first.seconds < 1.0 + gpu_check.INTERRUPT_GRACE_S + 3
    assert second.status == "ok" and second.reason == ""
    log = (tmp_path / "check.log").read_text()
    assert "===== hung (limit 1 s) =====" in log and "started" in log
    assert "----- hung: timeout" in log and "the next step ran" in log
    assert [r.name for r in runner.results] == ["hung", "next"]


def test_a_step_deaf_to_the_interrupt_is_killed_after_the_grace(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "INTERRUPT_GRACE_S", 0.5)
    runner = _runner(tmp_path)
    result = runner.run(_python_step(
        "deaf", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)", limit=1.0))
    assert result.status == "timeout" and result.seconds < 5


def test_the_overall_budget_caps_each_step(tmp_path):
    runner = _runner(tmp_path, budget=1.5)
    first = runner.run(_python_step("long", "import time; time.sleep(30)", limit=30.0))
    second = runner.run(_python_step("late", "print('never')", limit=30.0))
    assert first.status == "timeout" and first.seconds < 8
    assert second.status == "timeout" and second.reason == "no time left of the overall budget"


def test_failures_and_skips(tmp_path):
    runner = _runner(tmp_path)
    failed = runner.run(_python_step("fails", "raise SystemExit(3)"))
    assert (failed.status, failed.reason) == ("failed", "exit status 3")
    absent = runner.run(_python_step("absent", "print('not run')", requires=("no_such_module_for_the_check",)))
    assert (absent.status, absent.reason) == ("skipped", "no_such_module_for_the_check missing")
    assert absent.seconds == 0.0
    # an import that fails anyway: a third-party module is a skip, a first-party one a failure
    late = runner.run(_python_step("late-import", "import no_such_module_for_the_check.sub"))
    assert (late.status, late.reason) == ("skipped", "no_such_module_for_the_check missing")
    own = runner.run(_python_step("own-import", "import rlmem.no_such_module_for_the_check"))
    assert own.status == "failed"
    strict = runner.run(_python_step("pytest-like", "import no_such_module_for_the_check", missing_is_skip=False))
    assert strict.status == "failed"
    gpu = runner.run(Step("gpu", [PYTHON, "-c", "print('not run')"], 10.0))
    assert (gpu.status, gpu.reason) == ("skipped", NO_CUDA)
    assert "not run" not in (tmp_path / "check.log").read_text().splitlines()


def test_a_reader_gives_figures_and_a_verdict(tmp_path):
    runner = _runner(tmp_path)

    def read(output: str):
        return {"lines": len(output.splitlines())}, ("failed", "nothing measured") if "nothing" in output else None

    good = runner.run(_python_step("good", "print('a'); print('b')", read=read))
    bad = runner.run(_python_step("bad", "print('nothing')", read=read))
    broken = runner.run(_python_step("broken", "print('x')", read=lambda output: 1 / 0))
    assert (good.status, good.figures) == ("ok", {"lines": 2})
    assert (bad.status, bad.reason) == ("failed", "nothing measured")
    assert broken.status == "ok" and "ZeroDivisionError" in broken.figures["read_error"]


def test_the_real_procgen_step_skips_without_procgen(tmp_path, monkeypatch):
    real = gpu_check.module_available
    monkeypatch.setattr(gpu_check, "module_available", lambda name: name != "procgen" and real(name))
    step = next(s for s in gpu_check.gpu_steps(tmp_path, 1000) if s.name == "bench-envs-procgen")
    result = _runner(tmp_path, cuda=True).run(step)
    assert (result.status, result.reason) == ("skipped", "procgen missing")


def test_gpu_test_files_leave_out_files_with_missing_imports(tmp_path):
    (tmp_path / "test_a.py").write_text("import pytest\n\n@pytest.mark.gpu\ndef test_x():\n    pass\n")
    (tmp_path / "test_b.py").write_text("import no_such_module_for_the_check\nimport pytest\n"
                                        "@pytest.mark.gpu\ndef test_y():\n    pass\n")
    (tmp_path / "test_c.py").write_text("def test_z():\n    pass\n")
    chosen, left_out = gpu_check.gpu_test_files(tmp_path)
    assert chosen == [str(tmp_path / "test_a.py")]
    assert left_out == {str(tmp_path / "test_b.py"): "no_such_module_for_the_check missing"}
    chosen, _ = gpu_check.gpu_test_files(gpu_check.REPO_ROOT / "tests")
    assert "tests/test_kernels_parity.py" in chosen and "tests/test_gpu_check.py" not in chosen
    assert "tests/test_learners_on_device.py" in chosen  # the gpu mark on a parameter (pytest.param marks)


def test_stale_build_locks_are_found(tmp_path):
    lock = tmp_path / "py312_cu128" / loader.EXTENSION_NAME / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    assert gpu_check.extension_build_locks({"TORCH_EXTENSIONS_DIR": str(tmp_path)}) == [lock]
    assert gpu_check.extension_build_locks({"XDG_CACHE_HOME": str(tmp_path / "none")}) == []


# ----------------------------------------------------------------------------------------------------
# Readers


def test_read_device_and_arch_list():
    info = {"torch": "2.9.0", "cuda": "12.8", "available": True,
            "devices": [{"name": "H200", "capability": [9, 0], "memory_gib": 139.8, "multiprocessors": 132}]}
    figures, verdict = gpu_check.read_device("noise\nDEVICE " + json.dumps(info) + "\n")
    assert figures == info and verdict is None
    assert gpu_check.arch_list(info) == "9.0"
    two = {"devices": [{"capability": [9, 0]}, {"capability": [8, 6]}, {"capability": [9, 0]}]}
    assert gpu_check.arch_list(two) == "8.6;9.0"
    figures, verdict = gpu_check.read_device('DEVICE {"available": false, "devices": []}')
    assert verdict == ("skipped", NO_CUDA)
    assert gpu_check.read_device("Traceback ...")[1][0] == "failed"


def test_read_kernels_build_and_missing_tools():
    figures, verdict = gpu_check.read_kernels_build("built x: /a.so\n  architectures: 9.0 (TORCH_CUDA_ARCH_LIST)\n")
    assert figures == {"architectures": "9.0 (TORCH_CUDA_ARCH_LIST)"} and verdict is None
    message = "rlmem kernels build: cannot build the CUDA kernels: the CUDA toolkit (nvcc) was not found; set CUDA_HOME"
    assert gpu_check.read_kernels_build(message)[1] == ("skipped", "nvcc missing (the CUDA toolkit; set CUDA_HOME)")
    assert gpu_check.read_kernels_build("ninja is not installed (pip install ninja)")[1] == ("skipped", "ninja missing")


def test_read_pytest_counts():
    figures, _ = gpu_check.read_pytest("....s.\n3 passed, 2 skipped, 71 deselected in 4.20s\n")
    assert figures == {"passed": 3, "skipped": 2, "deselected": 71}
    figures, _ = gpu_check.read_pytest("1 failed, 40 passed, 1 error in 9s")
    assert figures == {"failed": 1, "passed": 40, "error": 1}


def test_read_bench_kernels_rows():
    def ms(seconds):
        return f"{seconds * 1e3:9.3f}m"

    row = (f"{'real':8s} {32:4d} {'window forward':20s} {ms(1e-4)} {ms(8e-5)} {ms(1.2e-3)} {ms(9e-3)} "
           f"{12.0:6.1f}x {90.0:7.1f}x {345.6:8.1f}")
    no_step = (f"{'complex':8s} {1:4d} {'step + gradient':20s} {ms(1e-5)} {ms(8e-6)} {ms(3e-5)} {'-':>10s} "
               f"{3.0:6.1f}x {'-':>8s} {12.5:8.1f}")
    bandwidth = f"{'':13s} {'bandwidth':20s} {3100:9.0f} GB/s = 65% of peak, 81% of the measured copy (kernel time)"
    core = ("\nelstm window, forward + backward (B=64, N=256, D=256, T=32):\n"
            f"  {'rtrl':20s} {2.5:9.3f} ms   {1.25:6.2f}x bptt\n"
            f"  {'rtrl (kernels off)':20s} {9.0:9.3f} ms   {4.5:6.2f}x bptt\n"
            f"  {'bptt':20s} {2.0:9.3f} ms   {1.0:6.2f}x bptt\n")
    output = "H200: memory bandwidth peak 4800 GB/s ...; measured device-to-device copy 3900 GB/s\nheader\n"
    figures, verdict = gpu_check.read_bench_kernels(output + row + "\n" + no_step + "\n" + bandwidth + core)
    assert verdict is None and figures["copy_GB_per_s"] == 3900.0
    assert figures["rows"] == {
        "real T=32 window forward": {"vs_reference": 12.0, "vs_stepwise": 90.0, "G_per_s": 345.6},
        "complex T=1 step + gradient": {"vs_reference": 3.0, "vs_stepwise": None, "G_per_s": 12.5,
                                        "GB_per_s": 3100.0, "of_copy": 0.81}}
    assert figures["elstm_window_ms"] == {"rtrl": 2.5, "rtrl (kernels off)": 9.0, "bptt": 2.0}
    unavailable = "rlmem bench kernels: the CUDA kernels are unavailable here: the build failed: error"
    assert gpu_check.read_bench_kernels(unavailable)[1] == ("failed", "the CUDA kernels are unavailable")


def test_targets_are_judged_from_the_figures():
    rows = {"real T=32 forward (3)": {"vs_reference": 25.0, "vs_stepwise": 40.0},
            "complex T=32 forward (3)": {"vs_reference": 21.0, "vs_stepwise": 22.0},
            "complex T=32 backward (4)": {"vs_reference": 18.0, "vs_stepwise": None},
            "real T=1 forward (3)": {"vs_reference": 2.0},
            "real T=1 per-step + gradient": {"vs_reference": 3.0, "of_copy": 0.81},
            "complex T=1 per-step + gradient": {"vs_reference": 3.0, "of_copy": 0.74}}
    results = [
        StepResult("bench-kernels", "", 40, "ok", 20.0,
                   figures={"rows": rows, "elstm_window_ms": {"rtrl": 3.0, "bptt": 2.0}}),
        StepResult("train-gru", "", 35, "ok", 20.0, figures={"SPS_median": 4000.0}),
        StepResult("train-gru-envs64", "", 35, "ok", 20.0, figures={"SPS_median": 9000.0}),
        StepResult("train-elstm", "", 35, "ok", 20.0, figures={"SPS_median": 3000.0}),
        StepResult("train-elstm-bptt", "", 35, "failed", 2.0, figures={"SPS_median": 1.0}),
    ]
    targets = gpu_check.judge_targets(results)
    assert set(targets) == set(gpu_check.TARGETS)
    assert targets["window_kernels_vs_reference"] == {  # T = 1 rows are not windows
        "value": 18.0, "target": ">= 20", "met": False, "what": gpu_check.TARGETS["window_kernels_vs_reference"][2]}
    assert targets["window_kernels_vs_eager_stepping"]["value"] == 22.0
    assert targets["window_kernels_vs_eager_stepping"]["met"] is True
    assert targets["step_kernel_of_copy"]["value"] == 0.74 and targets["step_kernel_of_copy"]["met"] is True
    assert targets["elstm_window_rtrl_over_bptt"]["value"] == 1.5 and targets["elstm_window_rtrl_over_bptt"]["met"]
    # a failed step's figures are not used
    assert targets["elstm_training_rtrl_over_bptt"] == {**targets["elstm_training_rtrl_over_bptt"],
                                                        "value": None, "met": None}
    assert targets["pong_gru_sps"]["value"] == 9000.0 and targets["pong_gru_sps"]["met"] is True
    table = gpu_check.targets_table(targets)
    assert "MISSED" in table and "not measured" in table and "9,000" in table


def test_read_bench_envs_row():
    table = ("env steps/s; ...\nsource       envs       raw    vecenv    policy   rollout   overlap roll/raw\n"
             "------\natari          16    12,345     9,876    20,000     5,432         -  0.44 \n")
    figures, verdict = gpu_check.bench_envs_reader("atari")(table)
    assert verdict is None
    assert figures == {"num_envs": 16, "raw": 12345.0, "vecenv": 9876.0, "policy": 20000.0, "rollout": 5432.0,
                       "overlap": None}
    skipped = "procgen        64  skipped: procgen is not installed\n"
    assert gpu_check.bench_envs_reader("procgen")(skipped) == ({}, ("skipped", "procgen missing"))
    assert gpu_check.bench_envs_reader("atari")("Traceback")[1][0] == "failed"


def test_read_sps_from_a_tiny_run(tmp_path):
    run_dir = tmp_path / "run"
    assert rlmem_main(["train", "memory.hidden_size=8", "env.num_envs=4", "agent.unroll_length=8",
                       "train.progress=false", "train.total_steps=96", f"train.run_dir={run_dir}"]) == 0
    figures = gpu_check.read_sps(run_dir)
    assert figures["points"] == 3 and figures["last_step"] == 96
    assert figures["SPS"] > 0 and figures["SPS_median"] > 0
    assert gpu_check.train_reader(run_dir)("") == (figures, None)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert gpu_check.train_reader(empty)("")[1] == ("failed", "no charts/SPS in the run's event files")


# ----------------------------------------------------------------------------------------------------
# Summary and the whole check


def test_summary_json_shape(tmp_path):
    results = [StepResult("device", "python -m rlmem.gpu_check --device-info", 25, "ok", 2.0,
                          figures={"available": True}),
               StepResult("train-gru", "python -m rlmem.cli train ...", 45, "ok", 30.5, figures={"SPS": 2500.0,
                                                                                               "SPS_median": 2400.0}),
               StepResult("bench-envs-procgen", "python -c ...", 25, "skipped", 0.0, "procgen missing"),
               StepResult("pytest-gpu", "python -m pytest ...", 60, "timeout", 61.0, "still running after 60 s")]
    written = gpu_check.write_summary(tmp_path / "summary.json", {"available": True}, results, 450.0)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == written
    assert set(summary) == {"device", "budget_s", "seconds", "ok", "counts", "steps", "targets"}
    assert summary["targets"]["pong_gru_sps"]["value"] == 2400.0
    assert summary["ok"] is False and summary["seconds"] == 93.5
    assert summary["counts"] == {"ok": 2, "failed": 0, "timeout": 1, "skipped": 1}
    assert [set(step) for step in summary["steps"]] == [
        {"name", "command", "limit_s", "status", "seconds", "reason", "figures"}] * 4
    assert summary["steps"][1]["figures"]["SPS"] == 2500.0
    table = gpu_check.summary_table(results)
    assert "SPS 2,500 (median 2,400)" in table and "procgen missing" in table
    assert gpu_check.write_summary(tmp_path / "s2.json", {}, results[:3], 450.0)["ok"] is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine this would run the whole check")
def test_the_whole_check_without_cuda_skips_the_gpu_steps_and_exits_0(tmp_path, capsys):
    started = time.monotonic()
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 0
    assert time.monotonic() - started < 60
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [s["name"] for s in summary["steps"]] == list(gpu_check.STEP_NAMES)
    assert all(s["status"] == "skipped" and s["reason"] == NO_CUDA for s in summary["steps"])
    assert summary["device"]["available"] is False and summary["ok"] is True
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert log.count("\n===== ") == len(gpu_check.STEP_NAMES) and "DEVICE {" in log
    out = capsys.readouterr().out
    assert "train-elstm" in out and "summary.json" in out

    assert gpu_check.main(["--out", str(tmp_path / "few"), "--only", "train-gru"]) == 0
    summary = json.loads((tmp_path / "few" / "summary.json").read_text())
    assert [s["name"] for s in summary["steps"]] == ["device", "train-gru"]


def test_a_pip_installed_ninja_goes_on_the_path(tmp_path, monkeypatch):
    target = tmp_path / "extras"  # as `pip install --target extras ninja` lays it out
    (target / "ninja").mkdir(parents=True)
    (target / "ninja" / "__init__.py").write_text("")
    (target / "bin").mkdir()
    (target / "bin" / "ninja").write_text("#!/bin/sh\n")
    (target / "bin" / "ninja").chmod(0o755)
    monkeypatch.syspath_prepend(str(target))
    empty = tmp_path / "empty"
    empty.mkdir()
    env = gpu_check.with_pip_ninja({"PATH": str(empty)})
    assert env["PATH"].split(os.pathsep) == [str(target / "bin"), str(empty)]
    (empty / "ninja").write_text("#!/bin/sh\n")
    (empty / "ninja").chmod(0o755)
    assert gpu_check.with_pip_ninja({"PATH": str(empty)}) == {"PATH": str(empty)}


def test_the_check_with_a_pretend_gpu(tmp_path, monkeypatch, capsys):
    """The orchestration on a pretend device: the arch list reaches the later steps, a stale build lock
    goes, a failed kernel build turns the kernels off for the rest, a training's old run dir is cleared,
    and an interrupt ends the check with the steps that ended in the summary (exit 130)."""
    info = {"available": True, "devices": [{"name": "Pretend", "capability": [9, 0], "memory_gib": 1.0}]}
    monkeypatch.setattr(gpu_check, "device_step", lambda: _python_step(
        "device", f"print('DEVICE ' + {json.dumps(info)!r})", read=gpu_check.read_device))
    extensions = tmp_path / "extensions"
    lock = extensions / "py312_cu128" / loader.EXTENSION_NAME / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    out = tmp_path / "out"
    old_run = out / "train" / "gru" / "checkpoint.pt"
    old_run.parent.mkdir(parents=True)
    old_run.write_text("")

    def interrupt(output: str):
        raise KeyboardInterrupt

    show_env = ("import os, sys; "
                "print('arch', os.environ.get('TORCH_CUDA_ARCH_LIST'), 'kernels', os.environ.get('RLMEM_KERNELS'), "
                "'pycache', os.environ.get('PYTHONPYCACHEPREFIX'))")
    steps = [
        Step("kernels-build", [PYTHON, "-c", show_env + "; sys.exit(1)"], 20),
        Step("train-gru", [PYTHON, "-c", show_env], 20),
        Step("bench-kernels", [PYTHON, "-c", "print('x')"], 20, read=interrupt),
        Step("bench-envs-atari", [PYTHON, "-c", "print('never')"], 20),
    ]
    monkeypatch.setattr(gpu_check, "gpu_steps", lambda out, train_steps: steps)
    assert gpu_check.main(["--out", str(out)]) == 130
    assert not lock.exists() and not old_run.exists()
    log = (out / "gpu_check.log").read_text()
    assert f"arch 9.0 kernels None pycache {out / 'pycache'}" in log and "arch 9.0 kernels 0" in log
    assert "never" not in log.splitlines()
    summary = json.loads((out / "summary.json").read_text())
    assert [(s["name"], s["status"]) for s in summary["steps"]] == [
        ("device", "ok"), ("kernels-build", "failed"), ("train-gru", "ok")]
    assert summary["device"]["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert "interrupted" in capsys.readouterr().out


def test_read_bench_population_from_the_real_table(capsys):
    assert rlmem_main(["bench", "population", "--members", "1,2", "--methods", "columnar", "--steps", "2",
                       "--repeats", "1"]) == 0
    figures, verdict = gpu_check.read_bench_population(capsys.readouterr().out)
    assert verdict is None and set(figures["rows"]) == {"columnar P=1", "columnar P=2"}
    assert all(row["member_steps_per_s"] > 0 and row["speedup"] > 0 for row in figures["rows"].values())
    assert gpu_check.read_bench_population("Traceback ...")[1] == ("failed", "no rows in the table")
    table = gpu_check.summary_table([StepResult("bench-population", "", 20, "ok", 5.0, figures=figures)])
    assert "columnar P=2" in table and "columnar P=1" not in table
