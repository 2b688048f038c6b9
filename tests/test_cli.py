"""End to end through the command line: train -> event files -> resume -> eval -> plot -> list."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from rlmem.checkpoint import load_checkpoint
from rlmem.cli import main
from rlmem.plot import read_scalars

SMALL = [
    "memory.hidden_size=16",
    "env.num_envs=4",
    "agent.unroll_length=8",
    "train.progress=false",
    "train.checkpoint_every=64",
]


def _train(run_dir: Path, steps: int, *extra: str) -> None:
    assert main(["train", *SMALL, f"train.total_steps={steps}", f"train.run_dir={run_dir}", *extra]) == 0


def _event_tags(run_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    return set(accumulator.Tags()["scalars"])


def test_train_writes_config_checkpoint_and_the_standard_tags(tmp_path: Path, capsys):
    run_dir = tmp_path / "run"
    _train(run_dir, 640, "env.delay=2")
    out = capsys.readouterr().out
    assert f"run dir: {run_dir}" in out and "tensorboard --logdir" in out
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoint.pt").is_file()
    tags = _event_tags(run_dir)
    for tag in [
        "charts/episodic_return",
        "charts/episodic_length",
        "charts/success_rate",  # the default env, cue_recall, scores its episodes
        "charts/SPS",
        "charts/learning_rate",
        "losses/value_loss",
        "losses/policy_loss",
        "losses/entropy",
        "losses/approx_kl",
        "losses/explained_variance",
    ]:
        assert tag in tags, f"missing TensorBoard tag {tag}"
    assert any(t.startswith("memory/") for t in tags)
    steps, _ = read_scalars(run_dir, "charts/SPS")
    assert steps[-1] == 640


def test_ctrl_c_checkpoints_and_resume_reproduces_the_uninterrupted_run(tmp_path: Path, monkeypatch, interrupt_at):
    straight, split = tmp_path / "straight", tmp_path / "split"
    _train(straight, 256)

    # the split run is interrupted by Ctrl-C during its 4th iteration (4 envs x 8 steps each)
    interrupt_at(4)
    _train(split, 256)
    monkeypatch.undo()
    first = load_checkpoint(split)
    assert first["global_step"] == 128

    assert main(["train", "--resume", str(split)]) == 0
    resumed = load_checkpoint(split)
    reference = load_checkpoint(straight)
    assert resumed["global_step"] == reference["global_step"] == 256
    for name, value in reference["network"].items():
        assert torch.equal(value, resumed["network"][name]), f"{name} differs after resume"
    steps, _ = read_scalars(split, "charts/SPS")
    assert steps.max() == 256 and steps.min() < 128


def test_resume_can_raise_the_step_budget(tmp_path: Path):
    run_dir = tmp_path / "run"
    _train(run_dir, 64)
    assert main(["train", "--resume", str(run_dir), "train.total_steps=128"]) == 0
    assert load_checkpoint(run_dir)["global_step"] == 128


def test_resume_refuses_other_overrides(tmp_path: Path, capsys):
    run_dir = tmp_path / "run"
    _train(run_dir, 64)
    assert main(["train", "--resume", str(run_dir), "memory.hidden_size=8"]) == 2
    err = capsys.readouterr().err
    assert "only train.total_steps" in err and "memory.hidden_size=8" in err


def test_existing_run_dir_is_not_overwritten(tmp_path: Path, capsys):
    run_dir = tmp_path / "run"
    _train(run_dir, 64)
    before = (run_dir / "checkpoint.pt").read_bytes()
    assert main(["train", *SMALL, "train.total_steps=64", f"train.run_dir={run_dir}"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (run_dir / "checkpoint.pt").read_bytes() == before


def test_a_run_config_yaml_starts_a_new_run_with_another_seed(tmp_path: Path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    _train(run_dir, 64, "env.delay=2")
    before = (run_dir / "checkpoint.pt").read_bytes()
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(run_dir / "config.yaml"), "train.seed=5"]) == 0
    new_dir = Path(capsys.readouterr().out.rsplit("run dir: ", 1)[1].split()[0])
    assert new_dir.parent == Path("runs") and new_dir.name.endswith("_s5")
    saved, repeated = (yaml.safe_load((d / "config.yaml").read_text()) for d in (run_dir, new_dir))
    assert repeated["train"]["seed"] == 5 and repeated["env"] == saved["env"] and repeated["memory"] == saved["memory"]
    assert (run_dir / "checkpoint.pt").read_bytes() == before


def test_eval_reports_mean_and_std(tmp_path: Path, capsys):
    run_dir = tmp_path / "run"
    _train(run_dir, 64)
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--episodes", "6", "--num-envs", "3"]) == 0
    out = capsys.readouterr().out
    assert "6 episodes" in out and "±" in out


def test_plot_draws_seed_groups(tmp_path: Path):
    pytest.importorskip("matplotlib")
    runs = []
    for seed in (0, 1):
        run_dir = tmp_path / f"s{seed}"
        _train(run_dir, 256, f"train.seed={seed}", "env.delay=1")
        runs.append(str(run_dir))
    output = tmp_path / "curves.png"
    assert main(["plot", *runs, "-o", str(output), "--tag", "losses/value_loss"]) == 0
    assert output.is_file() and output.stat().st_size > 1000
    smoothed = tmp_path / "smoothed.png"
    assert main(["plot", *runs, "-o", str(smoothed), "--tag", "losses/value_loss", "--smooth", "5"]) == 0
    assert smoothed.is_file() and main(["plot", *runs, "--smooth", "0"]) == 2
    early = tmp_path / "early.png"
    assert main(["plot", *runs, "-o", str(early), "--group-by", "name", "--until", "128"]) == 0 and early.is_file()


def test_smooth_is_a_trailing_mean():
    from rlmem.plot import smooth

    values = np.array([1.0, 3.0, 5.0, 7.0])
    assert np.allclose(smooth(values, 2), [1.0, 2.0, 4.0, 6.0])
    assert np.allclose(smooth(values, 10), [1.0, 2.0, 3.0, 4.0])
    assert np.array_equal(smooth(values, 1), values)


def test_list_names_every_registry(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ["gru", "lstm", "none", "cue_recall", "actor_critic", "hidden_size", "grad:"]:
        assert name in out


def test_plot_labels_groups_by_component_names(tmp_path: Path):
    from rlmem.plot import group_runs

    def run(name: str, core: str, seed: int, extra: str = "") -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "config.yaml").write_text(
            f"memory: {{name: {core}, hidden_size: 8{extra}}}\ntrain: {{seed: {seed}}}\n"
        )
        return d

    runs = [run("a0", "lru", 0, ", r_min: 0.5"), run("a1", "lru", 1, ", r_min: 0.5"), run("b0", "gru", 0)]
    groups = group_runs(runs)
    assert groups == {"memory=lru": runs[:2], "memory=gru": runs[2:]}
    # Seeds of a single configuration are one group, named by its components.
    assert group_runs(runs[:2]) == {"memory=lru": runs[:2]}
    # By name: the directory name without its trailing _s<seed>.
    named = [run("lru_big_s0", "lru", 0), run("lru_big_s1", "lru", 1), run("gru", "gru", 0)]
    assert group_runs(named, "name") == {"lru_big": named[:2], "gru": named[2:]}


def test_bench_robustness_groups_seeds_and_reports_every_sigma(tmp_path: Path, capsys):
    pytest.importorskip("matplotlib")
    import json

    runs = []
    for hidden, seed in ((16, 0), (16, 1), (8, 0)):
        run_dir = tmp_path / f"h{hidden}_s{seed}"
        _train(run_dir, 64, f"train.seed={seed}", f"memory.hidden_size={hidden}")
        runs.append(str(run_dir))
    out = tmp_path / "robust"
    args = ["bench", "robustness", *runs, "--sigmas", "0,0.5", "--episodes", "4", "--greedy", "--out", str(out)]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert sorted(len(r["runs"]) for r in results.values()) == [1, 2]  # the two seeds form one group
    for r in results.values():
        assert r["sigma"] == [0.0, 0.5] and len(r["returns"]) == 2 and len(r["returns"][0]) == len(r["runs"])
    assert (out / "robustness.png").stat().st_size > 1000 and "σ = 0.5" in (out / "results.md").read_text()
    # Same evaluation seed, same noise stream: the figures repeat exactly.
    assert main([*args[:-1], str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / "results.json").read_text()) == results
    capsys.readouterr()
    assert main(["bench", "robustness", *runs, "--sigmas", "0,-1"]) == 2
    assert "--sigmas" in capsys.readouterr().err


def _write_curve(run_dir: Path, steps: list[int], values: list[float]) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir))
    for step, value in zip(steps, values):
        writer.add_scalar("charts/success_rate", value, step)
    writer.close()
    return run_dir


def test_summary_reports_finals_and_steps_to_threshold_by_name_groups(tmp_path: Path, capsys):
    from rlmem.plot import summarize_runs

    steps = list(range(100, 2100, 100))  # 20 points
    ramp = [min(1.0, 0.05 * i) for i in range(20)]  # 1.0 from the 21st point on: never within 20 points
    runs = [
        _write_curve(tmp_path / "fast_s0", steps, [0.0] * 5 + [1.0] * 15),  # 400-step windows: 4 points
        _write_curve(tmp_path / "fast_s1", steps, [0.0] * 9 + [1.0] * 11),
        _write_curve(tmp_path / "slow_s0", steps, ramp),
    ]
    summaries = {s.label: s for s in summarize_runs(runs, "charts/success_rate", [0.5, 1.0], final_fraction=0.1,
                                                     window=400, group_by="name")}
    fast, slow = summaries["fast"], summaries["slow"]
    assert fast.runs == runs[:2] and slow.runs == runs[2:]
    # The last 10% of 2000 steps: the points at 1800, 1900, 2000.
    assert fast.finals == [1.0, 1.0] and slow.finals == pytest.approx([np.mean(ramp[-3:])])
    # The mean of 4 points first reaches 0.5 when 2 of them are 1.0, and 1.0 when all 4 are.
    assert fast.reached == {0.5: [700.0, 1100.0], 1.0: [900.0, 1300.0]}
    assert slow.reached[1.0] == [] and len(slow.reached[0.5]) == 1
    # Equal steps: read up to step 1000 only, where fast_s1 has not reached 1.0 yet.
    early = {s.label: s for s in summarize_runs(runs, "charts/success_rate", [1.0], window=400, group_by="name",
                                                 until=1000)}
    assert early["fast"].reached[1.0] == [900.0] and early["fast"].last_steps == [1000.0, 1000.0]

    assert main(["summary", *map(str, runs), "--tag", "charts/success_rate", "--threshold", "1", "--window", "400",
                 "--group-by", "name"]) == 0
    out = capsys.readouterr().out
    assert "| fast | 2 | 2k | 1 ± 0 | 1.1k (2/2) |" in out and "— (0/1)" in out
    for bad in (["--window", "0"], ["--final-fraction", "0"], ["--tag", "no/such_tag"], ["--until", "50"]):
        assert main(["summary", *map(str, runs), "--group-by", "name", *bad]) == 2
    assert main(["summary", str(tmp_path / "missing_s0")]) == 2


def test_plot_and_summary_show_a_prediction_run_by_its_error_unless_told_otherwise(tmp_path: Path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    def run(name: str, tags: dict[str, float]) -> str:
        writer = SummaryWriter(str(tmp_path / name))
        for step in (100, 200):
            for tag, value in tags.items():
                writer.add_scalar(tag, value, step)
        writer.close()
        return str(tmp_path / name)

    prediction = run("td_s0", {"charts/prediction_error": 0.25, "charts/value": 3.0})
    policy = run("ppo_s0", {"charts/episodic_return": 7.0, "charts/prediction_error": 0.5})
    assert main(["summary", prediction]) == 0
    assert "final charts/prediction_error" in (out := capsys.readouterr().out) and "| 0.25 ± 0 |" in out
    assert main(["summary", policy]) == 0
    assert "final charts/episodic_return" in capsys.readouterr().out
    assert main(["plot", prediction, "-o", str(tmp_path / "td.png")]) == 0 and (tmp_path / "td.png").is_file()
    neither = run("none_s0", {"charts/value": 1.0})
    capsys.readouterr()
    assert main(["summary", neither]) == 2
    assert "choose one with --tag from: charts/value" in capsys.readouterr().err
    assert main(["summary", neither, "--tag", "charts/value"]) == 0


def test_plot_draws_a_group_whose_runs_all_diverged_up_to_where_they_stopped(tmp_path: Path, capsys, monkeypatch):
    """A group whose every run diverged after logging is drawn (labelled so), not left out of the figure;
    with nothing logged anywhere there is nothing to draw: one message, exit 2."""
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes
    from torch.utils.tensorboard import SummaryWriter

    def run(name: str, steps: tuple[int, ...], diverged_at: int | None) -> str:
        writer = SummaryWriter(str(tmp_path / name))
        for step in steps:
            writer.add_scalar("charts/prediction_error", 0.1 * step, step)
        if diverged_at is not None:
            writer.add_text("diverged", f"member {name} diverged by step {diverged_at}", diverged_at)
        writer.close()
        return str(tmp_path / name)

    labels: list[str] = []
    drawn = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda ax, *a, **kw: labels.append(kw.get("label")) or drawn(ax, *a, **kw))
    blown = [run(f"blown_s{seed}", (1, 2, 3 + seed), 4 + seed) for seed in (0, 1)]
    fine = run("fine_s0", (1, 2, 3, 4), None)
    half = [run("half_s0", (1, 2), 3), run("half_s1", (1, 2, 3, 4), None)]
    assert main(["plot", *blown, fine, *half, "-o", str(tmp_path / "p.png"), "--group-by", "name"]) == 0
    assert labels == ["blown (all 2 diverged) (2 seeds)", "fine", "half (1 diverged)"]
    silent = run("silent_s0", (), 1)
    capsys.readouterr()
    assert main(["plot", silent, "--tag", "charts/prediction_error", "-o", str(tmp_path / "q.png")]) == 2
    assert "nothing to draw: every run given diverged before it logged" in capsys.readouterr().err
    assert not (tmp_path / "q.png").exists()


def test_bench_stream_ac_times_both_gradient_paths_and_checks_they_agree(capsys):
    args = ["bench", "stream_ac", "--envs", "1,3", "--hidden", "4", "--steps", "1", "--repeats", "1"]
    assert main(args) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [row[0] for row in rows] == ["1", "3"]
    assert all(float(row[-1]) < 1e-5 for row in rows)  # the largest gradient difference between the paths
    with pytest.warns(UserWarning):  # the CCN cannot run under vmap: no comparison to make
        assert main(["bench", "stream_ac", "--envs", "2", "--memory", "ccn", "--hidden", "4"]) == 2
    with pytest.raises(SystemExit) as exited:  # argparse: usage, one message, exit status 2
        main(["bench", "stream_ac", "--envs", "0"])
    assert exited.value.code == 2


def test_the_progress_bar_stays_out_of_a_log_file(tmp_path: Path, capsys):
    # train.progress defaults to true; with stderr not a terminal (a background run's log) nothing is drawn
    assert main(["train", *[a for a in SMALL if not a.startswith("train.progress")], "train.total_steps=128",
                 f"train.run_dir={tmp_path / 'run'}"]) == 0
    err = capsys.readouterr().err
    assert "step/s" not in err and "\r" not in err
