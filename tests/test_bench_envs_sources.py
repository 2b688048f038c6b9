"""`rlmem bench envs`: every raw library beside rlmem's VecEnv on the same id and env count (the
adapter's share ``vec/raw``), and sources whose package is missing skipped with one line."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest

from rlmem.bench import envs as bench


def rows(text: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in text.splitlines()[3:] if not line.startswith("*")}


def number(text: str) -> float:
    return float(text.replace(",", "").rstrip("*"))


def test_library_rows_and_missing_packages(capsys, monkeypatch):
    available = [name for name in ("atari", "procgen") if importlib.util.find_spec(bench.SOURCES[name].package)]
    missing = dataclasses.replace(bench.SOURCES["cartpole"], package="no_such_package_for_rlmem")
    monkeypatch.setitem(bench.SOURCES, "missing", missing)
    bench.run(["--steps", "2", "--unroll", "2", "--repeats", "1", "--num-envs", "2", "--hidden", "8",
               "--sources", ",".join(["cartpole", *available, "missing"])])
    out = capsys.readouterr().out
    assert "missing" in out and "skipped: no_such_package_for_rlmem is not installed" in out
    table = rows(out)
    for name in ["cartpole", *available]:
        _, _, raw, vecenv, *_ = table[name]
        adapter_share = table[name][7]
        assert number(raw) > 0 and number(vecenv) > 0
        # (from the rounded rates printed: a relative tolerance)
        assert number(adapter_share) == pytest.approx(number(vecenv) / number(raw), rel=0.02, abs=0.01)


def test_the_raw_sides_step_their_library():
    # Each raw contender steps the library's own vector env: one observation row per env.
    for name in ("cartpole", "atari", "procgen"):
        source = bench.SOURCES[name]
        if source.package is not None and importlib.util.find_spec(source.package) is None:
            continue
        contender = source.raw(2, 3)
        try:
            result = contender.step(0)
        finally:
            contender.close()
        obs = result[1]["rgb"] if name == "procgen" else result[0]
        assert len(obs) == 2
