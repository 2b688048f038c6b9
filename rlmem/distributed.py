"""Data-parallel training on ``torch.distributed``: one run split across processes, GPUs and nodes.

``torchrun --nproc_per_node N [--nnodes M --rdzv_endpoint HOST:PORT] -m rlmem train CONFIG ...``
starts W = N·M processes (ranks); ``rlmem train --nproc N CONFIG ...`` starts N of them on this
machine through ``torch.distributed.run``. Each rank reads its place from the launcher's environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and joins the default
process group: backend ``nccl`` with ``train.device=cuda`` (each rank then uses GPU ``LOCAL_RANK``),
``gloo`` on the CPU and with ``train.device=cuda:N`` (every rank of the machine shares GPU N, which
nccl does not allow).

One run, split. ``env.num_envs`` = B stays the run's number of envs; rank r steps envs
``[r·b, (r + 1)·b)``, b = B / W (``envs.base.EnvShard``: seeded as those envs of the whole batch), and
keeps their memory state and RTRL sensitivities, which never cross ranks. Parameters start as rank
0's (broadcast) and stay identical: after every backward the update directions are averaged over
ranks (``agents.distributed.average_gradients``, a ``Learner.gradient_hook``, so before the finite
check, the clipping and the step), and every statistic over the batch is global (``agents.distributed``).

What the training loop sees (``Distributed``): the iteration's result made global (env steps summed,
metrics averaged, finished episodes gathered), whether any rank was asked to stop, and for checkpoints
every rank's learner, env and generator states gathered on rank 0, which alone writes the run dir
(config, event files, checkpoints); on resume rank 0 reads the checkpoint and hands each rank its part.
In one process (no launcher, or ``WORLD_SIZE`` 1) every method is the identity.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from agents.base import IterationResult, Learner
from agents.distributed import average_gradients, sum_gradients
from envs.base import EnvShard
from rlmem.errors import ConfigError

# How long a collective waits for a rank that stopped answering before the run fails.
TIMEOUT = timedelta(minutes=30)


def launched_world_size() -> int:
    """The number of ranks the launcher started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_divides(num_envs: int, world_size: int) -> None:
    """``ConfigError`` unless ``world_size`` ranks split ``num_envs`` envs into equal shards."""
    if num_envs % world_size != 0:
        valid = [str(w) for w in range(1, num_envs + 1) if num_envs % w == 0]
        raise ConfigError(
            f"env.num_envs={num_envs} cannot be split evenly across {world_size} processes (each steps "
            f"env.num_envs / processes envs); valid process counts: {', '.join(valid)}, or set env.num_envs "
            f"to a multiple of {world_size}"
        )


