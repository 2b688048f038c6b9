"""Environment stepping for rollout collection, overlapping env steps with policy inference.

The policy needs step t's observations before it can act at step t + 1, so a single batch of envs
can never step while the policy acts for it. ``EnvRunner`` therefore drives the env as *groups* of
consecutive envs (``VecEnv.split``). With two groups A and B, one step of the window runs::

    act(A, t)  -> A.step_async    A's envs step in the library's own threads or processes ...
    B.step_wait (step t - 1)      ... while B's previous step is collected and recorded
    act(B, t)  -> B.step_async    ... and the policy acts for B;
    A.step_wait (step t)          then B's envs step while A's result is recorded, and so on.

The collector writes each group's data into the rows ``group.index`` of the same [T, B] buffers and
keeps one memory state per group, so the stored window is exactly what a single group would have
stored: the replay from the window's start state over all B envs reproduces the acting values.

Overlap needs a group's step to run in the background (ale-py ``send``/``recv``, gymnasium's
``AsyncVectorEnv``, ProcGen's ``act``/``observe``: ``VecEnv.steps_in_background``) and an env that can
be split; elsewhere the runner keeps one group and steps the whole batch, which is the plain
synchronous loop. It also costs something: the policy runs twice per step on half batches. Where that
costs compute in proportion to the batch (a policy on the CPU) the halves cost what the whole did, and
the env's step is hidden: the default on the CPU (``overlap_helps``), where each group's worker threads
are capped at its share of the cores (``envs.base.threads_per_group``). Where acting is bound by a fixed
cost per call instead (a policy on a GPU, whose kernel launches and host synchronisation do not shrink
with the batch), two calls per step cost twice one, more than the env step they hide: on a GPU the
runner steps the whole batch (measured in ``docs/gpu.md``). ``env.overlap`` (true, false, auto) or
``overlap=`` decides.
When the policy runs on a CUDA device and the env on the CPU (where ``train.build`` puts every env whose
library works on the host: ``VecEnv.steps_on_host``), step results travel through page-locked (pinned)
host buffers, so that their copies to the device are asynchronous.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from envs.base import VecEnv

GROUPS = 2  # two groups suffice: while one steps, the policy acts for the other


class GroupStep(NamedTuple):
    """One group's step result. ``Bg`` = the group's env count."""

    obs: Tensor  # [Bg, *obs_shape] on the policy device (env dtype: uint8 frames stay uint8)
    reward: Tensor  # [Bg] float32 on the policy device
    terminated: Tensor  # [Bg] bool on the policy device
    truncated: Tensor  # [Bg] bool on the policy device
    info: dict[str, Any]  # as the env returned it (on the env's device)
    env_reward: Tensor  # [Bg] the reward on the env's device (episode statistics stay there)
    env_done: Tensor  # [Bg] bool, terminated | truncated on the env's device


class PinnedStaging:
    """Page-locked host buffers for one group's step results, copied to ``device`` asynchronously.

    The buffers are reused every step; an event recorded after the copies tells the next ``upload``
    when the previous copies have left them.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers: dict[str, Tensor] = {}
        self.copied: torch.cuda.Event | None = None

    def _buffer(self, name: str, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """A pinned buffer shaped like ``like``, channels-last where ``like`` is (ProcGen's frames), so
        that the host copy into it is a plain one and the device copy keeps the layout."""
        dtype = dtype or like.dtype
        layout = (torch.channels_last if like.dim() == 4 and not like.is_contiguous()
                  and like.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
        buffer = self.buffers.get(name)
        if (buffer is None or buffer.shape != like.shape or buffer.dtype != dtype
                or not buffer.is_contiguous(memory_format=layout)):
            buffer = torch.empty(like.shape, dtype=dtype, pin_memory=True, memory_format=layout)
            self.buffers[name] = buffer
        return buffer

    def upload(self, **tensors: Tensor) -> dict[str, Tensor]:
        """Host tensors -> device tensors (float rewards as float32), through the pinned buffers."""
        if self.copied is None:
            self.copied = torch.cuda.Event()  # one event, recorded again each step (creating one costs a device query)
        else:
            self.copied.synchronize()
        out = {}
        for name, tensor in tensors.items():
            buffer = self._buffer(name, tensor, torch.float32 if tensor.dtype.is_floating_point else None)
            buffer.copy_(tensor)
            out[name] = buffer.to(self.device, non_blocking=True)
        self.copied.record()
        return out


@dataclass
class EnvGroup:
    """A group of consecutive envs that steps on its own: rows ``index`` of the full batch."""

    env: VecEnv  # the group's VecEnv (the whole env when the runner keeps one group)
    index: slice  # its envs in the full batch
    staging: PinnedStaging | None = None
    pending: bool = False  # a step was sent and not yet collected

    @property
    def num_envs(self) -> int:
        return self.env.num_envs


def overlap_helps(env: VecEnv, device: torch.device) -> bool:
    """The default of ``EnvRunner(overlap=None)``: overlap where the env steps in the background and
    the policy runs on the CPU (see the module docstring)."""
    return bool(env.steps_in_background) and env.num_envs >= GROUPS and torch.device(device).type == "cpu"


class EnvRunner:
    """Steps ``env`` in groups for a policy on ``device`` (see the module docstring).

    ``overlap``: True splits the env into two groups that step while the policy acts for the other
    (only if the env can be split; otherwise the runner keeps one group), False keeps one group, None
    takes the env's own setting (``env.overlap``, from its options) and, where that is auto too,
    ``overlap_helps(env, device)``. The runner must own the env from its first reset: splitting
    rebuilds the env's groups afresh.
    """

    def __init__(self, env: VecEnv, device: torch.device, overlap: bool | None = None) -> None:
        self.env = env
        self.device = torch.device(device)
        if overlap is None:
            overlap = env.overlap
        want = overlap_helps(env, self.device) if overlap is None else bool(overlap)
        parts = list(env.split(GROUPS)) if want else [env]
        if len(parts) < 2:
            parts = [env]
        self.overlap = len(parts) > 1
        # Pinned staging only where results cross from host memory to a CUDA device.
        stage = self.device.type == "cuda" and torch.device(env.device).type == "cpu"
        self.groups: list[EnvGroup] = []
        start = 0
        for part in parts:
            self.groups.append(EnvGroup(part, slice(start, start + part.num_envs),
                                        PinnedStaging(self.device) if stage else None))
            start += part.num_envs

    def reset(self, seed: int | None) -> Tensor:
        """Reset every env: observations [B, *obs_shape] on the policy device."""
        for group in self.groups:
            if group.pending:  # a window that was interrupted: collect its step, so that the env is idle
                self.wait(group)
        return self.env.reset(seed=seed).to(self.device)

    def send(self, group: EnvGroup, actions: Tensor) -> None:
        """Start ``group``'s step with ``actions`` [Bg, *act_shape] (as the env takes them)."""
        group.env.step_async(actions.to(group.env.device))
        group.pending = True

    def wait(self, group: EnvGroup) -> GroupStep:
        """Collect ``group``'s step (blocks until its envs have stepped)."""
        obs, reward, terminated, truncated, info = group.env.step_wait()
        group.pending = False
        env_done = terminated | truncated
        if group.staging is not None:
            up = group.staging.upload(obs=obs, reward=reward, terminated=terminated, truncated=truncated)
            return GroupStep(up["obs"], up["reward"], up["terminated"], up["truncated"], info, reward, env_done)
        return GroupStep(obs.to(self.device), reward.to(device=self.device, dtype=torch.float32),
                         terminated.to(self.device), truncated.to(self.device), info, reward, env_done)
