"""Checkpoints: plain data, checked finite, written atomically, read without running any code.

A checkpoint is one dict with the keys of ``CHECKPOINT_KEYS``::

    learner      the learner's state_dict() (networks, optimizer, carried memory state, its generators)
    network      the network's state_dict() (what ``rlmem eval`` loads)
    env          the env's state_dict(), or None for an env that cannot snapshot itself
    global_step  env steps so far, all envs together (int)
    iteration    learner iterations so far (int)
    rng          the global generators: python, numpy, torch (and cuda)
    config       the resolved run config (``RunConfig.to_dict()``)

A run of W > 1 data-parallel ranks (``rlmem.distributed``) saves rank 0's learner, env and rng in
those keys and adds ``world_size`` (W) and ``ranks``: ``[{"learner", "env", "rng"}, ...]`` of ranks
1..W−1 (each rank's envs, memory state and sensitivities are its own).

**Plain data.** Everything in it is a tensor or a plain container or scalar (dict, list, tuple, str,
bytes, int, float, bool, None), so that it loads with ``torch.load(..., weights_only=True)``: opening a
run dir that someone else wrote never unpickles a class, so it cannot run code. Numpy values (numpy's
global RNG state holds an array; env and learner states may hold arrays or scalars) are converted at
this boundary, generically: ``to_plain`` turns an array into ``{NUMPY_TAG: {"dtype", "shape",
"data"}}`` (the raw bytes, so the round trip is exact) and ``from_plain`` turns it back. Any other type
is a programming error and fails when the checkpoint is written, naming its key path.

**Finite.** ``save_checkpoint`` walks the payload's floating (and complex) tensors first; the first one
holding a NaN or an infinity raises ``TrainingDiverged`` naming its key path (``learner/network/
core.weight``), and the previous checkpoint stays as it was.

**Atomic.** The file is written to a temporary name, flushed to disk and renamed over
``checkpoint.pt``: a crash leaves either the old checkpoint or the new one, never half of one.

**One trainer per run dir.** ``exclusive_run_dir`` holds an exclusive lock on ``RUN_DIR/.lock`` while
a process trains there, so a second one (a ``--resume`` started before a stopping run has saved, say)
stops with one message instead of interleaving its checkpoints and event files with the first's. The
operating system releases the lock when the holder exits, however it exits.

**Checked on load.** A file that is not a checkpoint this code writes (foreign, truncated, holding a
pickled object, or lacking one of ``CHECKPOINT_KEYS``) raises ``ConfigError`` with one message naming
the file and what is wrong.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import re
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlmem.errors import ConfigError, TrainingDiverged, writable_dir

CHECKPOINT_NAME = "checkpoint.pt"
LOCK_NAME = ".lock"
CHECKPOINT_KEYS = ("learner", "network", "env", "global_step", "iteration", "rng", "config")
NUMPY_TAG = "__numpy__"
_SCALARS = (str, bytes, int, float, complex, bool, type(None))


# --------------------------------------------------------------------------------------------------
# Plain data


def to_plain(value: Any, key_path: str = "") -> Any:
    """``value`` with every numpy array or scalar replaced by a tagged dict of plain data.

    Tensors, dicts (with str or int keys), lists, tuples and plain scalars pass through (containers are
    rebuilt); any other type raises ``TypeError`` naming ``key_path``.
    """
    if isinstance(value, (torch.Tensor, *_SCALARS)):
        return value
    if isinstance(value, np.ndarray | np.generic):
        array = np.asarray(value)
        if array.dtype.hasobject or array.dtype.fields is not None:
            raise TypeError(f"checkpoint entry {key_path or '/'}: cannot store a numpy array of dtype {array.dtype}")
        return {NUMPY_TAG: {"dtype": array.dtype.str, "shape": list(array.shape), "scalar": array.ndim == 0
                            and isinstance(value, np.generic), "data": np.ascontiguousarray(array).tobytes()}}
    if isinstance(value, Mapping):
        plain = {}
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise TypeError(f"checkpoint entry {key_path or '/'}: cannot store a key of type {type(key).__name__}")
            plain[key] = to_plain(item, _join(key_path, key))
        return _like(value, plain)
    if isinstance(value, list | tuple):
        items = [to_plain(item, _join(key_path, i)) for i, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(f"checkpoint entry {key_path or '/'}: cannot store a {type(value).__name__} as plain data")


def from_plain(value: Any) -> Any:
    """The inverse of :func:`to_plain`: tagged dicts become numpy arrays (or scalars) again."""
    if isinstance(value, dict):
        if set(value) == {NUMPY_TAG}:
            spec = value[NUMPY_TAG]
            array = np.frombuffer(spec["data"], dtype=np.dtype(spec["dtype"])).reshape(spec["shape"]).copy()
            return array[()] if spec["scalar"] else array
        return _like(value, {key: from_plain(item) for key, item in value.items()})
    if isinstance(value, list):
        return [from_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(from_plain(item) for item in value)
    return value


def _like(original: Mapping, items: dict) -> dict:
    """``items`` as a dict, or as an OrderedDict with the original's ``_metadata`` (module state_dicts keep
    their version numbers there, which ``load_state_dict`` reads)."""
    if not isinstance(original, OrderedDict):
        return items
    ordered = OrderedDict(items)
    if hasattr(original, "_metadata"):
        ordered._metadata = original._metadata  # type: ignore[attr-defined]
    return ordered


def first_non_finite(value: Any, key_path: str = "") -> str | None:
    """The key path of the first floating or complex tensor (or float) holding a NaN or an infinity."""
    if isinstance(value, torch.Tensor):
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            return key_path or "/"
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else key_path or "/"
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = first_non_finite(item, _join(key_path, key))
        if found is not None:
            return found
    return None


def _join(key_path: str, key: Any) -> str:
    return f"{key_path}/{key}" if key_path else str(key)


# --------------------------------------------------------------------------------------------------
# Files


def save_checkpoint(run_dir: Path, payload: dict[str, Any]) -> Path:
    """Check ``payload`` finite, write it to ``run_dir/checkpoint.pt`` atomically and return the path.

    Raises ``TrainingDiverged`` (nothing written) for a non-finite entry.
    """
    non_finite = first_non_finite(payload)
    if non_finite is not None:
        raise TrainingDiverged(f"checkpoint entry {non_finite}")
    plain = to_plain(payload)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CHECKPOINT_NAME
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=run_dir)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(plain, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(run_dir: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint of ``run_dir``, read as plain data only and checked for every key it must hold."""
    path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        raise ConfigError(f"no checkpoint in {run_dir} (expected {path.name}); is this a run directory?")
    try:
        with warnings.catch_warnings():  # one message below, not the unpickler's warnings about a foreign file
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only refused something that is not plain data: a pickled object may run code when loaded.
        named = re.search(r"GLOBAL ([\w.]+)", str(err))
        detail = f" ({named.group(1)})" if named else ""
        raise ConfigError(
            f"refusing to load checkpoint {path}: it holds a pickled object{detail} besides tensors and plain "
            "data, and loading it could run code; rlmem writes plain data only (a checkpoint of an older rlmem "
            "cannot be resumed)"
        ) from None
    except Exception as err:  # the unpickler fails in many ways on a foreign or truncated file
        first_line = (str(err).splitlines() or [""])[0]
        raise ConfigError(
            f"cannot read checkpoint {path}: truncated or not a checkpoint ({type(err).__name__}: {first_line})"
        ) from None
    problem = _schema_problem(checkpoint)
    if problem is not None:
        raise ConfigError(f"checkpoint {path} is not a complete rlmem checkpoint: {problem}")
    return from_plain(checkpoint)