def to_cpu(tree: Any) -> Any:
    """``tree`` with every tensor on the CPU (a rank's state travels to rank 0 without touching its GPU)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_cpu(v) for v in tree)
    return tree


@dataclasses.dataclass
class Distributed:
    """This process's place in a data-parallel run (rank 0 of 1 without a launcher)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this object initialised the process group and destroys it on close
    collectives_device: str = "cpu"  # where the loop's own small collectives run (the GPU with nccl)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environment(cls, device: str) -> Distributed:
        """Join the run the launcher started (``device``: the configured ``train.device``)."""
        world_size = launched_world_size()
        if world_size == 1 and not (dist.is_available() and dist.is_initialized()):
            return cls()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        owns = False
        if not dist.is_initialized():
            gpu_per_rank = device == "cuda" or (device == "auto" and torch.cuda.is_available())
            if gpu_per_rank:
                if local_rank >= torch.cuda.device_count():
                    raise ConfigError(
                        f"train.device=cuda gives each process of a machine its own GPU, but local rank {local_rank} "
                        f"has none ({torch.cuda.device_count()} GPU(s)); start at most that many processes per "
                        "machine, or share one GPU with train.device=cuda:0"
                    )
                torch.cuda.set_device(local_rank)
            elif device.startswith("cuda:"):  # every rank on this one GPU: nccl cannot, gloo can
                torch.cuda.set_device(torch.device(device))
            dist.init_process_group("nccl" if gpu_per_rank else "gloo", timeout=TIMEOUT)
            owns = True
        device_of_collectives = f"cuda:{local_rank}" if dist.get_backend() == "nccl" else "cpu"
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, owns, device_of_collectives)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    # ----------------------------------------------------------------------------------------------
    # Building the rank's part of the run

    def device(self, device: str) -> str:
        """The rank's device: GPU ``LOCAL_RANK`` for ``cuda`` (and for ``auto`` on a CUDA machine)."""
        if self.active and (device == "cuda" or (device == "auto" and torch.cuda.is_available())):
            return f"cuda:{self.local_rank}"
        return device

    def shard(self, num_envs: int) -> EnvShard | None:
        """This rank's envs of the run's ``num_envs`` (None in one process)."""
        if not self.active:
            return None
        check_divides(num_envs, self.world_size)
        size = num_envs // self.world_size
        return EnvShard(self.rank * size, size, num_envs)

    def prepare(self, learner: Learner) -> None:
        """Start every rank from rank 0's parameters and buffers, and reduce every update over ranks."""
        if not self.active:
            return
        with torch.no_grad():
            for tensor in learner.network.state_dict().values():
                dist.broadcast(tensor, src=0)
        learner.gradient_hooks.append(sum_gradients if learner.gradients_sum_over_envs else average_gradients)

    # ----------------------------------------------------------------------------------------------
    # The training loop

    def global_result(self, result: IterationResult) -> IterationResult:
        """The iteration over every rank: env steps summed, metrics averaged (rank order), finished
        episodes of all ranks (rank 0's first)."""
        if not self.active:
            return result
        tags = sorted(result.metrics)
        values = torch.tensor([float(result.metrics[t]) for t in tags], dtype=torch.float64,
                              device=self.collectives_device)
        dist.all_reduce(values)
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, (result.env_steps, result.episode_returns, result.episode_lengths,
                                       result.episode_successes))
        metrics = {t: float(v) / self.world_size for t, v in zip(tags, values.tolist())}
        return IterationResult(sum(p[0] for p in parts), metrics, [r for p in parts for r in p[1]],
                               [n for p in parts for n in p[2]], [s for p in parts for s in p[3]])

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank (so that every rank stops at the same iteration)."""
        if not self.active:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.collectives_device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def gather_states(self, state: dict[str, Any]) -> list[dict[str, Any]] | None:
        """Every rank's ``state`` (on the CPU), in rank order, on rank 0; None on the other ranks."""
        if not self.active:
            return [state]
        parts: list[Any] = [None] * self.world_size if self.is_main else None
        dist.gather_object(to_cpu(state), parts, dst=0)
        return parts

    def on_main(self, action: Callable[[], Any]) -> None:
        """Run ``action`` on rank 0 only; a ``ConfigError`` it raises is raised on every rank."""
        error = ""
        if self.is_main:
            try:
                action()
            except ConfigError as err:
                error = str(err)
        self.raise_shared(error)

    def raise_shared(self, error: str) -> None:
        """Raise ``ConfigError(error)`` on every rank where rank 0's ``error`` is not empty."""
        if self.active:
            message = [error]
            dist.broadcast_object_list(message, src=0, device=torch.device(self.collectives_device))
            error = message[0]
        if error:
            raise ConfigError(error)

    def scatter_states(self, load: Callable[[], list[dict[str, Any]]]) -> dict[str, Any]:
        """This rank's part of what ``load()`` returns on rank 0 (one state per rank). A ``ConfigError``
        that ``load`` raises on rank 0 is raised on every rank."""
        if not self.active:
            return load()[0]
        parts: list[Any] | None = None

        def load_parts() -> None:
            nonlocal parts
            parts = load()

        self.on_main(load_parts)
        received: list[Any] = [None]
        dist.scatter_object_list(received, parts, src=0)
        return received[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()
