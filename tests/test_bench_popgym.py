"""`rlmem bench popgym` runs a tiny study end to end, starts no finished run again, resumes an unfinished
one from its checkpoint, writes POPGym's MMER table and the learning curves, and refuses unknown tasks,
cores and changed settings with one message and exit status 2 before any run starts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rlmem.bench.popgym import find_config, plan_runs, windowed_means
from rlmem.cli import main

pytest.importorskip("popgym")

TASKS = ["popgym-RepeatPreviousEasy-v0", "popgym-RepeatFirstEasy-v0"]
SMALL = ["--set", "memory.hidden_size=8", "--set", "model.encoder_size=8", "--set", "env.num_envs=4",
         "--set", "agent.unroll_length=16"]  # 64 env steps per update
TINY = ["--tasks", ",".join(TASKS), "--cores", "gru,elstm:rtrl", "--seeds", "1", "--window", "256", *SMALL]
RUN_DIRS = [f"{task}/{core}_s0" for task in TASKS for core in ("gru-bptt", "elstm-rtrl")]


def checkpoint_step(run_dir: Path) -> int:
    return int(torch.load(run_dir / "checkpoint.pt", weights_only=False)["global_step"])


def test_study_skips_finished_runs_resumes_unfinished_ones_and_writes_the_table(tmp_path: Path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "popgym"
    assert main(["bench", "popgym", *TINY, "--steps", "512", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("  start ") == 4 and printed.count("  done ") == 4
    assert all(checkpoint_step(out / d) == 512 for d in RUN_DIRS)
    results = json.loads((out / "results.json").read_text())
    cells = results["summary"]["cells"]
    assert list(cells) == TASKS and all(list(cells[t]) == ["gru:bptt", "elstm:rtrl"] for t in TASKS)
    assert all(-1 <= cells[t][c]["mmer"] <= 1 and cells[t][c]["seeds"] == 1 for t in TASKS for c in cells[t])
    overall = results["summary"]["mean_over_tasks"]
    assert overall["gru:bptt"]["mmer"] == pytest.approx(np.mean([cells[t]["gru:bptt"]["mmer"] for t in TASKS]))
    assert len(results["runs"]) == 4 and all(r["steps_per_second"] > 0 for r in results["runs"])
    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows] == [
        "| task", "| RepeatPreviousEasy", "| RepeatFirstEasy", "| **mean over tasks**"]
    assert rows[0] == "| task | gru:bptt | elstm:rtrl |"
    assert (out / "popgym.png").stat().st_size > 1000

    # The same command again: every run is finished, none starts, no checkpoint is rewritten.
    stamps = {d: (out / d / "checkpoint.pt").stat().st_mtime_ns for d in RUN_DIRS}
    assert main(["bench", "popgym", *TINY, "--steps", "512", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("  skip ") == 4 and "  start " not in printed and "  done " not in printed
    assert {d: (out / d / "checkpoint.pt").stat().st_mtime_ns for d in RUN_DIRS} == stamps
    assert json.loads((out / "results.json").read_text())["summary"] == results["summary"]

    # A longer study: the run stopped at 512 steps continues from its checkpoint to 1,024.
    one = ["--tasks", TASKS[1], "--cores", "gru", "--seeds", "1", "--window", "256", *SMALL]
    assert main(["bench", "popgym", *one, "--steps", "1024", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "resume from step 512: RepeatFirstEasy gru:bptt s0" in printed and "  done RepeatFirstEasy" in printed
    assert checkpoint_step(out / RUN_DIRS[2]) == 1024
    resumed = json.loads((out / "results.json").read_text())["runs"]
    assert len(resumed) == 1 and resumed[0]["steps"] == 1024

    # --saved-only runs nothing, not even the runs a larger study still lacks, and summarises the finished.
    more_seeds = [*TINY[: TINY.index("--seeds")], "--seeds", "2", *TINY[TINY.index("--seeds") + 2 :]]
    assert main(["bench", "popgym", *more_seeds, "--steps", "512", "--saved-only", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "leaving out 4 run(s) not finished yet" in printed and "  start " not in printed
    assert not list(out.glob("*/*_s1"))
    summary = json.loads((out / "results.json").read_text())
    assert len(summary["runs"]) == 4 and summary["settings"]["seeds"] == 2
    assert main(["bench", "popgym", *one, "--steps", "4096", "--saved-only", "--out", str(out)]) == 2
    assert "--saved-only: none of these runs has finished" in capsys.readouterr().err

    # Other settings into the same OUT would mix two studies in one table: refused before anything runs.
    changed = [*one[:-len(SMALL)], *SMALL, "--set", "agent.lr=0.01"]
    assert main(["bench", "popgym", *changed, "--steps", "1024", "--out", str(out)]) == 2
    assert "was trained with agent.lr=0.001" in capsys.readouterr().err
    assert checkpoint_step(out / RUN_DIRS[2]) == 1024


def test_ctrl_c_stops_the_study_and_the_same_command_resumes_the_interrupted_run(
    tmp_path: Path, monkeypatch, interrupt_at, capsys
):
    pytest.importorskip("matplotlib")
    out = tmp_path / "popgym"
    study = ["bench", "popgym", "--tasks", TASKS[1], "--cores", "gru", "--seeds", "2", "--steps", "512",
             "--window", "256", *SMALL, "--out", str(out)]
    interrupt_at(4)  # Ctrl-C during the first run's 4th update (64 env steps each)
    assert main(study) == 0
    monkeypatch.undo()
    printed = capsys.readouterr().out
    assert "stopped RepeatFirstEasy gru:bptt s0 at step 256" in printed and "s1" not in printed
    assert checkpoint_step(out / TASKS[1] / "gru-bptt_s0") == 256 and not (out / TASKS[1] / "gru-bptt_s1").exists()

    assert main(study) == 0
    printed = capsys.readouterr().out
    assert "resume from step 256: RepeatFirstEasy gru:bptt s0" in printed
    assert "start RepeatFirstEasy gru:bptt s1" in printed
    assert all(checkpoint_step(out / TASKS[1] / f"gru-bptt_s{seed}") == 512 for seed in (0, 1))
    cell = json.loads((out / "results.json").read_text())["summary"]["cells"][TASKS[1]]["gru:bptt"]
    assert cell["seeds"] == 2 and len(cell["per_seed"]) == 2


@pytest.mark.parametrize(
    ("argument", "message"),
    [(["--tasks", "popgym-RepeatPreviousEasy-v0,popgym-NoSuchTaskEasy-v0"], "--tasks 'popgym-NoSuchTaskEasy-v0': "),
     (["--tasks", "RepeatPreviousEasy"], "(POPGym's ids begin with 'popgym-', e.g. popgym-RepeatPreviousEasy-v0)"),
     (["--cores", "gru,no_such_core"], "--cores 'no_such_core': unknown memory choice"),
     (["--cores", "gru:rtrl"], "--cores 'gru:rtrl': memory.grad='rtrl' is not supported by core 'gru'")],
)
def test_unknown_task_or_core_is_one_message_and_exit_2_before_any_run(tmp_path: Path, capsys, argument, message):
    out = tmp_path / "popgym"
    assert main(["bench", "popgym", "--tasks", TASKS[0], "--cores", "gru", "--steps", "64", *argument,
                 "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and len(captured.err.strip().splitlines()) == 1
    assert "start" not in captured.out and not out.exists()


def test_a_core_option_is_checked_with_each_core_not_with_the_default_core(tmp_path: Path, capsys):
    """``--set memory.chrono_horizon=8`` is an eLSTM option (the config's own core, the GRU, has none):
    the study of eLSTMs plans with it; a GRU beside it is one message naming that core."""
    extra = ["memory.chrono_horizon=8"]
    runs = plan_runs(find_config(None), TASKS[:1], ["elstm:rtrl"], 1, 64, tmp_path, extra)
    assert [run.core for run in runs] == ["elstm:rtrl"] and "memory.chrono_horizon=8" in runs[0].overrides
    out = tmp_path / "popgym"
    assert main(["bench", "popgym", "--tasks", TASKS[0], "--cores", "elstm:rtrl,gru", "--steps", "64",
                 "--set", "memory.chrono_horizon=8", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--cores 'gru': " in err and "chrono_horizon" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_steps_below_one_update_train_one_update(tmp_path: Path, capsys):
    """A run trains whole updates (64 env steps here): ``--steps 40`` trains one and reads it."""
    out = tmp_path / "popgym"
    assert main(["bench", "popgym", "--tasks", TASKS[0], "--cores", "gru", "--seeds", "1", "--window", "32",
                 *SMALL, "--steps", "40", "--out", str(out)]) == 0
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    assert run["steps"] == 64 and run["steps_per_second"] > 0
    assert checkpoint_step(out / f"{TASKS[0]}/gru-bptt_s0") == 64


def test_mmer_is_the_best_mean_over_a_window_of_env_steps():
    steps = np.array([100.0, 200, 300, 400, 500])
    returns = np.array([-1.0, 0.0, 1.0, 0.5, -0.5])
    at, means = windowed_means(steps, returns, 200)  # points in (s − 200, s], from s = 200 on
    np.testing.assert_allclose(at, [200, 300, 400, 500])
    np.testing.assert_allclose(means, [-0.5, 0.5, 0.75, 0.0])
    assert means.max() == 0.75
    at, means = windowed_means(steps, returns, 1000)  # a run shorter than the window: one mean, all of it
    np.testing.assert_allclose(at, [500]) and np.testing.assert_allclose(means, [0.0])
