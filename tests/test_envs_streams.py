"""Counter-based random streams (envs/streams.py): SplitMix64 exactly, uniform values, independent
streams, and draws that depend only on (key, counter)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from envs.streams import CounterStreams, mix64, stream_keys

MASK = (1 << 64) - 1


def splitmix64(state: int, count: int) -> list[int]:
    """The reference generator in Python integers (Steele, Lea & Flood 2014)."""
    out = []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & MASK
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        out.append(z ^ (z >> 31))
    return out


def test_each_stream_is_splitmix64_from_its_key():
    # the published first outputs from state 0
    assert splitmix64(0, 2) == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]
    keys = stream_keys(5, torch.arange(4))
    streams = CounterStreams(keys.clone())
    drawn = torch.cat([streams.bits(3), streams.bits(1), streams.bits(6)], dim=1)  # in pieces
    for b in range(4):
        assert [int(v) & MASK for v in drawn[b]] == splitmix64(int(keys[b]) & MASK, 10)
    assert streams.counters.tolist() == [10] * 4
    values = torch.randint(-(2**63), 2**63 - 1, (1000,), dtype=torch.int64)
    mixed = mix64(values)
    for i in range(0, 1000, 97):
        assert int(mixed[i]) & MASK == splitmix64((int(values[i]) - 0x9E3779B97F4A7C15) & MASK, 1)[0]


def test_values_are_uniform_and_in_range():
    streams = CounterStreams.seeded(1, torch.arange(64))
    u = streams.uniform(2000)
    assert u.dtype == torch.float32 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    k = streams.integers(24, 36, 2000)
    counts = np.bincount((k - 24).flatten().numpy(), minlength=13)
    assert int(k.min()) == 24 and int(k.max()) == 36
    expected = k.numel() / 13
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 40.0  # 12 degrees of freedom: p < 1e-4 beyond 40
    with pytest.raises(ValueError, match="range"):
        streams.integers(3, 2, 1)


@pytest.mark.parametrize("columns", [1, 3])
def test_integer_blocks_draw_what_the_calls_one_by_one_draw(columns: int):
    """The trace tasks draw a trial's ISI, ITI and pattern in one block: the streams stay as they were."""
    one_by_one, blocks = CounterStreams.seeded(5, torch.arange(6)), CounterStreams.seeded(5, torch.arange(6))
    ranges = [(24, 36), (80, 120), (0, 19)]
    expected = [one_by_one.integers(low, high, columns) for low, high in ranges]
    got = blocks.integer_blocks(ranges, columns)
    assert all(torch.equal(e, g) for e, g in zip(expected, got))
    assert torch.equal(one_by_one.counters, blocks.counters)


def test_streams_are_independent_of_each_other_and_of_the_batch():
    # env b's stream depends on (seed, b) only: a shard, a stack or a larger batch draws the same values
    whole = CounterStreams.seeded(9, torch.arange(8))
    shard = CounterStreams.seeded(9, torch.arange(3, 6))
    assert torch.equal(whole.bits(5)[3:6], shard.bits(5))
    stacked = CounterStreams.cat([CounterStreams.seeded(seed, torch.arange(8)) for seed in (9, 10)])
    other = CounterStreams.seeded(10, torch.arange(8))
    drawn = stacked.bits(5)
    assert torch.equal(drawn[8:], other.bits(5)) and not torch.equal(drawn[:8], drawn[8:])
    u = CounterStreams.seeded(2, torch.arange(2)).uniform(20000)
    assert abs(float(np.corrcoef(u[0].numpy(), u[1].numpy())[0, 1])) < 0.03


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gpu_draws_the_same_streams():
    on_cpu = CounterStreams.seeded(3, torch.arange(256))
    on_gpu = CounterStreams.seeded(3, torch.arange(256, device="cuda"))
    assert torch.equal(on_cpu.bits(7), on_gpu.bits(7).cpu())
    assert torch.equal(on_cpu.integers(80, 120, 5), on_gpu.integers(80, 120, 5).cpu())
    assert torch.equal(on_cpu.uniform(5), on_gpu.uniform(5).cpu())
