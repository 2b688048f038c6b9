"""`rlmem bench trace_patterning` runs end to end on tiny settings, saves every finished run and reuses
it only when the settings match, and refuses bad arguments with exit status 2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rlmem.cli import main

TINY = ["--steps", "200", "--log-every", "100", "--window", "100", "--methods", "columnar,lstm_tbptt15"]
TABLE = "results-columnar+lstm_tbptt15.json"  # a subset's table: the whole comparison's results.json stays apart


def test_bench_saves_runs_and_resumes_with_more_seeds(tmp_path: Path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "tp"
    assert main(["bench", "trace_patterning", *TINY, "--seeds", "2", "--out", str(out)]) == 0
    first = json.loads((out / TABLE).read_text())
    assert [row["method"] for row in first["summary"]] == ["columnar", "lstm_tbptt15", "zero"]
    assert all(len(row["per_seed"]) == 2 for row in first["summary"])
    (pair,) = first["paired"]  # the other method against the better one, on both seeds
    assert pair["seeds"] == 2 and {pair["method"], pair["against"]} == {"columnar", "lstm_tbptt15"}
    assert "paired by seed" in capsys.readouterr().out
    assert sorted(p.name.rsplit("-", 1)[0] for p in (out / "runs").iterdir()) == [
        "columnar-seed0", "columnar-seed1", "lstm_tbptt15-seed0", "lstm_tbptt15-seed1", "zero-seed0", "zero-seed1"]
    assert (out / "trace_patterning-columnar+lstm_tbptt15.png").stat().st_size > 1000
    # Each learner's run is an ordinary training run dir, whose logged curve is the saved one.
    train_dirs = sorted((out / "train").iterdir())
    assert [p.name.rsplit("-", 1)[0] for p in train_dirs] == [
        "columnar-seed0", "columnar-seed1", "lstm_tbptt15-seed0", "lstm_tbptt15-seed1"]
    assert all((p / "config.yaml").is_file() and (p / "checkpoint.pt").is_file() for p in train_dirs)
    from rlmem.config import load_saved
    from rlmem.plot import read_scalars

    config = load_saved(train_dirs[0])
    assert (config.agent["name"], config.memory["name"], config.env["name"]) == ("td", "ccn", "trace_patterning")
    logged = read_scalars(train_dirs[0], "charts/prediction_error")[1].tolist()
    assert logged == next(r["curve"] for r in first["runs"] if (r["method"], r["seed"]) == ("columnar", 0))
    assert first["settings"]["task"] == "trace_patterning" and not (out / "results.json").exists()
    capsys.readouterr()

    # One more seed: the six finished runs (V = 0 included) are reused as they are, only seed 2 runs.
    assert main(["bench", "trace_patterning", *TINY, "--seeds", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "reusing 6 finished run(s)" in printed
    assert "done columnar seed 2" in printed and "done columnar seed 0" not in printed
    second = json.loads((out / TABLE).read_text())
    assert [r for r in second["runs"] if r["seed"] < 2] == first["runs"]

    # --saved-only summarises what is saved and runs nothing: seed 3 of either method is left out.
    assert main(["bench", "trace_patterning", *TINY, "--seeds", "4", "--saved-only", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "leaving out 3 run(s) not saved yet" in printed and "done" not in printed
    assert json.loads((out / TABLE).read_text())["runs"] == second["runs"]
    assert not list((out / "runs").glob("columnar-seed3-*.json"))
    assert main(["bench", "trace_patterning", *TINY, "--saved-only", "--out", str(tmp_path / "empty")]) == 2
    assert "no runs with these settings are saved" in capsys.readouterr().err

    # A different step size is a different run: those are not reused.
    assert main(["bench", "trace_patterning", *TINY, "--seeds", "1", "--lr", "columnar=0.02",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "reusing 2 finished run(s)" in printed and "done columnar seed 0" in printed
    assert sorted(json.loads(p.read_text())["settings"]["lr"]
                  for p in (out / "runs").glob("columnar-seed0-*.json")) == [0.01, 0.02]
    changed = list(out.glob("results-columnar+lstm_tbptt15-*.json"))  # its own table, named by a digest
    assert len(changed) == 1 and json.loads(changed[0].read_text())["settings"]["lr"]["columnar"] == 0.02
    assert json.loads((out / TABLE).read_text())["runs"] == second["runs"]  # the default setting's, untouched
    # ... saved beside the first setting's run, which is still there to reuse.
    assert main(["bench", "trace_patterning", *TINY, "--seeds", "1", "--out", str(out)]) == 0
    assert "reusing 3 finished run(s)" in capsys.readouterr().out

    # So is a different core option (--set): the option is part of the saved settings.
    assert main(["bench", "trace_patterning", *TINY, "--seeds", "1", "--lr", "columnar=0.02",
                 "--set", "columnar.init_scale=0.1", "--out", str(out)]) == 0
    assert "done columnar seed 0" in capsys.readouterr().out
    assert any(json.loads(p.read_text())["settings"]["memory"].get("init_scale") == 0.1
               for p in (out / "runs").glob("columnar-seed0-*.json"))

    # The memory-only task is another benchmark: nothing of trace patterning is reused.
    other = tmp_path / "tc"
    assert main(["bench", "trace_patterning", *TINY, "--seeds", "1", "--task", "trace_conditioning",
                 "--out", str(out)]) == 0
    assert "reusing" not in capsys.readouterr().out
    assert main(["bench", "trace_patterning", *TINY, "--seeds", "1", "--task", "trace_conditioning",
                 "--out", str(other)]) == 0
    conditioning = json.loads((other / TABLE).read_text())
    assert conditioning["settings"]["task"] == "trace_conditioning"
    assert (other / "trace_conditioning-columnar+lstm_tbptt15.png").exists()


def test_finished_runs_saved_under_results_are_reused_by_a_call_with_a_fresh_out(tmp_path: Path, capsys):
    """--results keeps the finished runs apart from OUT (a directory in version control, say): a later
    call with an empty OUT, as on another machine, trains nothing and writes the same table."""
    results = tmp_path / "results"
    assert main(["bench", "trace_patterning", *TINY, "--seeds", "1", "--results", str(results),
                 "--out", str(tmp_path / "first")]) == 0
    assert sorted(p.name.rsplit("-", 1)[0] for p in results.iterdir()) == [
        "columnar-seed0", "lstm_tbptt15-seed0", "zero-seed0"]
    assert not (tmp_path / "first" / "runs").exists()
    capsys.readouterr()
    fresh = tmp_path / "fresh"
    assert main(["bench", "trace_patterning", *TINY, "--seeds", "1", "--results", str(results),
                 "--out", str(fresh)]) == 0
    printed = capsys.readouterr().out
    assert "reusing 3 finished run(s)" in printed and "done" not in printed and not (fresh / "train").exists()
    assert (json.loads((fresh / TABLE).read_text())["runs"]
            == json.loads((tmp_path / "first" / TABLE).read_text())["runs"])


def test_summary_reports_mean_stderr_and_median_over_seeds():
    from rlmem.bench.trace_patterning import summarise

    def run(seed: int, curve: list[float]) -> dict:
        return {"method": "lru", "lr": 0.001, "seed": seed, "curve": curve, "macs_per_step": 10, "ms_per_step": 1.0}

    # The final error averages the last `window` steps (2 points of 100); seed 2 diverges.
    results = [run(0, [9.0, 1.0, 1.0]), run(1, [9.0, 2.0, 2.0]), run(2, [9.0, 30.0, 30.0])]
    (row,) = summarise(results, ["lru"], log_every=100, window=200)
    assert row["per_seed"] == [1.0, 2.0, 30.0]
    assert row["final_error"] == pytest.approx(11.0) and row["median_error"] == 2.0
    assert row["stderr"] == pytest.approx((((1 - 11) ** 2 + (2 - 11) ** 2 + (30 - 11) ** 2) / 2 / 3) ** 0.5)


def test_methods_are_compared_seed_by_seed_against_the_best():
    """A stream shared by every method on a seed makes their errors move together; the paired difference
    takes it out. Here the LRU is 1.0 worse than the eLSTM on every seed, while each method's spread over
    seeds is 100 times that: the pair says so with a standard error of 0, on the seeds both have
    (the LRU's seed 3, a hard stream, is left out of the pair)."""
    from rlmem.bench.trace_patterning import paired_against_best, summarise

    streams = {0: 10.0, 1: 200.0, 2: 30.0, 3: 400.0}  # what each seed's stream adds to every method's error

    def run(method: str, seed: int, worse: float) -> dict:
        level = streams[seed] + worse
        return {"method": method, "lr": 0.001, "seed": seed, "curve": [2 * level, level, level],
                "macs_per_step": 1, "ms_per_step": 1.0}

    results = ([run("elstm", seed, 0.0) for seed in range(3)] + [run("lru", seed, 1.0) for seed in range(4)]
               + [run("zero", seed, 5000.0) for seed in range(4)])
    rows = summarise(results, ["elstm", "lru", "zero"], log_every=100, window=200)
    assert rows[1]["stderr"] > 50 and rows[1]["whole_run_error"] == pytest.approx(rows[1]["final_error"] * 4 / 3)
    (pair,) = paired_against_best(rows)  # V = 0 is the reference, not a method to compare
    assert (pair["method"], pair["against"], pair["seeds"], pair["best_lower"]) == ("lru", "elstm", 3, 3)
    assert pair["difference"] == pytest.approx(1.0) and pair["stderr"] == pytest.approx(0.0, abs=1e-9)
    assert pair["whole_run_difference"] == pytest.approx(4 / 3)
    assert pair["whole_run_stderr"] == pytest.approx(0.0, abs=1e-9)
    assert paired_against_best(rows[:1]) == []  # one method: nothing to pair
    (pair,) = paired_against_best(rows, against="lru")  # a chosen reference instead of the best
    assert (pair["method"], pair["against"], pair["best_lower"]) == ("elstm", "lru", 0)
    assert pair["difference"] == pytest.approx(-1.0)


def test_the_figure_of_a_sweep_plots_each_method_final_error_against_its_step_size(tmp_path: Path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from rlmem.bench.trace_patterning import best_rows, plot, summarise

    def run(method: str, lr: float, seed: int, final: float) -> dict:
        return {"method": method, "lr": lr, "seed": seed, "curve": [2.0, final], "macs_per_step": 1, "ms_per_step": 1.0}

    results = [run("zero", 0.0, s, 2.0) for s in (0, 1)] + [
        run("lru", lr, s, final) for lr, final in ((0.001, 1.0), (0.003, 0.5), (0.01, 3.0)) for s in (0, 1)]
    sweep = summarise(results, ["lru", "zero"], log_every=100, window=100)
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot(results, best_rows(sweep), 100, tmp_path / "sweep.png", "sweep", sweep)
    plot(results, best_rows(sweep), 100, tmp_path / "best.png", "best")
    swept, best = figures
    assert len(best.axes) == 2 and swept.axes[2].get_title() == "step-size sensitivity"
    (line,) = [line for line in swept.axes[2].get_lines() if line.get_marker() == "o"]  # not the error bars' caps
    assert list(line.get_xdata()) == [0.001, 0.003, 0.01]
    assert list(line.get_ydata()) == pytest.approx([0.5, 0.25, 1.5])  # final error / V = 0's


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "gru"], "unknown method 'gru'; valid choices: ccn"),
        (["--task", "maze"], "unknown task 'maze'; valid choices: trace_patterning, trace_conditioning"),
        (["--steps", "0"], "--steps must be positive"),
        (["--steps", "100", "--log-every", "200"], "must be at least --log-every"),
        (["--lr", "ccn=fast"], "expected METHOD=<number>"),
        (["--set", "columnar.bogus=1"], "unknown key memory.bogus"),
        (["--set", "columnar.normalizer_decay=2"], "memory.normalizer_decay must be a number in [0, 1]"),
        (["--set", "ccn.steps_per_stage=5"], "the stage length follows from --steps"),
        (["--set", "columnar=1"], "expected METHOD.KEY=VALUE"),
        (["--set", "ccn.unroll_length=5"], "unroll_length is the window of a truncated-BPTT method (lstm_tbptt15"),
        (["--set", "lstm_tbptt40.unroll_length=0"], "unroll_length must be a positive whole number"),
        (["--set", "lstm_tbptt40.unroll_length=2.5"], "unroll_length must be a positive whole number"),
        (["--lr-factors", "0.3,x"], "expected comma-separated numbers"),
        (["--lr-factors", "0,1"], "expected positive numbers"),
        (["--compile"], "--compile compiles the step of a population: add --population"),
        (["--methods", "ccn,lru", "--against", "elstm"], "--against 'elstm': expected one of --methods: ccn, lru"),
        (["--variant", "fast=gru"], "expected NAME=METHOD"),
        (["--variant", "Fast=ccn"], "expected NAME=METHOD"),
        (["--variant", "lru=ccn"], "'lru' names a method already"),
        (["--variant", "fast=ccn", "--methods", "ccn,fast"], "ccn and fast are the same learner"),
        (["--variant", "fast=ccn", "--set", "slow.normalizer_decay=1"], "with METHOD one of: ccn"),
        (["--lr", "slow=0.1"], "unknown method 'slow'"),
    ],
)
def test_bench_bad_arguments_exit_2(argv, message, tmp_path: Path, capsys):
    assert main(["bench", "trace_patterning", *argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_runs_saved_under_the_first_file_names_are_reused(tmp_path: Path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "tp"
    assert main(["bench", "trace_patterning", *TINY, "--seeds", "1", "--out", str(out)]) == 0
    for path in (out / "runs").iterdir():  # <method>-seed<seed>.json, as the first version named them
        path.rename(path.with_name(path.name.rsplit("-", 1)[0] + ".json"))
    capsys.readouterr()
    assert main(["bench", "trace_patterning", *TINY, "--seeds", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "reusing 3 finished run(s)" in printed and "done columnar" not in printed


def test_a_variant_is_compared_beside_its_method_and_shares_the_runs_of_the_same_learner(tmp_path: Path, capsys):
    """``--variant NAME=METHOD`` lists a changed copy of a method under its own name, in the same table,
    figure and paired comparison as the method itself; a run saved earlier with the variant's settings
    (by a call that changed the method itself) is the variant's run."""
    pytest.importorskip("matplotlib")
    tiny = ["--steps", "200", "--log-every", "100", "--window", "100", "--seeds", "1", "--out", str(tmp_path)]
    warmup = ["normalizer_warmup=true"]
    assert main(["bench", "trace_patterning", *tiny, "--methods", "columnar", "--set", f"columnar.{warmup[0]}"]) == 0
    capsys.readouterr()
    assert main(["bench", "trace_patterning", *tiny, "--methods", "columnar,columnar_warmup",
                 "--variant", "columnar_warmup=columnar", "--set", f"columnar_warmup.{warmup[0]}"]) == 0
    printed = capsys.readouterr().out
    assert "reusing 2 finished run(s)" in printed  # the warm-up run and V = 0
    assert "done columnar seed 0" in printed and "done columnar_warmup" not in printed
    (table,) = tmp_path.glob("results-columnar+columnar_warmup-*.json")
    record = json.loads(table.read_text())
    labels = {row["method"]: row["label"] for row in record["summary"]}
    assert labels == {"columnar": "Columnar 7 (RTRL)", "columnar_warmup": "Columnar 7 (RTRL), normalizer_warmup=true",
                      "zero": "V = 0 (nothing learned)"}
    (pair,) = record["paired"]
    assert {pair["method"], pair["against"]} == {"columnar", "columnar_warmup"}
    for reference in ("columnar", "columnar_warmup"):  # either may be the reference of the pairs
        assert main(["bench", "trace_patterning", *tiny, "--methods", "columnar,columnar_warmup", "--saved-only",
                     "--variant", "columnar_warmup=columnar", "--set", f"columnar_warmup.{warmup[0]}",
                     "--against", reference]) == 0
        (pair,) = json.loads(table.read_text())["paired"]
        assert pair["against"] == reference
    printed += capsys.readouterr().out
    curves = {r["method"]: r["curve"] for r in record["runs"]}
    assert curves["columnar"] != curves["columnar_warmup"]
    # saved and trained under the family's name: the settings, not the name, say which learner it is
    assert sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "runs").iterdir()) == [
        "columnar-seed0", "columnar-seed0", "zero-seed0"]
    assert "Columnar 7 (RTRL), normalizer_warmup=true" in printed


def test_a_variant_trains_where_its_family_would():
    import dataclasses

    from rlmem.bench.trace_patterning import METHODS, Protocol, job_dir, with_variants

    protocol = Protocol("trace_patterning", steps=200, log_every=100, num_envs=1)
    variant = dataclasses.replace(with_variants(["slow=ccn"])["slow"], lr=0.001)
    changed = dataclasses.replace(METHODS["ccn"], lr=0.001)
    root = Path("train")
    assert job_dir(root, ("slow", variant, 0, protocol)) == job_dir(root, ("ccn", changed, 0, protocol))
    assert job_dir(root, ("slow", (variant,), [0, 1], protocol)) == job_dir(root, ("ccn", (changed,), [0, 1], protocol))


def test_a_variant_of_truncated_bptt_reads_as_its_size_and_window_and_trains_with_them():
    """A variant that changes what a label shows reads as what it is (LSTM 1, T-BPTT 40, not LSTM 2's
    label with a change appended), and ``--set NAME.unroll_length`` is the window its runs train with."""
    from rlmem.bench.trace_patterning import METHODS, Protocol, _with_option, run_config, variant_label, with_variants

    chosen = with_variants(["lstm1=lstm_tbptt40", "short=lstm_tbptt40", "warm=ccn", "fast=lstm_tbptt15"])
    for item in ["lstm1.hidden_size=1", "short.unroll_length=15", "warm.normalizer_warmup=true"]:
        name, chosen[name] = _with_option(chosen, item)
    labels = {name: variant_label(chosen[name], name) for name in ["lstm1", "short", "warm", "fast"]}
    assert labels == {"lstm1": "LSTM 1, T-BPTT 40", "short": "LSTM 2, T-BPTT 15",
                      "warm": "CCN 20:4 (RTRL), normalizer_warmup=true", "fast": "LSTM 4, T-BPTT 15, fast"}
    assert [METHODS[m].label for m in ("ccn", "constructive", "lstm_tbptt40")] == [
        "CCN 20:4 (RTRL)", "Constructive 10:1 (RTRL)", "LSTM 2, T-BPTT 40"]
    protocol = Protocol("trace_patterning", steps=200, log_every=100, num_envs=1)
    config = run_config(chosen["short"], 0, protocol, Path("unused"))
    assert config.agent["unroll_length"] == 15 and config.memory["hidden_size"] == 2


def test_only_the_whole_comparison_at_its_own_settings_writes_results_json(tmp_path: Path):
    import dataclasses

    from rlmem.bench.trace_patterning import METHODS, output_files

    everything = list(METHODS)
    assert output_files(tmp_path, "trace_patterning", everything, dict(METHODS)) == (
        tmp_path / "results.json", tmp_path / "trace_patterning.png")
    table, figure = output_files(tmp_path, "trace_patterning", ["elstm", "lru"], dict(METHODS))
    assert (table.name, figure.name) == ("results-elstm+lru.json", "trace_patterning-elstm+lru.png")
    slower = {**METHODS, "lru": dataclasses.replace(METHODS["lru"], lr=0.0003)}
    table, _ = output_files(tmp_path, "trace_patterning", everything, slower)
    assert table.name.startswith("results-" + "+".join(everything) + "-") and table.suffix == ".json"


def test_population_runs_give_each_seed_the_curve_of_its_own_run(tmp_path: Path, capsys):
    """``--population`` trains a method's seeds as one population; each seed's saved curve is the one its
    own run logs (to float32 rounding of batched kernels), and a saved run is reused either way."""
    pytest.importorskip("matplotlib")
    argv = ["bench", "trace_patterning", "--steps", "200", "--log-every", "100", "--window", "100",
            "--methods", "columnar", "--seeds", "3"]
    assert main([*argv, "--out", str(tmp_path / "alone")]) == 0
    assert main([*argv, "--out", str(tmp_path / "population"), "--population"]) == 0
    alone = json.loads((tmp_path / "alone" / "results-columnar.json").read_text())["runs"]
    together = json.loads((tmp_path / "population" / "results-columnar.json").read_text())["runs"]
    assert [(r["method"], r["seed"]) for r in together] == [(r["method"], r["seed"]) for r in alone]
    for expected, got in zip(alone, together):
        assert got["curve"] == pytest.approx(expected["curve"], rel=1e-4, abs=1e-7)
        assert got["macs_per_step"] == expected["macs_per_step"]
    train_dirs = [p.name.rsplit("-", 1)[0] for p in (tmp_path / "population" / "train").iterdir()]
    assert train_dirs == ["columnar-seeds0-2"]
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "population"), "--population", "--seeds", "4"]) == 0
    assert "reusing 6 finished run(s)" in capsys.readouterr().out


