"""`rlmem bench envs` (rlmem/bench/envs.py): raw, VecEnv and rollout rows on tiny settings; bad arguments."""

from __future__ import annotations

import importlib.util

import pytest

from rlmem import cli
from rlmem.bench import envs as bench


def rows(text: str) -> dict[str, list[str]]:
    lines = text.splitlines()
    assert lines[1].split() == ["source", "envs", "raw", "vecenv", "policy", "rollout", "overlap", "vec/raw",
                                "roll/raw", "ovl/raw", "seq/raw"]
    return {line.split()[0]: line.split() for line in lines[3:] if not line.startswith("*")}


def number(text: str) -> float:
    return float(text.replace(",", "").rstrip("*"))


def test_rows_for_sources_with_and_without_raw_library_and_overlap(capsys):
    bench.run(["--steps", "4", "--unroll", "2", "--repeats", "1", "--num-envs", "2", "--hidden", "8",
               "--sources", "cartpole,cue_recall"])
    table = rows(capsys.readouterr().out)
    assert set(table) == {"cartpole", "cue_recall"}
    _, envs, raw, vecenv, policy, rollout, overlap, _, ratio, overlap_ratio, sequential = table["cartpole"]
    assert envs == "2" and all(number(x) > 0 for x in (raw, vecenv, policy, rollout))
    assert number(ratio) == pytest.approx(number(rollout) / number(raw), abs=0.01)
    # stepping then acting with no overhead: 1 / (1/raw + 1/policy), over raw
    assert number(sequential) == pytest.approx(number(policy) / (number(raw) + number(policy)), abs=0.01)
    assert overlap == overlap_ratio == "-"  # a sync gymnasium env does not step in the background
    _, _, raw, vecenv, policy, rollout, overlap, adapter_share, ratio, _, sequential = table["cue_recall"]
    assert raw == "-" and overlap == "-" and adapter_share == "-"
    assert ratio.endswith("*") and sequential.endswith("*")  # relative to the VecEnv
    assert number(ratio) == pytest.approx(number(rollout) / number(vecenv), abs=0.01)
    assert number(sequential) == pytest.approx(number(policy) / (number(vecenv) + number(policy)), abs=0.01)


@pytest.mark.skipif(importlib.util.find_spec("ale_py") is None, reason="needs ale-py")
def test_atari_row_measures_the_overlap_through_the_cli(capsys):
    assert cli.BENCHES["envs"][0] == "rlmem.bench.envs"
    assert cli.main(["bench", "envs", "--steps", "2", "--unroll", "2", "--repeats", "1", "--num-envs", "2",
                     "--hidden", "8", "--sources", "atari"]) == 0
    _, _, raw, vecenv, policy, rollout, overlap, _, ratio, overlap_ratio, _ = rows(capsys.readouterr().out)["atari"]
    assert all(number(x) > 0 for x in (raw, vecenv, policy, rollout, overlap, ratio, overlap_ratio))
    assert number(overlap_ratio) == pytest.approx(number(overlap) / number(raw), abs=0.01)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sources", "pong"], "unknown source 'pong'; valid choices: cartpole"),
        (["--steps", "0"], "--steps must be positive"),
        (["--unroll", "0"], "--unroll must be positive"),
        (["--num-envs", "-1"], "--num-envs must be positive"),
        (["--repeats", "0"], "--repeats must be positive"),
        (["--hidden", "-1"], "--hidden must be positive"),
        (["--torch-threads", "-1"], "--torch-threads must be >= 0"),
        (["--encoder", "resnet"], "invalid choice: 'resnet'"),
    ],
)
def test_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.run(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
