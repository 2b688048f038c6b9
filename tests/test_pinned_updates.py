"""Refactors keep behaviour: a few short runs must produce bit-for-bit the parameters they produced when
the reference was recorded (``python tests/test_pinned_updates.py`` re-records it for this machine's kind
of CPU, on purpose only).

Bitwise equality only means something on the same CPU kernels: the capability PyTorch dispatches to
(AVX2, AVX512) and the vendor, since the math libraries take other code paths on AMD than on Intel at
the same capability (rounding-level differences, ~1e-6 relative after a few updates). So there is one
reference per kind, ``data/pinned_updates/<vendor>-<capability>.pt``, and the test skips, saying why,
on a kind with none. A change of behaviour made on purpose re-records every kind at hand and deletes
the references of the others, which would otherwise fail there.
"""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from rlmem import config as cfg
from rlmem.train import build

REFERENCES = Path(__file__).parent / "data" / "pinned_updates"


def cpu_kind() -> str:
    """``<vendor>-<capability>``, e.g. ``GenuineIntel-AVX512``: what decides which kernels run."""
    vendor = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("vendor_id"):
                vendor = line.split(":", 1)[1].strip()
                break
    return f"{vendor}-{torch.backends.cpu.get_cpu_capability()}"

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
    path = REFERENCES / f"{cpu_kind()}.pt"
    if not path.is_file():
        recorded = sorted(p.stem for p in REFERENCES.glob("*.pt"))
        pytest.skip(f"no reference recorded for {cpu_kind()} CPUs (recorded: {', '.join(recorded) or 'none'})")
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("name", sorted(CASES))
def test_updates_match_the_recorded_reference_bitwise(name: str):
    reference = _reference()["cases"][name]
    params = run_case(*CASES[name])
    assert sorted(params) == sorted(reference), "the network's parameter names changed"
    for key, value in params.items():
        assert torch.equal(value, reference[key]), f"{name}: {key} differs from the recorded run"


if __name__ == "__main__":
    cases = {name: run_case(*spec) for name, spec in CASES.items()}
    REFERENCES.mkdir(parents=True, exist_ok=True)
    path = REFERENCES / f"{cpu_kind()}.pt"
    torch.save({"cpu_kind": cpu_kind(), "cases": cases}, path)
    print(f"recorded {len(cases)} cases in {path}")
