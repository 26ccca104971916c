"""Shared fixtures. Real-sample tests read ../shared/data and skip cleanly when it is absent."""

from __future__ import annotations

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
