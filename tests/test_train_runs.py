"""Runs through the command line: exact resume for every learner, TensorBoard after a killed run, which
options --resume accepts, evaluation of every learner, and runs that diverge."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rlmem.checkpoint import CHECKPOINT_NAME, load_checkpoint
from rlmem.cli import main
from rlmem.errors import TrainingDiverged

CONFIGS = Path(__file__).parent.parent / "configs"
COMMON = ["train.progress=false", "train.torch_threads=1"]
# Each learner briefly, 4 iterations; the interrupted run stops during its 3rd (after 2 iterations).
LEARNERS = {
    "actor_critic": (["memory.hidden_size=8", "env.num_envs=4", "agent.unroll_length=8"], 32),
    "ppo": (["agent=ppo", "memory=elstm", "memory.grad=rtrl", "memory.hidden_size=8", "env.num_envs=4",
             "agent.unroll_length=8", "agent.num_minibatches=2", "agent.update_epochs=2"], 32),
    "stream_ac": (["agent=stream_ac", "memory=lru", "memory.grad=rtrl", "memory.hidden_size=8",
                   "env=repeat_previous", "env.num_envs=2", "agent.steps_per_iteration=4", "agent.torso_size=16"], 8),
    "td": ([str(CONFIGS / "trace_patterning_ccn.yaml"), "memory.steps_per_stage=48", "env.num_envs=2",
            "agent.steps_per_iteration=8"], 16),
}


def _train(run_dir: Path, learner: str, steps: int, *extra: str) -> int:
    args, _ = LEARNERS[learner]
    config, args = (args[:1], args[1:]) if args[0].endswith(".yaml") else ([], args)
    return main(["train", *config, *args, *COMMON, f"train.total_steps={steps}", f"train.run_dir={run_dir}", *extra])


def _assert_equal(a, b, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{path} differs after resume"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_equal(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{path}/{i}")
    elif hasattr(a, "shape"):  # numpy
        assert (a == b).all(), path
    else:
        assert a == b, path


@pytest.mark.parametrize("learner", sorted(LEARNERS))
def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path: Path, monkeypatch, interrupt_at,
                                                              learner: str):
    per_iteration = LEARNERS[learner][1]
    total = 4 * per_iteration
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _train(straight, learner, total) == 0
    interrupt_at(3)
    assert _train(split, learner, total) == 0
    monkeypatch.undo()
    assert load_checkpoint(split)["global_step"] == 3 * per_iteration
    assert main(["train", "--resume", str(split)]) == 0
    resumed, reference = load_checkpoint(split), load_checkpoint(straight)
    assert resumed["global_step"] == reference["global_step"] == total
    for key in ("network", "learner", "env", "iteration"):
        _assert_equal(reference[key], resumed[key], key)


# --------------------------------------------------------------------------------------------------
# TensorBoard after a killed run


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # purges orphaned data
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_resume_after_a_kill_drops_the_events_logged_after_the_checkpoint(tmp_path: Path):
    from torch.utils.tensorboard import SummaryWriter

    run_dir = tmp_path / "run"
    assert _train(run_dir, "actor_critic", 64, "train.checkpoint_every=32") == 0  # checkpoints at 32 and 64
    before = _scalars(run_dir)
    # The killed process went on logging past its last checkpoint (step 64) before it died.
    killed = SummaryWriter(str(run_dir))
    for step in (96, 128, 160):
        for tag in ("charts/SPS", "losses/value_loss", "losses/orphan_only"):
            killed.add_scalar(tag, -12345.0, step)
    killed.close()

    assert main(["train", "--resume", str(run_dir), "train.total_steps=128"]) == 0
    after = _scalars(run_dir)
    assert "losses/orphan_only" not in after or after["losses/orphan_only"] == []
    for tag, points in after.items():
        steps = [step for step, _ in points]
        assert len(steps) == len(set(steps)), f"{tag}: some steps appear twice"
        assert all(value != -12345.0 for _, value in points), f"{tag}: the killed run's values are still drawn"
    # Everything logged up to the checkpoint stays, the checkpoint's own step included.
    assert after["losses/value_loss"][: len(before["losses/value_loss"])] == before["losses/value_loss"]
    assert [step for step, _ in after["charts/SPS"]] == [32, 64, 96, 128]


# --------------------------------------------------------------------------------------------------
# What --resume accepts


@pytest.mark.parametrize("override", ["train.progress=true", "train.checkpoint_every=16", "train.torch_threads=2",
                                      "train.acting_threads=1", "train.total_steps=64", "memory.hidden_size=8",
                                      "memory=gru"])
def test_resume_accepts_options_that_do_not_change_what_is_learned(tmp_path: Path, override: str):
    run_dir = tmp_path / "run"
    assert _train(run_dir, "actor_critic", 32) == 0
    # memory.hidden_size=8 and memory=gru are what the run already has
    assert main(["train", "--resume", str(run_dir), override]) == 0


@pytest.mark.parametrize("override", ["memory.hidden_size=16", "memory=lstm", "agent.lr=0.1", "env.num_envs=2",
                                      "model.encoder_size=32", "train.seed=1", "train.device=auto",
                                      f"train.run_dir={Path('elsewhere')}", "train.name=other"])
def test_resume_refuses_what_would_make_the_continuation_differ(tmp_path: Path, capsys, override: str):
    run_dir = tmp_path / "run"
    assert _train(run_dir, "actor_critic", 32) == 0
    before = (run_dir / CHECKPOINT_NAME).read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), override, "train.total_steps=64"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "train.progress" in err and override in err
    assert (run_dir / CHECKPOINT_NAME).read_bytes() == before


@pytest.mark.parametrize("population", [False, True])
def test_a_run_dir_in_use_by_another_process_is_refused_and_left_as_it_was(tmp_path: Path, capsys, population):
    """A second trainer in a run dir (say a --resume started while a stopping run finishes its iteration)
    would interleave checkpoints and event files: it stops with one message, exit 2, touching nothing."""
    from rlmem.checkpoint import exclusive_run_dir

    run_dir = tmp_path / "run"
    extra = ["train.population=2"] if population else []
    assert _train(run_dir, "td", 16, *extra) == 0
    before = (run_dir / CHECKPOINT_NAME).read_bytes()
    events = sorted(p.relative_to(run_dir) for p in run_dir.rglob("events.out.tfevents.*"))
    capsys.readouterr()
    with exclusive_run_dir(run_dir):  # another process's hold: a lock on another open file, as there
        assert main(["train", "--resume", str(run_dir), "train.total_steps=32"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "is in use by process" in err
    assert (run_dir / CHECKPOINT_NAME).read_bytes() == before
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("events.out.tfevents.*")) == events
    assert main(["train", "--resume", str(run_dir), "train.total_steps=32"]) == 0  # released: it continues


# --------------------------------------------------------------------------------------------------
# Progress in a log file


def test_a_run_without_a_progress_bar_prints_a_progress_line_at_each_checkpoint(tmp_path: Path, capsys):
    # Under pytest stdout is no terminal, as in a background run's log file: no bar, a line per checkpoint.
    per_iteration = LEARNERS["actor_critic"][1]
    assert _train(tmp_path / "run", "actor_critic", 4 * per_iteration, f"train.checkpoint_every={per_iteration}") == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    total = 4 * per_iteration
    assert [line.split(",")[0] for line in lines] == [
        f"step {k * per_iteration} of {total} ({25 * k} %)" for k in (1, 2, 3)]
    assert all("steps/s" in line and "left" in line and "member" not in line for line in lines)


def test_progress_line_gives_the_rate_time_left_members_and_recent_return():
    from rlmem.train import EpisodeWindow, progress_line

    assert progress_line(1_800_000, 2_000_000, 135.0) == (
        "step 1,800,000 of 2,000,000 (90 %), 135 steps/s, about 25 min left")
    recent = EpisodeWindow.create()
    recent.returns.extend([17.0, 18.0, 19.0])
    assert progress_line(2_000_000, 10_000_000, 300.0, members=1, recent=recent) == (
        "step 2,000,000 of 10,000,000 (20 %), 300 steps/s, about 7 h 24 min left, "
        "mean return 18 over the last 3 episodes")
    assert "(4,050 member-steps/s)" in progress_line(10, 20, 135.0, members=30)
    assert "left" not in progress_line(20, 20, 135.0)


# --------------------------------------------------------------------------------------------------
# Evaluation


def test_eval_of_a_td_run_reports_its_prediction_error(tmp_path: Path, capsys):
    run_dir = tmp_path / "td"
    assert _train(run_dir, "td", 32) == 0
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--steps", "200"]) == 0
    out = capsys.readouterr().out
    assert "prediction error" in out and "200 steps x 2 streams" in out and "for V = 0" in out
    for argv in (["--episodes", "3"], ["--greedy"], ["--steps", "0"]):
        assert main(["eval", str(run_dir), *argv]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_eval_of_a_td_run_measures_the_error_against_the_true_return(tmp_path: Path):
    from rlmem import config as cfg
    from rlmem.evaluation import evaluate_saved
    from rlmem.train import build

    run_dir = tmp_path / "td"
    assert _train(run_dir, "td", 32) == 0
    scores = evaluate_saved(run_dir, steps=50, seed=7)
    # The same numbers by hand: a fresh network with the saved weights, the env reset with the eval seed.
    env, learner, _device = build(cfg.load_saved(run_dir), seed=7)
    learner.network.load_state_dict(load_checkpoint(run_dir)["network"])
    obs = env.reset(seed=7)
    state = learner.network.initial_state(env.num_envs)
    reset = torch.ones(1, env.num_envs, dtype=torch.bool)
    errors, zeros = [], []
    with torch.no_grad():
        _, state = learner.network(obs[None], state, reset)
        for _ in range(50):
            obs, _, _, _, info = env.step(None)
            values, state = learner.network(obs[None], state, torch.zeros_like(reset))
            errors.append((values[0].double() - info["true_return"].double()).pow(2).mean())
            zeros.append(info["true_return"].double().pow(2).mean())
    env.close()
    assert scores.squared_error == pytest.approx(float(torch.stack(errors).mean()), rel=1e-9)
    assert scores.zero_squared_error == pytest.approx(float(torch.stack(zeros).mean()), rel=1e-9)


@pytest.mark.parametrize("learner", ["ppo", "stream_ac"])
def test_eval_of_a_policy_learner_reports_returns(tmp_path: Path, capsys, learner: str):
    run_dir = tmp_path / learner
    assert _train(run_dir, learner, LEARNERS[learner][1]) == 0
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--episodes", "2"]) == 0
    assert "2 episodes" in capsys.readouterr().out
    assert main(["eval", str(run_dir), "--steps", "10"]) == 2


# --------------------------------------------------------------------------------------------------
# Runs that diverge


def _raise(error: BaseException):
    def failure(result):
        raise error

    return failure


def test_a_diverging_learner_stops_the_run_with_one_message_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch, on_iteration, capsys
):
    run_dir = tmp_path / "run"
    # 32 env steps per iteration, a checkpoint every 64: the good checkpoint is at 64, the 3rd iteration diverges.
    on_iteration(3, after=_raise(TrainingDiverged("gradient of core.weight")))
    assert _train(run_dir, "actor_critic", 256, "train.checkpoint_every=64") == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert "step 64" in lines[0] and "gradient of core.weight" in lines[0]
    assert str(run_dir / CHECKPOINT_NAME) in lines[0] and "(step 64)" in lines[0]
    assert load_checkpoint(run_dir)["global_step"] == 64


def test_a_divergence_before_any_checkpoint_says_none_was_written(tmp_path: Path, monkeypatch, on_iteration, capsys):
    run_dir = tmp_path / "run"
    on_iteration(1, after=_raise(TrainingDiverged("memory state")))
    assert _train(run_dir, "actor_critic", 256) == 2
    assert "no checkpoint was written yet" in capsys.readouterr().err
    assert not (run_dir / CHECKPOINT_NAME).exists()


def test_non_finite_metrics_stop_the_run_but_an_undefined_explained_variance_does_not(
    tmp_path: Path, monkeypatch, on_iteration, capsys
):
    def nan_metric(tag):
        def failure(result):
            result.metrics[tag] = math.nan
            return result

        return failure

    on_iteration(2, after=nan_metric("losses/explained_variance"))
    assert _train(tmp_path / "fine", "actor_critic", 96) == 0
    monkeypatch.undo()
    on_iteration(2, after=nan_metric("losses/value_loss"))
    assert _train(tmp_path / "broken", "actor_critic", 96, "train.checkpoint_every=32") == 2
    err = capsys.readouterr().err
    assert "step 64: non-finite losses/value_loss" in err and "(step 32)" in err


def test_a_non_finite_policy_stops_the_run_before_sampling_other_errors_propagate(
    tmp_path: Path, monkeypatch, on_iteration, capsys
):
    """A policy whose output is NaN ends the run with one message (sample_action checks before
    torch.multinomial, whose own error, or a device-side assert on a GPU, would come first otherwise);
    an error that is not a divergence is not turned into one."""
    sampled_after_poisoning = []

    def poison_policy(learner):
        original = torch.multinomial
        monkeypatch.setattr(torch, "multinomial",
                            lambda *a, **k: sampled_after_poisoning.append(1) or original(*a, **k))
        with torch.no_grad():
            for parameter in learner.network.policy.parameters():
                parameter.fill_(math.nan)

    on_iteration(2, before=poison_policy)
    assert _train(tmp_path / "nan", "actor_critic", 64, "train.checkpoint_every=16") == 2
    err = capsys.readouterr().err
    assert "step 32: non-finite policy output" in err and "(step 32)" in err
    assert sampled_after_poisoning == []
    monkeypatch.undo()
    on_iteration(1, after=_raise(RuntimeError("something else")))
    with pytest.raises(RuntimeError, match="something else"):
        _train(tmp_path / "other", "actor_critic", 64)


def test_a_non_finite_learner_state_is_never_checkpointed(tmp_path: Path, monkeypatch, on_iteration, capsys):
    def poison(learner) -> None:  # a parameter turns NaN and nothing in the learner notices
        with torch.no_grad():
            next(learner.network.parameters()).fill_(math.nan)

    on_iteration(2, before=poison)
    run_dir = tmp_path / "run"
    code = _train(run_dir, "actor_critic", 128, "train.checkpoint_every=32")
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert load_checkpoint(run_dir)["global_step"] == 32  # the last good one


def test_a_diverging_rtrl_run_ends_in_one_message(tmp_path: Path, capsys):
    """End to end: a far too large step size (the learners' own checks name the quantity)."""
    code = main(["train", "memory=lru", "memory.grad=rtrl", "agent.lr=100", "memory.hidden_size=8", "env.num_envs=4",
                 "agent.unroll_length=8", *COMMON, "train.total_steps=4096", f"train.run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "diverged at step" in err


def test_a_checkpoint_of_another_run_is_refused_with_one_message(tmp_path: Path, capsys):
    small, other = tmp_path / "small", tmp_path / "other"
    assert _train(small, "actor_critic", 32) == 0
    assert _train(other, "actor_critic", 32, "memory.hidden_size=16") == 0
    (other / CHECKPOINT_NAME).write_bytes((small / CHECKPOINT_NAME).read_bytes())
    capsys.readouterr()
    for argv in (["train", "--resume", str(other)], ["eval", str(other)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "does not fit the run's config.yaml" in err
