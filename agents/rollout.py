"""Synchronous rollout collection shared by the window learners (actor_critic, ppo).

``RolloutCollector`` owns everything that crosses windows on the acting side: the acting inputs of
the next step (``agents.acting.ActingInputs``: the env's current observation, the per-env ``reset``
flags, the previous action and reward), the carried memory state, and the running episode statistics.
``collect(T)`` acts for T steps on all envs, one step at a time under ``torch.no_grad()`` (a core in
rtrl mode then runs its cell only and passes its sensitivities through untouched), and returns a
``Rollout`` holding what an update needs to replay the window from its start state.

Timing convention (same-step autoreset): ``reset[t]`` is set where ``obs[t]`` is the first observation
of an episode, i.e. the env ended at step t − 1 (and at the very first step of a run). The core zeroes
those envs' state before step t; the previous action and reward are zeroed there too.

The env is stepped by an ``agents.runner.EnvRunner``: with ``overlap`` it acts for one group of envs
while the other group's envs step (see that module); each group writes its own rows of the same
buffers and carries its own slice of the memory state, so a ``Rollout`` looks the same either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from agents.acting import ActingInputs, sample_action
from agents.base import load_attributes, save_attributes
from agents.networks import ActorCritic
from agents.runner import EnvGroup, EnvRunner
from envs.base import EnvShard, VecEnv
from rlmem.memory import State, cat_states, clone_state, select_state

_acting_threads = 0  # see set_acting_threads


def set_acting_threads(threads: int) -> None:
    """Intra-op threads for every ``RolloutCollector.collect`` in this process (0: the process's own
    setting). Acting runs while the env's own threads step (ale-py, ProcGen) and wants few; the update
    that follows has the cores to itself and can use them all (``train.acting_threads``)."""
    global _acting_threads
    _acting_threads = int(threads)


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


@dataclass
class _Window:
    """The buffers of one window being collected, time-major [T, B, ...] (see ``Rollout``)."""

    obs: Tensor
    actions: Tensor
    prev_actions: Tensor
    log_probs: Tensor
    values: Tensor
    rewards: Tensor
    prev_rewards: Tensor
    terminated: Tensor
    truncated: Tensor
    reset: Tensor
    final_values: Tensor
    # Episode statistics stay on the env's device: they cross to the host once per window.
    ep_done: Tensor
    ep_return: Tensor
    ep_length: Tensor
    success: Tensor
    reports_success: bool = False


@dataclass
class _Cursor:
    """What one group of envs acts on next: its rows of the collector's acting inputs and memory state."""

    inputs: ActingInputs  # [Bg, ...]
    state: State  # the group's memory state
    action: Tensor | None = None  # the action sent at the step in flight


