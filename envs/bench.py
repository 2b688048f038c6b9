"""Environment throughput: each raw library next to rlmem's VecEnv on the same id, env count and machine.

``rlmem bench envs [--steps N] [--num-envs B] [--sources a,b,...]`` steps every source with uniformly
random actions (drawn before timing) and prints env steps per second (all envs together) of the raw
library and of the rlmem VecEnv, and their ratio (rlmem / raw; the adapter's overhead is 1 − ratio).
The built-in memory tasks have no raw counterpart. Sources whose package is missing are skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Callable
from typing import Any

# source -> (default num_envs, the optional package it needs, or None)
SOURCES: dict[str, tuple[int, str | None]] = {
    "cartpole": (64, None),
    "cue_recall": (64, None),
    "repeat_previous": (64, None),
    "count_recall": (64, None),
}


def _steps_per_second(step: Callable[[int], Any], steps: int, num_envs: int, warmup: int = 20) -> float:
    for i in range(warmup):
        step(i)
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    return steps * num_envs / (time.perf_counter() - start)


def _rlmem_steps_per_second(spec: dict[str, Any], steps: int, seed: int = 0) -> float:
    import gymnasium as gym
    import torch

    from envs import make_env

    with make_env(spec, seed=seed) as env:
        env.reset(seed=seed)
        generator = torch.Generator().manual_seed(seed)
        space, B = env.single_action_space, env.num_envs
        if isinstance(space, gym.spaces.Discrete):
            actions = int(space.start) + torch.randint(int(space.n), (steps + 20, B), generator=generator)
        else:
            low, high = torch.as_tensor(space.low), torch.as_tensor(space.high)
            actions = low + (high - low) * torch.rand(steps + 20, B, *space.shape, generator=generator)
        actions = actions.to(env.device)
        return _steps_per_second(lambda i: env.step(actions[i]), steps, B)


def _cartpole(num_envs: int, steps: int) -> tuple[float | None, float]:
    import gymnasium as gym
    import numpy as np

    raw = gym.vector.SyncVectorEnv(
        [lambda: gym.make("CartPole-v1") for _ in range(num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    raw.reset(seed=0)
    actions = np.random.default_rng(0).integers(0, 2, size=(steps + 20, num_envs))
    raw_sps = _steps_per_second(lambda i: raw.step(actions[i]), steps, num_envs)
    raw.close()
    ours = _rlmem_steps_per_second({"name": "gym", "id": "CartPole-v1", "num_envs": num_envs}, steps)
    return raw_sps, ours


def _memory_task(name: str) -> Callable[[int, int], tuple[float | None, float]]:
    def measure(num_envs: int, steps: int) -> tuple[float | None, float]:
        return None, _rlmem_steps_per_second({"name": name, "num_envs": num_envs}, steps)

    return measure


MEASURES: dict[str, Callable[[int, int], tuple[float | None, float]]] = {
    "cartpole": _cartpole,
    "cue_recall": _memory_task("cue_recall"),
    "repeat_previous": _memory_task("repeat_previous"),
    "count_recall": _memory_task("count_recall"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlmem bench envs", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="timed vector steps per source (default 1000)")
    parser.add_argument("--num-envs", type=int, default=None, help="envs per source (default: per source, "
                        + ", ".join(f"{name} {n}" for name, (n, _) in SOURCES.items()) + ")")
    parser.add_argument("--sources", default=",".join(SOURCES),
                        help=f"comma-separated sources among {', '.join(SOURCES)} (default: all)")
    return parser


def run(argv: list[str]) -> None:
    """Measure and print the table; a bad argument exits with status 2 and one message."""
    parser = _parser()
    args = parser.parse_args(argv)
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        parser.error(f"unknown source {unknown[0]!r}; valid choices: {', '.join(SOURCES)}")
    if args.steps <= 0:
        parser.error(f"--steps must be positive, got {args.steps}")
    if args.num_envs is not None and args.num_envs <= 0:
        parser.error(f"--num-envs must be positive, got {args.num_envs}")

    header = f"{'source':<16} {'num_envs':>8} {'raw steps/s':>12} {'rlmem steps/s':>14} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for source in sources:
        default_envs, package = SOURCES[source]
        num_envs = args.num_envs or default_envs
        if package is not None and importlib.util.find_spec(package) is None:
            print(f"{source:<16} {num_envs:>8} {'skipped: ' + package + ' is not installed':>35}")
            continue
        raw, ours = MEASURES[source](num_envs, args.steps)
        raw_text = f"{raw:>12,.0f}" if raw is not None else f"{'-':>12}"
        ratio_text = f"{ours / raw:>6.2f}" if raw is not None else f"{'-':>6}"
        print(f"{source:<16} {num_envs:>8} {raw_text} {ours:>14,.0f} {ratio_text}", flush=True)
