"""Online normalisation by running statistics (the streaming-deep-RL recipe, Elsayed et al. 2024).

``RunningMeanStd`` merges batches of samples [n, *shape] into a running mean and variance with Chan et
al.'s parallel update: for a batch of n samples with mean m_b and Σ(x − m_b)² = M_b, merged into
count c, mean m and M = Σ(x − m)²,

    c' = c + n,   δ = m_b − m,   m' = m + δ n / c',   M' = M + M_b + δ² c n / c',   Var = M' / (c' − 1).

``NormalizedObservation`` turns raw vector observations into (x − m) / √(Var + ε) inside the network,
so that acting, replaying and evaluating all see the same statistics; the learner updates them.
Samples are rows of the run's envs: in data-parallel training every process merges all of them.
"""

from __future__ import annotations

import gymnasium as gym
import torch
from torch import Tensor, nn

from agents.distributed import gather_envs
from agents.networks import ObservationFloat
from rlmem.errors import ConfigError


class RunningMeanStd(nn.Module):
    """Running mean and variance of samples [n, *shape], merged batch by batch (Chan et al.'s update).

    float64 buffers, so that long runs do not lose precision; the variance is 1 until two samples."""

    def __init__(self, shape: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("sum_squares", torch.zeros(shape, dtype=torch.float64))  # Σ (x − mean)²
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, samples: Tensor) -> None:
        """Merge ``samples`` [n, *shape], one row per env; with the envs split across processes, every
        process's rows (``agents.distributed.gather_envs``), so that the statistics are the run's."""
        samples = gather_envs(samples).to(torch.float64)
        n = samples.shape[0]
        batch_mean = samples.mean(0)
        total = self.count + n
        delta = batch_mean - self.mean
        self.sum_squares += (samples - batch_mean).pow(2).sum(0) + delta.pow(2) * self.count * n / total
        self.mean += delta * n / total
        self.count.copy_(total)

    @property
    def var(self) -> Tensor:
        return torch.where(self.count < 2, 1.0, self.sum_squares / (self.count - 1).clamp(min=1.0))

    def normalize(self, x: Tensor, eps: float = 1e-8) -> Tensor:
        return ((x - self.mean) / (self.var + eps).sqrt()).to(x.dtype)


class NormalizedObservation(nn.Module):
    """Raw observations [N, *obs_shape] -> float [N, D], normalised by running statistics when enabled.

    The learner updates the statistics (``stats.update``) as observations arrive; ``forward`` only reads
    them, so acting, replaying and evaluating all see the same normalisation."""

    def __init__(self, space: gym.Space, normalize: bool) -> None:
        super().__init__()
        self.to_float = ObservationFloat(space)
        if self.to_float.kind == "image":
            raise ConfigError(
                f"learner 'stream_ac' needs vector observations, got the image space {space}; "
                "valid choices for images: actor_critic, ppo"
            )
        self.output_size = self.to_float.shape[0]
        self.normalize = normalize
        self.stats = RunningMeanStd((self.output_size,))

    def forward(self, obs: Tensor) -> Tensor:
        x = self.to_float(obs)
        return self.stats.normalize(x) if self.normalize else x
