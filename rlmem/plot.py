"""Learning curves from TensorBoard event files (read with TensorBoard's own reader, drawn with matplotlib).

Runs whose configs differ only in the seed (and their names/dirs) form one group, drawn as the mean
with a band of ± one standard deviation over seeds on a common step grid. Groups are labelled by the
config keys in which they differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rlmem.errors import ConfigError

IGNORED_KEYS = {"train.seed", "train.run_dir", "train.name", "train.progress", "train.checkpoint_every"}


def read_scalars(run_dir: Path, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one scalar tag in a run directory, sorted by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not run_dir.is_dir():
        raise ConfigError(f"run dir not found: {run_dir}")
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = accumulator.Tags().get("scalars", [])
    if tag not in tags:
        raise ConfigError(f"{run_dir} has no scalar {tag!r}; it has: {', '.join(sorted(tags)) or 'none'}")
    events = accumulator.Scalars(tag)
    steps = np.array([e.step for e in events], dtype=np.float64)
    values = np.array([e.value for e in events], dtype=np.float64)
    order = np.argsort(steps, kind="stable")
    return steps[order], values[order]


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


def group_runs(run_dirs: Sequence[Path]) -> dict[str, list[Path]]:
    """Label -> runs that differ only by seed.

    Labels name the keys that differ between groups: the component names first (learner, core, grad,
    env); other options only where names alone do not tell the groups apart, and never options that
    one component has and another lacks.
    """
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


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` logged points (fewer at the start); 1 leaves values as they are."""
    if window <= 1 or len(values) == 0:
        return values
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    counts = np.minimum(ends, window)
    return (sums[ends] - sums[ends - counts]) / counts


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
) -> Path:
    """Draw ``tag`` against steps for every group of runs; ``smoothing`` > 1 takes the trailing mean over
    that many logged points of each run first (per-iteration figures such as a success rate averaged
    over the few episodes that ended in one iteration are noisy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, dirs in group_runs(run_dirs).items():
        curves = [(steps, smooth(values, smoothing)) for steps, values in (read_scalars(d, tag) for d in dirs)]
        if len(curves) == 1:
            steps, values = curves[0]
            ax.plot(steps, values, label=label)
            continue
        end = min(s[-1] for s, _ in curves)
        grid = np.linspace(max(s[0] for s, _ in curves), end, 200)
        draw_mean_band(ax, grid, np.stack([np.interp(grid, s, v) for s, v in curves]), label)
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
