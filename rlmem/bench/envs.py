"""Environment and rollout throughput: raw library, rlmem VecEnv, and rollout collection with a policy.

``rlmem bench envs [--steps N] [--repeats R] [--num-envs B] [--sources a,b,...] [--unroll T]
[--hidden H] [--encoder E] [--torch-threads K]`` prints, per source, env steps per second (all envs
together) of

* ``raw``: the library's own vector env under random actions (``envs.bench``'s measurement);
* ``vecenv``: rlmem's VecEnv on the same id and env count, random actions (``envs.bench`` likewise);
* ``policy``: the acting network alone (below) on the env's first observations, with no env step:
  what inference can deliver on this machine, whatever the env;
* ``rollout``: ``RolloutCollector.collect(T)`` with policy inference and no learning: encoder E
  (``model.encoder``; by default ``auto``, the Nature CNN for frames), a GRU core of H units, sampled
  actions and the rollout buffers, with the overlap of env steps and inference off and on
  (``agents.runner``; "-" where the env cannot overlap: it cannot be split or does not step in the
  background);

and the ratios rollout / raw (for sources without a raw library, rollout / vecenv, marked ``*``), with
``seq/raw``: the ratio that stepping and then acting would reach with no overhead at all,
1 / (1/raw + 1/policy), over raw. A rollout that does not overlap cannot pass it; one that overlaps
can only where the cores are not all busy already (the env's threads and inference share them). All
contenders of a source are built once and timed in alternating rounds of N vector steps (rollouts:
N / T windows of T steps); each figure is the best of R rounds, so that load from other processes
skews them alike. Acting uses K intra-op threads, the training default (``train.torch_threads``).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from dataclasses import dataclass
from typing import Any

from envs.bench import SOURCES, Contender, _rlmem, measure

DEFAULT_SOURCES = ("atari", "procgen", "cartpole", "cue_recall")


@dataclass(frozen=True)
class Policy:
    """The acting network's settings: a GRU core of ``hidden`` units behind ``encoder`` (``model.encoder``)."""

    hidden: int = 128
    encoder: str = "auto"


def _network(env: Any, policy: Policy) -> Any:
    """The acting network for ``env``, seeded alike for every contender, in eval mode."""
    import torch

    from agents.base import ModelOptions
    from agents.networks import ActorCritic

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        network = ActorCritic(env.single_observation_space, env.single_action_space,
                              {"name": "gru", "hidden_size": policy.hidden}, ModelOptions(encoder=policy.encoder))
    return network.eval()


def _policy(spec: dict[str, Any], policy: Policy) -> Contender:
    """Inference alone: call ``i`` acts once for all envs on the env's first observations (carried
    memory state, sampled actions), with no env step. Its rate bounds any rollout of this network."""
    import torch

    from envs import make_env

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

    from agents.rollout import RolloutCollector
    from envs import make_env

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
    from agents.networks import ENCODERS

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


def _rate(value: float | None, width: int) -> str:
    return f"{value:>{width},.0f}" if value is not None else f"{'-':>{width}}"


def _ratio(value: float | None, base: float | None, mark: str) -> str:
    return f"{value / base:>5.2f}{mark}" if value is not None and base else f"{'-':>6}"


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

    header = (f"{'source':<12} {'envs':>4} {'raw':>9} {'vecenv':>9} {'policy':>9} {'rollout':>9} {'overlap':>9} "
              f"{'roll/raw':>8} {'ovl/raw':>8} {'seq/raw':>8}")
    print(f"env steps/s; rollout: GRU {args.hidden}, {args.encoder} encoder, T = {args.unroll}, "
          f"{torch.get_num_threads()} torch thread(s); best of {args.repeats} rounds of {steps} steps")
    print(header)
    print("-" * len(header))
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
                built["vecenv"] = _rlmem(spec, steps)
                built["policy"] = _policy(spec, policy)
                built["rollout"] = _rollout(spec, args.unroll, policy, overlap=False)
                built["overlap"] = _rollout(spec, args.unroll, policy, overlap=True)
                present = {k: c for k, c in built.items() if c is not None}
                rates = dict(zip(present, measure(list(present.values()), steps, args.repeats, num_envs),
                                 strict=True))
            finally:
                for contender in built.values():
                    if contender is not None:
                        contender.close()
            raw, vecenv = rates.get("raw"), rates["vecenv"]
            base, mark = (raw, " ") if raw is not None else (vecenv, "*")
            inference = rates["policy"]
            sequential = 1.0 / (1.0 / base + 1.0 / inference)  # stepping, then acting, with no overhead
            print(f"{name:<12} {num_envs:>4} {_rate(raw, 9)} {_rate(vecenv, 9)} {_rate(inference, 9)} "
                  f"{_rate(rates['rollout'], 9)} {_rate(rates.get('overlap'), 9)} "
                  f"{_ratio(rates['rollout'], base, mark):>8} {_ratio(rates.get('overlap'), base, mark):>8} "
                  f"{_ratio(sequential, base, mark):>8}", flush=True)
    finally:
        torch.set_num_threads(threads)
    print("* relative to the rlmem VecEnv (the source has no raw library)")
