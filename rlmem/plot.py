"""Learning curves and result tables from TensorBoard event files (read with TensorBoard's own reader,
drawn with matplotlib).

Runs whose configs differ only in the seed (and their names/dirs) form one group, drawn as the mean
with a band of ± one standard deviation over seeds on a common step grid. Groups are labelled by the
config keys in which they differ, or (``group_by="name"``) by the run directory's name without its
trailing ``_s<seed>``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rlmem.errors import DIVERGED_TAG, ConfigError

IGNORED_KEYS = {"train.seed", "train.run_dir", "train.name", "train.progress", "train.checkpoint_every"}


# What a run is judged by, in this order: a policy's episode return, else a prediction's error (``td``).
MAIN_TAGS = ("charts/episodic_return", "charts/prediction_error")


def _events(run_dir: Path):
    """The run's event files, read once for ``main_tag`` and the ``read_scalars`` that follows it: the
    last read is kept while the files stay as they were (a live run's growing files are read again)."""
    if not run_dir.is_dir():
        raise ConfigError(f"run dir not found: {run_dir}")
    files = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(run_dir.glob("events.out.*")))
    return _read_events(str(run_dir), files)


@functools.lru_cache(maxsize=1)
def _read_events(run_dir: str, files: tuple):  # ``files`` only keys the cache
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    return accumulator


def diverged(run_dir: Path) -> str | None:
    """What the run says about its divergence (the text under ``DIVERGED_TAG`` that a population's
    member that diverged logs: it took no further steps from there), or None."""
    accumulator, text_tag = _events(run_dir), f"{DIVERGED_TAG}/text_summary"  # where add_text puts it
    if text_tag not in accumulator.Tags().get("tensors", []):
        return None
    return accumulator.Tensors(text_tag)[-1].tensor_proto.string_val[0].decode()


def scalar_tags(run_dir: Path) -> list[str]:
    """The scalar tags ``run_dir`` logs."""
    return _events(run_dir).Tags().get("scalars", [])


def main_tag(run_dir: Path) -> str:
    """The first of ``MAIN_TAGS`` that ``run_dir`` logs (what ``rlmem plot``/``summary`` show by default)."""
    tags = scalar_tags(run_dir)
    for tag in MAIN_TAGS:
        if tag in tags:
            return tag
    raise ConfigError(f"{run_dir} logs none of {', '.join(MAIN_TAGS)}; choose one with --tag from: "
                      f"{', '.join(sorted(tags)) or 'none'}")


