"""Standard recurrent cores trained by truncated BPTT: ``gru``, ``lstm`` and ``none`` (no memory).

GRU and LSTM run through PyTorch's fused sequence modules (cuDNN on a GPU). Resets inside a window
split it into segments at the steps where any env resets (``reset_segments``); each segment is one
fused call, so a window without resets costs one call and resets never fall back to a per-step loop
over the whole window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rlmem.memory.base import CoreOptions, MemoryCore, State, register_core, reset_segments


@dataclass
class RNNOptions(CoreOptions):
    pass


class _FusedRNNCore(MemoryCore):
    rnn: nn.RNNBase
    state_keys: tuple[str, ...]

    def initial_state(self, batch: int, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> State:
        dtype = dtype or self.rnn.weight_ih_l0.dtype
        return {k: torch.zeros(batch, self.hidden_size, device=device, dtype=dtype) for k in self.state_keys}

    def _pack(self, state: State):
        raise NotImplementedError

    def forward(self, x: Tensor, state: State, reset: Tensor) -> tuple[Tensor, State]:
        outputs = []
        for t0, t1 in reset_segments(reset):
            keep = (~reset[t0]).to(x.dtype).unsqueeze(-1)
            state = {k: v * keep for k, v in state.items()}
            y, packed = self.rnn(x[t0:t1], self._pack(state))
            state = self._unpack(packed)
            outputs.append(y)
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
        return y, {k: v.detach() for k, v in state.items()}


@register_core("gru", RNNOptions)
class GRUCore(_FusedRNNCore):
    """Gated recurrent unit (fused nn.GRU); learns by truncated BPTT within each window."""

    state_keys = ("h",)

    def __init__(self, options: RNNOptions, input_size: int) -> None:
        super().__init__(options, input_size)
        self.rnn = nn.GRU(input_size, options.hidden_size)

    def _pack(self, state: State):
        return state["h"].unsqueeze(0).contiguous()

    def _unpack(self, packed) -> State:
        return {"h": packed.squeeze(0)}


@register_core("lstm", RNNOptions)
class LSTMCore(_FusedRNNCore):
    """Long short-term memory (fused nn.LSTM); learns by truncated BPTT within each window."""

    state_keys = ("h", "c")

    def __init__(self, options: RNNOptions, input_size: int) -> None:
        super().__init__(options, input_size)
        self.rnn = nn.LSTM(input_size, options.hidden_size)

    def _pack(self, state: State):
        return state["h"].unsqueeze(0).contiguous(), state["c"].unsqueeze(0).contiguous()

    def _unpack(self, packed) -> State:
        h, c = packed
        return {"h": h.squeeze(0), "c": c.squeeze(0)}


@register_core("none", RNNOptions)
class NoMemoryCore(MemoryCore):
    """No memory: a feed-forward layer (Linear + tanh), the baseline that shows a task needs memory."""

    def __init__(self, options: RNNOptions, input_size: int) -> None:
        super().__init__(options, input_size)
        self.linear = nn.Linear(input_size, options.hidden_size)

    def initial_state(self, batch: int, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> State:
        return {}

    def forward(self, x: Tensor, state: State, reset: Tensor) -> tuple[Tensor, State]:
        return torch.tanh(self.linear(x)), {}
