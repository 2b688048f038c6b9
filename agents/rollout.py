"""Synchronous rollout collection shared by the on-policy learners (actor-critic, PPO, streaming).

``RolloutCollector`` owns everything that crosses windows on the acting side: the env's current
observation, the carried memory state, the per-env ``reset`` flags of the next step, the previous
action and reward, and the running episode statistics. ``collect(T)`` acts for T steps on all envs,
one step at a time under ``torch.no_grad()`` (a core in rtrl mode then runs its cell only and passes
its sensitivities through untouched), and returns a ``Rollout`` holding what an update needs to replay
the window from its start state.

Timing convention (same-step autoreset): ``reset[t]`` is set where ``obs[t]`` is the first observation
of an episode, i.e. the env ended at step t − 1 (and at the very first step of a run). The core zeroes
those envs' state before step t; the previous action and reward are zeroed there too.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from agents.networks import ActorCritic
from envs.base import VecEnv
from rlmem.memory import State, clone_state, select_state


@dataclass
class Rollout:
    """One window of T steps on B envs, time-major. Obs keep their env dtype (uint8 frames stay uint8)."""

    obs: Tensor  # [T, B, *obs_shape]
    actions: Tensor  # [T, B, *act_shape] the sampled (unclipped) actions
    log_probs: Tensor  # [T, B] behaviour log-probs of ``actions``
    values: Tensor  # [T, B] behaviour values V(obs[t])
    rewards: Tensor  # [T, B] raw env rewards
    terminated: Tensor  # [T, B] bool
    truncated: Tensor  # [T, B] bool
    reset: Tensor  # [T, B] bool: obs[t] starts an episode (zero the state before step t)
    prev_actions: Tensor  # [T, B, *act_shape] the action before step t (masked by the network at resets)
    prev_rewards: Tensor  # [T, B] the raw reward before step t (masked likewise)
    final_values: Tensor  # [T, B] V(final_obs) where truncated[t] and not terminated[t], else 0
    bootstrap_value: Tensor  # [B] V(obs[T]) with the state after the window
    start_state: State  # the memory state before step 0 (before reset[0] is applied)

    @property
    def done(self) -> Tensor:
        return self.terminated | self.truncated

    def select_envs(self, index: Tensor | slice) -> Rollout:
        """The window of a subset of envs (e.g. a recurrent-PPO minibatch): whole sequences stay whole."""
        per_step = {f.name: getattr(self, f.name)[:, index] for f in fields(self)
                    if f.name not in ("bootstrap_value", "start_state")}
        return Rollout(**per_step, bootstrap_value=self.bootstrap_value[index],
                       start_state=select_state(self.start_state, index))

    @property
    def num_steps(self) -> int:
        return self.rewards.numel()


@dataclass
class EpisodeStats:
    """Episodes finished during a window (raw returns, as the env reports them)."""

    returns: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    successes: list[float] = field(default_factory=list)  # only when the env reports ``info["success"]``


class RolloutCollector:
    """Acts with ``network`` in ``env``, carrying memory and bookkeeping across windows.

    The learner owns ``memory_state`` after an update: it replaces it with the state its replay of the
    window returns (identical in bptt mode; in rtrl mode that is where sensitivities advance).
    """

    def __init__(self, network: ActorCritic, env: VecEnv, device: torch.device, generator: torch.Generator,
                 seed: int) -> None:
        self.network = network
        self.env = env
        self.device = device
        self.generator = generator
        B = env.num_envs
        self.num_envs = B
        self.obs = env.reset(seed=seed).to(device)
        self.memory_state: State = network.initial_state(B, device)
        # The first observation starts an episode; the state is zero already, the flag keeps the
        # previous action/reward inputs zero and tells cores that reset sensitivities the same thing.
        self.reset = torch.ones(B, dtype=torch.bool, device=device)
        self.prev_action = torch.zeros(B, *network.action_shape, dtype=network.action_dtype(), device=device)
        self.prev_reward = torch.zeros(B, device=device)
        # Fallback episode statistics (on the env's device) for envs that do not report ``info["episode"]``.
        self.episode_return = torch.zeros(B, dtype=torch.float64, device=env.device)
        self.episode_length = torch.zeros(B, dtype=torch.long, device=env.device)

    # ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def collect(self, unroll_length: int) -> tuple[Rollout, EpisodeStats]:
        T, B, device, net = unroll_length, self.num_envs, self.device, self.network
        obs_buf = torch.empty(T, *self.obs.shape, dtype=self.obs.dtype, device=device)
        actions = torch.empty(T, *self.prev_action.shape, dtype=self.prev_action.dtype, device=device)
        prev_actions = torch.empty_like(actions)
        log_probs = torch.empty(T, B, device=device)
        values = torch.empty(T, B, device=device)
        rewards = torch.empty(T, B, device=device)
        prev_rewards = torch.empty(T, B, device=device)
        terminated = torch.empty(T, B, dtype=torch.bool, device=device)
        truncated = torch.empty(T, B, dtype=torch.bool, device=device)
        reset = torch.empty(T, B, dtype=torch.bool, device=device)
        final_values = torch.zeros(T, B, device=device)
        # Episode statistics stay on the env's device: they cross to the host once per window.
        env_device = self.env.device
        ep_done = torch.zeros(T, B, dtype=torch.bool, device=env_device)
        ep_return = torch.zeros(T, B, dtype=torch.float64, device=env_device)
        ep_length = torch.zeros(T, B, dtype=torch.long, device=env_device)
        success = torch.zeros(T, B, device=env_device)
        reports_success = False

        start_state = clone_state(self.memory_state)
        state = self.memory_state
        for t in range(T):
            obs_buf[t], reset[t] = self.obs, self.reset
            prev_actions[t], prev_rewards[t] = self.prev_action, self.prev_reward
            out = net.step(self.obs, state, self.reset, self.prev_action, self.prev_reward)
            sample = out.dist.sample(self.generator)  # [1, B, *act_shape]
            action = sample[0]
            actions[t], log_probs[t], values[t] = action, out.dist.log_prob(sample)[0], out.value[0]
            state = out.state

            next_obs, env_reward, env_term, env_trunc, info = self.env.step(net.env_action(action).to(env_device))
            self._record_episodes(t, env_reward, env_term | env_trunc, info, ep_done, ep_return, ep_length, success)
            reports_success = reports_success or "success" in info
            next_obs, reward = next_obs.to(device), env_reward.to(device=device, dtype=torch.float32)
            term, trunc = env_term.to(device), env_trunc.to(device)
            rewards[t], terminated[t], truncated[t] = reward, term, trunc
            # Only a truncated episode bootstraps (an env may set both flags; termination wins).
            bootstrap_final = trunc & ~term
            if bootstrap_final.any():
                # V(final_obs) with the state before the reset: one extra step from the state after step t.
                final_obs = info["final_obs"].to(device)
                final = net.step(final_obs, state, torch.zeros_like(trunc), action, reward)
                final_values[t] = torch.where(bootstrap_final, final.value[0], 0.0)

            self.obs, self.reset = next_obs, term | trunc
            self.prev_action, self.prev_reward = action, reward
        self.memory_state = state

        # V(obs[T]) for the bootstrap; the step's state is not kept (the next window recomputes it).
        bootstrap = net.step(self.obs, state, self.reset, self.prev_action, self.prev_reward).value[0]

        rollout = Rollout(obs_buf, actions, log_probs, values, rewards, terminated, truncated, reset,
                          prev_actions, prev_rewards, final_values, bootstrap, start_state)
        return rollout, self._episode_stats(ep_done, ep_return, ep_length, success, reports_success)

    def _record_episodes(self, t: int, reward: Tensor, done: Tensor, info: dict[str, Any], ep_done: Tensor,
                         ep_return: Tensor, ep_length: Tensor, success: Tensor) -> None:
        """Write step t's finished episodes (all on the env's device) into the window's buffers."""
        episode = info.get("episode")
        if episode is not None:
            ep_done[t] = torch.as_tensor(episode["done"])
            ep_return[t] = torch.as_tensor(episode["return"], dtype=torch.float64)
            ep_length[t] = torch.as_tensor(episode["length"])
        else:
            self.episode_return += reward
            self.episode_length += 1
            ep_done[t], ep_return[t], ep_length[t] = done, self.episode_return, self.episode_length
            self.episode_return.masked_fill_(done, 0.0)
            self.episode_length.masked_fill_(done, 0)
        if "success" in info:
            success[t] = torch.as_tensor(info["success"]).float()

    @staticmethod
    def _episode_stats(ep_done: Tensor, ep_return: Tensor, ep_length: Tensor, success: Tensor,
                       reports_success: bool) -> EpisodeStats:
        # One host transfer per window, in time-then-env order.
        if not bool(ep_done.any()):
            return EpisodeStats()
        return EpisodeStats(
            returns=ep_return[ep_done].tolist(),
            lengths=ep_length[ep_done].tolist(),
            successes=success[ep_done].tolist() if reports_success else [],
        )

    # ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "obs": self.obs.clone(),
            "memory_state": clone_state(self.memory_state),
            "reset": self.reset.clone(),
            "prev_action": self.prev_action.clone(),
            "prev_reward": self.prev_reward.clone(),
            "episode_return": self.episode_return.clone(),
            "episode_length": self.episode_length.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.obs = state["obs"].to(self.device)
        self.memory_state = {k: v.to(self.device) for k, v in state["memory_state"].items()}
        self.reset = state["reset"].to(self.device)
        self.prev_action = state["prev_action"].to(self.device)
        self.prev_reward = state["prev_reward"].to(self.device)
        self.episode_return = state["episode_return"].to(self.env.device)
        self.episode_length = state["episode_length"].to(self.env.device)
