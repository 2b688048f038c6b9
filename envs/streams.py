"""Counter-based random streams: one independent SplitMix64 sequence per env, drawn for all envs at once.

Each env ``b`` of a batch owns a 64-bit key and a counter. Its stream is the SplitMix64 sequence
(Steele, Lea & Flood, OOPSLA 2014) started from the key,

    x_n = mix64(key_b + n·φ)    for n = 1, 2, …,      φ = 0x9E3779B97F4A7C15 (the golden-ratio increment)
    mix64(z) = z' ^ (z' >> 31),  z' = (z'' ^ (z'' >> 27))·0x94D049BB133111EB,  z'' = (z ^ (z >> 30))·0xBF58476D1CE4E5B9

(arithmetic mod 2^64, logical shifts), and a draw of ``k`` values per env takes the env's next ``k``
outputs. The key is ``mix64(mix64(seed) + (index + 1)·φ)``: a hash of the stream's seed and the env's
index in its run's whole batch.

Why not ``torch.Generator``: a generator is one sequential state, so independent streams (the members
of a population, each with the stream it has alone) need one generator call per stream and step, which
at P = 1,024 members was 40 % of a population step on a CPU and would be P kernel launches per draw on
a GPU. Here every value is a pure function of (key, counter), so one batch of tensor ops draws for any
number of streams, a stack of tasks is a concatenation of their keys and counters, a shard of a batch
computes only its own rows, and the state to save is the counters.

Values: ``uniform`` gives float32 in [0, 1) from the top 24 bits; ``integers(low, high)`` gives
``low + ⌊(x >> 32)·n / 2^32⌋`` with ``n = high − low + 1`` (the multiply-shift range reduction; its
bias is below n / 2^32).
"""

from __future__ import annotations

import torch
from torch import Tensor

_MASK = (1 << 64) - 1


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    value &= _MASK
    return value - (1 << 64) if value >> 63 else value


GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX_1 = _signed(0xBF58476D1CE4E5B9)
_MIX_2 = _signed(0x94D049BB133111EB)


def _shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: Tensor) -> Tensor:
    """SplitMix64's output function on int64 tensors (multiplication wraps mod 2^64)."""
    x = (x ^ _shift_right(x, 30)) * _MIX_1
    x = (x ^ _shift_right(x, 27)) * _MIX_2
    return x ^ _shift_right(x, 31)


def stream_keys(seed: int, indices: Tensor) -> Tensor:
    """The keys [B] of the streams of envs ``indices`` [B] (their indices in the run's whole batch)."""
    seed_word = mix64(torch.tensor(_signed(seed), dtype=torch.int64, device=indices.device))
    return mix64(seed_word + (indices.to(torch.int64) + 1) * GOLDEN)


class CounterStreams:
    """The streams of a batch of envs: ``keys`` and ``counters`` [B] int64 (outputs drawn so far)."""

    def __init__(self, keys: Tensor, counters: Tensor | None = None) -> None:
        self.keys = keys
        self.counters = torch.zeros_like(keys) if counters is None else counters

    @classmethod
    def seeded(cls, seed: int, indices: Tensor) -> CounterStreams:
        return cls(stream_keys(seed, indices))

    @classmethod
    def cat(cls, parts: list[CounterStreams]) -> CounterStreams:
        """The streams of several batches as one (each keeps its own sequence)."""
        return cls(torch.cat([p.keys for p in parts]), torch.cat([p.counters for p in parts]))

    def rows(self, rows: slice) -> CounterStreams:
        return CounterStreams(self.keys[rows].clone(), self.counters[rows].clone())

    def bits(self, columns: int) -> Tensor:
        """Every env's next ``columns`` outputs: int64 [B, columns]."""
        offsets = torch.arange(1, columns + 1, dtype=torch.int64, device=self.keys.device)
        outputs = mix64(self.keys.unsqueeze(1) + (self.counters.unsqueeze(1) + offsets) * GOLDEN)
        self.counters = self.counters + columns
        return outputs

    def uniform(self, columns: int) -> Tensor:
        """float32 [B, columns] in [0, 1)."""
        return uniform_from_bits(self.bits(columns))

    def integers(self, low: int, high: int, columns: int) -> Tensor:
        """int64 [B, columns] in {low, …, high}."""
        (values,) = self.integer_blocks([(low, high)], columns)
        return values

    def integer_blocks(self, ranges: list[tuple[int, int]], columns: int) -> list[Tensor]:
        """``integers(low, high, columns)`` for each (low, high) of ``ranges`` in turn, from one draw of
        every env's next ``len(ranges) · columns`` outputs: the same values as those calls one by one."""
        outputs = self.bits(len(ranges) * columns)
        return [integers_from_bits(outputs[:, i * columns:(i + 1) * columns], low, high)
                for i, (low, high) in enumerate(ranges)]


def uniform_from_bits(outputs: Tensor) -> Tensor:
    """Stream outputs (int64, any shape) as float32 uniforms in [0, 1), as ``uniform`` draws them."""
    return _shift_right(outputs, 40).to(torch.float32) * 2.0**-24


def integers_from_bits(outputs: Tensor, low: int, high: int) -> Tensor:
    """Stream outputs (int64, any shape) as int64 in {low, …, high}, as ``integers`` draws them."""
    count = high - low + 1
    if not 1 <= count < 2**31:
        raise ValueError(f"integers({low}, {high}): the range must hold 1 to 2^31 - 1 values")
    return low + _shift_right(_shift_right(outputs, 32) * count, 32)
