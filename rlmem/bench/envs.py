"""Environment and rollout throughput: raw library, rlmem VecEnv, and rollout collection with a policy.

``rlmem bench envs [--steps N] [--repeats R] [--num-envs B] [--sources a,b,...] [--unroll T]
[--hidden H] [--encoder E] [--torch-threads K]`` prints, per source, env steps per second (all envs
together) of

* ``raw``: the library's own vector env under uniformly random actions (drawn before timing),
  configured as the VecEnv configures it (same game, env count, frame processing and same-step
  autoreset); the built-in tasks have none;
* ``vecenv``: rlmem's VecEnv on the same id and env count, random actions likewise (``vecenv / raw``
  is the adapter's share: its overhead is 1 − that ratio);
* ``policy``: the acting network alone (below) on the env's first observations, with no env step:
  what inference can deliver on this machine, whatever the env;
* ``rollout``: ``RolloutCollector.collect(T)`` with policy inference and no learning: encoder E
  (``model.encoder``; by default ``auto``, the Nature CNN for frames), a GRU core of H units, sampled
  actions and the rollout buffers, with the overlap of env steps and inference off and on
  (``agents.runner``; "-" where the env cannot overlap: it cannot be split or does not step in the
  background);

and the ratios vecenv / raw and rollout / raw (for sources without a raw library, rollout / vecenv,
marked ``*``), with ``seq/raw``: the ratio that stepping and then acting would reach with no overhead at all,
1 / (1/raw + 1/policy), over raw. A rollout that does not overlap cannot pass it; one that overlaps
can only where the cores are not all busy already (the env's threads and inference share them). All
contenders of a source are built once and timed in alternating rounds of N vector steps (rollouts:
N / T windows of T steps); each figure is the best of R rounds, so that load from other processes
skews them alike (``rlmem.bench.measure.best_rates``). Acting uses K intra-op threads, the training
default (``train.torch_threads``). Sources whose package is missing are skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agents.base import ModelOptions
from agents.networks import ENCODERS, ActorCritic
from agents.rollout import RolloutCollector
from envs import make_env
from envs.atari import AtariOptions
from envs.procgen_env import ProcgenOptions, procgen_module
from rlmem.bench.measure import Column, Table, best_rates, ratio


@dataclass
class Contender:
    """One side of a comparison: ``step(i)`` takes the i-th (precomputed) vector step."""
    step: Callable[[int], Any]
    close: Callable[[], None]


def random_indices(high: int, steps: int, num_envs: int) -> Any:
    """Uniformly random discrete actions ``[steps, num_envs]`` in ``[0, high)``, seeded alike for every side."""
    import numpy as np

    return np.random.default_rng(0).integers(0, high, size=(steps, num_envs))


def vecenv_contender(spec: dict[str, Any], steps: int) -> Contender:
    """rlmem's VecEnv for ``spec`` under uniformly random actions (drawn before timing)."""
    import gymnasium as gym
    import torch


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


