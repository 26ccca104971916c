"""Co-registration results shared by the whole build: one measurement per (scene, window).

Every footprint of a co-registration window (`cmsrd.stages.CONTEXT_LEVELS` zooms up) in the same LR scene
shares one shift. Kept per process in memory (a lock per window, so a worker's threads do not measure the
same window twice) and on disk beside the journal (`<out>/.cmsrd/shift/`), so other worker processes (and
a resumed build whose resolved sources are the same: the key includes `BuildSpec.key`) read the result
instead of fetching and measuring the window again (~80 ms + two fetches). Two processes that reach a new
window at the same moment may both measure it (same result; the file is replaced atomically).
Only final results are stored (a measured shift, or NaN for an unmeasurable window): a window whose fetch
failed is not, so a later sample or run tries it again.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from pathlib import Path

from .io import atomic_write_bytes

Result = tuple[float, float, float, float]

_LOCK = threading.Lock()
_MEMORY: dict[tuple, Result] = {}
_KEY_LOCKS: dict[tuple, threading.Lock] = {}
MAX_MEMORY = 4096


def _file(directory: str, key: tuple) -> Path:
    name = hashlib.sha1(repr(key).encode()).hexdigest()[:20]
    return Path(directory) / f"{name}.json"


def _read(path: Path) -> Result | None:
    try:
        got = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # absent (or unreadable: measure again and replace it)
    return tuple(float(v) for v in got["shift"]) if len(got.get("shift", ())) == 4 else None


def shared_shift(directory: str | None, key: tuple, measure: Callable[[], Result]) -> Result:
    """The cached result for `key` (scene id, z, x, y), else `measure()` stored in memory and on disk.

    `directory` None keeps it in memory only. `measure` may raise: nothing is stored then."""
    mem_key = (directory, key)
    with _LOCK:
        got = _MEMORY.get(mem_key)
        if got is not None:
            return got
        lock = _KEY_LOCKS.setdefault(mem_key, threading.Lock())
    with lock:
        got = _MEMORY.get(mem_key)
        path = _file(directory, key) if directory else None
        if got is None and path is not None:
            got = _read(path)
        if got is None:
            got = tuple(float(v) for v in measure())
            if path is not None:  # json writes NaN as NaN and floats with repr: read back bit-identical
                atomic_write_bytes(path, json.dumps({"key": list(key), "shift": list(got)}).encode())
        with _LOCK:
            if len(_MEMORY) >= MAX_MEMORY:
                _MEMORY.pop(next(iter(_MEMORY)))
            _MEMORY[mem_key] = got
            _KEY_LOCKS.pop(mem_key, None)
    return got
