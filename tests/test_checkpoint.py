"""Checkpoints hold plain data only, load without running code, refuse foreign files with one message and
never store a non-finite value."""

from __future__ import annotations

import os
import pickle
import random
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from rlmem.checkpoint import (
    CHECKPOINT_KEYS,
    CHECKPOINT_NAME,
    from_plain,
    load_checkpoint,
    save_checkpoint,
    to_plain,
)
from rlmem.cli import main
from rlmem.errors import ConfigError, TrainingDiverged

SMALL = ["memory.hidden_size=8", "env.num_envs=4", "agent.unroll_length=8", "train.progress=false",
         "train.checkpoint_every=32"]


def _payload(**changes) -> dict:
    network = torch.nn.Linear(2, 3).state_dict()  # an OrderedDict with the module versions in _metadata
    payload = {
        "learner": {"network": network, "generator": torch.Generator().get_state(), "steps": 3,
                    "env_rng": np.random.default_rng(1).bit_generator.state, "buffer": np.arange(5.0)},
        "network": network,
        "env": {"counts": np.array([1, 2], dtype=np.int16), "scale": np.float32(0.5)},
        "global_step": 96,
        "iteration": 3,
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        "config": {"train": {"seed": 0}},
    }
    payload.update(changes)
    return payload


class PlantsAMarker:
    """Unpickling this object would create a file (it would run any command just as well)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_numpy_values_round_trip_exactly_through_plain_data():
    state = np.random.get_state()
    back = from_plain(to_plain({"numpy": state, "scalar": np.float32(1.5), "ints": np.arange(6).reshape(2, 3)}))
    assert back["numpy"][0] == state[0] and back["numpy"][2:] == state[2:]
    assert back["numpy"][1].dtype == state[1].dtype and np.array_equal(back["numpy"][1], state[1])
    assert type(back["scalar"]) is np.float32 and back["scalar"] == np.float32(1.5)
    assert np.array_equal(back["ints"], np.arange(6).reshape(2, 3))
    with pytest.raises(TypeError, match="learner/odd"):
        to_plain({"learner": {"odd": object()}})


def test_a_checkpoint_loads_with_weights_only_and_restores_every_value(tmp_path: Path):
    payload = _payload()
    path = save_checkpoint(tmp_path, payload)
    raw = torch.load(path, weights_only=True)  # plain data: no class is unpickled
    assert set(raw) == set(CHECKPOINT_KEYS)
    loaded = load_checkpoint(tmp_path)
    np.random.set_state(loaded["rng"]["numpy"])
    expected = payload["rng"]["numpy"]
    assert np.array_equal(np.random.get_state()[1], expected[1])
    random.setstate(loaded["rng"]["python"])
    assert random.getstate() == payload["rng"]["python"]
    assert loaded["learner"]["env_rng"] == payload["learner"]["env_rng"]
    assert np.array_equal(loaded["env"]["counts"], payload["env"]["counts"])
    assert loaded["env"]["counts"].dtype == np.int16 and type(loaded["env"]["scale"]) is np.float32
    assert isinstance(loaded["network"], OrderedDict)
    assert loaded["network"]._metadata == payload["network"]._metadata  # module versions survive
    assert torch.equal(loaded["network"]["weight"], payload["network"]["weight"])


def test_save_refuses_a_non_finite_entry_and_keeps_the_previous_checkpoint(tmp_path: Path):
    save_checkpoint(tmp_path, _payload())
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()
    broken = _payload()
    broken["learner"]["network"] = OrderedDict(weight=torch.tensor([1.0, float("nan")]))
    with pytest.raises(TrainingDiverged, match="learner/network/weight"):
        save_checkpoint(tmp_path, broken)
    with pytest.raises(TrainingDiverged, match="rng/extra"):
        save_checkpoint(tmp_path, _payload(rng={**_payload()["rng"], "extra": torch.tensor(float("inf"))}))
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]  # no temporary file left


def _plant(run_dir: Path, write) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / CHECKPOINT_NAME, "wb") as handle:
        write(handle)


@pytest.mark.parametrize("kind", ["torch_save", "raw_pickle", "truncated", "junk", "incomplete", "not_a_dict",
                                  "bad_step"])
def test_load_refuses_foreign_corrupt_or_incomplete_files_with_one_message(tmp_path: Path, kind: str):
    marker = tmp_path / "marker"
    good = tmp_path / "good"
    save_checkpoint(good, _payload())
    writers = {
        "torch_save": lambda f: torch.save({**_payload(), "learner": PlantsAMarker(marker)}, f),
        "raw_pickle": lambda f: pickle.dump(PlantsAMarker(marker), f),
        "truncated": lambda f: f.write((good / CHECKPOINT_NAME).read_bytes()[:2000]),
        "junk": lambda f: f.write(b"not a checkpoint at all"),
        "incomplete": lambda f: torch.save({"learner": {}, "network": {}}, f),
        "not_a_dict": lambda f: torch.save([1, 2], f),
        "bad_step": lambda f: torch.save({**_payload(), "global_step": "many"}, f),
    }
    run_dir = tmp_path / "run"
    _plant(run_dir, writers[kind])
    with pytest.raises(ConfigError) as refused:
        load_checkpoint(run_dir)
    message = str(refused.value)
    assert str(run_dir / CHECKPOINT_NAME) in message and "\n" not in message
    if kind == "incomplete":
        assert "missing env, global_step, iteration, rng, config" in message
    assert not marker.exists()


def test_cli_refuses_a_planted_pickle_in_a_run_dir_and_never_runs_it(tmp_path: Path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", *SMALL, "train.total_steps=32", f"train.run_dir={run_dir}"]) == 0
    marker = tmp_path / "marker"
    command = tmp_path / "command_ran"
    (run_dir / CHECKPOINT_NAME).unlink()
    _plant(run_dir, lambda f: torch.save({**_payload(), "learner": PlantsAMarker(marker),
                                          "network": _RunsACommand(command)}, f))
    capsys.readouterr()
    for argv in (["eval", str(run_dir)], ["train", "--resume", str(run_dir)]):
        assert main(argv) == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and "refusing to load checkpoint" in lines[0] and "Traceback" not in captured.err
        assert not marker.exists() and not command.exists()


class _RunsACommand:
    def __init__(self, created: Path) -> None:
        self.created = created

    def __reduce__(self):
        return (os.system, (f"touch {self.created}",))