def raw_cartpole(num_envs: int, steps: int) -> Contender:
    """gymnasium's SyncVectorEnv of CartPole-v1, same-step autoreset."""
    import gymnasium as gym

    env = gym.vector.SyncVectorEnv(
        [lambda: gym.make("CartPole-v1") for _ in range(num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    env.reset(seed=0)
    actions = random_indices(2, steps, num_envs)
    return Contender(lambda i: env.step(actions[i]), env.close)


def raw_atari(num_envs: int, steps: int) -> Contender:
    """ale-py's AtariVectorEnv on Pong, set as rlmem's defaults set it."""
    import gymnasium as gym
    from ale_py.vector_env import AtariVectorEnv


    options = AtariOptions(game="pong", num_envs=num_envs)
    env = AtariVectorEnv(
        options.game, num_envs, max_num_frames_per_episode=options.max_episode_frames,
        repeat_action_probability=options.sticky_actions, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
        stack_num=options.frame_stack, frameskip=options.frameskip, noop_max=options.noop_max,
        use_fire_reset=options.fire_reset, reward_clipping=False,
    )
    env.reset(seed=0)
    actions = random_indices(int(env.single_action_space.n), steps, num_envs)
    return Contender(lambda i: env.step(actions[i]), env.close)


def raw_procgen(num_envs: int, steps: int) -> Contender:
    """ProcGen's gym3 env on maze, set as rlmem's defaults set it (act, then observe)."""
    import numpy as np


    options = ProcgenOptions(game="maze", num_envs=num_envs)
    env = procgen_module().ProcgenGym3Env(
        num=num_envs, env_name=options.game, distribution_mode=options.distribution_mode,
        num_levels=options.num_levels, start_level=options.start_level, num_threads=options.num_threads, rand_seed=0,
    )
    actions = random_indices(15, steps, num_envs).astype(np.int32)

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
    "cartpole": Source(64, None, {"name": "gym", "id": "CartPole-v1"}, raw_cartpole),
    "cue_recall": Source(64, None, {"name": "cue_recall"}, None),
    "repeat_previous": Source(64, None, {"name": "repeat_previous"}, None),
    "count_recall": Source(64, None, {"name": "count_recall"}, None),
    "atari": Source(16, "ale_py", {"name": "atari", "game": "pong"}, raw_atari),
    "procgen": Source(64, "procgen", {"name": "procgen", "game": "maze"}, raw_procgen),
}
DEFAULT_SOURCES = ("atari", "procgen", "cartpole", "cue_recall")


@dataclass(frozen=True)
class Policy:
    """The acting network's settings: a GRU core of ``hidden`` units behind ``encoder`` (``model.encoder``)."""
    hidden: int = 128
    encoder: str = "auto"


def _network(env: Any, policy: Policy) -> Any:
    """The acting network for ``env``, seeded alike for every contender, in eval mode."""
    import torch


    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        network = ActorCritic(env.single_observation_space, env.single_action_space,
                              {"name": "gru", "hidden_size": policy.hidden}, ModelOptions(encoder=policy.encoder))
    return network.eval()


def _policy(spec: dict[str, Any], policy: Policy) -> Contender:
    """Inference alone: call ``i`` acts once for all envs on the env's first observations (carried
    memory state, sampled actions), with no env step. Its rate bounds any rollout of this network."""
    import torch


    env = make_env(spec, seed=0)
    try:
        obs = env.reset(seed=0)
        network = _network(env, policy)
    finally:
        env.close()
    B = obs.shape[0]
    generator = torch.Generator().manual_seed(0)
    carried = {"state": network.initial_state(B)}
    reset = torch.zeros(B, dtype=torch.bool)
    prev_action = torch.zeros(B, *network.action_shape, dtype=network.action_dtype())
    prev_reward = torch.zeros(B)

    @torch.no_grad()
    def step(i: int) -> Any:
        out = network.step(obs, carried["state"], reset, prev_action, prev_reward)
        carried["state"] = out.state
        return out.dist.sample(generator)

    return Contender(step, lambda: None)


def _rollout(spec: dict[str, Any], unroll: int, policy: Policy, overlap: bool) -> Contender | None:
    """A contender whose call ``i`` collects one window of ``unroll`` steps where ``i % unroll == 0``
    (so N calls take N vector steps); None where ``overlap`` is asked for and cannot engage."""
    import torch


    env = make_env(spec, seed=0)
    try:
        network = _network(env, policy)
        generator = torch.Generator().manual_seed(0)
        collector = RolloutCollector(network, env, torch.device("cpu"), generator, seed=0, overlap=overlap)
    except BaseException:
        env.close()
        raise
    if overlap and not (collector.overlap and env.steps_in_background):
        env.close()
        return None

    def step(i: int) -> Any:
        if i % unroll == 0:
            collector.collect(unroll)

    return Contender(step, env.close)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlmem bench envs", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200,
                        help="vector steps per timed round (rounded up to whole windows; default 200)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds; the best counts (default 3)")
    parser.add_argument("--num-envs", type=int, default=None, help="envs per source (default: per source, "
                        + ", ".join(f"{name} {s.num_envs}" for name, s in SOURCES.items()) + ")")
    parser.add_argument("--sources", default=",".join(DEFAULT_SOURCES),
                        help=f"comma-separated sources among {', '.join(SOURCES)} "
                        f"(default: {','.join(DEFAULT_SOURCES)})")
    parser.add_argument("--unroll", type=int, default=20, help="rollout window T (default 20)")
    parser.add_argument("--hidden", type=int, default=128, help="GRU hidden size (default 128)")
    parser.add_argument("--encoder", default="auto", choices=ENCODERS,
                        help="the policy's encoder, as model.encoder (default auto: the Nature CNN for frames)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="intra-op threads for the policy (default 1, as train.torch_threads; 0: torch's own)")
    return parser


def _rate(value: float | None) -> str:
    return f"{value:,.0f}" if value is not None else "-"


def _ratio(value: float | None, base: float | None, mark: str = " ") -> str:
    quotient = ratio(value, base)
    return f"{quotient:.2f}{mark}" if quotient is not None else "- "


def run(argv: list[str]) -> None:
    """Measure and print the table; a bad argument exits with status 2 and one message."""
    import torch

    parser = _parser()
    args = parser.parse_args(argv)
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        parser.error(f"unknown source {unknown[0]!r}; valid choices: {', '.join(SOURCES)}")
    for flag, value in (("--steps", args.steps), ("--repeats", args.repeats), ("--num-envs", args.num_envs),
                        ("--unroll", args.unroll), ("--hidden", args.hidden)):
        if value is not None and value <= 0:
            parser.error(f"{flag} must be positive, got {value}")
    if args.torch_threads < 0:
        parser.error(f"--torch-threads must be >= 0, got {args.torch_threads}")
    steps = math.ceil(args.steps / args.unroll) * args.unroll  # whole windows
    policy = Policy(args.hidden, args.encoder)
    threads = torch.get_num_threads()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    table = Table(Column("source", 12, "<"), Column("envs", 4), *(Column(c, 9) for c in (
        "raw", "vecenv", "policy", "rollout", "overlap")), *(Column(c, 8) for c in (
        "vec/raw", "roll/raw", "ovl/raw", "seq/raw")))
    print(f"env steps/s; rollout: GRU {args.hidden}, {args.encoder} encoder, T = {args.unroll}, "
          f"{torch.get_num_threads()} torch thread(s); best of {args.repeats} rounds of {steps} steps")
    table.header()
    try:
        for name in sources:
            source = SOURCES[name]
            num_envs = args.num_envs or source.num_envs
            if source.package is not None and importlib.util.find_spec(source.package) is None:
                print(f"{name:<12} {num_envs:>4}  skipped: {source.package} is not installed")
                continue
            spec = {**source.spec, "num_envs": num_envs}
            built: dict[str, Contender | None] = {}
            try:
                built["raw"] = source.raw(num_envs, steps) if source.raw is not None else None
                built["vecenv"] = vecenv_contender(spec, steps)
                built["policy"] = _policy(spec, policy)
                built["rollout"] = _rollout(spec, args.unroll, policy, overlap=False)
                built["overlap"] = _rollout(spec, args.unroll, policy, overlap=True)
                present = {k: c for k, c in built.items() if c is not None}
                rates = dict(zip(present, best_rates([c.step for c in present.values()], steps, args.repeats,
                                                     num_envs), strict=True))
            finally:
                for contender in built.values():
                    if contender is not None:
                        contender.close()
            raw, vecenv = rates.get("raw"), rates["vecenv"]
            base, mark = (raw, " ") if raw is not None else (vecenv, "*")
            inference = rates["policy"]
            sequential = 1.0 / (1.0 / base + 1.0 / inference)  # stepping, then acting, with no overhead
            table.row(name, num_envs, _rate(raw), _rate(vecenv), _rate(inference), _rate(rates["rollout"]),
                      _rate(rates.get("overlap")), _ratio(vecenv, raw), _ratio(rates["rollout"], base, mark),
                      _ratio(rates.get("overlap"), base, mark), _ratio(sequential, base, mark))
    finally:
        torch.set_num_threads(threads)
    print("* relative to the rlmem VecEnv (the source has no raw library)")
