"""`rlmem bench envs` runs end to end on tiny settings and refuses bad arguments with exit status 2."""

from __future__ import annotations

import pytest

from envs import bench


def test_bench_prints_one_row_per_source(capsys):
    bench.run(["--steps", "3", "--repeats", "1", "--num-envs", "2", "--sources", "cartpole,cue_recall"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["source", "num_envs", "raw", "steps/s", "rlmem", "steps/s", "ratio"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(rows) == {"cartpole", "cue_recall"}
    raw, ours, ratio = (float(x.replace(",", "")) for x in rows["cartpole"][2:5])
    assert raw > 0 and ours > 0 and ratio == pytest.approx(ours / raw, abs=0.01)
    assert rows["cue_recall"][1] == "2" and rows["cue_recall"][2] == "-"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sources", "pong"], "unknown source 'pong'; valid choices: cartpole"),
        (["--steps", "0"], "--steps must be positive"),
        (["--num-envs", "-1"], "--num-envs must be positive"),
        (["--repeats", "0"], "--repeats must be positive"),
    ],
)
def test_bench_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.run(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_library_rows_and_missing_packages(capsys, monkeypatch):
    import dataclasses
    import importlib.util

    available = [name for name in ("atari", "procgen") if importlib.util.find_spec(bench.SOURCES[name].package)]
    missing = dataclasses.replace(bench.SOURCES["cartpole"], package="no_such_package_for_rlmem")
    monkeypatch.setitem(bench.SOURCES, "missing", missing)
    bench.run(["--steps", "2", "--repeats", "1", "--num-envs", "2", "--sources", ",".join([*available, "missing"])])
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert "skipped: no_such_package_for_rlmem is not installed" in rows["missing"]
    for name in available:
        raw, ours, ratio = (float(x.replace(",", "")) for x in rows[name].split()[2:5])
        assert raw > 0 and ours > 0 and ratio > 0