class RolloutCollector:
    """Acts with ``network`` in ``env``, carrying memory and bookkeeping across windows.

    The learner owns ``memory_state`` after an update: it replaces it with the state its replay of the
    window returns (identical in bptt mode; in rtrl mode that is where sensitivities advance).

    ``overlap`` (None: where it helps, see ``agents.runner.overlap_helps``) steps one half of the envs
    while the policy acts for the other half; the collector then owns ``env`` from its first reset.
    """

    def __init__(self, network: ActorCritic, env: VecEnv, device: torch.device, generator: torch.Generator,
                 seed: int, overlap: bool | None = None) -> None:
        self.network = network
        self.env = env
        self.device = device
        self.generator = generator
        B = env.num_envs
        self.num_envs = B
        self.runner = EnvRunner(env, device, overlap)
        self.inputs = ActingInputs.first(self.runner.reset(seed), network)
        self.memory_state: State = network.initial_state(B, device)
        # Fallback episode statistics (on the env's device) for envs that do not report ``info["episode"]``.
        self.episode_return = torch.zeros(B, dtype=torch.float64, device=env.device)
        self.episode_length = torch.zeros(B, dtype=torch.long, device=env.device)

    @property
    def overlap(self) -> bool:
        """Whether env steps overlap with policy inference (two groups of envs)."""
        return self.runner.overlap

    # ----------------------------------------------------------------------------------------------

    def collect(self, unroll_length: int) -> tuple[Rollout, EpisodeStats]:
        """Act for ``unroll_length`` steps on every env (on ``acting_threads`` intra-op threads, where set)."""
        threads = torch.get_num_threads()
        switch = 0 < _acting_threads != threads
        if switch:
            torch.set_num_threads(_acting_threads)
        try:
            return self._collect(unroll_length)
        finally:
            if switch:
                torch.set_num_threads(threads)

    @torch.no_grad()
    def _collect(self, unroll_length: int) -> tuple[Rollout, EpisodeStats]:
        T, B, device = unroll_length, self.num_envs, self.device
        env_device = self.env.device
        obs, prev_action = self.inputs.obs, self.inputs.prev_action
        window = _Window(
            obs=torch.empty(T, *obs.shape, dtype=obs.dtype, device=device),
            actions=torch.empty(T, *prev_action.shape, dtype=prev_action.dtype, device=device),
            prev_actions=torch.empty(T, *prev_action.shape, dtype=prev_action.dtype, device=device),
            log_probs=torch.empty(T, B, device=device),
            values=torch.empty(T, B, device=device),
            rewards=torch.empty(T, B, device=device),
            prev_rewards=torch.empty(T, B, device=device),
            terminated=torch.empty(T, B, dtype=torch.bool, device=device),
            truncated=torch.empty(T, B, dtype=torch.bool, device=device),
            reset=torch.empty(T, B, dtype=torch.bool, device=device),
            final_values=torch.zeros(T, B, device=device),
            ep_done=torch.zeros(T, B, dtype=torch.bool, device=env_device),
            ep_return=torch.zeros(T, B, dtype=torch.float64, device=env_device),
            ep_length=torch.zeros(T, B, dtype=torch.long, device=env_device),
            success=torch.zeros(T, B, device=env_device),
        )
        start_state = clone_state(self.memory_state)
        groups = self.runner.groups
        whole = len(groups) == 1
        cursors = [
            _Cursor(self.inputs, self.memory_state) if whole else
            _Cursor(self.inputs.select(g.index), select_state(self.memory_state, g.index))
            for g in groups
        ]
        # Each group records its previous step and acts again; with two groups, one group's envs step
        # meanwhile (agents/runner.py). With one group this is the plain act -> step -> record loop.
        for t in range(T):
            for group, cursor in zip(groups, cursors, strict=True):
                if group.pending:
                    self._record(t - 1, group, cursor, window)
                self._act(t, group, cursor, window)
        bootstrap = torch.empty(B, device=device)
        for group, cursor in zip(groups, cursors, strict=True):
            self._record(T - 1, group, cursor, window)
            # V(obs[T]) for the bootstrap; the step's state is not kept (the next window recomputes it).
            bootstrap[group.index] = self.network.step(*cursor.inputs.before(cursor.state)).value[0]

        if whole:
            (last,) = cursors
            self.inputs, self.memory_state = last.inputs, last.state
        else:
            self.inputs = ActingInputs.cat([c.inputs for c in cursors])
            self.memory_state = cat_states([c.state for c in cursors])

        rollout = Rollout(window.obs, window.actions, window.log_probs, window.values, window.rewards,
                          window.terminated, window.truncated, window.reset, window.prev_actions,
                          window.prev_rewards, window.final_values, bootstrap, start_state)
        return rollout, self._episode_stats(window.ep_done, window.ep_return, window.ep_length, window.success,
                                            window.reports_success)

    def _act(self, t: int, group: EnvGroup, cursor: _Cursor, window: _Window) -> None:
        """Step t of ``group``: store its inputs, run the policy, send the sampled actions to its envs."""
        net, rows, inputs = self.network, group.index, cursor.inputs
        window.obs[t, rows], window.reset[t, rows] = inputs.obs, inputs.reset
        window.prev_actions[t, rows], window.prev_rewards[t, rows] = inputs.prev_action, inputs.prev_reward
        out = net.step(*inputs.before(cursor.state))
        sample = sample_action(out, self.generator, self._sampling_shard(rows))  # [1, Bg, *act_shape]
        action = sample[0]
        window.actions[t, rows], window.log_probs[t, rows] = action, out.dist.log_prob(sample)[0]
        window.values[t, rows] = out.value[0]
        cursor.state, cursor.action = out.state, action
        self.runner.send(group, net.env_action(action))

    def _sampling_shard(self, rows: slice) -> EnvShard | None:
        """The rows ``rows`` of this env in the whole batch of a data-parallel run (None: one process)."""
        shard = self.env.shard
        if shard is None or rows == slice(None):
            return shard
        start, stop, _ = rows.indices(self.num_envs)
        return EnvShard(shard.offset + start, stop - start, shard.total)

    def _record(self, t: int, group: EnvGroup, cursor: _Cursor, window: _Window) -> None:
        """Collect ``group``'s step t and store its outcome; the group's next inputs follow from it."""
        step = self.runner.wait(group)
        rows = group.index
        self._record_episodes(t, rows, step.env_reward, step.env_done, step.info, window)
        reward, term, trunc = step.reward, step.terminated, step.truncated
        window.rewards[t, rows], window.terminated[t, rows], window.truncated[t, rows] = reward, term, trunc
        # Only a truncated episode bootstraps (an env may set both flags; termination wins).
        bootstrap_final = trunc & ~term
        if bootstrap_final.any():
            # V(final_obs) with the state before the reset: one extra step from the state after step t.
            final_obs = step.info["final_obs"].to(self.device)
            final = self.network.step(final_obs, cursor.state, torch.zeros_like(trunc), cursor.action, reward)
            window.final_values[t, rows] = torch.where(bootstrap_final, final.value[0], 0.0)
        cursor.inputs = cursor.inputs.after(step.obs, term | trunc, cursor.action, reward)

    def _record_episodes(self, t: int, rows: slice, reward: Tensor, done: Tensor, info: dict[str, Any],
                         window: _Window) -> None:
        """Write step t's finished episodes of the envs ``rows`` (all on the env's device) into the window."""
        episode = info.get("episode")
        if episode is not None:
            window.ep_done[t, rows] = torch.as_tensor(episode["done"])
            window.ep_return[t, rows] = torch.as_tensor(episode["return"], dtype=torch.float64)
            window.ep_length[t, rows] = torch.as_tensor(episode["length"])
        else:
            returns, lengths = self.episode_return[rows], self.episode_length[rows]  # views: updated in place
            returns += reward
            lengths += 1
            window.ep_done[t, rows], window.ep_return[t, rows], window.ep_length[t, rows] = done, returns, lengths
            returns.masked_fill_(done, 0.0)
            lengths.masked_fill_(done, 0)
        if "success" in info:
            window.success[t, rows] = torch.as_tensor(info["success"]).float()
            window.reports_success = True

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

    # Saved, besides the acting inputs (the same keys as ever: obs, reset, prev_action, prev_reward).
    checkpointed = ("memory_state", "episode_return", "episode_length")

    def state_dict(self) -> dict[str, Any]:
        return {**self.inputs.state_dict(), **save_attributes(self, self.checkpointed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inputs.load_state_dict(state)
        load_attributes(self, state, self.checkpointed, self.device)
