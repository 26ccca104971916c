"""Downstream agreement inside a benchmark run: models loaded once, HR outputs computed once, SR scored per row.

The runner hands the downstream metric names of a run here (`score`), with the SR PNGs of one method x
condition; the HR side (RVSA logits and segmentations of the HR tiles) is computed on first use and reused for
every row. `REFERENCE` (`hr`) is the reference row: the HR tiles themselves as the "SR" output, so every
agreement column is 1.0 by construction and the map-agreement column is the segmenter's ceiling.

`rvsa_init="random"` builds the RVSA models with seeded random weights instead of the official files: a
test/demo option (agreement of an untrained network measures nothing about SR quality), recorded as such.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmsrd.classes import palette
from cmsrd.errors import InputError
from cmsrd.io import read_png, write_png
from cmsrd.layout import DatasetLayout

from . import agreement as A

REFERENCE = "hr"
SCORER = "__downstream__"  # the runner's per-run scorer slot
CLS_METRICS = ("cls_top1_agree", "cls_top5_agree", "cls_kappa")
SEG_METRICS = ("seg_miou_vs_hr", "seg_pixel_agree")
MAP_METRICS = ("map_miou", "map_pixel_acc")
METRICS = CLS_METRICS + SEG_METRICS + MAP_METRICS
RVSA_INITS = ("official", "random")
CHUNK = 16  # tiles read at a time
SAVE_N = 3  # segmentations kept per row (the first ids) for the report's side-by-side tiles
SEG_DIR = "downstream"  # under each row's SR folder: <id>_seg.png (LoveDA), <id>_map.png (map classes)


def is_downstream(name: str) -> bool:
    return name in METRICS


def check_options(names: Sequence[str], rvsa_init: str, map_segmenter: Path | None, skip_missing: bool) -> dict:
    """Before any inference: metrics that cannot run, with the reason (raised unless `skip_missing`)."""
    if rvsa_init not in RVSA_INITS:
        raise InputError(f"--rvsa-init {rvsa_init}", "unknown", f"use one of: {', '.join(RVSA_INITS)}")
    asked = [n for n in names if n in MAP_METRICS]
    if not asked:
        return {}
    problem = None
    if map_segmenter is None:
        problem = "needs a map segmenter trained on this dataset"
    elif not Path(map_segmenter).is_file():
        problem = f"map segmenter {map_segmenter} not found"
    if problem is None:
        return {}
    if not skip_missing:
        raise InputError(
            f"--metrics {','.join(asked)}",
            problem,
            "train one with `cmsrd-bench train-downstream --data DATASET --out DIR` and pass "
            "--map-segmenter DIR/mapseg.safetensors, or pass --skip-missing to run without these metrics",
        )
    return {n: problem for n in asked}


def waived_weights(names: Sequence[str], rvsa_init: str) -> set[str]:
    """Metrics whose manifest weights are not needed (random-init RVSA), so the weights check leaves them out."""
    return {n for n in names if n in CLS_METRICS + SEG_METRICS} if rvsa_init == "random" else set()


def build_random_rvsa(seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The full-size RVSA classifier and segmenter with seeded random weights (test/demo option)."""
    from .rvsa import RVSAClassifier
    from .uperhead import RVSASegmenter

    torch.manual_seed(seed)
    return RVSAClassifier().eval(), RVSASegmenter().eval()


