"""The one evaluation path: a method's SR of one split under one condition, then scored.

The benchmark runner and training validation both go through `SRPass` (condition applied to the batch,
one seeded generator per image, the method's declared inputs on the device, autocast, SR converted to the
uint8 bytes that are saved and scored) and `score_images` / `mean_finite` (metrics from
`benchmark.metrics`), so a validation score is the benchmark's score of the same images.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from baselines.base import Batch, SRMethod
from baselines.conditions import Conditions, apply_conditions
from baselines.inference import NONFINITE, method_inputs, nonfinite_images, super_resolve_batch, to_uint8_images
from baselines.seeding import seeded_generators
from cmsrd.layout import DatasetLayout

ImageMetric = Any  # f(sr_images, hr_images) -> per-image values (`benchmark.metrics.build_image_metric`)


class SRPass:
    """Super-resolve images of `split` under `cond`: image `ids[i]` gets generator `seed + i` and the shuffle
    partner `partner[ids[i]]`, whatever batch it is in."""

    def __init__(
        self,
        method: SRMethod,
        cond: Conditions,
        layout: DatasetLayout,
        split: str,
        ids: Sequence[str],
        partner: Mapping[str, str],
        seed: int,
        device: str | torch.device,
        precision: str,
    ):
        self.method, self.cond, self.layout, self.split = method, cond, layout, split
        self.partner, self.seed, self.device, self.precision = partner, int(seed), device, precision
        self.index_of = {sid: i for i, sid in enumerate(ids)}

    @staticmethod
    def collate(items: Sequence[dict[str, Any]]) -> Batch:
        """Dataset items -> one batch dict (tensors stacked; `id`, `crs` and other non-tensors as lists)."""
        batch: Batch = {}
        for k, v in items[0].items():
            vals = [it[k] for it in items]
            batch[k] = torch.stack(vals) if isinstance(v, torch.Tensor) else vals
        return batch

    def prepare(self, batch: Batch) -> Batch:
        """Apply the condition (may read partner PNGs; drops `hr`) and copy the method's inputs to the device."""
        batch = apply_conditions(dict(batch), self.cond, self.layout, self.split, self.partner)
        for k, v in method_inputs(self.method, batch, self.cond).items():
            batch[k] = v.to(self.device, non_blocking=True)
        return batch

    def forward(self, batch: Batch) -> torch.Tensor:
        """A prepared batch -> SR N x 3 x H x W float in [0, 1] on the device (`super_resolve_batch`)."""
        gens = seeded_generators(self.seed, [self.index_of[i] for i in batch["id"]], self.device)
        return super_resolve_batch(self.method, batch, self.cond, self.device, self.precision, gens)

    def images(self, batches: Iterable[Batch]) -> Iterator[tuple[list[str], np.ndarray, np.ndarray | None]]:
        """(ids, SR uint8 N x H x W x 3, HR uint8 or None) for every batch (each holding `hr` when scored)."""
        for batch in batches:
            hr = batch.get("hr")
            sr = self.forward(self.prepare(batch))
            yield list(batch["id"]), to_uint8_images(sr), to_uint8_images(hr) if hr is not None else None


def finite_images(ids: Sequence[str], sr: torch.Tensor) -> tuple[list[tuple[str, np.ndarray]], dict[str, str]]:
    """A batch's SR -> ([(id, uint8 image)] of the finite ones, {id: NONFINITE} of the others): an image with
    NaN/inf is a recorded failure, never converted (NaN would become black pixels) and never scored."""
    bad = nonfinite_images(sr)
    images = [(sid, arr) for sid, arr, b in zip(ids, to_uint8_images(sr), bad) if not b]
    return images, {sid: NONFINITE for sid, b in zip(ids, bad) if b}


def score_images(
    metrics: Mapping[str, ImageMetric], sr: Sequence[np.ndarray], hr: Sequence[np.ndarray] | None
) -> dict[str, list[float]]:
    """Per-image values of each image-level metric on uint8 images."""
    return {name: [float(v) for v in fn(sr, hr)] for name, fn in metrics.items()}


MEAN_DEFINITION = (
    "A row's image-level metric is the mean over the images whose value is finite: an image with infinite PSNR "
    "(SR identical to HR after uint8 rounding) or a NaN value is excluded (BasicSR would average the inf in). "
    "methods[...].n_finite gives, per metric, how many of the n_images values were averaged."
)


def mean_finite(vals: Sequence[float]) -> tuple[float, int]:
    """(mean over the finite values, how many were finite); see MEAN_DEFINITION. With none finite, the mean
    of all (inf when every PSNR is inf, NaN when a value is NaN)."""
    finite = [v for v in vals if np.isfinite(v)]
    if finite:
        return float(np.mean(finite)), len(finite)
    return (float(np.mean(vals)) if len(vals) else float("nan")), 0
