"""Run a trained network with its memory on fresh data: a policy for episodes, a prediction for steps.

* ``evaluate``: an actor-critic acts until ``episodes`` episodes have finished; their raw returns and
  lengths.
* ``evaluate_prediction``: a prediction network (``agents.td``) follows ``steps`` steps of each stream
  of a prediction task without learning; the mean squared error of its prediction ``V(obs_t)`` against
  the true return ``G_t`` the env reports (``info["true_return"]``, see ``envs.prediction_tasks``),

      error = mean over t = 1..steps and streams b of (V(obs_t)[b] − G_t[b])²

  the error the ``td`` learner logs as ``charts/prediction_error`` while it learns, and beside it the
  same mean for V = 0 (nothing learned: the mean of G²).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from agents.networks import ActorCritic
from agents.td import PredictionNetwork
from envs.base import EnvError, VecEnv


@torch.no_grad()
def evaluate(
    network: ActorCritic,
    env: VecEnv,
    episodes: int,
    device: torch.device | str,
    greedy: bool = False,
    seed: int = 0,
) -> tuple[list[float], list[int]]:
    """Raw returns and lengths of the first ``episodes`` episodes to finish (all envs act in parallel).

    The memory state of an env is reset where its episode starts, exactly as in training; actions are
    the policy's mode when ``greedy``, else samples from a generator seeded with ``seed``. Episodes that
    finish on the same step are taken in env order. The env is reset with ``seed``.
    """
    if episodes <= 0:
        return [], []
    device = torch.device(device)
    was_training = network.training
    network.eval()
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)

    B = env.num_envs
    obs = env.reset(seed=seed).to(device)
    state = network.initial_state(B, device)
    reset = torch.ones(B, dtype=torch.bool, device=device)
    prev_action = torch.zeros(B, *network.action_shape, dtype=network.action_dtype(), device=device)
    prev_reward = torch.zeros(B, device=device)
    episode_return = torch.zeros(B, dtype=torch.float64, device=device)
    episode_length = torch.zeros(B, dtype=torch.long, device=device)
    returns: list[float] = []
    lengths: list[int] = []
    while len(returns) < episodes:
        out = network.step(obs, state, reset, prev_action, prev_reward)
        action = (out.dist.mode() if greedy else out.dist.sample(generator))[0]
        state = out.state
        next_obs, reward, terminated, truncated, info = env.step(network.env_action(action).to(env.device))
        reward = reward.to(device=device, dtype=torch.float32)
        done = (terminated | truncated).to(device)
        if "episode" in info:
            finished = torch.as_tensor(info["episode"]["done"], device=device)
            finished_return = torch.as_tensor(info["episode"]["return"], device=device, dtype=torch.float64)
            finished_length = torch.as_tensor(info["episode"]["length"], device=device)
        else:
            episode_return += reward
            episode_length += 1
            finished, finished_return, finished_length = done, episode_return.clone(), episode_length.clone()
            episode_return.masked_fill_(done, 0.0)
            episode_length.masked_fill_(done, 0)
        if bool(finished.any()):  # one host read per step; episode data moves only when some ended
            returns += finished_return[finished].tolist()
            lengths += finished_length[finished].tolist()
        obs, reset = next_obs.to(device), done
        prev_action, prev_reward = action, reward
    network.train(was_training)
    return returns[:episodes], lengths[:episodes]


class PredictionError(NamedTuple):
    """Mean squared errors over every step and stream of an evaluation (module docstring)."""

    squared_error: float  # of the network's prediction
    zero_squared_error: float  # of V = 0, i.e. the mean of G²


@torch.no_grad()
def evaluate_prediction(
    network: PredictionNetwork,
    env: VecEnv,
    steps: int,
    device: torch.device | str,
    seed: int = 0,
) -> PredictionError:
    """The prediction error of ``network`` over ``steps`` steps of every stream of ``env`` (reset with
    ``seed``), its memory carried from step to step and reset where an episode starts, as in training.

    Without gradients the network does not learn (memory cores adapt only while gradients are enabled).
    """
    device = torch.device(device)
    was_training = network.training
    network.eval()
    B = env.num_envs
    state = network.initial_state(B, device)
    reset = torch.ones(B, dtype=torch.bool, device=device)
    obs = env.reset(seed=seed).to(device)
    _, state = network(obs.unsqueeze(0), state, reset.unsqueeze(0))  # the memory of obs_0, whose G is not given
    squared = torch.zeros((), dtype=torch.float64, device=device)
    zero_squared = torch.zeros((), dtype=torch.float64, device=device)
    for _ in range(steps):
        obs, _reward, terminated, truncated, info = env.step(None)
        if "true_return" not in info:
            raise EnvError(
                f"{type(env).__name__} reports no true return (info['true_return']): there is no ground truth "
                "to measure the prediction against"
            )
        reset = (terminated | truncated).to(device)
        values, state = network(obs.to(device).unsqueeze(0), state, reset.unsqueeze(0))
        target = info["true_return"].to(device, torch.float64)
        squared += (values[0].double() - target).pow(2).mean()
        zero_squared += target.pow(2).mean()
    network.train(was_training)
    return PredictionError(float(squared) / steps, float(zero_squared) / steps)
