"""Data-parallel training (rlmem.distributed, agents.distributed) on CPU with gloo: two ranks started
by torch.distributed.run against one process, in float64.

Equivalence: a 2-rank run with B/2 envs per rank ends with the parameters of a 1-process run with B
envs on the same seed (max abs difference < 1e-9: the ranks' envs are the same envs, actions are drawn
from the same generator stream, gradients and statistics are reduced over all envs; only the order of
floating-point sums differs). td (on trace patterning) is compared too. PPO is compared with one
minibatch: with M > 1 each minibatch takes B/(W·M) envs of each rank, so it differs from one process
in which envs share a minibatch (documented).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlmem.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
RUNS_SCRIPT = Path(__file__).resolve().parent / "distributed_runs.py"
B = 4  # env.num_envs of every run: 2 envs per rank
TOLERANCE = 1e-9

COMMON = [f"env.num_envs={B}", "memory.hidden_size=8", "model.encoder_size=8", "train.progress=false",
          "train.checkpoint_every=1000000"]
WINDOW = ["agent.unroll_length=8", f"train.total_steps={3 * 8 * B}"]  # 3 updates (ppo: 3 x 2 epochs)
CASES = {
    "actor_critic_elstm_rtrl": ["agent=actor_critic", "memory=elstm", "memory.grad=rtrl", *WINDOW],
    "actor_critic_gru_bptt": ["agent=actor_critic", "memory=gru", *WINDOW],
    "ppo_elstm_rtrl": ["agent=ppo", "memory=elstm", "memory.grad=rtrl", "agent.num_minibatches=1",
                       "agent.update_epochs=2", *WINDOW],
    "ppo_gru_bptt": ["agent=ppo", "memory=gru", "agent.num_minibatches=1", "agent.update_epochs=2", *WINDOW],
    "stream_ac_lru_rtrl": ["agent=stream_ac", "memory=lru", "memory.grad=rtrl", "agent.steps_per_iteration=4",
                           "agent.torso_size=8", f"train.total_steps={6 * 4 * B}"],
    "td_elstm_rtrl": ["agent=td", "env=trace_patterning", "memory=elstm", "memory.grad=rtrl",
                      "agent.steps_per_iteration=8", f"train.total_steps={3 * 8 * B}"],
}
# Runs only the 2-rank side makes: minibatches split across ranks with KL early stopping; a run
# interrupted half-way and resumed, beside the uninterrupted one.
PPO_MINIBATCHES = ["agent=ppo", "memory=gru", "agent.num_minibatches=2", "agent.target_kl=0.001", *WINDOW]
# anneal_lr off: the learning-rate schedule follows train.total_steps, which the resume extends
RESUMED = ["agent=actor_critic", "memory=elstm", "memory.grad=rtrl", "agent.unroll_length=8", "agent.anneal_lr=false"]


def environment() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def run_batch(runs: list[dict], path: Path, nproc: int | None) -> None:
    spec = path / "runs.json"
    spec.write_text(json.dumps(runs))
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    done = subprocess.run([sys.executable, *launcher, str(RUNS_SCRIPT), str(spec)], env=environment(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Every case in one process and on two ranks; the 2-rank-only runs."""
    root = tmp_path_factory.mktemp("distributed")
    one = [{"args": [*COMMON, *args, f"train.run_dir={root / 'one' / name}"]} for name, args in CASES.items()]
    two = [{"args": [*COMMON, *args, f"train.run_dir={root / 'two' / name}"]} for name, args in CASES.items()]
    two += [
        {"args": [*COMMON, *PPO_MINIBATCHES, f"train.run_dir={root / 'two' / 'ppo_minibatches'}"]},
        {"args": [*COMMON, *RESUMED, f"train.total_steps={4 * 8 * B}", f"train.run_dir={root / 'full'}"]},
        {"args": [*COMMON, *RESUMED, f"train.total_steps={2 * 8 * B}", f"train.run_dir={root / 'part'}"]},
        {"args": [f"train.total_steps={4 * 8 * B}"], "resume": str(root / "part")},
    ]
    run_batch(one, root, None)
    run_batch(two, root, 2)
    return root


