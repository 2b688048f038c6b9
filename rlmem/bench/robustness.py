"""``rlmem bench robustness``: return of trained policies as observation noise grows.

The distribution-shift test of the low-rank sparse CfC paper: policies trained on clean observations
are run closed-loop with N(0, σ²) added to every observation they see, for each σ of ``--sigmas``
(``rlmem eval RUN --obs-noise σ`` for every run and σ). Runs whose configs differ only in the seed
form one group (as in ``rlmem plot``); the table and the plot give each group's mean return over
its seeds ± the standard deviation across seeds, each seed's return being the mean over
``--episodes`` episodes. Every (run, σ) pair uses the same evaluation seed, so all groups see the
same noise stream and the same starting states::

    rlmem bench robustness runs/cfc/cfc_s* runs/cfc/cfc_lowrank_s* --sigmas 0,0.05,0.1,0.2 --greedy \\
        --out runs/bench/robustness
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rlmem.bench.measure import markdown_table, write_json
from rlmem.errors import ConfigError, writable_dir
from rlmem.evaluation import EVAL_SEED, evaluate_at_noise_levels
from rlmem.plot import draw_mean_band, group_runs


def _sigmas(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--sigmas must be comma-separated numbers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise ConfigError(f"--sigmas must list non-negative numbers, got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlmem bench robustness", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", help="trained run directories (several seeds per group)")
    parser.add_argument("--sigmas", default="0,0.05,0.1,0.2,0.4", help="comma-separated noise stds")
    parser.add_argument("--episodes", type=int, default=20, help="episodes per run and σ")
    parser.add_argument("--num-envs", type=int, default=None, help="envs in parallel (default: the run's)")
    parser.add_argument("--greedy", action="store_true", help="take the most likely action")
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="evaluation seed")
    parser.add_argument("--out", default="runs/bench/robustness", help="directory for results.json/.md/.png")
    return parser


def measure(
    run_dirs: Sequence[Path], sigmas: Sequence[float], episodes: int, greedy: bool, seed: int, num_envs: int | None
) -> dict[str, dict[str, list[float]]]:
    """Group label -> {"sigma": σ list, "returns": [[mean return of each seed] for each σ]}."""
    results: dict[str, dict[str, list]] = {}
    for label, dirs in group_runs(run_dirs).items():
        per_run = [  # [run, σ]: mean return, each run loaded once
            [float(np.mean(returns)) for returns, _ in
             evaluate_at_noise_levels(d, episodes, sigmas, seed=seed, greedy=greedy, num_envs=num_envs)]
            for d in dirs
        ]
        per_sigma = [list(row) for row in zip(*per_run)]
        for sigma, per_seed in zip(sigmas, per_sigma):
            print(f"{label:40s} σ={sigma:<6g} return {np.mean(per_seed):9.2f} ± {np.std(per_seed):.2f} "
                  f"({len(per_seed)} runs)", flush=True)
        results[label] = {"sigma": list(sigmas), "returns": per_sigma, "runs": [str(d) for d in dirs]}
    return results


def write_report(results: dict[str, dict[str, list]], out: Path, title: str = "") -> None:
    """results.json, a markdown table (groups × σ) and the plot of return vs σ (mean ± std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    write_json(out / "results.json", results, indent=1)
    sigmas = next(iter(results.values()))["sigma"]
    rows = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, r in results.items():
        values = np.array(r["returns"]).T  # [seed, σ]
        mean, std = values.mean(axis=0), values.std(axis=0)
        rows.append([label, len(values), *(f"{m:.1f} ± {s:.1f}" for m, s in zip(mean, std))])
        draw_mean_band(ax, np.array(r["sigma"]), values, label, marker="o")
    (out / "results.md").write_text(markdown_table(["group", "seeds", *(f"σ = {s:g}" for s in sigmas)], rows))
    ax.set_xlabel("observation noise σ")
    ax.set_ylabel("mean episodic return")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "robustness.png", dpi=120)
    plt.close(fig)


def run(argv: Sequence[str]) -> None:
    ns = _parser().parse_args(list(argv))
    sigmas = _sigmas(ns.sigmas)
    if ns.episodes <= 0:
        raise ConfigError(f"--episodes must be positive, got {ns.episodes}")
    out = writable_dir(Path(ns.out), "the report")
    results = measure([Path(d) for d in ns.run_dirs], sigmas, ns.episodes, ns.greedy, ns.seed, ns.num_envs)
    write_report(results, out)
    print((out / "results.md").read_text(), end="")
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'robustness.png'}")
