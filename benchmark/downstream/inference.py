"""Running the RVSA models on tiles, with the input policy recorded next to every downstream column.

SGDM section 6.4 does not say how its 256 px tiles met the 224 px classifier and the 512 px segmenter;
these are the toolkit's choices (reconstructions), stated in `CLS_POLICY` / `SEG_POLICY`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .definitions import CLS_POLICY, SEG_POLICY  # noqa: F401  (re-exported: the policy of this code)
from .rvsa import IMAGENET_MEAN, IMAGENET_STD, RVSAClassifier
from .uperhead import RVSASegmenter

CLS_RESIZE, CLS_CROP = 256, 224


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def classifier_input(images: Sequence[np.ndarray], size: int = CLS_CROP, resize: int = CLS_RESIZE) -> torch.Tensor:
    """uint8 HxWx3 tiles -> normalised (B, 3, size, size) as the official eval transform makes them."""
    out = []
    for a in images:
        img = Image.fromarray(np.asarray(a, dtype=np.uint8))
        w, h = img.size
        if min(w, h) != resize:  # torchvision Resize(int): shorter side to `resize`, aspect kept
            s = resize / min(w, h)
            img = img.resize((round(w * s), round(h * s)), Image.BICUBIC)
            w, h = img.size
        left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
        out.append(np.asarray(img.crop((left, top, left + size, top + size))))
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float().div_(255.0)
    return _normalise(x)


@torch.inference_mode()
def classify(model: RVSAClassifier, images: Sequence[np.ndarray], batch_size: int = 16) -> np.ndarray:
    """Logits (N, classes) of uint8 tiles."""
    device = next(model.parameters()).device
    size = model.img_size
    resize = round(size * CLS_RESIZE / CLS_CROP)
    out = [
        model(classifier_input(images[i : i + batch_size], size, resize).to(device)).float().cpu().numpy()
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out)


@torch.inference_mode()
def segment(model: RVSASegmenter, images: Sequence[np.ndarray], batch_size: int = 4, flip: bool = True) -> list:
    """Class-index maps (uint8 HxW, at the tile size) of uint8 tiles."""
    device = next(model.parameters()).device
    preds: list[np.ndarray] = []
    for i in range(0, len(images), batch_size):
        tiles = torch.from_numpy(np.stack(images[i : i + batch_size])).to(device).permute(0, 3, 1, 2).float() / 255
        size = tiles.shape[2:]
        x = _normalise(F.interpolate(tiles, size=(model.img_size,) * 2, mode="bilinear", align_corners=False))
        prob = model(x).softmax(1)
        if flip:
            prob = (prob + model(x.flip(3)).softmax(1).flip(3)) / 2
        prob = F.interpolate(prob, size=size, mode="bilinear", align_corners=False)
        preds += [p.astype(np.uint8) for p in prob.argmax(1).cpu().numpy()]
    return preds
