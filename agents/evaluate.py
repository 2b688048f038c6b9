"""Run a trained actor-critic with its memory until a number of episodes have finished."""

from __future__ import annotations

import torch

from agents.networks import ActorCritic
from envs.base import VecEnv


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