def _schema_problem(checkpoint: Any) -> str | None:
    """What is wrong with a loaded checkpoint's layout, or None."""
    if not isinstance(checkpoint, dict):
        return f"it holds a {type(checkpoint).__name__}, not a dict of {', '.join(CHECKPOINT_KEYS)}"
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        return f"missing {', '.join(missing)}"
    for key in ("global_step", "iteration"):
        value = checkpoint[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"{key} must be a non-negative int, got {value!r}"
    for key in ("learner", "network", "rng", "config"):
        if not isinstance(checkpoint[key], dict):
            return f"{key} must be a dict, got {type(checkpoint[key]).__name__}"
    missing_rng = [key for key in ("python", "numpy", "torch") if key not in checkpoint["rng"]]
    if missing_rng:
        return f"rng is missing {', '.join(missing_rng)}"
    if checkpoint["env"] is not None and not isinstance(checkpoint["env"], dict):
        return f"env must be a dict or None, got {type(checkpoint['env']).__name__}"
    return None


@contextlib.contextmanager
def exclusive_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir`` (created if missing) for this process; raise ``ConfigError`` if another holds it.

    An advisory ``flock`` on ``RUN_DIR/.lock``, which names the holder's pid. Where there is no
    ``fcntl`` (Windows) nothing is locked."""
    writable_dir(run_dir, "the run")
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(run_dir / LOCK_NAME, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise ConfigError(
                f"run dir {run_dir} is in use by {holder}: wait until it has stopped (after Ctrl-C it finishes "
                "its iteration and saves first), or choose another train.run_dir"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"process {os.getpid()}\n")
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
