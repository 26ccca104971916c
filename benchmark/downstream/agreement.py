"""Agreement between a downstream model's outputs on SR and on HR (or on SR and the map), as pure functions.

Scene classification (per image, logits over the same classes): top-1 agreement (Stanton et al. 2021 call it
"fidelity"), top-5 agreement (HR's top-1 among SR's 5 best) and Cohen's kappa of the two label sets.
Segmentation: a confusion matrix accumulated over the whole set (mmseg style), mIoU averaged over the classes
present (union > 0 in prediction or label: absent classes are neither 0 nor 1, they do not count) and pixel
agreement. For SR vs HR the HR prediction is the label; for map agreement the dataset's OSM mask is.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _logits(a: Sequence[Sequence[float]] | np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(a, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{what}: expected (images, classes) scores, got shape {x.shape}")
    return x


def _pair(sr, hr) -> tuple[np.ndarray, np.ndarray]:
    s, h = _logits(sr, "SR scores"), _logits(hr, "HR scores")
    if s.shape != h.shape:
        raise ValueError(f"SR scores {s.shape} and HR scores {h.shape} differ in shape")
    return s, h


def cls_top1_agree(sr_logits, hr_logits) -> float:
    """Mean over images of [argmax SR == argmax HR]."""
    s, h = _pair(sr_logits, hr_logits)
    return float(np.mean(s.argmax(1) == h.argmax(1)))


def cls_top5_agree(sr_logits, hr_logits, k: int = 5) -> float:
    """Mean over images of [HR's top-1 class is among SR's k highest scores] (ties broken by class order)."""
    s, h = _pair(sr_logits, hr_logits)
    k = min(k, s.shape[1])
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return float(np.mean((top == h.argmax(1)[:, None]).any(1)))


def cls_kappa(sr_labels: Sequence[int], hr_labels: Sequence[int], num_classes: int | None = None) -> float:
    """Cohen's kappa (p_o - p_e) / (1 - p_e) of two label sets. When p_e = 1 (both give one and the same
    class to every image) agreement is perfect and kappa is 1.0 rather than 0/0."""
    a, b = np.asarray(sr_labels, dtype=np.int64), np.asarray(hr_labels, dtype=np.int64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"label sets must be equal-length 1-D, got {a.shape} and {b.shape}")
    n = num_classes or int(max(a.max(), b.max())) + 1
    po = float(np.mean(a == b))
    pe = float(np.sum(np.bincount(a, minlength=n) * np.bincount(b, minlength=n))) / a.size**2
    return 1.0 if pe >= 1.0 else (po - pe) / (1.0 - pe)


def confusion(pred: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """(classes x classes) counts, rows = label, columns = prediction; add them up over a set."""
    p, t = np.asarray(pred, dtype=np.int64).ravel(), np.asarray(label, dtype=np.int64).ravel()
    if p.shape != t.shape:
        raise ValueError(f"prediction {np.shape(pred)} and label {np.shape(label)} differ in shape")
    if p.size and (min(p.min(), t.min()) < 0 or max(p.max(), t.max()) >= num_classes):
        raise ValueError(f"class index outside 0..{num_classes - 1}")
    return np.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU of each class; NaN for a class absent from both prediction and label."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)


def miou(conf: np.ndarray) -> float:
    """Mean IoU over the classes present (union > 0); NaN for an empty matrix."""
    iou = iou_per_class(conf)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def pixel_agree(conf: np.ndarray) -> float:
    conf = np.asarray(conf, dtype=np.float64)
    total = conf.sum()
    return float(np.trace(conf) / total) if total else float("nan")


def set_confusion(preds: Sequence[np.ndarray], labels: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Confusion summed over a set of (prediction, label) maps; an empty set is an error, not a score."""
    if len(preds) != len(labels) or not len(preds):
        raise ValueError(f"need equal, non-zero numbers of predictions and labels, got {len(preds)} and {len(labels)}")
    total = np.zeros((num_classes, num_classes), dtype=np.int64)
    for p, t in zip(preds, labels):
        total += confusion(p, t, num_classes)
    return total


def seg_miou_vs_hr(sr_preds: Sequence[np.ndarray], hr_preds: Sequence[np.ndarray], num_classes: int) -> float:
    """mIoU of the SR segmentations with the HR segmentations as label, confusion summed over the set."""
    return miou(set_confusion(sr_preds, hr_preds, num_classes))


def seg_pixel_agree(sr_preds: Sequence[np.ndarray], hr_preds: Sequence[np.ndarray], num_classes: int) -> float:
    """Fraction of pixels whose SR and HR classes agree, over the set."""
    return pixel_agree(set_confusion(sr_preds, hr_preds, num_classes))


def group_lut(groups: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    """Look-up table class id -> group index; every class must be in exactly one group."""
    lut = np.full(num_classes, -1, dtype=np.int64)
    for g, ids in enumerate(groups):
        for i in ids:
            if lut[i] != -1:
                raise ValueError(f"class {i} is in two groups")
            lut[i] = g
    if (lut < 0).any():
        raise ValueError(f"classes {np.flatnonzero(lut < 0).tolist()} are in no group")
    return lut


def map_confusion(preds: Sequence[np.ndarray], masks: Sequence[np.ndarray], lut: np.ndarray) -> np.ndarray:
    """Group-level confusion of predicted map classes against the dataset masks, summed over the set."""
    return set_confusion([lut[np.asarray(p)] for p in preds], [lut[np.asarray(m)] for m in masks], int(lut.max()) + 1)


def map_miou(preds: Sequence[np.ndarray], masks: Sequence[np.ndarray], lut: np.ndarray) -> float:
    """mIoU over the class groups present, predictions (of SR) against the OSM mask."""
    return miou(map_confusion(preds, masks, lut))


def map_pixel_acc(preds: Sequence[np.ndarray], masks: Sequence[np.ndarray], lut: np.ndarray) -> float:
    """Fraction of pixels whose predicted class group equals the mask's."""
    return pixel_agree(map_confusion(preds, masks, lut))
