"""torch Dataset over a built CMSRD dataset (the layout of `cmsrd.layout`).

Items are dicts of CHW float32 tensors in [0, 1] (`lr`, `sr`, `map`, `hr`), a long HxW `mask`, and the
sample `id`. Methods convert to their own ranges (SGDM maps to [-1, 1]); keeping one range here means
every method reads the same bytes the same way.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import InputError
from .io import read_png
from .layout import IMAGE_KINDS, DatasetLayout, read_dataset_json, read_manifest

DEFAULT_INPUTS = ("lr", "sr", "map", "hr")


def official_augment(arrays: dict[str, np.ndarray], rng: random.Random) -> dict[str, np.ndarray]:
    """SGDM's train-time augmentation (dataset/exps/util.py::transform_augment), same for every image:
    hflip p=0.5, vflip p=0.5, then with p=0.75 a rotation by a random choice of 90/180/270 degrees."""
    hflip = rng.random() < 0.5
    vflip = rng.random() < 0.5
    k = rng.choice((1, 2, 3)) if rng.random() < 0.75 else 0
    out = {}
    for key, a in arrays.items():
        if hflip:
            a = a[:, ::-1]
        if vflip:
            a = a[::-1, :]
        if k:
            a = np.rot90(a, k, axes=(0, 1))
        out[key] = np.ascontiguousarray(a)
    return out


class CMSRDDataset(Dataset):
    """Samples of one split whose `qa_status` is ok.

    Args:
        root: a dataset built by `cmsrd build`.
        split: "train" or "test".
        inputs: which images to load, any of lr, sr, map, mask, hr.
        scale: if given, must equal the dataset's scale (guards a x16 model against a x32 dataset).
        augment: apply the official SGDM flips/rotations (train only, in practice).
        ids: restrict to these sample ids (in this order).
        seed: seed of the augmentation stream (per-item streams derive from it and the index).
        transforms: callable applied to each sample dict last (torchgeo's convention: dict in, dict out).

    A sample holds `id`, the `inputs` as tensors (images float CHW in [0, 1], mask int64 HW), and as in torchgeo
    `crs` (the dataset's CRS string, EPSG:3857) and `bounds` (float64 tensor [minx, miny, maxx, maxy] of the
    tile footprint in that CRS; the default collate stacks it to N x 4).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        inputs: Sequence[str] = DEFAULT_INPUTS,
        scale: int | None = None,
        augment: bool = False,
        ids: Sequence[str] | None = None,
        seed: int = 0,
        transforms: Callable[[dict], dict] | None = None,
    ):
        if transforms is not None and not callable(transforms):
            raise InputError("transforms", f"is a {type(transforms).__name__}, not a callable", "pass a function")
        self.layout = DatasetLayout.open(root)
        unknown = set(inputs) - set(IMAGE_KINDS)
        if unknown:
            raise InputError(f"inputs {sorted(unknown)}", f"unknown; choose from {list(IMAGE_KINDS)}")
        if scale is not None and scale != self.layout.scale:
            raise InputError(
                f"dataset {root}",
                f"has scale x{self.layout.scale} ({self.layout.lr_px}->{self.layout.hr_px} px) "
                f"but x{scale} was asked for",
                f"use a x{scale} dataset or a x{self.layout.scale} method",
            )
        df = read_manifest(root)
        df = df[(df["split"] == split) & (df["qa_status"] == "ok")]
        available = list(df["id"].astype(str))
        if ids is not None:
            missing = sorted(set(ids) - set(available))
            if missing:
                raise InputError(f"ids {missing[:5]}", f"not ok samples of split {split!r} in {root}")
            available = list(ids)
        if not available:
            raise InputError(f"dataset {root}", f"has no ok samples in split {split!r}")
        self.ids = sorted(available) if ids is None else available
        self.split, self.inputs, self.augment, self.seed = split, tuple(inputs), augment, seed
        self.transforms, self.crs = transforms, str(read_dataset_json(root).get("crs", "EPSG:3857"))
        box = df.set_index(df["id"].astype(str))[["minx", "miny", "maxx", "maxy"]]
        self._bounds = {i: box.loc[i].to_numpy(dtype=np.float64) for i in self.ids}
        self._epoch = 0

    @property
    def scale(self) -> int:
        return self.layout.scale

    def set_epoch(self, epoch: int) -> None:
        """Vary the augmentation per epoch while keeping it reproducible."""
        self._epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def path(self, kind: str, index: int) -> Path:
        return self.layout.image_path(self.split, kind, self.ids[index])

    def __getitem__(self, index: int) -> dict:
        sid = self.ids[index]
        arrays = {k: read_png(self.layout.image_path(self.split, k, sid), indices=(k == "mask")) for k in self.inputs}
        if self.augment:
            rng = random.Random(hash((self.seed, self._epoch, index)) & 0xFFFFFFFF)
            arrays = official_augment(arrays, rng)
        item: dict = {"id": sid, "crs": self.crs, "bounds": torch.from_numpy(self._bounds[sid].copy())}
        for k, a in arrays.items():
            if k == "mask":
                item[k] = torch.from_numpy(a.astype(np.int64))
            else:
                item[k] = torch.from_numpy(np.array(a, copy=True)).permute(2, 0, 1).float().div_(255.0)
        return self.transforms(item) if self.transforms is not None else item
