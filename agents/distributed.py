"""What a learner computes over the whole batch of envs when the envs are split across processes.

Data-parallel training (``rlmem.distributed``) runs W processes (ranks) of one run; rank r steps the
envs ``[r·b, (r + 1)·b)`` of the run's B = W·b envs (``envs.base.EnvShard``) and keeps their memory
state and sensitivities. Everything a learner derives from the whole batch must then see every rank's
envs, through ``torch.distributed`` collectives on the default process group:

* update directions are averaged over ranks (``average_gradients``, a ``Learner.gradient_hook``):
  where a direction is a mean over envs, the mean over equal shards of their means is the mean over
  all B envs; a learner whose direction is a sum over envs (``Learner.gradients_sum_over_envs``)
  sums them instead;
* statistics over envs are global: ``all_sum`` / ``all_mean`` of per-rank sums or means,
  ``gather_envs`` of per-env rows in the global env order (running observation and return
  statistics merge all B rows, as one process would), ``normalize`` standardises advantages with the
  mean and variance of all ranks' values;
* a sampler draws each step's noise for all B envs and keeps its own rows
  (``agents.acting.sample_action`` with the env's shard), so actions are those of one process.

Without an initialised process group of more than one rank every function here is the identity and
the computation is exactly the one-process computation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

# Gradients travel in flat buckets of at most this many bytes: few collectives, bounded extra memory.
BUCKET_BYTES = 25 * 2**20


def world_size() -> int:
    """Ranks of the default process group; 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_sum(tensor: Tensor) -> Tensor:
    """Σ over ranks of ``tensor`` (a new tensor; ``tensor`` itself in one process)."""
    if world_size() == 1:
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def all_mean(tensor: Tensor) -> Tensor:
    """The mean over ranks of ``tensor``: the global mean of per-rank means over equal shards."""
    if world_size() == 1:
        return tensor
    return all_sum(tensor) / world_size()


def gather_envs(rows: Tensor) -> Tensor:
    """Every rank's ``rows`` [b, ...] stacked in rank order: [W·b, ...], the global env order."""
    if world_size() == 1:
        return rows
    parts = [torch.empty_like(rows) for _ in range(world_size())]
    dist.all_gather(parts, rows.contiguous())
    return torch.cat(parts)


def normalize(values: Tensor, eps: float = 1e-8) -> Tensor:
    """(x − mean) / (std + eps) with the mean and (unbiased) standard deviation of every rank's
    ``values`` together (two passes: the mean, then the squared deviations from it)."""
    if world_size() == 1:
        return (values - values.mean()) / (values.std() + eps)
    count = values.numel() * world_size()
    mean = all_sum(values.sum()) / count
    variance = all_sum((values - mean).pow(2).sum()) / (count - 1)
    return (values - mean) / (variance.sqrt() + eps)


def global_count(values: Tensor) -> int:
    """Elements of ``values`` over all ranks (equal shards)."""
    return values.numel() * world_size()


def reduce_gradients(gradients: Sequence[tuple[str, Tensor]], average: bool = True) -> None:
    """All-reduce the update directions in place (mean over ranks, or sum with ``average`` False),
    flattened into buckets of at most ``BUCKET_BYTES`` per dtype and device."""
    W = world_size()
    if W == 1:
        return
    buckets: dict[tuple[torch.dtype, torch.device], list[list[Tensor]]] = {}
    for _, gradient in gradients:
        groups = buckets.setdefault((gradient.dtype, gradient.device), [[]])
        size = sum(g.numel() for g in groups[-1]) * gradient.element_size()
        if groups[-1] and size + gradient.numel() * gradient.element_size() > BUCKET_BYTES:
            groups.append([])
        groups[-1].append(gradient)
    for groups in buckets.values():
        for bucket in groups:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            if average:
                flat /= W
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()


def average_gradients(gradients: Sequence[tuple[str, Tensor]]) -> None:
    """A ``Learner.gradient_hook``: the mean over ranks of every update direction."""
    reduce_gradients(gradients, average=True)


def sum_gradients(gradients: Sequence[tuple[str, Tensor]]) -> None:
    """A ``Learner.gradient_hook``: the sum over ranks (directions that sum over envs)."""
    reduce_gradients(gradients, average=False)
