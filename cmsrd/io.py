"""Atomic file writes (temp file in the same directory + os.replace) and checksums.

Every writer in the toolkit goes through here so a killed process never leaves a half-written file
under its final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def _create_temp(path: Path) -> Path:
    """Create an empty, uniquely named `.<name>.<random>.part` file next to `path`.

    Unlike `tempfile.mkstemp` (always 0600, a mode `os.replace` would carry over to the final file), the
    file is created with 0o666 and the process umask applies, so published reports, SR images and a shared
    weights cache get the same permissions as any other file the user writes."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.part"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name next to {path}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success rename it over `path`, on error remove it.

    The final file has the usual mode (0o666 minus the umask), not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path)
    try:
        yield tmp
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


def write_png(
    path: str | os.PathLike, array: np.ndarray, palette: list[int] | None = None, compress_level: int = 6
) -> None:
    """Write an HxW or HxWx3 uint8 array as PNG atomically (palette PNG when `palette` is given).

    `compress_level` is zlib's 0-9 (lossless at any level: only the file size and the time change)."""
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
        img.save(tmp, format="PNG", compress_level=compress_level)


def read_png(path: str | os.PathLike, indices: bool = False) -> np.ndarray:
    """PNG -> uint8 array: HxWx3 RGB, or with `indices=True` the raw HxW index/grey values (masks).

    A missing, truncated or damaged file is an InputError naming it (PIL decodes lazily, so the pixels
    are loaded here, inside the guard, not later by whoever uses the array)."""
    from PIL import Image, UnidentifiedImageError

    from .errors import InputError

    try:
        with Image.open(path) as img:
            img.load()
            if indices or img.mode == "L":
                return np.asarray(img)
            return np.asarray(img.convert("RGB"))
    except FileNotFoundError:
        raise InputError(f"image {path}", "is missing", "rebuild the dataset (`cmsrd build` resumes)") from None
    except (UnidentifiedImageError, SyntaxError, ValueError, OSError) as e:
        raise InputError(
            f"image {path}",
            f"is damaged or not a PNG ({type(e).__name__}: {e})",
            "check it with `cmsrd validate` and rebuild the dataset (`cmsrd build` resumes)",
        ) from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
