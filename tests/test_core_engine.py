"""The shared state layout of the cores on the RTRL engine (``rlmem.memory.engine.EngineCore``).

Every engine core carries ``{state_key: h}`` plus, in its engine mode, one ``sensitivity_<group>``
entry per group of its cell; bptt carries h only; acting under no_grad passes the sensitivities on
as they are, and a learning window returns them (and h) detached.
"""

from __future__ import annotations

import pytest
import torch

from rlmem.memory import make_core
from rlmem.memory.engine import SENSITIVITY, EngineCore, sensitivities_in, sensitivity_entries

D, B, T = 3, 2, 5
# (core, its engine mode, options)
ENGINE_CORES = [
    ("elstm", "rtrl", {}),
    ("lru", "rtrl", {}),
    ("ffm", "rtrl", {"traces": 3, "context": 2}),
    ("ccn", "rtrl", {"columns_per_stage": 2}),
    ("cfc", "snap1", {}),
]


def build(name: str, grad: str, options: dict) -> EngineCore:
    torch.manual_seed(0)
    core = make_core({"name": name, "hidden_size": 4, "grad": grad, **options}, input_size=D)
    assert isinstance(core, EngineCore)
    return core


@pytest.mark.parametrize(("name", "mode", "options"), ENGINE_CORES)
def test_state_keys_follow_one_convention(name, mode, options):
    core = build(name, mode, options)
    state = core.initial_state(B)
    expected = {core.state_key} | {SENSITIVITY + group.name for group in core.cell.groups}
    assert set(state) == expected
    assert all(value.shape[0] == B and not value.any() for value in state.values())
    assert set(build(name, "bptt", options).initial_state(B)) == {core.state_key}


@pytest.mark.parametrize(("name", "mode", "options"), ENGINE_CORES)
def test_windows_return_detached_states_and_acting_passes_sensitivities_on(name, mode, options):
    core = build(name, mode, options)
    state = core.initial_state(B)
    x, reset = torch.randn(T, B, D), torch.zeros(T, B, dtype=torch.bool)
    y, learned = core(x, state, reset)
    y.sum().backward()
    assert set(learned) == set(state)
    assert all(not value.requires_grad for value in learned.values())
    assert any(value.any() for key, value in learned.items() if key.startswith(SENSITIVITY))
    with torch.no_grad():
        _, acted = core(x, learned, reset)
    for key, value in sensitivities_in(learned).items():
        assert acted[SENSITIVITY + key] is value
    assert not torch.equal(acted[core.state_key], learned[core.state_key])


def test_sensitivity_entries_round_trip():
    by_group = {"w": torch.zeros(1), "b": torch.ones(1)}
    state = {"h": torch.zeros(1), **sensitivity_entries(by_group)}
    assert sensitivities_in(state) == by_group