def read_scalars(run_dir: Path, tag: str, until: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one scalar tag in a run directory, sorted by step; only steps ≤ ``until`` if given."""
    accumulator = _events(run_dir)
    tags = accumulator.Tags().get("scalars", [])
    if tag not in tags:
        raise ConfigError(f"{run_dir} has no scalar {tag!r}; it has: {', '.join(sorted(tags)) or 'none'}")
    events = accumulator.Scalars(tag)
    steps = np.array([e.step for e in events], dtype=np.float64)
    values = np.array([e.value for e in events], dtype=np.float64)
    order = np.argsort(steps, kind="stable")
    steps, values = steps[order], values[order]
    if until is not None:
        kept = steps <= until
        steps, values = steps[kept], values[kept]
        if steps.size == 0:
            raise ConfigError(f"{run_dir} logged no {tag!r} at or before step {until:g}")
    return steps, values


def _flat_config(run_dir: Path) -> dict[str, str]:
    from omegaconf import OmegaConf

    path = run_dir / "config.yaml"
    if not path.is_file():
        return {"run": run_dir.name}
    data = OmegaConf.to_container(OmegaConf.load(path))
    flat: dict[str, str] = {}
    for section, values in (data or {}).items():
        if section == "choices" or not isinstance(values, dict):
            continue
        for key, value in values.items():
            flat[f"{section}.{key}"] = str(value)
    return flat


def _short(key: str) -> str:
    section, _, option = key.partition(".")
    return section if option == "name" else option or section


NAME_KEYS = ("agent.name", "memory.name", "memory.grad", "env.name", "env.id", "env.game")


GROUPINGS = ("config", "name")
SEED_SUFFIX = re.compile(r"_s\d+$")


def group_runs(run_dirs: Sequence[Path], group_by: str = "config") -> dict[str, list[Path]]:
    """Label -> runs that differ only by seed.

    ``group_by="name"`` groups by the directory name without a trailing ``_s<seed>`` instead (runs
    named ``ppo-gru_s0``, ``ppo-gru_s1`` form the group ``ppo-gru``), for studies whose runs differ in
    settings the label need not spell out.

    Labels name the keys that differ between groups: the component names first (learner, core, grad,
    env); other options only where names alone do not tell the groups apart, and never options that
    one component has and another lacks.
    """
    if group_by not in GROUPINGS:
        raise ConfigError(f"unknown grouping {group_by!r}; valid choices: {', '.join(GROUPINGS)}")
    if group_by == "name":
        by_name: dict[str, list[Path]] = {}
        for d in run_dirs:
            by_name.setdefault(SEED_SUFFIX.sub("", d.name), []).append(d)
        return by_name
    configs = {d: {k: v for k, v in _flat_config(d).items() if k not in IGNORED_KEYS} for d in run_dirs}
    keys = sorted({k for c in configs.values() for k in c})
    varying = [k for k in keys if len({c.get(k) for c in configs.values()}) > 1]
    named = [k for k in NAME_KEYS if k in varying]
    present_everywhere = [k for k in varying if all(k in c and c[k] != "None" for c in configs.values())]
    distinct = len({tuple(c.get(k) for k in varying) for c in configs.values()})
    if not varying:  # seeds of one configuration: one group, named by its components
        label_keys = [k for k in NAME_KEYS if all(k in c for c in configs.values())]
    else:
        label_keys = varying
        for candidate in (named, named + [k for k in present_everywhere if k not in named]):
            if candidate and len({tuple(c.get(k) for k in candidate) for c in configs.values()}) == distinct:
                label_keys = candidate  # the shortest label that still tells the groups apart
                break
    groups: dict[str, list[Path]] = {}
    for d, c in configs.items():
        label = ", ".join(f"{_short(k)}={c.get(k)}" for k in label_keys) or d.name
        groups.setdefault(label, []).append(d)
    return groups


def _trailing_mean(values: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Point i's mean over points first[i] .. i."""
    sums = np.concatenate([[0.0], np.cumsum(values)])
    ends = np.arange(1, len(values) + 1)
    return (sums[ends] - sums[first]) / (ends - first)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` logged points (fewer at the start); 1 leaves values as they are."""
    if window <= 1 or len(values) == 0:
        return values
    return _trailing_mean(values, np.maximum(np.arange(len(values)) - window + 1, 0))


def draw_mean_band(ax, x: np.ndarray, stacked: np.ndarray, label: str, **style) -> None:
    """Mean over seeds with a band of ± one standard deviation; ``stacked`` is [seeds, len(x)]."""
    mean, std = stacked.mean(axis=0), stacked.std(axis=0)
    (line,) = ax.plot(x, mean, label=f"{label} ({len(stacked)} seeds)", **style)
    ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)


def plot_runs(
    run_dirs: Sequence[Path],
    output: Path,
    tag: str = "charts/episodic_return",
    title: str | None = None,
    smoothing: int = 1,
    group_by: str = "config",
    until: float | None = None,
) -> Path:
    """Draw ``tag`` against steps for every group of runs; ``smoothing`` > 1 takes the trailing mean over
    that many logged points of each run first (per-iteration figures such as a success rate averaged
    over the few episodes that ended in one iteration are noisy); ``until`` draws steps up to it only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    for label, dirs in group_runs(run_dirs, group_by).items():
        # a diverged run's curve ends early, so it is left out of its group's band; a group whose runs
        # all diverged is drawn from those that logged the tag, up to where the first of them stopped
        finite = [d for d in dirs if diverged(d) is None]
        if len(finite) < len(dirs):
            label += f" ({len(dirs) - len(finite)} diverged)" if finite else f" (all {len(dirs)} diverged)"
        shown = finite or [d for d in dirs if tag in scalar_tags(d)]
        curves = []
        for d in shown:
            steps, values = read_scalars(d, tag, until)
            curves.append((steps, smooth(values, smoothing)))
        if not curves:
            continue
        drawn += 1
        if len(curves) == 1:
            steps, values = curves[0]
            ax.plot(steps, values, label=label)
            continue
        end = min(s[-1] for s, _ in curves)
        grid = np.linspace(max(s[0] for s, _ in curves), end, 200)
        draw_mean_band(ax, grid, np.stack([np.interp(grid, s, v) for s, v in curves]), label)
    if not drawn:
        plt.close(fig)
        raise ConfigError(f"nothing to draw: every run given diverged before it logged {tag!r}")
    ax.set_xlabel("environment steps")
    ax.set_ylabel(tag if smoothing <= 1 else f"{tag} (trailing mean of {smoothing} points)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return output


@dataclass
class GroupSummary:
    """One group's results: per run, the final value and the step at which each threshold was reached."""

    label: str
    runs: list[Path]
    last_steps: list[float]  # each run's last logged step (≤ ``until``)
    finals: list[float]  # each run's mean over the last ``final_fraction`` of its steps
    reached: dict[float, list[float]] = field(default_factory=dict)  # threshold -> steps of the runs that reached it
    diverged: list[Path] = field(default_factory=list)  # runs that diverged (population members): no final


def summarize_runs(
    run_dirs: Sequence[Path],
    tag: str = "charts/episodic_return",
    thresholds: Sequence[float] = (),
    final_fraction: float = 0.1,
    window: float = 10_000,
    group_by: str = "config",
    until: float | None = None,
) -> list[GroupSummary]:
    """Final value and steps to threshold of every group of runs (the groups of ``group_runs``).

    A run's final value is the mean of ``tag`` over its last ``final_fraction`` of steps. A run reaches a
    threshold at the first logged step s ≥ ``window`` where the mean of the points logged in the last
    ``window`` env steps, (s − window, s], is at or above it: a window in env steps, so that learners
    that log at different intervals are averaged over the same stretch of experience. ``until`` reads
    every run up to that step, so runs of different lengths are compared at equal environment steps.
    A run that diverged (a population's member that stopped there) counts in ``diverged``, not in the
    finals or thresholds.
    """
    if not 0 < final_fraction <= 1:
        raise ConfigError(f"the final fraction must lie in (0, 1], got {final_fraction}")
    if not window > 0:
        raise ConfigError(f"the threshold window must be a positive number of env steps, got {window}")
    summaries = []
    for label, dirs in group_runs(run_dirs, group_by).items():
        summary = GroupSummary(label, list(dirs), [], [], {threshold: [] for threshold in thresholds})
        for run_dir in dirs:
            if diverged(run_dir) is not None:
                summary.diverged.append(run_dir)
                continue
            steps, values = read_scalars(run_dir, tag, until)
            summary.last_steps.append(float(steps[-1]))
            summary.finals.append(float(values[steps >= (1 - final_fraction) * steps[-1]].mean()))
            # the points logged in (s − window, s]
            moving = _trailing_mean(values, np.searchsorted(steps, steps - window, side="right"))
            for threshold in thresholds:
                above = np.flatnonzero((moving >= threshold) & (steps >= window))
                if above.size:
                    summary.reached[threshold].append(float(steps[above[0]]))
        summaries.append(summary)
    return summaries


def _steps(value: float) -> str:
    return f"{value / 1e6:.3g}M" if value >= 1e6 else f"{value / 1e3:.3g}k"


def summary_table(summaries: Sequence[GroupSummary], tag: str, final_fraction: float = 0.1) -> str:
    """A markdown table of ``summarize_runs``: per group, final mean ± std over runs and mean steps to
    each threshold over the runs that reached it (with how many did)."""
    thresholds = list(summaries[0].reached) if summaries else []
    header = ["group", "runs", "steps", f"final {tag} (mean ± std, last {final_fraction:.0%})"]
    header += [f"steps to ≥ {threshold:g}" for threshold in thresholds]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        n = len(s.runs)
        final = f"{np.mean(s.finals):.3g} ± {np.std(s.finals):.2g}" if s.finals else "—"
        if s.diverged:
            final += f" ({len(s.diverged)} of {n} diverged)"
        cells = [s.label, str(n), _steps(min(s.last_steps)) if s.last_steps else "—", final]
        for threshold in thresholds:
            hits = s.reached[threshold]
            cells.append(f"{_steps(float(np.mean(hits)))} ({len(hits)}/{n})" if hits else f"— (0/{n})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