def test_a_step_size_sweep_is_one_population_per_method_and_reports_each_at_its_best(tmp_path: Path, capsys):
    pytest.importorskip("matplotlib")
    argv = ["bench", "trace_patterning", "--steps", "200", "--log-every", "100", "--window", "100",
            "--methods", "columnar", "--seeds", "2"]
    out = tmp_path / "sweep"
    assert main([*argv, "--lr-factors", "0.5,2", "--population", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "the step-size sweep" in printed and "paired by seed" not in printed  # one method: no pairs
    assert [p.name.rsplit("-", 1)[0] for p in (out / "train").iterdir()] == ["columnar-sweep-seeds0-1"]
    (table,) = out.glob("results-columnar-*.json")  # a sweep is not the comparison at the bench's settings
    record = json.loads(table.read_text())
    runs = [r for r in record["runs"] if r["method"] == "columnar"]
    assert sorted((r["lr"], r["seed"]) for r in runs) == [(0.005, 0), (0.005, 1), (0.02, 0), (0.02, 1)]
    assert [(row["method"], row["lr"]) for row in record["sweep"]] == [("columnar", 0.005), ("columnar", 0.02),
                                                                      ("zero", 0.0)]
    best = record["summary"][0]
    assert best["final_error"] == min(row["final_error"] for row in record["sweep"][:2])
    assert [row["method"] for row in record["summary"]] == ["columnar", "zero"]

    # Every member's curve is the one its own run gives at that step size.
    assert main([*argv, "--lr", "columnar=0.02", "--out", str(tmp_path / "alone")]) == 0
    alone = json.loads((tmp_path / "alone" / next(p.name for p in (tmp_path / "alone").glob("results-*.json")))
                       .read_text())["runs"]
    for expected in (r for r in alone if r["method"] == "columnar"):
        got = next(r for r in runs if (r["lr"], r["seed"]) == (0.02, expected["seed"]))
        assert got["curve"] == pytest.approx(expected["curve"], rel=1e-4, abs=1e-7)
    capsys.readouterr()
    assert main([*argv, "--lr-factors", "0.5,2", "--population", "--out", str(out)]) == 0
    assert "reusing 6 finished run(s)" in capsys.readouterr().out


def test_the_jobs_of_a_sweep_group_into_populations():
    from rlmem.bench.trace_patterning import METHODS, ZERO, Protocol, population_jobs, swept

    protocol = Protocol("trace_patterning", steps=200, log_every=100, num_envs=1)
    slow, fast = swept(METHODS["elstm"], 0.5), swept(METHODS["elstm"], 2.0)
    full = [("elstm", m, seed, protocol) for m in (slow, fast) for seed in range(3)] + [("zero", ZERO, 0, protocol)]
    assert population_jobs(full) == [("zero", ZERO, 0, protocol), ("elstm", (slow, fast), [0, 1, 2], protocol)]
    # seed 1 of the slow step size is saved already: each step size's consecutive seeds on their own
    partial = [job for job in full if (job[1], job[2]) != (slow, 1)]
    assert population_jobs(partial) == [("zero", ZERO, 0, protocol), ("elstm", slow, 0, protocol),
                                        ("elstm", slow, 2, protocol), ("elstm", (fast,), [0, 1, 2], protocol)]
    # V = 0's seeds step their streams together, with the curve each seed's stream gives alone
    zeros = [("zero", ZERO, seed, protocol) for seed in (0, 1, 2, 5)]
    assert population_jobs(zeros) == [("zero", ZERO, [0, 1, 2], protocol), ("zero", ZERO, 5, protocol)]
    from rlmem.bench.trace_patterning import zero_prediction_curves

    together = zero_prediction_curves([0, 1, 2], protocol)
    assert together == [zero_prediction_curves([seed], protocol)[0] for seed in (0, 1, 2)]
    assert len(together[0]) == 2 and together[0] != together[1]


def test_an_interrupted_population_continues_from_its_checkpoint(tmp_path: Path):
    from rlmem.bench.trace_patterning import METHODS, Protocol, run_config, run_population, swept
    from rlmem.train import train

    methods = (swept(METHODS["columnar"], 0.5), METHODS["columnar"])
    protocol = Protocol("trace_patterning", steps=400, log_every=100, num_envs=1)
    whole = run_population("columnar", methods, [0, 1], protocol, tmp_path / "whole")

    # the same population, stopped at 200 steps (as Ctrl-C leaves it: a checkpoint), then the bench's job
    config = run_config(methods[0], 0, protocol, tmp_path / "stopped")
    config.train.population, config.train.population_grid = 2, {"agent.lr": [m.lr for m in methods]}
    config.train.total_steps = 200
    train(config, log=lambda message: None)
    first_events = sorted((tmp_path / "stopped" / "members").rglob("events.out.tfevents*"))
    continued = run_population("columnar", methods, [0, 1], protocol, tmp_path / "stopped")
    assert first_events and all(path.exists() for path in first_events)  # continued there, not started again
    assert [(r["lr"], r["seed"]) for r in continued] == [(r["lr"], r["seed"]) for r in whole]
    for expected, got in zip(whole, continued):
        assert len(got["curve"]) == 4 and got["curve"] == pytest.approx(expected["curve"], rel=1e-6, abs=1e-9)

    # a run dir of other learners (here one step size) is replaced, not continued
    replaced = run_population("columnar", methods[:1], [0, 1], protocol, tmp_path / "stopped")
    assert not any(path.exists() for path in first_events) and len(replaced) == 2


def test_a_run_stopped_part_way_stops_the_bench_and_is_continued_by_the_next_call(tmp_path: Path, monkeypatch,
                                                                                  capsys):
    pytest.importorskip("matplotlib")
    import dataclasses

    import rlmem.bench.trace_patterning as bench

    real_train = bench.train

    def stopped_at_100(config, resume=False, log=print, report=None):  # as Ctrl-C leaves a run: saved at 100 of 200
        return real_train(dataclasses.replace(config, train=dataclasses.replace(config.train, total_steps=100)),
                          resume, log, report)

    argv = ["bench", "trace_patterning", *TINY, "--methods", "columnar", "--seeds", "1", "--out", str(tmp_path)]
    monkeypatch.setattr(bench, "train", stopped_at_100)
    assert main(argv) == 130
    assert not list((tmp_path / "runs").glob("columnar-*.json"))  # the part run is not taken for a finished one
    (stopped,) = (tmp_path / "train").iterdir()
    assert bench.unfinished_runs(tmp_path / "train", 200) == [  # what --saved-only lists as in progress
        f"in progress: {stopped.name}: checkpoint at step 100 of 200"]
    # ... with the error so far against V = 0's on the same seed and steps, where V = 0 is saved
    from rlmem.plot import read_scalars

    (error,) = read_scalars(stopped, "charts/prediction_error")[1]
    assert bench.unfinished_runs(tmp_path / "train", 200, {0: [0.5, 0.25]}, 100, 100) == [
        f"in progress: {stopped.name}: checkpoint at step 100 of 200; error / V = 0 over steps 0–100: "
        f"lr 0.01 {error / 0.5:.2f}"]  # one seed: no standard error
    monkeypatch.undo()
    capsys.readouterr()
    assert main(argv) == 0
    assert "done columnar seed 0" in capsys.readouterr().out
    (train_dir,) = (tmp_path / "train").iterdir()
    assert len(list(train_dir.glob("events.out.tfevents*"))) == 2  # the stopped run's file and the continuation's


def test_a_stopped_population_is_continued_when_a_later_call_adds_seeds_and_step_sizes(tmp_path: Path,
                                                                                       monkeypatch, capsys):
    """Adding seeds or step sizes to a study must not fold a population stopped part way into a new, larger
    one (starting hours of training again): it continues in its own directory, and only the added members
    form new populations. Every member's curve is still the one its own run gives."""
    pytest.importorskip("matplotlib")
    import dataclasses

    import rlmem.bench.trace_patterning as bench

    real_train = bench.train

    def stopped_at_100(config, resume=False, log=print, report=None):
        return real_train(dataclasses.replace(config, train=dataclasses.replace(config.train, total_steps=100)),
                          resume, log, report)

    argv = ["bench", "trace_patterning", *TINY, "--methods", "columnar", "--population", "--out", str(tmp_path)]
    monkeypatch.setattr(bench, "train", stopped_at_100)
    assert main([*argv, "--seeds", "2", "--lr-factors", "0.5,2"]) == 130
    (stopped,) = (tmp_path / "train").iterdir()
    first_events = sorted(stopped.rglob("events.out.tfevents*"))
    assert bench.unfinished_runs(tmp_path / "train", 200) == [
        f"in progress: {stopped.name}: checkpoint at step 100 of 200, 4 members"]
    (line,) = bench.unfinished_runs(tmp_path / "train", 200, {0: [1.0, 1.0], 1: [1.0, 1.0]}, 100, 100)
    assert line.startswith(f"in progress: {stopped.name}: checkpoint at step 100 of 200, 4 members; error / V = 0 "
                           "over steps 0–100: lr 0.005 ") and ", lr 0.02 " in line  # both step sizes, 2 seeds each
    assert re.search(r"lr 0\.005 \d+\.\d\d ± \d+\.\d\d \(median \d+\.\d\d\), lr 0\.02 ", line)
    (spiking,) = bench.unfinished_runs(tmp_path / "train", 200, {0: [1e-9, 1e-9], 1: [1e-9, 1e-9]}, 100, 100)
    assert re.search(r"lr 0\.005 [\d.]+e\+\d\d ± [\d.]+e\+\d\d \(median [\d.]+e\+\d\d\)", spiking)  # blown up
    monkeypatch.undo()
    capsys.readouterr()

    assert main([*argv, "--seeds", "3", "--lr-factors", "0.5,1,2"]) == 0
    assert "reusing 2 finished run(s)" in capsys.readouterr().out  # V = 0 on seeds 0 and 1; no learner
    assert first_events and all(path.exists() for path in first_events)  # continued where it stopped
    assert sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "train").iterdir()) == [
        "columnar-seed2", "columnar-seed2",  # seed 2 at 0.5x and at 2x, each alone
        "columnar-seeds0-2",  # 1x on seeds 0-2
        "columnar-sweep-seeds0-1"]  # the stopped population
    record = json.loads(next(tmp_path.glob("results-columnar-*.json")).read_text())
    runs = {(r["lr"], r["seed"]): r["curve"] for r in record["runs"] if r["method"] == "columnar"}
    assert len(runs) == 9
    assert main(["bench", "trace_patterning", *TINY, "--methods", "columnar", "--lr-factors", "0.5,1,2",
                 "--seeds", "3", "--out", str(tmp_path / "alone")]) == 0
    alone = json.loads(next((tmp_path / "alone").glob("results-columnar-*.json")).read_text())["runs"]
    for expected in (r for r in alone if r["method"] == "columnar"):
        assert runs[(expected["lr"], expected["seed"])] == pytest.approx(expected["curve"], rel=1e-4, abs=1e-7)


