"""``rlmem bench stream_ac``: env steps/s of the streaming actor-critic, per-env gradients by vmap over
envs vs by one-hot output gradients through the batched backward, as the number of envs grows
(the figures behind ``agent.per_env_gradients: auto``).

``stream_ac`` updates every step from per-env gradients (each env keeps its own eligibility traces).
It takes them by running one env's step under ``torch.func.vmap`` over envs, which costs the
arithmetic of 2·B single-env backward passes; cores that cannot run under torch.func fall back to
2·B one-hot output gradients pushed through the batched graph, where every op sees all B envs:
quadratic in B. Both run here in one process on the same task, network and seed, their timed
iterations interleaved, so the ratio is the figure to quote. Before timing, one step of each from
the same learner state must give the same gradients (the largest difference is printed).

Example::

    rlmem bench stream_ac --envs 1,16,64 --memory elstm --hidden 128 --delay 32
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

from agents.base import ModelOptions
from agents.stream_ac import StreamACLearner, StreamACOptions
from envs import make_env
from rlmem.bench.measure import Column, Table, alternating_seconds, positive_ints
from rlmem.errors import ConfigError

STRATEGIES = ("vmap", "batched")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlmem bench stream_ac", description=__doc__.splitlines()[0])
    parser.add_argument("--envs", type=positive_ints, default=[1, 4, 16, 64], help="numbers of envs B")
    parser.add_argument("--memory", default="elstm", help="core name (grad: rtrl)")
    parser.add_argument("--hidden", type=int, default=128, help="hidden_size N")
    parser.add_argument("--delay", type=int, default=32, help="cue_recall delay L")
    parser.add_argument("--steps", type=int, default=16, help="learner steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per strategy (the median is shown)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (0: leave as is)")
    return parser


def _learner(args: argparse.Namespace, num_envs: int) -> StreamACLearner:
    env = make_env({"name": "cue_recall", "num_envs": num_envs, "delay": args.delay, "desync": True}, seed=0)
    memory = {"name": args.memory, "hidden_size": args.hidden, "grad": "rtrl"}
    options = StreamACOptions(per_env_gradients="vmap")
    return StreamACLearner(options, env, memory, ModelOptions(), "cpu", seed=0, total_steps=10**9)


def _gradient_difference(learner: StreamACLearner) -> float:
    """Largest |vmap − batched| over one step's per-env gradients from the learner's current state, both
    taken by the learner's own ``gradients``."""
    inputs = learner.inputs.before(learner.memory_state)
    action = torch.zeros_like(learner.inputs.prev_action)
    entropy_weight = torch.full((learner.num_envs,), 0.01)
    with torch.no_grad():  # as the learner acts on the vmap path
        acting = learner.network.step(*inputs)
    vmapped, _ = learner.gradients(acting, {}, action, entropy_weight)
    learner.vmap_gradients = False
    batched, _ = learner.gradients(learner.network.step(*inputs), {}, action, entropy_weight)
    return float((vmapped - batched).abs().max())


def run(argv: list[str]) -> None:
    """Time ``steps`` learner steps per repeat for each strategy and number of envs; print a table."""
    args = _parser().parse_args(argv)
    for key in ("hidden", "delay", "steps", "repeats"):
        if getattr(args, key) <= 0:
            raise ConfigError(f"--{key} must be positive, got {getattr(args, key)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"stream_ac on cue_recall (L = {args.delay}), {args.memory} rtrl N = {args.hidden}, "
          f"{args.steps} steps per repeat, median of {args.repeats}, {torch.get_num_threads()} CPU threads")
    table = Table(Column("envs", 5), Column("vmap steps/s", 13), Column("batched steps/s", 16),
                  Column("vmap/batched", 13), Column("max |diff|", 11))
    table.header(rule=False)
    for num_envs in args.envs:
        base = _learner(args, num_envs)
        base.step()  # carry non-zero sensitivities and traces
        if not base.vmap_gradients:
            raise ConfigError(f"core {args.memory!r} does not run under torch.func; only its batched path exists")
        difference = _gradient_difference(copy.deepcopy(base))
        learners = {name: copy.deepcopy(base) for name in STRATEGIES}
        learners["batched"].vmap_gradients = False
        # Interleaved repeats: both see the same machine load (the step above warmed them up).
        times = alternating_seconds({name: lambda learner=learner: [learner.step() for _ in range(args.steps)]
                                     for name, learner in learners.items()}, torch.device("cpu"), args.repeats,
                                    warmup=0)
        rate = {name: args.steps * num_envs / statistics.median(seconds) for name, seconds in times.items()}
        table.row(num_envs, f"{rate['vmap']:.0f}", f"{rate['batched']:.0f}", f"{rate['vmap'] / rate['batched']:.2f}",
                  f"{difference:.1e}")
