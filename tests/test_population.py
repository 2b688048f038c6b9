"""Populations (``agents.population``, ``train.population``): every member receives exactly the updates
it receives alone (float64, same seed; ``td`` and ``stream_ac``), members with other step sizes move
apart as they should, a resumed population continues the uninterrupted one bit for bit, members log
as sub-runs that the summary groups like seeds, and a grid key that is not a member option is one
message, exit 2."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from agents.base import ModelOptions
from agents.population import StreamACPopulation, TDPopulation
from agents.stream_ac import StreamACLearner, StreamACOptions
from agents.td import TDLearner, TDOptions
from envs import make_env
from rlmem import config as cfg
from rlmem.bench.population import _learners
from rlmem.checkpoint import load_checkpoint
from rlmem.cli import main
from rlmem.errors import TrainingDiverged
from rlmem.memory import make_core
from rlmem.plot import group_runs
from rlmem.train import train

SMALL_TASK = {"name": "trace_patterning", "isi_min": 3, "isi_max": 4, "iti_min": 4, "iti_max": 6,
              "num_distractors": 1}
IDENTITY = ModelOptions(encoder="identity")
# |member − alone| after 60 float64 steps: batched kernels (and the unfused LSTM cell) round differently.
ATOL, RTOL = 1e-10, 1e-9

CORES = {
    "elstm-rtrl": ({"name": "elstm", "hidden_size": 4, "grad": "rtrl"}, {}),
    "lstm-bptt": ({"name": "lstm", "hidden_size": 3, "grad": "bptt"}, {"unroll_length": 3}),
    # a group behind a reduce (the traces' sum over the context columns), with a non-identity input layer
    "ffm-rtrl": ({"name": "ffm", "hidden_size": 4, "traces": 3, "context": 2, "grad": "rtrl"}, {}),
    # stages begin at 25 and 50 steps: the population crosses two stage boundaries
    "ccn-rtrl": ({"name": "ccn", "hidden_size": 4, "columns_per_stage": 2, "steps_per_stage": 25, "grad": "rtrl",
                  "init_scale": 0.5, "normalizer_decay": 0.9}, {}),
    "ccn-warmup": ({"name": "ccn", "hidden_size": 4, "columns_per_stage": 2, "steps_per_stage": 25, "grad": "rtrl",
                    "init_scale": 0.5, "normalizer_decay": 0.9, "normalizer_warmup": True}, {}),
}


@pytest.fixture
def float64() -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def make_learner(memory: dict, seed: int, num_envs: int = 1, **options) -> TDLearner:
    env = make_env({**SMALL_TASK, "num_envs": num_envs}, seed=seed)
    return TDLearner(TDOptions(steps_per_iteration=20, **options), env, memory, IDENTITY, torch.device("cpu"),
                     seed, total_steps=1000)


def assert_members_equal(alone: TDLearner, member: TDLearner) -> None:
    for (name, expected), (_, got) in zip(alone.network.state_dict().items(), member.network.state_dict().items()):
        if isinstance(expected, torch.Tensor):
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL, msg=name)
        else:
            assert got == expected, name
    for key in ("traces", "step_norms", "value"):
        torch.testing.assert_close(getattr(member, key), getattr(alone, key), atol=ATOL, rtol=RTOL, msg=key)
    for key, value in alone.state_after.items():
        torch.testing.assert_close(member.state_after[key], value, atol=ATOL, rtol=RTOL, msg=key)
    assert member.updates == alone.updates and member.steps == alone.steps


@pytest.mark.parametrize("core", list(CORES))
@pytest.mark.parametrize("num_envs", [1, 2])
def test_each_member_gets_exactly_the_updates_it_gets_alone(float64, core: str, num_envs: int):
    memory, options = CORES[core]
    settings = [(0, 0.01), (1, 0.01), (2, 0.05)]  # (seed, lr): seeds and step sizes differ
    alone = [make_learner(memory, seed, num_envs, lr=lr, **options) for seed, lr in settings]
    population = TDPopulation([make_learner(memory, seed, num_envs, lr=lr, **options) for seed, lr in settings])
    for _ in range(3):
        expected = [learner.iteration() for learner in alone]
        got = population.iteration()
        for e, g in zip(expected, got):
            assert g.metrics.keys() == e.metrics.keys()
            for tag, value in e.metrics.items():
                assert g.metrics[tag] == pytest.approx(value, rel=1e-9, abs=1e-12), tag
    population.sync_members()
    for learner, member in zip(alone, population.members):
        assert_members_equal(learner, member)
    if core.startswith("ccn"):
        assert population.members[0].network.core.learning_stage == 1  # a stage boundary was crossed


def test_members_with_other_step_sizes_move_apart_as_they_should(float64):
    memory, _ = CORES["elstm-rtrl"]
    lrs = [0.001, 0.01, 0.01, 0.1]
    population = TDPopulation([make_learner(memory, 0, lr=lr) for lr in lrs])
    initial = {name: p.detach().clone() for name, p in population.params.items()}
    population.iteration()
    moved = torch.stack([torch.cat([(p.detach()[i] - initial[name][i]).flatten()
                                    for name, p in population.params.items()]).norm() for i in range(len(lrs))])
    assert torch.equal(moved[1], moved[2])  # the same seed and step size: the same member
    assert 0 < moved[0] < moved[1] < moved[3]  # a larger normalised step moves further
    second = population.params["value.weight"].detach()
    assert not torch.equal(second[0], second[1]) and not torch.equal(second[1], second[3])


@pytest.mark.parametrize(("core", "num_envs"), [("ccn-warmup", 1), ("ccn-warmup", 2), ("lstm-bptt", 1)])
def test_a_compiled_population_gets_the_updates_of_the_uncompiled_one(float64, core: str, num_envs: int):
    """``train.compile``: the same updates up to rounding, across a ccn stage boundary (its warm-up
    normaliser updates buffers in the compiled step) and for T-BPTT windows (compiled once full), and
    one graph per stage: no per-step recompiles, no graph break that would send the step back to eager."""
    memory, options = CORES[core]
    settings = [(0, 0.01), (1, 0.01), (2, 0.05)]
    uncompiled = TDPopulation([make_learner(memory, seed, num_envs, lr=lr, **options) for seed, lr in settings])
    torch._dynamo.reset()
    counters.clear()
    compiled = TDPopulation([make_learner(memory, seed, num_envs, lr=lr, **options) for seed, lr in settings],
                            compile=True)
    for _ in range(3):
        for e, g in zip(uncompiled.iteration(), compiled.iteration()):
            for tag, value in e.metrics.items():
                assert g.metrics[tag] == pytest.approx(value, rel=1e-9, abs=1e-12), tag
    uncompiled.sync_members()
    compiled.sync_members()
    for expected, got in zip(uncompiled.members, compiled.members):
        assert_members_equal(expected, got)
    assert not counters["graph_break"] and not counters["unimplemented"]
    # Per stage a forward and a parameter step (and the first, sensitivity-free step's): a handful of graphs
    # over 60 steps, not one per step. A T-BPTT window's first steps, while it fills, run uncompiled.
    assert 2 <= counters["frames"]["ok"] <= (8 if core.startswith("ccn") else 3)
    if core.startswith("ccn"):
        assert compiled.members[0].network.core.learning_stage == 1


def run(tmp_path: Path, name: str, steps: int, resume: bool = False) -> Path:
    config = cfg.resolve(
        {
            "defaults": {"memory": "ccn", "env": "trace_patterning", "agent": "td"},
            "memory": {"hidden_size": 4, "columns_per_stage": 2, "steps_per_stage": 50, "init_scale": 0.5},
            "env": {k: v for k, v in SMALL_TASK.items() if k != "name"},
            "agent": {"steps_per_iteration": 20},
            "model": {"encoder": "identity"},
            "train": {"total_steps": steps, "checkpoint_every": 40, "progress": False, "population": 2,
                      "population_grid": {"agent.lr": [0.01, 0.03]}, "run_dir": str(tmp_path / name)},
        }
    )
    if resume:
        config = cfg.load_saved(tmp_path / name, [f"train.total_steps={steps}"])
        config.train.run_dir = str(tmp_path / name)
    return train(config, resume=resume, log=lambda *_: None)


def test_resume_of_a_population_equals_the_uninterrupted_run(tmp_path: Path):
    straight = load_checkpoint(run(tmp_path, "straight", 120))
    run(tmp_path, "interrupted", 60)  # stops inside the second stage; the third begins at step 100
    resumed = load_checkpoint(run(tmp_path, "interrupted", 120, resume=True))
    assert len(straight["network"]) == 4 and straight["global_step"] == resumed["global_step"] == 120
    assert list(straight["network"]) == ["lr0.01_s0", "lr0.01_s1", "lr0.03_s0", "lr0.03_s1"]
    for expected, got in zip(straight["network"].values(), resumed["network"].values()):
        assert expected["core._extra_state"] == got["core._extra_state"]
        for key, value in expected.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, got[key]), key
    for expected, got in zip(straight["learner"]["members"], resumed["learner"]["members"]):
        for key in ("traces", "step_norms", "value"):
            assert torch.equal(expected[key], got[key]), key
        assert expected["updates"] == got["updates"]
    for name, expected in straight["env"].items():
        for key, value in expected.items():
            got = resumed["env"][name][key]
            assert torch.equal(value, got) if isinstance(value, torch.Tensor) else value == got, (name, key)


def test_a_population_may_be_continued_compiled(float64, tmp_path: Path, capsys):
    """``train.compile`` may change on ``--resume`` (it changes rounding, not the updates): the continued
    run ends where the uncompiled one does, across the stage boundary at step 100. (In float32 the
    normalised steps of a stage's first updates amplify the rounding to ~1e-4 of a weight.)"""
    straight = load_checkpoint(run(tmp_path, "straight", 120))
    run(tmp_path, "interrupted", 60)
    assert main(["train", "--resume", str(tmp_path / "interrupted"), "train.total_steps=120",
                 "train.compile=true"]) == 0
    resumed = load_checkpoint(tmp_path / "interrupted")
    assert resumed["global_step"] == 120 and resumed["config"]["train"]["compile"] is True
    for expected, got in zip(straight["network"].values(), resumed["network"].values()):
        assert expected["core._extra_state"] == got["core._extra_state"]
        for key, value in expected.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(got[key], value, atol=ATOL, rtol=RTOL)


def test_compile_without_a_cpp_compiler_is_one_message_exit_2(tmp_path: Path, capsys, monkeypatch):
    from torch._inductor import cpp_builder, exc

    def no_compiler() -> str:
        raise exc.InvalidCxxCompiler

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    status = main(["train", "configs/trace_patterning_ccn.yaml", "train.population=2", "train.compile=true",
                   f"train.run_dir={tmp_path / 'x'}"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and "needs a C++ compiler" in err


def test_compile_is_an_option_of_td_populations_only(tmp_path: Path, capsys):
    for args in (["train.compile=true"], ["train.compile=true", "train.population=2", "agent=stream_ac"]):
        status = main(["train", "configs/trace_patterning_ccn.yaml", *args, f"train.run_dir={tmp_path / 'x'}"])
        err = capsys.readouterr().err
        assert status == 2 and len(err.strip().splitlines()) == 1 and "train.compile" in err
    assert not (tmp_path / "x").exists()


def test_members_log_as_sub_runs_grouped_like_seeds(tmp_path: Path):
    run_dir = run(tmp_path, "grid", 40)
    members = sorted((run_dir / "members").iterdir())
    assert [m.name for m in members] == ["lr0.01_s0", "lr0.01_s1", "lr0.03_s0", "lr0.03_s1"]
    assert all(any(m.glob("events.out.tfevents.*")) for m in members)
    groups = group_runs(members)
    assert sorted(groups) == ["lr=0.01", "lr=0.03"] and all(len(runs) == 2 for runs in groups.values())
    assert sorted(group_runs(members, "name")) == ["lr0.01", "lr0.03"]


@pytest.mark.parametrize("key", ["memory.hidden_size", "agent.unroll_length", "agent.lrr"])
def test_a_grid_key_that_is_not_a_member_option_is_one_message_exit_2(tmp_path: Path, capsys, key: str):
    status = main(["train", "configs/trace_patterning_ccn.yaml", f"train.population_grid.{key}=[1, 2]",
                   f"train.run_dir={tmp_path / 'x'}"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert f"train.population_grid key '{key}'" in err and "valid keys: agent.lr" in err
    assert not (tmp_path / "x").exists()


def test_grid_values_must_be_numbers_and_valid_options():
    base = {"defaults": {"memory": "ccn", "env": "trace_patterning", "agent": "td"}}
    with pytest.raises(cfg.ConfigError, match="must be a non-empty list of numbers"):
        cfg.resolve(base, ["train.population_grid.agent.lr=[]"])
    with pytest.raises(cfg.ConfigError, match=r"agent\.lr"):
        cfg.resolve(base, ["train.population_grid.agent.lr=[0.1, -1.0]"])
    with pytest.raises(cfg.ConfigError, match=r"several members the name lr0\.1_s0"):
        cfg.resolve(base, ["train.population_grid.agent.lr=[0.1, 0.1]"])
    with pytest.raises(cfg.ConfigError, match=r"train\.population must be >= 1"):
        cfg.resolve(base, ["train.population=0"])
    with pytest.raises(cfg.ConfigError, match="not supported by learner 'ppo'"):
        cfg.resolve({"defaults": {"memory": "gru", "env": "cue_recall", "agent": "ppo"}}, ["train.population=2"])


@pytest.mark.parametrize("name", ["gru", "lstm"])
def test_unfused_recurrent_cores_equal_the_fused_kernels(float64, name: str):
    """The gate equations that populations run under vmap compute what the fused kernel computes."""
    core = make_core({"name": name, "hidden_size": 5}, 3)
    x = torch.randn(6, 4, 3)
    reset = torch.zeros(6, 4, dtype=torch.bool)
    reset[3, 1] = True
    state = {k: torch.randn_like(v) for k, v in core.initial_state(4).items()}
    fused_y, fused_state = core(x, state, reset)
    fused_grads = torch.autograd.grad(fused_y.square().sum(), list(core.parameters()))
    core.fused = False
    y, unfused_state = core(x, state, reset)
    grads = torch.autograd.grad(y.square().sum(), list(core.parameters()))
    torch.testing.assert_close(y, fused_y, atol=1e-12, rtol=1e-12)
    for key, value in fused_state.items():
        torch.testing.assert_close(unfused_state[key], value, atol=1e-12, rtol=1e-12)
    for got, expected in zip(grads, fused_grads):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


def test_eval_takes_a_member_of_a_population(tmp_path: Path, capsys):
    run_dir = run(tmp_path, "grid", 40)
    assert main(["eval", str(run_dir), "--steps", "20"]) == 2
    assert "evaluate one of its members" in capsys.readouterr().err
    assert main(["eval", str(run_dir / "members" / "lr0.03_s1"), "--steps", "20"]) == 0
    assert "lr0.03_s1" not in capsys.readouterr().err


def make_stream_ac(seed: int, num_envs: int, desync: bool = False, **options) -> StreamACLearner:
    env = make_env({"name": "cue_recall", "num_envs": num_envs, "delay": 3, "desync": desync}, seed=seed)
    return StreamACLearner(StreamACOptions(steps_per_iteration=10, torso_size=16, **options), env,
                           {"name": "lru", "hidden_size": 4, "grad": "rtrl"}, ModelOptions(), "cpu", seed, 10**6)


@pytest.mark.parametrize("num_envs, desync", [(1, False), (2, False), (1, True), (2, True)])
def test_each_stream_ac_member_gets_exactly_the_updates_it_gets_alone(float64, num_envs: int, desync: bool):
    """stream_ac with an LRU learning by RTRL: own seeds, sampled actions, reward scales, observation
    statistics, traces and ObGD steps (alone, 1–2 envs take the batched-backward path, the population
    the vmap one); with ``desync`` the members' episodes end at different steps."""
    settings = [(0, 1.0, 0.01), (1, 1.0, 0.01), (2, 0.3, 0.05)]  # (seed, lr, entropy_coef)
    alone = [make_stream_ac(seed, num_envs, desync, lr=lr, entropy_coef=c) for seed, lr, c in settings]
    population = StreamACPopulation([make_stream_ac(seed, num_envs, desync, lr=lr, entropy_coef=c)
                                     for seed, lr, c in settings])
    for _ in range(3):
        expected = [learner.iteration() for learner in alone]
        got = population.iteration()
        for e, g in zip(expected, got):
            assert g.episode_returns == e.episode_returns and g.episode_lengths == e.episode_lengths
            assert g.episode_successes == e.episode_successes
            for tag, value in e.metrics.items():
                assert g.metrics[tag] == pytest.approx(value, rel=1e-9, abs=1e-12), tag
    assert any(r.episode_returns for r in got)
    population.sync_members()
    for learner, member in zip(alone, population.members):
        for name, value in learner.network.state_dict().items():
            torch.testing.assert_close(member.network.state_dict()[name], value, atol=ATOL, rtol=RTOL, msg=name)
        for key in ("traces", "discounted_return"):
            torch.testing.assert_close(getattr(member, key), getattr(learner, key), atol=ATOL, rtol=RTOL, msg=key)
        for key, value in learner.memory_state.items():
            torch.testing.assert_close(member.memory_state[key], value, atol=ATOL, rtol=RTOL, msg=key)
        assert torch.equal(member.inputs.prev_action, learner.inputs.prev_action)  # the same actions sampled
        assert torch.equal(member.generator.get_state(), learner.generator.get_state())


def stream_ac_run(tmp_path: Path, name: str, steps: int, resume: bool = False) -> Path:
    if resume:
        config = cfg.load_saved(tmp_path / name, [f"train.total_steps={steps}"])
        config.train.run_dir = str(tmp_path / name)
    else:
        config = cfg.resolve(
            {"defaults": {"memory": "lru", "env": "cue_recall", "agent": "stream_ac"},
             "memory": {"hidden_size": 4, "grad": "rtrl"}, "env": {"num_envs": 1, "delay": 3},
             "agent": {"steps_per_iteration": 10, "torso_size": 16},
             "train": {"total_steps": steps, "checkpoint_every": 20, "progress": False, "population": 2,
                       "population_grid": {"agent.lr": [1.0, 0.3]}, "run_dir": str(tmp_path / name)}})
    return train(config, resume=resume, log=lambda *_: None)


def test_resume_of_a_stream_ac_population_equals_the_uninterrupted_run(tmp_path: Path):
    straight = load_checkpoint(stream_ac_run(tmp_path, "straight", 60))
    stream_ac_run(tmp_path, "interrupted", 30)
    resumed = load_checkpoint(stream_ac_run(tmp_path, "interrupted", 60, resume=True))
    assert list(straight["network"]) == ["lr1_s0", "lr1_s1", "lr0.3_s0", "lr0.3_s1"]  # the grid's order
    for name, expected in straight["network"].items():
        for key, value in expected.items():
            assert torch.equal(value, resumed["network"][name][key]), (name, key)
    for expected, got in zip(straight["learner"]["members"], resumed["learner"]["members"]):
        for key in ("traces", "discounted_return", "prev_action"):
            assert torch.equal(expected[key], got[key]), key


def test_bench_population_reports_member_steps_against_one_learner_alone(tmp_path: Path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "population", "--members", "1,2", "--methods", "columnar,lstm_tbptt15", "--steps", "2",
                 "--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["members"]) for r in rows] == [("columnar", 1), ("columnar", 2), ("lstm_tbptt15", 1),
                                                           ("lstm_tbptt15", 2)]
    assert all(r["speedup"] > 0 for r in rows) and json.loads(out.read_text())["device"] == "cpu"
    assert main(["bench", "population", "--methods", "gru"]) == 2
    assert "unknown method 'gru'" in capsys.readouterr().err
    assert main(["bench", "population", "--stage", "-1"]) == 2
    assert "--stage must be >= 0" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "population", "--device", "cuda"]) == 2
        assert "--device cuda: no CUDA device is available here" in capsys.readouterr().err


def test_bench_population_times_a_later_ccn_stage_and_the_compiled_population(tmp_path: Path):
    out = tmp_path / "bench.json"
    assert main(["bench", "population", "--members", "2", "--methods", "ccn", "--steps", "2", "--repeats", "1",
                 "--stage", "9", "--compile", "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    (row,) = table["rows"]
    assert table["stage"] == 9 and table["compile"] is True
    assert row["compiled_member_steps_per_s"] > 0 and row["compiled_speedup"] > 0
    # stage 9 is past CCN 20:4's last (4): every stage ran, the last one learning
    assert _learners("ccn", range(1), steps=2, device="cpu", stage=9)[0].network.core.learning_stage == 4


def test_a_diverging_member_stops_alone_and_the_others_go_on(float64):
    """A member whose update stops being finite (here its step size is absurd: the square of its update
    overflows float64 on its second step, as alone) retires: it says why, reports no metrics, and keeps
    its last finite parameters, while every other member gets exactly the updates it gets alone. Its
    rows stay finite for checkpoints, and a population loaded from one knows who has retired."""
    memory, _ = CORES["elstm-rtrl"]
    alone = make_learner(memory, 2, lr=1e200)
    with pytest.raises(TrainingDiverged, match="gradient norm"):
        alone.iteration()
    settings = [(0, 0.01), (1, 0.01), (2, 1e200)]
    population = TDPopulation([make_learner(memory, seed, lr=lr) for seed, lr in settings])
    results = [population.iteration() for _ in range(3)]
    assert all(r[2].diverged == "gradient norm (update norm inf)" and not r[2].metrics for r in results)
    assert all(r[p].diverged is None and r[p].metrics for r in results for p in (0, 1))
    stopped = {name: p.detach()[2].clone() for name, p in population.params.items()}
    population.iteration()
    assert all(torch.equal(p.detach()[2], stopped[name]) for name, p in population.params.items())
    assert all(bool(torch.isfinite(t).all()) for t in population.stacked_tensors())
    population.sync_members()
    for seed, member in zip((0, 1), population.members):
        learner = make_learner(memory, seed, lr=0.01)
        for _ in range(4):
            learner.iteration()
        assert_members_equal(learner, member)

    saved = population.state_dict()
    assert saved["diverged"] == [None, None, "gradient norm (update norm inf)"]
    loaded = TDPopulation([make_learner(memory, seed, lr=lr) for seed, lr in settings])
    for member, env_state in zip(loaded.members, [m.env.state_dict() for m in population.members]):
        member.env.load_state_dict(env_state)
    loaded.load_state_dict(saved)
    assert [r.diverged for r in loaded.iteration()] == [None, None, "gradient norm (update norm inf)"]


def test_the_population_stops_when_every_member_has_diverged(float64):
    memory, _ = CORES["elstm-rtrl"]
    population = TDPopulation([make_learner(memory, seed, lr=1e200) for seed in range(2)])
    assert [r.diverged is None for r in population.iteration()] == [False, True]  # seed 1 lasts 40 steps more
    with pytest.raises(TrainingDiverged, match=r"gradient norm \(update norm inf\) in member 1, the last of the 2 "
                                               "members to diverge"):
        for _ in range(2):
            population.iteration()


def test_a_stream_ac_member_whose_policy_stops_being_finite_retires(float64):
    """stream_ac: a member whose policy output is not finite (its weights poisoned here) retires; it acts
    by another member's policy from then on, and the others get exactly the updates they get alone."""
    settings = [(0, 1.0), (1, 0.3), (2, 1.0)]
    population = StreamACPopulation([make_stream_ac(seed, 1, False, lr=lr) for seed, lr in settings])
    population.iteration()
    with torch.no_grad():
        next(iter(population.params.values()))[1].fill_(float("nan"))
    for _ in range(2):
        results = population.iteration()
    assert [r.diverged for r in results] == [None, "policy output", None]
    assert all(bool(torch.isfinite(t).all()) for t in population.stacked_tensors())
    population.sync_members()
    for p in (0, 2):
        learner = make_stream_ac(settings[p][0], 1, False, lr=settings[p][1])
        for _ in range(3):
            learner.iteration()
        for name, value in learner.network.state_dict().items():
            torch.testing.assert_close(population.members[p].network.state_dict()[name], value, atol=ATOL,
                                       rtol=RTOL, msg=name)


def test_a_run_goes_on_past_a_diverged_member_and_says_so(tmp_path: Path, capsys):
    """Through the training loop: the member's divergence is reported once (and in its own TensorBoard
    text), its curve ends, the run finishes with the others and resumes with the member still retired;
    ``rlmem summary`` and ``rlmem plot`` count it as diverged rather than fail on its missing curve."""
    lines: list[str] = []
    settings = {"defaults": {"memory": "elstm", "env": "trace_patterning", "agent": "td"},
                "memory": {"hidden_size": 4}, "env": {k: v for k, v in SMALL_TASK.items() if k != "name"},
                "agent": {"steps_per_iteration": 20}, "model": {"encoder": "identity"},
                "train": {"total_steps": 100, "checkpoint_every": 40, "progress": False,
                          "population_grid": {"agent.lr": [0.01, 1e200]}, "run_dir": str(tmp_path / "run")}}
    config = cfg.resolve(settings)
    train(config, log=lambda *_: None, report=lines.append)
    (announced,) = [line for line in lines if "diverged" in line]
    assert announced.startswith("member lr1e+200_s0 diverged by step 20: non-finite ")
    assert announced.endswith("it takes no further steps and the other members go on")
    checkpoint = load_checkpoint(tmp_path / "run")
    assert checkpoint["global_step"] == 100 and checkpoint["learner"]["diverged"][0] is None
    assert checkpoint["learner"]["diverged"][1] is not None
    from rlmem.plot import read_scalars

    members = tmp_path / "run" / "members"
    assert len(read_scalars(members / "lr0.01_s0", "charts/prediction_error")[1]) == 5
    with pytest.raises(cfg.ConfigError, match="no scalar"):  # nothing logged: its first update was not finite
        read_scalars(members / "lr1e+200_s0", "charts/prediction_error")
    runs = [str(members / "lr1e+200_s0"), str(members / "lr0.01_s0")]  # the main tag from the run that logs it
    capsys.readouterr()
    assert main(["summary", *runs]) == 0
    table = capsys.readouterr().out
    assert "| lr=1e+200 | 1 | — | — (1 of 1 diverged) |" in table and "| lr=0.01 | 1 | 0.1k | 0." in table
    assert main(["plot", *runs, "--out", str(tmp_path / "curves.png")]) == 0
    assert main(["summary", str(tmp_path / "run")]) == 0  # the population's run dir stands for its members
    whole = capsys.readouterr().out
    assert "| lr=1e+200 | 1 | — | — (1 of 1 diverged) |" in whole and "| lr=0.01 | 1 | 0.1k | 0." in whole
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "population.png")]) == 0
    assert main(["summary", runs[0]]) == 2
    assert "every run given diverged, and" in capsys.readouterr().err
    config = cfg.load_saved(tmp_path / "run", ["train.total_steps=140"])
    config.train.run_dir = str(tmp_path / "run")
    train(config, resume=True, log=lambda *_: None, report=lines.append)
    assert load_checkpoint(tmp_path / "run")["global_step"] == 140
    assert len(read_scalars(members / "lr0.01_s0", "charts/prediction_error")[1]) == 7
    # when the last member diverges the run stops, naming it
    config = cfg.resolve({**settings, "train": {**settings["train"], "run_dir": str(tmp_path / "all"), "population": 2,
                                                "population_grid": {"agent.lr": [1e200]}}})
    with pytest.raises(TrainingDiverged, match=r"in member lr1e\+200_s1, the last of the 2 members to diverge"):
        train(config, log=lambda *_: None, report=lines.append)
