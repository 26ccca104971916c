"""cmsrd.io atomic writers: final files get the usual mode (0o666 minus the umask), not mkstemp's 0600,
and a failed write leaves neither the final name nor a temp file behind."""

from __future__ import annotations

import os
import stat
import sys

import numpy as np
import pytest
import torch

from baselines.checkpoint import save_weights
from cmsrd.io import atomic_path, atomic_write_bytes, atomic_write_text, write_png

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")


@pytest.fixture
def restore_umask():
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_written_files_respect_the_umask(tmp_path, restore_umask, mask):
    os.umask(mask)
    want = 0o666 & ~mask
    atomic_write_text(tmp_path / "index.html", "<html></html>")
    atomic_write_bytes(tmp_path / "w.pth", b"\0" * 10)
    write_png(tmp_path / "sr.png", np.zeros((4, 4, 3), np.uint8))
    with atomic_path(tmp_path / "sub" / "leaderboard.csv") as tmp:
        tmp.write_text("a,b\n")  # writers that open the temp path themselves (pandas, PIL, matplotlib)
    save_weights(tmp_path / "model.safetensors", {"w": torch.zeros(2)})  # safetensors alone writes 0600
    for name in ("index.html", "w.pth", "sr.png", "sub/leaderboard.csv", "model.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want, name
    assert not list(tmp_path.rglob("*.part"))


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "out.csv") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_replaces_existing_file(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "one")
    atomic_write_text(tmp_path / "a.txt", "two")
    assert (tmp_path / "a.txt").read_text() == "two" and len(list(tmp_path.iterdir())) == 1
