"""Every learner, the cores that have their own CUDA paths (RTRL kernels, FFM's scan, CfC's SnAp-1) and
both kinds of population train on the policy device end to end: a short ``rlmem train`` run with
``train.device=<device>`` exits 0, logs finite losses, and leaves a checkpoint whose parameters are
finite and moved from their start. On a CPU this checks the test itself; with a CUDA device (``pytest
-m gpu``, run by ``make gpu-check``) it is what catches a tensor left on the wrong device, the stream_ac
vmap path on CUDA, or a population's stacked state on the host."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rlmem import config as cfg
from rlmem.checkpoint import load_checkpoint
from rlmem.cli import main
from rlmem.plot import read_scalars
from rlmem.train import build

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]),
]
SMALL = ["memory.hidden_size=8", "env.num_envs=4", "agent.unroll_length=8"]
# trace patterning with short gaps, so that a few dozen steps see rewards (and so TD errors)
SHORT_TRACES = ["env.isi_min=3", "env.isi_max=4", "env.iti_min=4", "env.iti_max=6", "env.num_distractors=1"]
# name: (arguments, env steps, a loss tag every iteration logs)
CASES = {
    "actor_critic-gru": ([*SMALL], 64, "losses/value_loss"),
    "actor_critic-elstm-rtrl": ([*SMALL, "memory=elstm", "memory.grad=rtrl"], 64, "losses/value_loss"),
    "actor_critic-cfc-snap1": ([*SMALL, "memory=cfc_lowrank", "memory.grad=snap1"], 64, "losses/value_loss"),
    "ppo-lru-rtrl": ([*SMALL, "agent=ppo", "memory=lru", "memory.grad=rtrl", "agent.num_minibatches=2",
                      "agent.update_epochs=2"], 64, "losses/value_loss"),
    "ppo-ffm": ([*SMALL, "agent=ppo", "memory=ffm", "agent.num_minibatches=2"], 64, "losses/value_loss"),
    "stream_ac-lru-rtrl": (["agent=stream_ac", "memory=lru", "memory.grad=rtrl", "memory.hidden_size=8",
                            "env=repeat_previous", "env.num_envs=2", "agent.steps_per_iteration=8",
                            "agent.torso_size=16"], 32, "losses/td_error"),
    "td-ccn": ([str(CONFIGS / "trace_patterning_ccn.yaml"), "memory.steps_per_stage=24", "env.num_envs=2",
                "agent.steps_per_iteration=8", *SHORT_TRACES], 64, "losses/td_error"),
    "td-population-elstm": (["agent=td", "env=trace_patterning", "model.encoder=identity", "memory=elstm",
                             "memory.grad=rtrl", "memory.hidden_size=4", "train.population=2",
                             "train.population_grid={agent.lr: [0.01, 0.03]}", "agent.steps_per_iteration=8",
                             *SHORT_TRACES],
                            32, "losses/td_error"),
    "stream_ac-population-lru": (["agent=stream_ac", "memory=lru", "memory.grad=rtrl", "memory.hidden_size=8",
                                  "env=repeat_previous", "env.num_envs=1", "agent.steps_per_iteration=8",
                                  "agent.torso_size=16", "train.population=3"], 32, "losses/td_error"),
}


def trained_networks(run_dir: Path) -> list[tuple[Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """Per run (the run itself, or each member of a population): its directory, the network as built
    from its config (the start), and the network in the run's checkpoint."""
    config = cfg.load_saved(run_dir)
    checkpoint = load_checkpoint(run_dir)["learner"]
    if config.train.population > 1:
        members = cfg.population_members(config)
        runs = [(run_dir / "members" / cfg.member_name(m, config.train.population_grid), m, checkpoint["members"][p])
                for p, m in enumerate(members)]
    else:
        runs = [(run_dir, config, checkpoint)]
    out = []
    for member_dir, member, state in runs:
        env, learner, _ = build(member)
        try:
            start = {k: v.detach().cpu().clone() for k, v in learner.network.state_dict().items()
                     if isinstance(v, torch.Tensor) and v.is_floating_point()}
            learner.load_state_dict(state)
            end = {k: v.detach().cpu() for k, v in learner.network.state_dict().items() if k in start}
        finally:
            env.close()
        out.append((member_dir, start, end))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_a_learner_trains_on_the_device(tmp_path: Path, device: str, case: str):
    args, steps, loss_tag = CASES[case]
    run_dir = tmp_path / case
    assert main(["train", *args, f"train.device={device}", f"train.total_steps={steps}", "train.progress=false",
                 "train.torch_threads=1", f"train.checkpoint_every={steps}", f"train.run_dir={run_dir}"]) == 0
    for member_dir, start, end in trained_networks(run_dir):
        _, losses = read_scalars(member_dir, loss_tag)
        assert len(losses) > 0 and all(math.isfinite(v) for v in losses), f"{member_dir.name}: {loss_tag}"
        assert all(torch.isfinite(v).all() for v in end.values()), f"{member_dir.name}: non-finite parameters"
        moved = [k for k in start if not torch.equal(start[k], end[k])]
        assert moved, f"{member_dir.name}: no parameter moved on {device}"
