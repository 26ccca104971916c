"""Atomic file writes (temp file in the same directory + os.replace) and checksums.

Every writer in the toolkit goes through here so a killed process never leaves a half-written file
under its final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success rename it over `path`, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_png(path: str | os.PathLike, array: np.ndarray, palette: list[int] | None = None) -> None:
    """Write an HxW or HxWx3 uint8 array as PNG atomically (palette PNG when `palette` is given)."""
    from PIL import Image

    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        raise ValueError(f"write_png expects uint8, got {arr.dtype}")
    img = Image.fromarray(arr)
    if palette is not None:
        if arr.ndim != 2:
            raise ValueError("a palette PNG needs a 2-D index array")
        img.putpalette(palette)  # L -> P, index values kept
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def read_png(path: str | os.PathLike, indices: bool = False) -> np.ndarray:
    """PNG -> uint8 array: HxWx3 RGB, or with `indices=True` the raw HxW index/grey values (masks)."""
    from PIL import Image

    with Image.open(path) as img:
        if indices or img.mode == "L":
            return np.asarray(img)
        return np.asarray(img.convert("RGB"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
