"""``rlmem bench memory``: it runs, prints one row per core and window, and its memory figures (exact
byte counts on CPU, not timings) show what RTRL promises: a per-step cost below BPTT's and the
sensitivities as the part that does not grow with the window."""

from __future__ import annotations

import argparse

import pytest

from rlmem.bench import memory as bench
from rlmem.errors import ConfigError


def test_prints_a_row_per_core_and_window(capsys):
    bench.run(
        ["--cores", "elstm,gru", "--windows", "1,3", "--batch", "2", "--hidden", "4", "--input", "3", "--min-time", "0"]
    )
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.startswith(("elstm", "gru"))]
    assert [(r[0], r[1]) for r in rows] == [("elstm", "1"), ("elstm", "3"), ("gru", "1"), ("gru", "3")]
    gru_row = next(line for line in lines if line.startswith("gru"))
    assert gru_row.count(" - ") >= 2  # gru has no rtrl mode: its rtrl cells are empty


def test_rtrl_grows_per_step_slower_than_bptt_and_carries_its_sensitivities():
    args = argparse.Namespace(batch=2, hidden=16, input=16, seed=0, min_time=0.0)
    short = bench.measure("elstm", ["rtrl", "bptt"], 8, args, bench.torch.device("cpu"))
    long = bench.measure("elstm", ["rtrl", "bptt"], 40, args, bench.torch.device("cpu"))
    rtrl_per_step = (long["rtrl"][0] - short["rtrl"][0]) / 32
    bptt_per_step = (long["bptt"][0] - short["bptt"][0]) / 32
    assert 0 < rtrl_per_step < bptt_per_step
    # The part that does not grow with the window: RTRL's exceeds BPTT's by the sensitivities.
    sensitivity_bytes = (2 * 16 * 16 + 4 * 16) * 4  # float32, per env
    fixed = {
        mode: short[mode][0] - 8 * per_step for mode, per_step in (("rtrl", rtrl_per_step), ("bptt", bptt_per_step))
    }
    assert 0.9 * sensitivity_bytes <= fixed["rtrl"] - fixed["bptt"] <= 1.5 * sensitivity_bytes


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--cores", "transformer"], "unknown memory core 'transformer'; valid choices:"),
        (["--batch", "0"], "--batch must be a positive integer"),
    ],
)
def test_bad_arguments_name_the_problem(argv, fragment):
    with pytest.raises(ConfigError, match=fragment):
        bench.run(argv)


def test_window_list_must_be_positive_integers():
    with pytest.raises(SystemExit):
        bench.run(["--windows", "4,-2"])