def test_a_step_size_at_which_seeds_diverge_is_reported_and_the_sweep_goes_on(tmp_path: Path, capsys):
    """A population member that diverges stops alone: the sweep finishes, its run is saved as diverged
    (its curve ends there), its step size's row says so and is never the best, and the figure is drawn."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "sweep"
    assert main(["bench", "trace_patterning", *TINY, "--methods", "columnar", "--seeds", "2", "--population",
                 "--lr-factors", "1,1e200", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "diverged by step" in printed and "it takes no further steps" in printed
    (table,) = out.glob("results-columnar-*.json")
    record = json.loads(table.read_text())
    diverged = [(r["lr"], r["seed"]) for r in record["runs"] if "diverged" in r]
    assert diverged == [(1e198, 0), (1e198, 1)]
    (row,) = [row for row in record["sweep"] if row["lr"] == 1e198]
    assert row["diverged"] == [0, 1] and row["final_error"] == float("inf")
    assert [(row["method"], row["lr"]) for row in record["summary"]] == [("columnar", 0.01), ("zero", 0.0)]
    sweep_line = next(line for line in printed.splitlines() if line.startswith("Columnar") and "1e+198" in line)
    assert "diverged" in sweep_line and sweep_line.rstrip().endswith("2")
    assert (out / table.name.replace("results", "trace_patterning").replace(".json", ".png")).is_file()


def test_saved_only_lists_the_runs_in_progress_that_the_same_call_would_continue(tmp_path: Path, monkeypatch,
                                                                                 capsys):
    """Another method's population stopped under the same --out is not listed, and the line names the
    method (a variant shares its core's run-dir prefix)."""
    pytest.importorskip("matplotlib")
    import dataclasses

    import rlmem.bench.trace_patterning as bench

    real_train = bench.train

    def stopped_at_100(config, resume=False, log=print, report=None):
        return real_train(dataclasses.replace(config, train=dataclasses.replace(config.train, total_steps=100)),
                          resume, log, report)

    monkeypatch.setattr(bench, "train", stopped_at_100)
    argv = ["bench", "trace_patterning", *TINY, "--seeds", "2", "--population", "--out", str(tmp_path),
            "--variant", "columns=columnar"]
    for method in ("columns", "lstm_tbptt15"):
        assert main([*argv, "--methods", method]) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert main([*argv, "--methods", "columns", "--saved-only"]) == 0
    (listed,) = [line for line in capsys.readouterr().out.splitlines() if "in progress" in line]
    assert "in progress: columns (columnar-seeds0-1-" in listed and "2 members" in listed
