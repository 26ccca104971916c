"""CMSRDDataset over a built dataset: items, ranges, scale guard, official augmentation."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from cmsrd.data import CMSRDDataset, official_augment
from cmsrd.errors import InputError
from cmsrd.grid import tile_bounds_3857


def test_items_have_the_contract_shapes_and_ranges(tiny_dataset):
    ds = CMSRDDataset(tiny_dataset, "train", inputs=("lr", "sr", "map", "mask", "hr"), scale=16)
    assert len(ds) == 6 and ds.scale == 16
    item = ds[0]
    assert item["lr"].shape == (3, 4, 4) and item["sr"].shape == (3, 64, 64)
    assert item["map"].shape == (3, 64, 64) and item["hr"].shape == (3, 64, 64)
    assert item["mask"].shape == (64, 64) and item["mask"].dtype == torch.int64
    for k in ("lr", "sr", "map", "hr"):
        assert item[k].dtype == torch.float32 and 0.0 <= item[k].min() and item[k].max() <= 1.0
    assert item["id"] == ds.ids[0]
    assert len(CMSRDDataset(tiny_dataset, "test")) == 4


def test_scale_mismatch_and_unknown_inputs_are_clear_errors(tiny_dataset):
    with pytest.raises(InputError, match="x16.*x32"):
        CMSRDDataset(tiny_dataset, "train", scale=32)
    with pytest.raises(InputError, match="unknown"):
        CMSRDDataset(tiny_dataset, "train", inputs=("lr", "depth"))
    with pytest.raises(InputError, match="no ok samples"):
        CMSRDDataset(tiny_dataset, "val")


def test_augmentation_is_the_same_for_every_image_and_reproducible(tiny_dataset):
    from cmsrd.classes import CLASSES

    palette = torch.zeros(256, 3)
    for c in CLASSES:
        palette[c.id] = torch.tensor(c.rgb, dtype=torch.float32)
    plain = CMSRDDataset(tiny_dataset, "train", inputs=("map", "mask", "hr"))
    aug = CMSRDDataset(tiny_dataset, "train", inputs=("map", "mask", "hr"), augment=True, seed=3)
    changed = 0
    for i in range(len(plain)):
        b = aug[i]
        assert torch.equal(b["map"], aug[i]["map"])  # reproducible for (seed, epoch, index)
        # map and mask went through the same flips/rotation: colours still equal palette[mask]
        assert torch.equal((b["map"] * 255).round().permute(1, 2, 0), palette[b["mask"]])
        changed += not torch.equal(plain[i]["hr"], b["hr"])
    assert changed > 0


def test_official_augment_transform_set():
    """hflip/vflip then rotation: every outcome is one of the 8 dihedral transforms, all reachable."""
    a = np.arange(9).reshape(3, 3)
    outcomes = {official_augment({"x": a}, random.Random(s))["x"].tobytes() for s in range(400)}
    dihedral = {np.rot90(f, k).tobytes() for f in (a, a[:, ::-1]) for k in range(4)}
    assert outcomes == dihedral


def test_truncated_png_is_one_clear_error(tiny_dataset, tmp_path):
    import shutil

    root = tmp_path / "ds"
    shutil.copytree(tiny_dataset, root)
    ds = CMSRDDataset(root, "train")
    p = ds.path("hr", 0)
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(InputError) as ei:
        ds[0]
    assert p.name in str(ei.value) and "cmsrd validate" in str(ei.value)
    p.unlink()
    with pytest.raises(InputError, match="is missing"):
        ds[0]


def test_samples_have_torchgeo_style_crs_bounds_and_transforms(tiny_dataset):
    from torch.utils.data import DataLoader

    from cmsrd.layout import read_manifest

    ds = CMSRDDataset(tiny_dataset, "train", inputs=("lr", "hr"))
    item = ds[0]
    row = read_manifest(tiny_dataset).set_index("id").loc[item["id"]]
    assert item["crs"] == "EPSG:3857"
    assert item["bounds"].dtype == torch.float64
    assert item["bounds"].tolist() == [row.minx, row.miny, row.maxx, row.maxy]
    assert item["bounds"].tolist() == list(tile_bounds_3857(int(row.z), int(row.x), int(row.y)))
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["bounds"].shape == (2, 4) and batch["crs"] == ["EPSG:3857"] * 2

    def flip(sample: dict) -> dict:
        return {**sample, "hr": sample["hr"].flip(-1), "seen": True}

    t = CMSRDDataset(tiny_dataset, "train", inputs=("lr", "hr"), transforms=flip)[0]
    assert t["seen"] and torch.equal(t["hr"], item["hr"].flip(-1)) and torch.equal(t["lr"], item["lr"])
    with pytest.raises(InputError, match="transforms"):
        CMSRDDataset(tiny_dataset, "train", transforms="flip")
