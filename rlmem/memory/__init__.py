"""Memory cores behind one contract (see ``rlmem.memory.base``). Importing this package registers them.

The cores on the RTRL engine (elstm, lru, ffm, ccn, cfc) share ``rlmem.memory.engine.EngineCore``;
gru, lstm and none (``rlmem.memory.rnn``) use the plain ``MemoryCore`` base.
"""

from rlmem.memory import (
    ccn,  # noqa: F401  (registers ccn)
    cfc,  # noqa: F401  (registers cfc)
    elstm,  # noqa: F401  (registers elstm)
    ffm,  # noqa: F401  (registers ffm)
    lru,  # noqa: F401  (registers lru)
    rnn,  # noqa: F401  (registers gru, lstm, none)
)
from rlmem.memory.base import (
    CORES,
    CoreOptions,
    MemoryCore,
    State,
    cat_states,
    clone_state,
    core_options,
    detach_state,
    make_core,
    register_core,
    reset_state,
    select_state,
)
from rlmem.memory.engine import SENSITIVITY, EngineCore

__all__ = [
    "CORES",
    "SENSITIVITY",
    "CoreOptions",
    "EngineCore",
    "MemoryCore",
    "State",
    "cat_states",
    "clone_state",
    "core_options",
    "detach_state",
    "make_core",
    "register_core",
    "reset_state",
    "select_state",
]
