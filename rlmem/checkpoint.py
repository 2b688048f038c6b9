"""Checkpoints: written atomically (temp file + rename) so a crash never leaves a half-written file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from rlmem.errors import ConfigError

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(run_dir: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``run_dir/checkpoint.pt`` atomically and return the path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CHECKPOINT_NAME
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=run_dir)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(run_dir: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        raise ConfigError(f"no checkpoint in {run_dir} (expected {path.name}); is this a run directory?")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # a truncated or foreign file
        raise ConfigError(f"cannot read checkpoint {path}: {err}") from None