@dataclass
class DownstreamScorer:
    """One per run: downstream models and the HR side, built lazily and kept for every row."""

    layout: DatasetLayout
    split: str
    ids: list[str]
    device: str
    rvsa_init: str = "official"
    map_segmenter: Path | None = None
    seed: int = 0
    _models: dict[str, Any] = field(default_factory=dict)
    _hr: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)  # run.json `downstream`: models, weights, input policy
    last_iou: dict[str, dict[str, float | None]] = field(default_factory=dict)  # per class of the last `score`

    def _tiles(self, paths: Sequence[Path]):
        for a in range(0, len(paths), CHUNK):
            yield [read_png(p) for p in paths[a : a + CHUNK]]

    def _rvsa(self, which: str) -> torch.nn.Module:
        if which in self._models:
            return self._models[which]
        from baselines.weights import file_sha256, resolve

        from .checkpoints import load_classifier, load_segmenter
        from .cli import CLASSIFIER_KEY, SEGMENTER_KEY
        from .definitions import CLS_POLICY, SEG_POLICY

        key = CLASSIFIER_KEY if which == "classifier" else SEGMENTER_KEY
        if self.rvsa_init == "random":
            cls, seg = build_random_rvsa(self.seed)
            self._models.update(classifier=cls.to(self.device), segmenter=seg.to(self.device))
            for w in ("classifier", "segmenter"):
                self.record[f"rvsa_{w}"] = {
                    "weights": f"RANDOM INIT (seed {self.seed}): --rvsa-init random, test/demo only"
                }
        else:
            path = resolve(key)
            load = load_classifier if which == "classifier" else load_segmenter
            self._models[which] = load(path, self.device)
            self.record[f"rvsa_{which}"] = {"weights": key, "path": str(path), "sha256": file_sha256(path)}
        for w, policy in (("classifier", CLS_POLICY), ("segmenter", SEG_POLICY)):
            if f"rvsa_{w}" in self.record:
                self.record[f"rvsa_{w}"]["input"] = policy
        return self._models[which]

    def _map(self):
        if "map" not in self._models:
            from baselines.weights import file_sha256

            from .mapseg import describe, load_map_segmenter

            model, meta = load_map_segmenter(self.map_segmenter, self.device)
            sha = file_sha256(self.map_segmenter)
            self._models["map"] = model
            self.record["map_segmenter"] = {
                "path": str(self.map_segmenter),
                "sha256": sha,
                "arch": meta["arch"],
                "groups": meta["groups"],
                "description": describe(meta, sha),
            }
        return self._models["map"]

    def _classify(self, paths: Sequence[Path]) -> np.ndarray:
        from .inference import classify

        model = self._rvsa("classifier")
        return np.concatenate([classify(model, t) for t in self._tiles(paths)])

    def _segment(self, paths: Sequence[Path]) -> list[np.ndarray]:
        from .inference import segment

        model = self._rvsa("segmenter")
        return [p for t in self._tiles(paths) for p in segment(model, t)]

    def _hr_side(self, what: str) -> Any:
        if what not in self._hr:
            hr = [self.layout.image_path(self.split, "hr", i) for i in self.ids]
            self._hr[what] = self._classify(hr) if what == "cls" else self._segment(hr)
        return self._hr[what]

    def _keep(self, preds: Sequence[np.ndarray], save_to: Path | None, suffix: str, colours: list[int]) -> None:
        if save_to is not None:
            (save_to / SEG_DIR).mkdir(parents=True, exist_ok=True)
            for i, p in zip(self.ids[:SAVE_N], preds):
                write_png(save_to / SEG_DIR / f"{i}_{suffix}.png", np.asarray(p, dtype=np.uint8), colours)

    def score(self, names: Sequence[str], sr_paths: Sequence[Path], save_to: Path | None = None) -> dict[str, float]:
        """Values of the asked downstream metrics for one method x condition's SR tiles; with `save_to` (the
        row's SR folder) the first `SAVE_N` segmentations are kept as palette PNGs for the report."""
        from .definitions import MAP_GROUPS
        from .mapseg import map_group_lut, predict
        from .uperhead import LOVEDA_CLASSES, LOVEDA_PALETTE

        out: dict[str, float] = {}
        self.last_iou = {}
        if any(n in CLS_METRICS for n in names):
            sr, hr = self._classify(sr_paths), self._hr_side("cls")
            values = {
                "cls_top1_agree": A.cls_top1_agree(sr, hr),
                "cls_top5_agree": A.cls_top5_agree(sr, hr),
                "cls_kappa": A.cls_kappa(sr.argmax(1), hr.argmax(1), sr.shape[1]),
            }
            out.update({n: v for n, v in values.items() if n in names})
        if any(n in SEG_METRICS for n in names):
            preds = self._segment(sr_paths)
            self._keep(preds, save_to, "seg", [v for rgb in LOVEDA_PALETTE for v in rgb])
            conf = A.set_confusion(preds, self._hr_side("seg"), len(LOVEDA_CLASSES))
            values = {"seg_miou_vs_hr": A.miou(conf), "seg_pixel_agree": A.pixel_agree(conf)}
            self.last_iou["seg_vs_hr"] = _named(A.iou_per_class(conf), LOVEDA_CLASSES)
            out.update({n: v for n, v in values.items() if n in names})
        if any(n in MAP_METRICS for n in names):
            model = self._map()
            preds = [p for t in self._tiles(sr_paths) for p in predict(model, t)]
            self._keep(preds, save_to, "map", palette())
            masks = [read_png(self.layout.image_path(self.split, "mask", i), indices=True) for i in self.ids]
            conf = A.map_confusion(preds, masks, map_group_lut())
            values = {"map_miou": A.miou(conf), "map_pixel_acc": A.pixel_agree(conf)}
            self.last_iou["map"] = _named(A.iou_per_class(conf), [g for g, _ in MAP_GROUPS])
            out.update({n: v for n, v in values.items() if n in names})
        return out


def _named(iou: np.ndarray, names: Sequence[str]) -> dict[str, float | None]:
    """IoU per class name; None for a class absent from prediction and label (JSON has no NaN)."""
    return {n: (float(v) if np.isfinite(v) else None) for n, v in zip(names, iou)}


def write_reference(layout: DatasetLayout, split: str, ids: Sequence[str], out_dir: Path) -> dict[str, Any]:
    """The `hr` row's "SR" folder: the HR tiles, copied byte for byte. Returns the row's info."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for i in ids:  # copied every run (cheap), so a reused --out never keeps another dataset's tiles
        shutil.copyfile(layout.image_path(split, "hr", i), out_dir / f"{i}.png")
    return {"reference": True, "kind": "reference", "note": "HR tiles as the output: a reference row, not ranked"}
