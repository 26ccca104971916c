"""Exit statuses and one-line errors of the installed console scripts, run as a user runs them.

CliRunner calls the click command in-process and hides how `run_cli` turns a command's status into the
process's exit code, so these tests start `cmsrd` / `cmsrd-bench` in a subprocess (the venv's console
script where installed, else `python -m`), with this checkout first on PYTHONPATH.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cmsrd.testing import one_error_line as one_clear_error
from cmsrd.testing import run_console_script as run_script


@pytest.fixture
def dataset(tiny_dataset, tmp_path) -> Path:
    """The tiny dataset with the footprint bounds `cmsrd validate` checks (the tiny one leaves them out)."""
    from cmsrd.grid import tile_bounds_3857
    from cmsrd.layout import read_manifest, write_manifest

    root = tmp_path / "ds"
    shutil.copytree(tiny_dataset, root)
    df = read_manifest(root)
    for i, r in df.iterrows():
        df.loc[i, ["minx", "miny", "maxx", "maxy"]] = tile_bounds_3857(int(r["z"]), int(r["x"]), int(r["y"]))
    write_manifest(root, df)
    return root


def test_validate_exits_0_on_a_valid_dataset(dataset):
    res = run_script("cmsrd", "validate", str(dataset))
    assert res.returncode == 0, res.stderr
    assert "valid" in res.stdout


def _delete_png(root: Path) -> None:
    next(root.glob("test/hr_*/*.png")).unlink()


def _flip_byte(root: Path) -> None:
    p = next(root.glob("train/lr_*/*.png"))
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


def _truncate_png(root: Path) -> None:
    p = next(root.glob("train/hr_*/*.png"))
    p.write_bytes(p.read_bytes()[:40])


@pytest.mark.parametrize("damage", [_delete_png, _flip_byte])
def test_validate_exits_1_when_it_lists_problems(dataset, damage):
    damage(dataset)
    res = run_script("cmsrd", "validate", str(dataset))
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "problem:" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("name", ["manifest.parquet", "dataset.json"])
def test_garbage_metadata_is_one_clear_error(dataset, name):
    (dataset / name).write_bytes(b"\x00garbage\xff" * 10)
    res = run_script("cmsrd", "validate", str(dataset))
    assert res.returncode == 2
    assert name in one_clear_error(res)
