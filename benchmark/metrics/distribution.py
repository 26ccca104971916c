"""Set-level distribution metrics: FID, KID and patch-FID through torch-fidelity.

Settings are fixed and recorded, because FID numbers are only comparable under the same ones:
feature extractor `inception-v3-compat` (the TF 2015-12-05 Inception graph), feature layer `2048`
(pool3), images as uint8 3xHxW resized by torch-fidelity to 299x299 with its TF1.x-compatible bilinear
("legacy TF" mode, not clean-fid's PIL bicubic). KID uses an unbiased polynomial-kernel MMD over
`kid_subsets` random subsets of size min(1000, N) (torch-fidelity asserts subset size <= N, so small
remote-sensing test sets get a smaller subset, recorded in the outputs). FID on N < 2048 images has a
rank-deficient covariance: valid for comparing methods on the same set, not with published numbers;
patch-FID (non-overlapping PxP crops of every image) is offered for such small sets.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from baselines.weights import resolve
from cmsrd.errors import InputError

FIDELITY_WEIGHTS = ("fidelity_inception",)
FEATURE_EXTRACTOR = "inception-v3-compat"
FEATURE_LAYER = "2048"
RESIZE_MODE = "torch-fidelity TF1.x-compatible bilinear to 299x299 (legacy TF mode), uint8 input"
KID_SUBSETS = 100
KID_MAX_SUBSET = 1000


class _UInt8Images(Dataset):
    """In-memory uint8 HxWx3 images served as the 3xHxW uint8 tensors torch-fidelity requires."""

    def __init__(self, images: Sequence[np.ndarray]):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(self.images[i]).permute(2, 0, 1).contiguous()  # a copy: inputs may be read-only views


def patches(images: Sequence[np.ndarray], size: int) -> list[np.ndarray]:
    """Non-overlapping size x size crops of every image (partial edge strips dropped)."""
    out = []
    for img in images:
        h, w = img.shape[:2]
        for y in range(0, h - size + 1, size):
            for x in range(0, w - size + 1, size):
                out.append(img[y: y + size, x: x + size])
    return out


def kid_subset_size(n: int) -> int:
    return min(KID_MAX_SUBSET, n)


def fid_kid(
    sr: Sequence[np.ndarray],
    hr: Sequence[np.ndarray],
    device: str | torch.device = "cpu",
    kid: bool = True,
    batch_size: int = 32,
    seed: int = 2020,
) -> dict[str, Any]:
    """FID (and KID) of SR against HR images; returns values plus the settings that produced them."""
    import torch_fidelity

    n = min(len(sr), len(hr))
    if n < 2:
        raise InputError(f"{n} image(s)", "FID/KID need at least 2 images per set", "run on a larger split or drop fid/kid")
    weights = resolve("fidelity_inception")
    sub = kid_subset_size(n)
    res = torch_fidelity.calculate_metrics(
        input1=_UInt8Images(sr), input2=_UInt8Images(hr), cuda=torch.device(device).type == "cuda",
        batch_size=batch_size, fid=True, kid=kid, isc=False, prc=False, verbose=False, cache=False,
        feature_extractor=FEATURE_EXTRACTOR, feature_layer_fid=FEATURE_LAYER, feature_layer_kid=FEATURE_LAYER,
        feature_extractor_weights_path=str(weights), kid_subset_size=sub, kid_subsets=KID_SUBSETS, rng_seed=seed,
        save_cpu_ram=True,
    )
    out: dict[str, Any] = {
        "fid": float(res["frechet_inception_distance"]),
        "n_images": n, "feature_layer": FEATURE_LAYER, "resize": RESIZE_MODE,
    }
    if kid:
        out.update(kid=float(res["kernel_inception_distance_mean"]), kid_std=float(res["kernel_inception_distance_std"]),
                   kid_subset_size=sub, kid_subsets=KID_SUBSETS)
    return out


def patch_fid(
    sr: Sequence[np.ndarray],
    hr: Sequence[np.ndarray],
    patch_size: int | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
) -> dict[str, Any]:
    """FID over non-overlapping patches (default: a quarter of the image side, at least 16 px)."""
    if not len(sr):
        raise InputError("patch-FID", "no images")
    size = patch_size or max(16, min(sr[0].shape[:2]) // 4)
    ps, ph = patches(sr, size), patches(hr, size)
    res = fid_kid(ps, ph, device=device, kid=False, batch_size=batch_size)
    return {"patch_fid": res["fid"], "patch_size": size, "n_patches": res["n_images"],
            "feature_layer": FEATURE_LAYER, "resize": RESIZE_MODE}
