"""Errors a user can cause. The CLI turns each into one message and exit status 2."""

from __future__ import annotations

import tempfile
from pathlib import Path


class ConfigError(ValueError):
    """A configuration, command-line or file error: the message names the key and the valid choices."""


# The TensorBoard text tag under which a population's member records that it diverged: the train loop
# writes it, and ``rlmem summary``/``rlmem plot`` read it to count the member as diverged.
DIVERGED_TAG = "diverged"


class TrainingDiverged(RuntimeError):
    """A loss, gradient, parameter or carried memory state stopped being finite.

    ``quantity`` names what (``"losses/value_loss"``, ``"gradient of core.weight"``, ``"memory state
    sensitivities/w"``); the training loop adds the step and the last good checkpoint, and the CLI
    turns it into one message and exit status 2.
    """

    def __init__(self, quantity: str) -> None:
        super().__init__(f"non-finite {quantity}")
        self.quantity = quantity


def writable_dir(path: Path, what: str) -> Path:
    """``path``, created if missing, once a file could be made in it. A folder the user named that cannot
    be written (a file in the way, no permission, a read-only mount) is a ConfigError that names
    ``what`` was to go there, raised before any work is done rather than when the results are written."""
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"cannot write {what} in {path}: {existing} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ConfigError(f"cannot write {what} in {path}: {err.strerror or err}") from None
    return path
