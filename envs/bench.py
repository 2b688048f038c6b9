"""Environment throughput: each raw library next to rlmem's VecEnv on the same id, env count and machine.

``rlmem bench envs [--steps N] [--repeats R] [--num-envs B] [--sources a,b,...]`` steps every source
with uniformly random actions (drawn before timing) and prints env steps per second (all envs
together) of the raw library and of the rlmem VecEnv, and their ratio (rlmem / raw; the adapter's
overhead is 1 − ratio). Both sides are configured alike (same game, env count, frame processing and
same-step autoreset) and timed in alternating rounds of N vector steps; each figure is the best of R
rounds, so that load from other processes skews both sides alike. The built-in memory tasks have no
raw counterpart. Sources whose package is missing are skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Contender:
    """One side of a comparison: ``step(i)`` takes the i-th precomputed vector step."""

    step: Callable[[int], Any]
    close: Callable[[], None]


def _random_indices(high: int, steps: int, num_envs: int):
    import numpy as np

    return np.random.default_rng(0).integers(0, high, size=(steps, num_envs))


def _rlmem(spec: dict[str, Any], steps: int) -> Contender:
    import gymnasium as gym
    import torch

    from envs import make_env

    env = make_env(spec, seed=0)
    env.reset(seed=0)
    space, B = env.single_action_space, env.num_envs
    generator = torch.Generator().manual_seed(0)
    if isinstance(space, gym.spaces.Discrete):
        actions = int(space.start) + torch.randint(int(space.n), (steps, B), generator=generator)
    else:
        low, high = torch.as_tensor(space.low), torch.as_tensor(space.high)
        actions = low + (high - low) * torch.rand(steps, B, *space.shape, generator=generator)
    actions = actions.to(env.device)
    return Contender(lambda i: env.step(actions[i]), env.close)


def _raw_cartpole(num_envs: int, steps: int) -> Contender:
    import gymnasium as gym

    env = gym.vector.SyncVectorEnv(
        [lambda: gym.make("CartPole-v1") for _ in range(num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    env.reset(seed=0)
    actions = _random_indices(2, steps, num_envs)
    return Contender(lambda i: env.step(actions[i]), env.close)


def _raw_atari(num_envs: int, steps: int) -> Contender:
    import gymnasium as gym
    from ale_py.vector_env import AtariVectorEnv

    from envs.atari import AtariOptions

    options = AtariOptions(game="pong", num_envs=num_envs)  # rlmem's defaults, the raw side set alike
    env = AtariVectorEnv(
        options.game, num_envs, max_num_frames_per_episode=options.max_episode_frames,
        repeat_action_probability=options.sticky_actions, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
        stack_num=options.frame_stack, frameskip=options.frameskip, noop_max=options.noop_max,
        use_fire_reset=options.fire_reset, reward_clipping=False,
    )
    env.reset(seed=0)
    actions = _random_indices(int(env.single_action_space.n), steps, num_envs)
    return Contender(lambda i: env.step(actions[i]), env.close)


def _raw_procgen(num_envs: int, steps: int) -> Contender:
    import numpy as np

    from envs.procgen_env import ProcgenOptions, procgen_module

    options = ProcgenOptions(game="maze", num_envs=num_envs)  # rlmem's defaults, the raw side set alike
    env = procgen_module().ProcgenGym3Env(
        num=num_envs, env_name=options.game, distribution_mode=options.distribution_mode,
        num_levels=options.num_levels, start_level=options.start_level, num_threads=options.num_threads, rand_seed=0,
    )
    actions = _random_indices(15, steps, num_envs).astype(np.int32)

    def step(i: int) -> Any:
        env.act(actions[i])
        return env.observe()

    return Contender(step, lambda: None)


@dataclass(frozen=True)
class Source:
    num_envs: int  # default env count
    package: str | None  # the optional package it needs
    spec: dict[str, Any]  # rlmem env spec, without num_envs
    raw: Callable[[int, int], Contender] | None  # the raw library's vector env, if any


SOURCES: dict[str, Source] = {
    "cartpole": Source(64, None, {"name": "gym", "id": "CartPole-v1"}, _raw_cartpole),
    "cue_recall": Source(64, None, {"name": "cue_recall"}, None),
    "repeat_previous": Source(64, None, {"name": "repeat_previous"}, None),
    "count_recall": Source(64, None, {"name": "count_recall"}, None),
    "atari": Source(16, "ale_py", {"name": "atari", "game": "pong"}, _raw_atari),
    "procgen": Source(64, "procgen", {"name": "procgen", "game": "maze"}, _raw_procgen),
}


def measure(contenders: list[Contender], steps: int, repeats: int, num_envs: int, warmup: int = 20) -> list[float]:
    """Best env steps/s of each contender over ``repeats`` alternating rounds of ``steps`` vector steps."""
    best = [0.0] * len(contenders)
    for contender in contenders:
        for i in range(min(warmup, steps)):
            contender.step(i)
    for _ in range(repeats):
        for k, contender in enumerate(contenders):
            start = time.perf_counter()
            for i in range(steps):
                contender.step(i)
            best[k] = max(best[k], steps * num_envs / (time.perf_counter() - start))
    return best


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlmem bench envs", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500, help="vector steps per timed round (default 500)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds; the best counts (default 3)")
    parser.add_argument("--num-envs", type=int, default=None, help="envs per source (default: per source, "
                        + ", ".join(f"{name} {s.num_envs}" for name, s in SOURCES.items()) + ")")
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
    for flag, value in (("--steps", args.steps), ("--repeats", args.repeats), ("--num-envs", args.num_envs)):
        if value is not None and value <= 0:
            parser.error(f"{flag} must be positive, got {value}")

    header = f"{'source':<16} {'num_envs':>8} {'raw steps/s':>12} {'rlmem steps/s':>14} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for name in sources:
        source = SOURCES[name]
        num_envs = args.num_envs or source.num_envs
        if source.package is not None and importlib.util.find_spec(source.package) is None:
            print(f"{name:<16} {num_envs:>8}  skipped: {source.package} is not installed")
            continue
        contenders = [_rlmem({**source.spec, "num_envs": num_envs}, args.steps)]
        if source.raw is not None:
            contenders.insert(0, source.raw(num_envs, args.steps))
        try:
            rates = measure(contenders, args.steps, args.repeats, num_envs)
        finally:
            for contender in contenders:
                contender.close()
        ours = rates[-1]
        raw = rates[0] if source.raw is not None else None
        raw_text = f"{raw:>12,.0f}" if raw is not None else f"{'-':>12}"
        ratio_text = f"{ours / raw:>6.2f}" if raw is not None else f"{'-':>6}"
        print(f"{name:<16} {num_envs:>8} {raw_text} {ours:>14,.0f} {ratio_text}", flush=True)
