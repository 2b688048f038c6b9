"""Standard recurrent cores trained by truncated BPTT: ``gru``, ``lstm`` and ``none`` (no memory).

GRU and LSTM run through PyTorch's fused sequence modules (cuDNN on a GPU). Resets inside a window
split it into segments at the steps where any env resets (``reset_segments``); each segment is one
fused call, so a window without resets costs one call and resets never fall back to a per-step loop
over the whole window.

The fused modules have no batching rule for ``torch.func.vmap``; with ``fused = False`` a core runs its
window step by step through the same cell's functional form (PyTorch's gate equations written out, same
weights, same arithmetic up to rounding), which vmap batches (populations of learners use it).
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
    fused = True  # False: step by step through the cell's functional form (see the module docstring)

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
            if self.fused:
                y, packed = self.rnn(x[t0:t1], self._pack(state))
                state = self._unpack(packed)
            else:
                y, state = self._cell_steps(x[t0:t1], state)
            outputs.append(y)
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
        return y, {k: v.detach() for k, v in state.items()}

    def _cell_steps(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        raise NotImplementedError

    def _weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        rnn = self.rnn
        return rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0


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

    def _cell_steps(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        w_ih, w_hh, b_ih, b_hh = self._weights()
        drive = (x @ w_ih.t() + b_ih).chunk(3, dim=-1)  # r, z, n parts of W_i x + b_i, [T, B, H] each
        h, outputs = state["h"], []
        for t in range(x.shape[0]):
            r_h, z_h, n_h = (h @ w_hh.t() + b_hh).chunk(3, dim=-1)
            r, z = torch.sigmoid(drive[0][t] + r_h), torch.sigmoid(drive[1][t] + z_h)
            h = (1 - z) * torch.tanh(drive[2][t] + r * n_h) + z * h
            outputs.append(h)
        return torch.stack(outputs), {"h": h}


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

    def _cell_steps(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        w_ih, w_hh, b_ih, b_hh = self._weights()
        drive = x @ w_ih.t() + b_ih  # [T, B, 4H]
        h, c, outputs = state["h"], state["c"], []
        for t in range(x.shape[0]):
            i, f, g, o = (drive[t] + h @ w_hh.t() + b_hh).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        return torch.stack(outputs), {"h": h, "c": c}


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
