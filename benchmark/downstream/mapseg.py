"""The map segmenter: predicts the dataset's OSM mask classes from an HR-size image, for map agreement.

No pretrained model knows CMSRD's legend (`cmsrd.classes`), so the toolkit trains its own on the dataset's
train-split HR/mask pairs. It is a small U-Net (Ronneberger et al. 2015): four levels of two 3x3
conv-BN-ReLU, max-pool down, bilinear up with skip concatenation, width 16/32/64/128 by default (~0.47 M
parameters), run on the image average-pooled by `input_scale` (4: 64 px for a 256 px tile, 4 m pixels at
zoom 18), its logits bilinearly upsampled to the full size. Map classes are areas and lines several metres
wide, so this keeps what separates them while making a few CPU minutes of training enough; the SR/HR
difference it sees is that of 4 m pixels, which bicubic x16 upsampling does not have (its LR pixels are
16 m). Inputs are RGB in [0, 1] normalised with ImageNet statistics. It predicts every legend class
(10 logits); scoring folds classes into the groups below, because OSM tags that look alike from above
(forest, wood, park; road, major road, railway) cannot be told apart reliably from imagery and would
otherwise swamp the score with tagging noise.

The weights file is safetensors with its architecture, legend and training record in the metadata, so a
map-agreement column can name exactly which segmenter produced it (architecture + file sha256).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from baselines.checkpoint import load_strict, read_metadata, read_state_dict
from cmsrd.classes import CLASSES
from cmsrd.errors import InputError

from .agreement import group_lut
from .definitions import MAP_GROUPS, groups_text  # noqa: F401  (re-exported)
from .rvsa import IMAGENET_MEAN, IMAGENET_STD

KIND = "cmsrd-map-segmenter"
ARCH = "unet"


def map_group_lut() -> np.ndarray:
    """Class id -> group index for `MAP_GROUPS`."""
    ids = {c.name: c.id for c in CLASSES}
    return group_lut([[ids[n] for n in names] for _, names in MAP_GROUPS], len(CLASSES))


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class MapSegNet(nn.Module):
    """Small U-Net: logits (B, classes, H, W) for H, W divisible by input_scale * 2**(levels-1)."""

    def __init__(self, num_classes: int = len(CLASSES), width: int = 16, levels: int = 4, input_scale: int = 4):
        super().__init__()
        self.input_scale = input_scale
        self.config = {
            "arch": ARCH,
            "num_classes": num_classes,
            "width": width,
            "levels": levels,
            "input_scale": input_scale,
        }
        chans = [width * 2**i for i in range(levels)]
        self.down = nn.ModuleList(_double_conv(cin, c) for cin, c in zip([3] + chans[:-1], chans))
        self.up = nn.ModuleList(_double_conv(chans[i] + chans[i + 1], chans[i]) for i in range(levels - 1))
        self.head = nn.Conv2d(chans[0], num_classes, 1)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        x = (x - self.mean) / self.std
        if self.input_scale > 1:
            x = F.avg_pool2d(x, self.input_scale)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for i in range(len(self.up) - 1, -1, -1):
            x = F.interpolate(x, size=skips[i].shape[2:], mode="bilinear", align_corners=False)
            x = self.up[i](torch.cat([skips[i], x], 1))
        return F.interpolate(self.head(x), size=size, mode="bilinear", align_corners=False)


def to_tensor(images: Sequence[np.ndarray], device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 HxWx3 images -> float (B, 3, H, W) in [0, 1]."""
    arr = np.stack([np.asarray(a) for a in images])
    return torch.from_numpy(arr).to(device).permute(0, 3, 1, 2).float().div_(255.0)


@torch.inference_mode()
def predict(model: MapSegNet, images: Sequence[np.ndarray], batch_size: int = 8) -> list[np.ndarray]:
    """Class-index maps (uint8 HxW) of uint8 RGB images."""
    device = next(model.parameters()).device
    out: list[np.ndarray] = []
    for i in range(0, len(images), batch_size):
        logits = model(to_tensor(images[i : i + batch_size], device))
        out += [p.astype(np.uint8) for p in logits.argmax(1).cpu().numpy()]
    return out


def load_map_segmenter(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[MapSegNet, dict]:
    """A segmenter written by `train_map_segmenter` and its metadata (architecture, legend, training record)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"map segmenter {path}",
            "file not found",
            "train one with `cmsrd-bench train-downstream --data DATASET --out DIR`",
        )
    meta = read_metadata(path) if path.suffix == ".safetensors" else {}
    if meta.get("kind") != KIND:
        raise InputError(
            f"map segmenter {path}",
            "is not a map-segmenter file written by this toolkit (no `kind: cmsrd-map-segmenter` metadata)",
            "pass the mapseg.safetensors that `cmsrd-bench train-downstream` wrote",
        )
    legend = [c.name for c in CLASSES]
    if meta.get("classes") != legend:
        raise InputError(
            f"map segmenter {path}",
            f"was trained on the classes {meta.get('classes')}, this toolkit's legend is {legend}",
            "retrain it with `cmsrd-bench train-downstream` on a dataset built with this version",
        )
    arch = meta["arch"]
    model = MapSegNet(arch["num_classes"], arch["width"], arch["levels"], arch["input_scale"])
    load_strict(model, read_state_dict(path, strip_module=False), f"map segmenter {path}")
    return model.eval().to(device), meta


def describe(meta: dict[str, Any], sha256: str) -> str:
    """The sentence a map-agreement column carries about the segmenter that produced it."""
    a, t = meta["arch"], meta.get("train", {})
    return (
        f"map segmenter {a['arch']} (width {a['width']}, {a['levels']} levels, input average-pooled "
        f"x{a['input_scale']}, {meta.get('parameters')} parameters), "
        f"weights sha256 {sha256}, trained {t.get('steps')} steps on {t.get('images')} train-split HR/mask pairs "
        f"of {t.get('dataset')}"
    )
