"""Set-level distribution metrics: FID, KID and patch-FID through torch-fidelity.

Settings are fixed and recorded, because FID numbers are only comparable under the same ones:
feature extractor `inception-v3-compat` (the TF 2015-12-05 Inception graph), feature layer `2048`
(pool3), images as uint8 3xHxW resized by torch-fidelity to 299x299 with its TF1.x-compatible bilinear
("legacy TF" mode, not clean-fid's PIL bicubic). KID uses an unbiased polynomial-kernel MMD over
`kid_subsets` random subsets (`kid_subset_size`: half the set, at least 2 and at most 1000, so that the
subsets of a remote-sensing test set differ and their spread means something; the size used is recorded
in the outputs). FID on N < 2048 images has a rank-deficient covariance: valid
for comparing methods on the same set, not with published numbers; patch-FID (non-overlapping PxP
crops of every image) is offered for such small sets.

Images are given as uint8 HxWx3 arrays or as PNG paths; paths are decoded lazily while torch-fidelity
iterates, so memory stays bounded by its batch, not by the split.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from baselines.weights import resolve
from cmsrd.errors import InputError
from cmsrd.io import read_png

FIDELITY_WEIGHTS = ("fidelity_inception",)
FEATURE_EXTRACTOR = "inception-v3-compat"
FEATURE_LAYER = "2048"
RESIZE_MODE = "torch-fidelity TF1.x-compatible bilinear to 299x299 (legacy TF mode), uint8 input"
KID_SUBSETS = 100
KID_MAX_SUBSET = 1000
FID_SEED = 2020  # torch-fidelity's rng seed (KID subset draws); named in the `kid` definition run.json records
MIN_PATCH = 16

Image = np.ndarray | str | os.PathLike  # a uint8 HxWx3 array, or the path of a PNG read on access


def _shape(img: Image) -> tuple[int, int]:
    """(H, W) of an array, or of a PNG from its header (no decode)."""
    if isinstance(img, np.ndarray):
        return img.shape[0], img.shape[1]
    from PIL import Image as PILImage

    with PILImage.open(img) as im:
        return im.height, im.width


class _UInt8Images(Dataset):
    """uint8 images (arrays, or PNG paths decoded on access) served as the 3xHxW uint8 tensors
    torch-fidelity requires, whole or as non-overlapping `patch` x `patch` crops. The last decoded image
    is kept, so the crops of one image (and torch-fidelity's probe of item 0) decode it once; `bar`
    counts decoded images."""

    def __init__(self, images: Sequence[Image], patch: int | None = None, bar: tqdm | None = None):
        self.images, self.patch, self.bar = images, patch, bar
        self._last: tuple[int, np.ndarray] | None = None
        if patch is None:
            self.index = [(k, 0, 0) for k in range(len(images))]
        else:
            self.index = [
                (k, y, x)
                for k, img in enumerate(images)
                for h, w in [_shape(img)]
                for y in range(0, h - patch + 1, patch)
                for x in range(0, w - patch + 1, patch)
            ]

    def _image(self, k: int) -> np.ndarray:
        if self._last is None or self._last[0] != k:
            img = self.images[k]
            self._last = (k, img if isinstance(img, np.ndarray) else read_png(img))
            if self.bar is not None:
                self.bar.update(1)
        return self._last[1]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> torch.Tensor:
        k, y, x = self.index[i]
        img = self._image(k)
        if self.patch is not None:
            img = img[y : y + self.patch, x : x + self.patch]
        return torch.tensor(img).permute(2, 0, 1).contiguous()  # a copy: inputs may be read-only views


def kid_subset_size(n: int) -> int:
    """KID subset size for n images: n // 2, at least 2 and at most 1000 (the usual size).

    Subsets of (nearly) all n images would be (nearly) the same set in every draw (MMD ignores order):
    100 (nearly) identical estimates and a std close to 0 that looks like precision."""
    return min(KID_MAX_SUBSET, max(2, n // 2))


def kid_has_spread(n: int, subset: int | None = None) -> bool:
    """Whether KID's subsets of `subset` (default `kid_subset_size(n)`) out of n images differ, so that
    kid_std means something; subsets of the whole set are all the same set."""
    return (subset or kid_subset_size(n)) < n


def patch_size_for(side: int) -> int:
    """Default patch-FID patch side: a quarter of the image side, at least 16 px."""
    return max(MIN_PATCH, side // 4)


def check_set_size(names: Sequence[str], n_images: int, hr_size: tuple[int, int]) -> None:
    """Raise one InputError before any inference when a requested set metric cannot run on this split
    (FID/KID need 2 images per set, patch-FID 2 patches)."""
    problems = []
    if {"fid", "kid"} & set(names) and n_images < 2:
        problems.append(f"FID/KID need at least 2 images per set, the run has {n_images}")
    if "patch_fid" in names:
        size = patch_size_for(min(hr_size))
        n_patches = n_images * (hr_size[0] // size) * (hr_size[1] // size)
        if n_patches < 2:
            problems.append(
                f"patch-FID needs at least 2 patches of {size} px, "
                f"{n_images} image(s) of {hr_size[0]}x{hr_size[1]} give {n_patches}"
            )
    if problems:
        asked = [n for n in names if n in ("fid", "kid", "patch_fid")]
        raise InputError(
            f"--metrics {','.join(asked)}",
            "; ".join(problems),
            "run on more images (a larger --limit or split), or leave these metrics out of --metrics",
        )


def _run_fidelity(
    sr: _UInt8Images,
    hr: _UInt8Images,
    device: str | torch.device,
    kid: bool,
    batch_size: int,
    seed: int = FID_SEED,
    subset: int | None = None,
) -> dict[str, Any]:
    """FID (and, with `kid`, KID over `subset`-image subsets) with the fixed settings above."""
    import torch_fidelity

    kid_args = {"kid_subset_size": subset, "kid_subsets": KID_SUBSETS} if kid else {}
    return torch_fidelity.calculate_metrics(
        input1=sr,
        input2=hr,
        cuda=torch.device(device).type == "cuda",
        batch_size=batch_size,
        fid=True,
        kid=kid,
        isc=False,
        prc=False,
        verbose=False,
        cache=False,
        feature_extractor=FEATURE_EXTRACTOR,
        feature_layer_fid=FEATURE_LAYER,
        feature_layer_kid=FEATURE_LAYER,
        feature_extractor_weights_path=str(resolve("fidelity_inception")),
        rng_seed=seed,
        save_cpu_ram=True,
        **kid_args,
    )


def fid_kid(
    sr: Sequence[Image],
    hr: Sequence[Image],
    device: str | torch.device = "cpu",
    kid: bool = True,
    batch_size: int = 32,
    seed: int = FID_SEED,
    subset_size: int | None = None,
    desc: str = "FID/KID",
) -> dict[str, Any]:
    """FID (and KID) of SR against HR images; returns values plus the settings that produced them.

    `subset_size` overrides `kid_subset_size(N)`; when it covers the whole set the subsets are all the
    same set, so `kid_std` is None instead of a meaningless 0."""
    n = min(len(sr), len(hr))
    if n < 2:
        raise InputError(
            f"{n} image(s)", "FID/KID need at least 2 images per set", "run on a larger split or drop fid/kid"
        )
    sub = subset_size or kid_subset_size(n)
    if kid and not 2 <= sub <= n:
        raise InputError(f"KID subset size {sub}", f"must be between 2 and the set size {n}")
    with tqdm(total=len(sr) + len(hr), desc=desc, unit="img", leave=False) as bar:
        res = _run_fidelity(
            _UInt8Images(sr, bar=bar),
            _UInt8Images(hr, bar=bar),
            device,
            kid=kid,
            batch_size=batch_size,
            seed=seed,
            subset=sub,
        )
    out: dict[str, Any] = {
        "fid": float(res["frechet_inception_distance"]),
        "n_images": n,
        "feature_layer": FEATURE_LAYER,
        "resize": RESIZE_MODE,
    }
    if kid:
        out.update(
            kid=float(res["kernel_inception_distance_mean"]),
            kid_std=float(res["kernel_inception_distance_std"]) if kid_has_spread(n, sub) else None,
            kid_subset_size=sub,
            kid_subsets=KID_SUBSETS,
        )
    return out


def patch_fid(
    sr: Sequence[Image],
    hr: Sequence[Image],
    patch_size: int | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    desc: str = "patch-FID",
) -> dict[str, Any]:
    """FID over non-overlapping patches (default: a quarter of the image side, at least 16 px); the
    patches are cut while torch-fidelity reads, not collected up front."""
    if not len(sr):
        raise InputError("patch-FID", "no images")
    size = patch_size or patch_size_for(min(_shape(sr[0])))
    with tqdm(total=len(sr) + len(hr), desc=desc, unit="img", leave=False) as bar:
        ps, ph = _UInt8Images(sr, patch=size, bar=bar), _UInt8Images(hr, patch=size, bar=bar)
        if min(len(ps), len(ph)) < 2:
            raise InputError(
                f"patch-FID on {len(sr)} image(s)",
                f"gives {min(len(ps), len(ph))} patch(es) of {size} px; FID needs at least 2",
                "run on more or larger images",
            )
        res = _run_fidelity(ps, ph, device, kid=False, batch_size=batch_size)
    return {
        "patch_fid": float(res["frechet_inception_distance"]),
        "patch_size": size,
        "n_patches": min(len(ps), len(ph)),
        "feature_layer": FEATURE_LAYER,
        "resize": RESIZE_MODE,
    }