def parameters(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir)["network"]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_process(runs: Path, case: str) -> None:
    one, two = parameters(runs / "one" / case), parameters(runs / "two" / case)
    assert one[next(iter(one))].dtype == torch.float64
    assert max_difference(one, two) < TOLERANCE


@pytest.mark.parametrize("case", [*CASES, "ppo_minibatches"])
def test_ranks_hold_identical_parameters_and_their_own_state(runs: Path, case: str) -> None:
    checkpoint = load_checkpoint(runs / "two" / case)
    assert checkpoint["world_size"] == 2 and len(checkpoint["ranks"]) == 1
    rank0, rank1 = checkpoint["learner"], checkpoint["ranks"][0]["learner"]
    assert max_difference(rank0["network"], rank1["network"]) == 0.0
    # each rank saved its own envs' state
    assert checkpoint["env"] is not None and checkpoint["ranks"][0]["env"] is not None
    if "tensors" in checkpoint["env"]:  # a memory task: one row per env of the rank
        assert checkpoint["env"]["tensors"]["step_index"].shape == (B // 2,)


def test_only_rank_zero_writes_the_run_dir(runs: Path) -> None:
    for run_dir in (runs / "two").iterdir():
        files = sorted(p.name for p in run_dir.iterdir())
        events = [f for f in files if f.startswith("events.out.tfevents")]
        assert len(events) == 1, files
        assert set(files) == {"checkpoint.pt", "config.yaml", ".lock", *events}, files  # .lock: rank 0 holds the dir


def test_resumed_two_rank_run_equals_the_uninterrupted_one(runs: Path) -> None:
    full, resumed = load_checkpoint(runs / "full"), load_checkpoint(runs / "part")
    assert resumed["global_step"] == full["global_step"] == 4 * 8 * B
    assert max_difference(full["network"], resumed["network"]) == 0.0
    for a, b in ((full["learner"], resumed["learner"]), (full["ranks"][0]["learner"], resumed["ranks"][0]["learner"])):
        for key, value in a["collector"]["memory_state"].items():
            assert torch.equal(value, b["collector"]["memory_state"][key]), key


def rlmem(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlmem", *args], env=environment(), capture_output=True, text=True,
                          timeout=120)


def test_world_size_that_does_not_divide_num_envs_exits_2() -> None:
    done = rlmem("train", "--nproc", "3", "env.num_envs=4", "train.total_steps=64")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "env.num_envs=4 cannot be split evenly across 3 processes" in lines[0]


def test_resume_with_another_world_size_exits_2(runs: Path) -> None:
    done = rlmem("train", "--nproc", "1", "--resume", str(runs / "full"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "saved by a run of 2 process(es)" in lines[0]


def test_rlmem_train_nproc_runs_the_ranks_through_torchrun(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = rlmem("train", "--nproc", "2", *COMMON, "agent.unroll_length=8", f"train.total_steps={2 * 8 * B}",
                 f"train.run_dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = load_checkpoint(run_dir)
    assert checkpoint["world_size"] == 2 and checkpoint["global_step"] == 2 * 8 * B


def test_an_error_inside_the_ranks_exits_2_with_its_message(tmp_path: Path) -> None:
    # 2 envs per rank cannot form 4 minibatches: each rank refuses, and the launcher's status is theirs
    done = rlmem("train", "--nproc", "2", *COMMON, "agent=ppo", "agent.num_minibatches=4", "train.total_steps=64",
                 f"train.run_dir={tmp_path / 'run'}")
    assert done.returncode == 2
    assert "agent.num_minibatches=4 must divide env.num_envs=2" in done.stderr
    assert "2 envs per process" in done.stderr


def test_bench_distributed_prints_steps_per_second() -> None:
    done = rlmem("bench", "distributed", "--nproc", "1", *COMMON, "agent.unroll_length=8", "train.total_steps=64")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines()[2:]]
    assert len(rows) == 1 and rows[0][0] == "1" and float(rows[0][1].replace(",", "")) > 0
