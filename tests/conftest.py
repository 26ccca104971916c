"""Shared fixtures. Real-sample tests read $CMSRD_SHARED_DATA (default ../shared/data) and skip cleanly when
it is absent."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CMSRD_SHARED_DATA", REPO.parent / "shared" / "data"))

# Never reach the network for weights in tests; tests make their own small weights.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample data not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _isolated_torch_home(tmp_path_factory, monkeypatch):
    """Weight caches point into a temp dir so tests never touch (or depend on) the user's cache."""
    home = tmp_path_factory.getbasetemp() / "torch_home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("TORCH_HOME", str(home))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A complete x16 dataset (64 px HR, 4 px LR; 6 train / 4 test) in the built-dataset layout."""
    from cmsrd.testing import make_tiny_dataset

    root = tmp_path_factory.mktemp("tiny_dataset")
    make_tiny_dataset(root)
    return root


@pytest.fixture(scope="session")
def small_world(tmp_path_factory) -> Path:
    """An offline world (`cmsrd.world` layout) of ~0.87 km x 0.87 km at 11.70 E, 48.40 N: 2 x 2 z16
    tiles, XYZ zooms 16-18, HR on the z18 grid (2048 px), two Sentinel-2 dates (2023-06-12 cloudy,
    2023-06-27 clear with a no-data corner). Generated once per session (~5-10 s on one core)."""
    from cmsrd.world.config import WorldConfig
    from cmsrd.world.generate import generate_world

    root = tmp_path_factory.mktemp("small_world") / "world"
    return generate_world(WorldConfig.small(), root, progress=False)


@pytest.fixture(scope="session")
def s2_world(small_world):
    """(root, world.json, truth.json) of `small_world`, for the Sentinel-2 source tests."""
    meta = json.loads((small_world / "world.json").read_text())
    truth = json.loads((small_world / "truth" / "truth.json").read_text())
    return small_world, meta, truth


@pytest.fixture(scope="session")
def world_server(small_world):
    """`small_world` served on 127.0.0.1 (ephemeral port) for the session, stopped at teardown.

    Shared by every test: compare `stats` before/after rather than resetting them, and a test that
    needs faults sets them and restores `set_faults(None)` in a finally (or starts its own
    `cmsrd.world.servers.serve_world`).
    """
    from cmsrd.world.servers import serve_world

    with serve_world(small_world) as srv:
        yield srv


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (the test machine is shared; tiny ops are faster single-threaded).
    Method test modules use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
