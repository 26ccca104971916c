"""Exit statuses and one-line errors of the installed console scripts, run as a user runs them.

CliRunner calls the click command in-process and hides how `run_cli` turns a command's status into the
process's exit code, so these tests start `cmsrd` / `cmsrd-bench` in a subprocess (the venv's console
script where installed, else `python -m`), with this checkout first on PYTHONPATH.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cmsrd.errors import InputError
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


@pytest.mark.parametrize("damage", [_delete_png, _flip_byte, _truncate_png])
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


def _demo_preset(tmp_path: Path, **changes) -> Path:
    import yaml

    from cmsrd.config import PRESETS_DIR

    d = yaml.safe_load((PRESETS_DIR / "demo-real.yaml").read_text())
    d.update(changes)
    p = tmp_path / "preset.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def test_build_input_errors_are_one_line_and_leave_nothing_behind(tmp_path):
    out = tmp_path / "out"
    typo = _demo_preset(tmp_path, world={"faults": {"eror_rate": 0.2}})
    res = run_script("cmsrd", "build", str(typo), "--out", str(out), "--quiet")
    assert res.returncode == 2 and "error_rate" in one_clear_error(res)
    assert not out.exists()
    res = run_script("cmsrd", "build", str(tmp_path), "--out", str(out))  # a folder as the preset
    assert res.returncode == 2 and "is a folder" in one_clear_error(res)
    afile = tmp_path / "afile"
    afile.write_text("x")
    res = run_script("cmsrd", "build", "demo-synthetic", "--out", str(afile / "ds"), "--quiet")
    assert res.returncode == 2 and "which is a file" in one_clear_error(res)
    aoi = tmp_path / "list.geojson"
    aoi.write_text("[1, 2]")
    listed = _demo_preset(tmp_path, aois=[str(aoi)], world=None, lr={"source": "bicubic"})
    res = run_script("cmsrd", "build", str(listed), "--out", str(out), "--quiet")
    assert res.returncode == 2 and "list.geojson" in one_clear_error(res)
    assert not out.exists()
    res = run_script("cmsrd", "build", "demo-synthetic", "--out", str(out), "--limit", "0")
    assert res.returncode == 2 and "--limit" in one_clear_error(res)
    assert not out.exists()


def test_a_fresh_output_dir_is_removed_when_the_build_cannot_start(tmp_path, monkeypatch):
    """A failure after the lock was taken (here: an output dir of another dataset cannot happen in a fresh
    dir, so the world's serving fails) removes the dir the command created, lock included."""
    from click.testing import CliRunner

    from cmsrd import driver
    from cmsrd.cli import cli

    def boom(*a, **k):
        from cmsrd.journal import BuildState

        BuildState(tmp_path / "out").lock()  # what run_build does first
        raise InputError("credentials", "rejected", "set them")

    monkeypatch.setattr(driver, "run_build", boom)
    res = CliRunner().invoke(cli, ["build", "demo-synthetic", "--out", str(tmp_path / "out"), "--quiet"])
    assert isinstance(res.exception, InputError)
    assert not (tmp_path / "out").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    res = CliRunner().invoke(cli, ["build", "demo-synthetic", "--out", str(kept), "--quiet"])
    assert kept.is_dir()  # it existed before: not ours to delete


def test_disk_full_is_one_line(monkeypatch, capsys):
    import errno

    import click

    from cmsrd.clitools import run_cli

    @click.group()
    def grp():
        pass

    @grp.command("write")
    def write():
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/x.png")

    monkeypatch.setattr("sys.argv", ["cmsrd", "write"])
    with pytest.raises(SystemExit) as ei:
        run_cli(grp)
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: /data/out/x.png: the disk is full") and "Traceback" not in err
