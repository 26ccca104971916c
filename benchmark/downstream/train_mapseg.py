"""Training of the map segmenter on a dataset's train-split HR/mask pairs (`cmsrd-bench train-downstream`).

A dedicated loop rather than the SR trainer: that one is built around `SRMethod` (SR losses, PSNR/LPIPS
validation, SR conditions, EMA of a generator); this task is plain per-pixel cross-entropy over minutes of
CPU. What it shares with it: the dataset (`CMSRDDataset` with the official SGDM flips/rotations), the
safetensors export with its record in the metadata, and the benchmark's own metric code for the score
written at the end (map agreement of the HR test split, i.e. the ceiling row of the leaderboard).
Deterministic for a seed on one device; a run is minutes long, so it restarts rather than resumes.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from baselines.checkpoint import save_weights
from baselines.weights import file_sha256
from cmsrd.classes import CLASSES
from cmsrd.data import CMSRDDataset
from cmsrd.errors import InputError
from cmsrd.io import atomic_write_text, read_png

from .agreement import map_confusion, miou, pixel_agree
from .mapseg import KIND, MAP_GROUPS, MapSegNet, map_group_lut, predict
from .rvsa import count_parameters

WEIGHTS_FILE = "mapseg.safetensors"
SUMMARY_FILE = "mapseg.json"


def _batches(ds: CMSRDDataset, batch_size: int, crop: int, gen: torch.Generator):
    """Endless (images, masks) batches: reshuffled epochs, official augmentation, random crops."""
    epoch = 0
    while True:
        ds.set_epoch(epoch)
        order = torch.randperm(len(ds), generator=gen).tolist()
        for i in range(0, len(order) - batch_size + 1, batch_size):  # drop the ragged tail
            items = [ds[j] for j in order[i : i + batch_size]]
            hr = torch.stack([it["hr"] for it in items])
            mask = torch.stack([it["mask"] for it in items])
            size = hr.shape[-1]
            if crop is not None and crop < size:
                y, x = (int(v) for v in torch.randint(0, size - crop + 1, (2,), generator=gen))
                hr, mask = hr[..., y : y + crop, x : x + crop], mask[..., y : y + crop, x : x + crop]
            yield hr, mask
        epoch += 1


def score_split(model: MapSegNet, data: Path, split: str = "test", kind: str = "hr") -> dict[str, Any]:
    """Map agreement of the model's prediction on one image kind of a split against its masks."""
    ds = CMSRDDataset(data, split, inputs=("mask",))
    images = [read_png(ds.path(kind, i)) for i in range(len(ds))]
    masks = [read_png(ds.path("mask", i), indices=True) for i in range(len(ds))]
    conf = map_confusion(predict(model, images), masks, map_group_lut())
    return {"split": split, "images": len(ds), "map_miou": miou(conf), "map_pixel_acc": pixel_agree(conf)}


def train_map_segmenter(
    data: str | os.PathLike,
    out: str | os.PathLike,
    max_minutes: float | None = 3.0,
    max_steps: int | None = None,
    batch_size: int = 8,
    crop: int | None = None,
    lr: float = 2e-3,
    width: int = 16,
    input_scale: int = 4,
    seed: int = 0,
    device: str = "cpu",
    log_every: int = 10,
    echo=print,
) -> dict[str, Any]:
    """Train, score the HR test split, write `<out>/mapseg.safetensors` + `mapseg.json`; returns the summary."""
    data, out = Path(data), Path(out)
    if max_minutes is None and max_steps is None:
        raise InputError("train-downstream", "neither a time budget nor a step count was given", "pass --max-minutes")
    torch.manual_seed(seed)
    model = MapSegNet(width=width, input_scale=input_scale).to(device).train()
    unit = input_scale * 2 ** (model.config["levels"] - 1)
    if crop is not None and crop % unit:
        raise InputError(f"--crop {crop}", f"must be a multiple of {unit} (input scale x three 2x poolings)", "")
    gen = torch.Generator().manual_seed(seed)
    train = CMSRDDataset(data, "train", inputs=("hr", "mask"), augment=True, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.csv"
    step, spent, t_log = 0, 0.0, time.perf_counter()
    with open(log_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "elapsed_s", "loss"])
        for hr, mask in _batches(train, min(batch_size, len(train)), crop, gen):
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(hr.to(device)), mask.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss = loss.detach()
            step += 1
            spent += time.perf_counter() - t0
            if step % log_every == 0 or step == 1:
                writer.writerow([step, round(spent, 2), round(float(loss), 5)])
                f.flush()
                if time.perf_counter() - t_log > 15:
                    echo(f"step {step}  loss {float(loss):.4f}  {spent:.0f}s")
                    t_log = time.perf_counter()
            if (max_steps is not None and step >= max_steps) or (max_minutes is not None and spent >= 60 * max_minutes):
                writer.writerow([step, round(spent, 2), round(float(loss), 5)])
                break
    model.eval()
    ceiling = score_split(model, data, "test", "hr")
    meta = {
        "kind": KIND,
        "arch": model.config,
        "parameters": count_parameters(model),
        "classes": [c.name for c in CLASSES],
        "groups": [[g, list(names)] for g, names in MAP_GROUPS],
        "input": "RGB uint8 / 255, ImageNet mean/std normalised, at the dataset's HR size",
        "train": {
            "dataset": str(data.resolve()),
            "split": "train",
            "images": len(train),
            "steps": step,
            "seconds": round(spent, 1),
            "batch_size": batch_size,
            "crop": crop or "whole tile",
            "lr": lr,
            "optimizer": "AdamW(weight_decay=1e-4), constant LR, per-pixel cross-entropy",
            "augment": "official SGDM flips/rotations + random crop",
            "seed": seed,
            "device": device,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "hr_test_score": ceiling,
    }
    path = save_weights(out / WEIGHTS_FILE, model.state_dict(), meta)
    summary = {**meta, "weights": str(path), "sha256": file_sha256(path)}
    atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    echo(
        f"map segmenter: {step} steps in {spent:.0f}s; HR test split map_miou {ceiling['map_miou']:.4f}, "
        f"map_pixel_acc {ceiling['map_pixel_acc']:.4f} -> {path}"
    )
    return summary
