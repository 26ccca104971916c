"""Small builders the method tests share: official key lists, tiny batches and a training context.

Imported as `from helpers import ...` (pytest puts this folder on sys.path: tests/ has no __init__.py)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn import functional as F

from baselines.base import TrainContext

OFFICIAL_KEYS = Path(__file__).parent / "data" / "official_keys"
WATER, BUILDING = (133, 203, 249), (226, 224, 210)  # map colours of the two halves of `map_batch`


def official_keys(name: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of an official checkpoint, from `tests/data/official_keys/<name>.json`."""
    return {k: tuple(v) for k, v in json.loads((OFFICIAL_KEYS / f"{name}.json").read_text())["keys"].items()}


def hr_lr_batch(n: int, hr_px: int = 64, lr_px: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed random HR batch and its area-downsampled LR."""
    hr = torch.rand(n, 3, hr_px, hr_px, generator=torch.Generator().manual_seed(seed))
    return {"hr": hr, "lr": F.interpolate(hr, size=(lr_px, lr_px), mode="area")}


def map_batch(n: int, size: int, lr_px: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """`hr_lr_batch` plus a two-class map (water top half, building bottom half) and the bicubic SR of
    the LR: the inputs of the map- and SR-conditioned methods."""
    batch = hr_lr_batch(n, size, lr_px, seed)
    mp = torch.zeros(n, 3, size, size)
    mp[:, :, : size // 2] = torch.tensor(WATER).view(1, 3, 1, 1) / 255
    mp[:, :, size // 2 :] = torch.tensor(BUILDING).view(1, 3, 1, 1) / 255
    sr = F.interpolate(batch["lr"], size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return {**batch, "sr": sr, "map": mp}


def train_context(
    opts: dict[str, torch.optim.Optimizer],
    step: int = 0,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    seen_lr: list[float] | None = None,
) -> TrainContext:
    """A `TrainContext` whose backward steps the named optimiser at once (recording its lr in `seen_lr`)."""

    def backward(loss: torch.Tensor, name: str) -> None:
        if seen_lr is not None:
            seen_lr.append(opts[name].param_groups[0]["lr"])
        opts[name].zero_grad(set_to_none=True)
        loss.backward()
        opts[name].step()

    return TrainContext(step, backward, autocast)


def dataset_batch(root: Path, n: int = 4) -> dict[str, torch.Tensor]:
    """The first `n` train items of a built dataset as one LR/HR batch (a fixed objective for loss tests)."""
    from cmsrd.data import CMSRDDataset

    ds = CMSRDDataset(root, "train", inputs=("lr", "hr"))
    items = [ds[i] for i in range(n)]
    return {k: torch.stack([it[k] for it in items]) for k in ("lr", "hr")}


TRAIN = {
    "batch_size": 2,
    "num_workers": 0,
    "total_steps": 100,
    "log_every": 2,
    "val_every": 4,
    "save_every": 4,
    "optim_g": {"type": "Adam", "lr": 1e-3, "betas": [0.9, 0.99]},
    "lpips": "off",
}


def train_cfg(net: dict, **train_kw: object) -> dict:
    """A feed-forward method's config for short shared-trainer runs: `net` plus `TRAIN` updated by `train_kw`."""
    return {**net, "train": {**TRAIN, **train_kw}}


def two_step_train(**train_kw: object) -> dict:
    """The `train` section of a diffusion method's smoke run: two steps, one validation image, one save."""
    return {
        "batch_size": 2,
        "total_steps": 2,
        "val_every": 2,
        "save_every": 2,
        "val_max_images": 1,
        "lpips": "off",
        "keep_best": None,
        "log_every": 1,
        **train_kw,
    }
