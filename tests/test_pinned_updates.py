"""Refactors keep behaviour: a few short runs must produce bit-for-bit the parameters they produced when
the reference was recorded (``python tests/test_pinned_updates.py`` re-records it, on purpose only).

Bitwise equality only means something on the same kind of CPU kernels, so the reference records the
CPU capability PyTorch dispatched to and the test skips, saying why, where that differs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlmem import config as cfg
from rlmem.train import build

REFERENCE = Path(__file__).parent / "data" / "pinned_updates.pt"

# name -> (runnable file or None for the embedded default, command-line arguments, iterations)
CASES: dict[str, tuple[str | None, list[str], int]] = {
    "default": (None, ["env.num_envs=8"], 3),
    "ppo_elstm_rtrl": (None, ["agent=ppo", "memory=elstm", "memory.grad=rtrl", "memory.hidden_size=16",
                              "env.num_envs=8"], 2),
    "actor_critic_ffm": (None, ["memory=ffm", "env.num_envs=8"], 2),
    "actor_critic_cfc_snap1": (None, ["memory=cfc_lowrank", "memory.grad=snap1", "env.num_envs=8"], 2),
    "stream_ac_lru_rtrl": (None, ["agent=stream_ac", "memory=lru", "memory.grad=rtrl", "env=repeat_previous",
                                  "env.num_envs=4", "agent.steps_per_iteration=8"], 2),
    "td_ccn": ("trace_patterning_ccn.yaml", ["agent.steps_per_iteration=200"], 2),
}


def run_case(config_file: str | None, args: list[str], iterations: int) -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    path = None if config_file is None else str(Path(__file__).parent.parent / "configs" / config_file)
    config = cfg.load(path, [*args, "train.torch_threads=1", "train.device=cpu"])
    env, learner, _ = build(config)
    try:
        for _ in range(iterations):
            learner.iteration()
        tensors = [*learner.network.named_parameters(), *learner.network.named_buffers()]
        return {k: v.detach().clone() for k, v in tensors}
    finally:
        env.close()


def _reference() -> dict:
    if not REFERENCE.is_file():
        pytest.skip(f"no reference recorded at {REFERENCE}")
    reference = torch.load(REFERENCE, weights_only=True)
    here = torch.backends.cpu.get_cpu_capability()
    if reference["cpu_capability"] != here:
        pytest.skip(f"reference recorded on {reference['cpu_capability']} CPU kernels, this machine runs {here}")
    return reference


@pytest.mark.parametrize("name", sorted(CASES))
def test_updates_match_the_recorded_reference_bitwise(name: str):
    reference = _reference()["cases"][name]
    params = run_case(*CASES[name])
    assert sorted(params) == sorted(reference), "the network's parameter names changed"
    for key, value in params.items():
        assert torch.equal(value, reference[key]), f"{name}: {key} differs from the recorded run"


if __name__ == "__main__":
    cases = {name: run_case(*spec) for name, spec in CASES.items()}
    REFERENCE.parent.mkdir(exist_ok=True)
    torch.save({"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cases": cases}, REFERENCE)
    print(f"recorded {len(cases)} cases in {REFERENCE}")
