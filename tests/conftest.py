"""Fixtures several test files share."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import pytest
import torch

import rlmem.train


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks: one intra-op thread is several times faster than two (use with usefixtures)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def on_iteration(monkeypatch) -> Callable[..., None]:
    """``arm(call, before=..., after=...)``: in every learner ``rlmem.train`` builds from now on, run
    ``before(learner)`` ahead of the ``call``-th iteration and return ``after(result)`` instead of its
    result."""

    def arm(call: int, before: Callable[[Any], None] | None = None,
            after: Callable[[Any], Any] | None = None) -> None:
        original_build = rlmem.train.build

        def build(*args, **kwargs):
            env, learner, device = original_build(*args, **kwargs)
            iteration, calls = learner.iteration, []

            def hooked_iteration():
                calls.append(1)
                now = len(calls) == call
                if now and before is not None:
                    before(learner)
                result = iteration()
                return after(result) if now and after is not None else result

            learner.iteration = hooked_iteration
            return env, learner, device

        monkeypatch.setattr(rlmem.train, "build", build)

    return arm


@pytest.fixture
def interrupt_at(on_iteration) -> Callable[[int], None]:
    """``interrupt_at(call)``: Ctrl-C during the learner's ``call``-th iteration."""
    return lambda call: on_iteration(call, before=lambda learner: signal.raise_signal(signal.SIGINT))
