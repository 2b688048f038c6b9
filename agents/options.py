"""Validation of learner options: every check names the option as the user writes it (``agent.<name>``)
and raises ``ConfigError``, which the CLI turns into one line and exit status 2.

An options dataclass validates itself in ``__post_init__``, mostly with one ``check_options`` call
that groups its options by the range they must lie in; ranges of their own use ``check_number``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rlmem.errors import ConfigError


def check_number(name: str, value: Any, low: float, high: float = math.inf, *, low_open: bool = False,
                 high_open: bool = False, integer: bool = False) -> None:
    """Validate the learner option ``agent.<name>`` lies in [low, high] (either end open on request);
    ConfigError if not."""
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}"
        if high != math.inf:
            bound += f" and {'<' if high_open else '<='} {high}"
        raise ConfigError(f"agent.{name} must be {'an integer' if integer else 'a number'} {bound}, got {value!r}")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """Validate the learner option ``agent.<name>`` is one of ``choices``; ConfigError if not."""
    if value not in choices:
        raise ConfigError(f"agent.{name} must be one of {', '.join(choices)}; got {value!r}")


def check_flags(options: Any, *names: str) -> None:
    """Validate the learner options ``agent.<name>`` are booleans; ConfigError naming the first that is not."""
    for name in names:
        if not isinstance(getattr(options, name), bool):
            raise ConfigError(f"agent.{name} must be true or false, got {getattr(options, name)!r}")


def check_options(options: Any, *, counts: Sequence[str] = (), positive: Sequence[str] = (),
                  non_negative: Sequence[str] = (), unit_interval: Sequence[str] = (),
                  flags: Sequence[str] = ()) -> None:
    """Validate the named attributes of ``options``: ``counts`` integers >= 1, ``positive`` numbers > 0,
    ``non_negative`` numbers >= 0, ``unit_interval`` numbers in [0, 1], ``flags`` booleans."""
    for name in counts:
        check_number(name, getattr(options, name), 0, low_open=True, integer=True)
    for name in positive:
        check_number(name, getattr(options, name), 0.0, low_open=True)
    for name in non_negative:
        check_number(name, getattr(options, name), 0.0)
    for name in unit_interval:
        check_number(name, getattr(options, name), 0.0, 1.0)
    check_flags(options, *flags)
