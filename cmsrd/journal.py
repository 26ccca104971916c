"""Resumable builds: an append-only, fsync'd JSONL journal plus the build's identity and lock.

The driver appends one line per finished sample *after* its files are in place, and fsyncs it, so
after Ctrl-C, `kill -9` or a dead worker the journal lists exactly the samples that are complete. A
line cut off by a crash is dropped on reopen (the sample is simply redone). The last record of an id
wins, so a sample redone after a failure never yields two manifest rows.

`<out>/.cmsrd/build.json` stores the config fingerprint: resuming into a directory built from a
different config is refused before any work, unless `--force` clears the previous build.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import InputError
from .io import atomic_write_text

STATE_DIR = ".cmsrd"
JOURNAL = "journal.jsonl"
BUILD_JSON = "build.json"
LOCK = "lock"


class Journal:
    """Append-only JSONL of finished samples; `records()` maps id -> last record."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()
        self._fh = open(self.path, "a", encoding="utf-8")

    def _repair(self) -> None:
        """Drop a torn last line left by a crash mid-append."""
        if not self.path.exists():
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                cut = data.rfind(b"\n") + 1
                f.truncate(cut)
                f.flush()
                os.fsync(f.fileno())

    def append(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, default=_json_default, separators=(",", ":")) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def index(self) -> dict[str, tuple[int, str]]:
        """id -> (byte offset of its last record, qa_status); small enough for millions of samples."""
        out: dict[str, tuple[int, str]] = {}
        if not self.path.exists():
            return out
        with open(self.path, "rb") as f:
            offset = 0
            for line in f:
                if line.endswith(b"\n"):
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        rec = None
                    if isinstance(rec, dict) and "id" in rec:
                        out[str(rec["id"])] = (offset, str(rec.get("qa_status", "")))
                offset += len(line)
        return out

    def read_at(self, offsets: list[int]) -> Iterator[dict[str, Any]]:
        """Records at the given byte offsets, in the order given."""
        with open(self.path, "rb") as f:
            for off in offsets:
                f.seek(off)
                yield json.loads(f.readline())


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    return str(o)


class BuildState:
    """The hidden state directory of one output dir: identity, lock and journal."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.dir = self.out / STATE_DIR
        self._lock_fh = None

    @property
    def journal_path(self) -> Path:
        return self.dir / JOURNAL

    @property
    def build_json(self) -> Path:
        return self.dir / BUILD_JSON

    def lock(self) -> None:
        """One build per output dir; the OS drops the lock when the process dies (kill -9 included)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_fh = open(self.dir / LOCK, "w")
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_fh.close()
            self._lock_fh = None
            raise InputError(
                f"output dir {self.out}",
                "another `cmsrd build` is writing into it",
                "wait for it to finish or choose another --out",
            ) from None

    def unlock(self) -> None:
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    def precheck(self, config_fingerprint: str, force: bool) -> None:
        """The config half of `check_identity`, cheap enough to run before anything else (world
        generation, planning): a directory of another dataset is refused at once."""
        if force:
            return
        prev_fp = None
        if self.build_json.exists():
            prev_fp = str(json.loads(self.build_json.read_text()).get("fingerprint", ""))
            if prev_fp.split("-")[0] == config_fingerprint:
                return
        self.check_identity("", f"{config_fingerprint}-", {}, force=False)

    def check_identity(self, name: str, fingerprint: str, config: dict, force: bool) -> bool:
        """Record or verify which config this dir is built from. Returns True when resuming."""
        foreign = (self.out / "dataset.json").exists() and not self.build_json.exists()
        if self.build_json.exists():
            prev = json.loads(self.build_json.read_text())
            if prev.get("fingerprint") == fingerprint and not force:
                return True
            if not force:
                raise InputError(
                    f"output dir {self.out}",
                    f"holds dataset {prev.get('name')!r} built from a different config "
                    f"(fingerprint {prev.get('fingerprint')} != {fingerprint})",
                    "choose another --out, or pass --force to discard it and rebuild",
                )
        elif foreign and not force:
            raise InputError(
                f"output dir {self.out}",
                "holds a dataset not built by this cmsrd (no .cmsrd/build.json)",
                "choose another --out, or pass --force to overwrite it",
            )
        return False

    def reset(self, layout_dirs: list[Path]) -> None:
        """--force: remove the previous build's journal, manifest and image folders (only those)."""
        for p in layout_dirs:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        if self.journal_path.exists():
            self.journal_path.unlink()

    def write_identity(self, name: str, fingerprint: str, config: dict, versions: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            self.build_json,
            json.dumps(
                {"name": name, "fingerprint": fingerprint, "config": config, "versions": versions},
                indent=2,
                default=str,
            ),
        )
