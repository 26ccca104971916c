"""Metric registry: name -> Metric with direction, exact definition, weights it needs, image or set level.

Every number the benchmark writes comes from a metric named here, and its definition text (which
depends on settings such as the crop border) is copied into `run.json` and the reports, so a column
never stands without saying what it is. Heavy libraries are imported only when a metric is built.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmark.downstream.definitions import CLS_POLICY, SEG_POLICY, groups_text
from cmsrd.errors import InputError

from .psnr_ssim import definition as _psnr_ssim_definition


@dataclass(frozen=True)
class Metric:
    name: str
    direction: str  # "higher" | "lower" (better)
    level: str  # "image" (one value per image, averaged) | "set" (one value per method x condition)
    reference: bool  # needs the HR image
    weights: tuple[str, ...]  # keys of manifests/weights.yaml
    factory: str  # "module:attr"
    definition: str
    licence: str = ""

    def describe(self, crop_border: int = 0, n_images: int | None = None) -> str:
        """The definition text; with `n_images`, KID's text also states the subset size used for that N."""
        if self.name in ("psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb"):
            return _psnr_ssim_definition(self.name, crop_border)
        text = self.definition
        if self.name == "kid" and n_images is not None and n_images >= 2:
            from .distribution import KID_SUBSETS, kid_has_spread, kid_subset_size

            k = kid_subset_size(n_images)
            text += f" Here N = {n_images}: {KID_SUBSETS} subsets of {k} images" + (
                "." if kid_has_spread(n_images) else " (the whole set: no spread, kid_std omitted)."
            )
        return text + (f" Licence: {self.licence}." if self.licence else "")

    @property
    def arrow(self) -> str:
        return "↑" if self.direction == "higher" else "↓"


_FID_NOTE = (
    "torch-fidelity inception-v3-compat, feature layer 2048, TF1.x-compatible bilinear resize to 299 "
    "(legacy TF mode), uint8 input"
)
_PYIQA_LICENCE = "pyiqa 0.1.16 is PolyForm-Noncommercial-1.0.0 (non-commercial use only)"

METRICS: dict[str, Metric] = {
    m.name: m
    for m in [
        Metric("psnr_y", "higher", "image", True, (), "benchmark.metrics.psnr_ssim:psnr", "PSNR on BT.601 Y"),
        Metric("ssim_y", "higher", "image", True, (), "benchmark.metrics.psnr_ssim:ssim", "SSIM on BT.601 Y"),
        Metric("psnr_rgb", "higher", "image", True, (), "benchmark.metrics.psnr_ssim:psnr", "PSNR on RGB"),
        Metric("ssim_rgb", "higher", "image", True, (), "benchmark.metrics.psnr_ssim:ssim", "SSIM on RGB"),
        Metric(
            "lpips",
            "lower",
            "image",
            True,
            ("tv_alexnet", "lpips_alex_v0.1"),
            "benchmark.metrics.perceptual:LPIPS",
            "LPIPS v0.1, AlexNet backbone (lpips package, spatial average), inputs [0,1] from uint8 PNGs.",
            "BSD-2-Clause",
        ),
        Metric(
            "dists",
            "lower",
            "image",
            True,
            ("tv_vgg16", "dists"),
            "benchmark.metrics.perceptual:DISTS",
            "DISTS (Ding et al. 2020), pyiqa implementation, VGG16 backbone, inputs [0,1] from uint8 PNGs.",
            _PYIQA_LICENCE,
        ),
        Metric(
            "musiq",
            "higher",
            "image",
            False,
            ("musiq_koniq",),
            "benchmark.metrics.nr_iqa:MUSIQ",
            "MUSIQ multi-scale transformer trained on KonIQ-10k (pyiqa `musiq`), MOS ~0..100, no reference.",
            _PYIQA_LICENCE,
        ),
        Metric(
            "clipiqa",
            "higher",
            "image",
            False,
            ("clip_rn50",),
            "benchmark.metrics.nr_iqa:CLIPIQA",
            "CLIP-IQA (pyiqa `clipiqa`), CLIP RN50, antonym prompt pairs, 0..1, no reference.",
            _PYIQA_LICENCE,
        ),
        Metric(
            "fid",
            "lower",
            "set",
            True,
            ("fidelity_inception",),
            "benchmark.metrics.distribution:fid_kid",
            f"FID of the SR set against the HR set; {_FID_NOTE}. Below 2048 images the covariance is "
            "rank-deficient: compare methods on the same set only.",
            "Apache-2.0",
        ),
        Metric(
            "kid",
            "lower",
            "set",
            True,
            ("fidelity_inception",),
            "benchmark.metrics.distribution:fid_kid",
            f"KID (unbiased MMD, cubic polynomial kernel) mean over 100 random subsets of min(1000, max(2, N // 2)) "
            f"of the N images (torch-fidelity rng seed 2020), so that the subsets differ; {_FID_NOTE}.",
            "Apache-2.0",
        ),
        Metric(
            "patch_fid",
            "lower",
            "set",
            True,
            ("fidelity_inception",),
            "benchmark.metrics.distribution:patch_fid",
            f"FID over non-overlapping patches (side = image side / 4, >= 16 px) of SR vs HR; {_FID_NOTE}.",
            "Apache-2.0",
        ),
    ]
}

_RVSA = "benchmark.downstream.bench:DownstreamScorer"
_CLS = f"RVSA ViT-B UCM scene classifier (21 classes) on SR and on HR of each image; {CLS_POLICY}"
_SEG = f"RVSA UperNet LoveDA segmenter (7 classes) on SR and on HR; {SEG_POLICY}"
_MAP = (
    "Map segmenter trained on this dataset's train split (`cmsrd-bench train-downstream`; which one: run.json "
    "`downstream.map_segmenter`, architecture and weights sha256) run on SR, scored against the dataset's OSM "
    f"class mask of the same tile on class groups ({groups_text()}), confusion accumulated over the set"
)
METRICS.update(
    {
        m.name: m
        for m in [
            Metric(
                "cls_top1_agree",
                "higher",
                "set",
                True,
                ("rvsa_ucm_vit_b",),
                _RVSA,
                f"Top-1 agreement: fraction of images whose SR top-1 class equals the HR top-1 class. {_CLS}",
                "MIT (RVSA)",
            ),
            Metric(
                "cls_top5_agree",
                "higher",
                "set",
                True,
                ("rvsa_ucm_vit_b",),
                _RVSA,
                f"Top-5 agreement: fraction of images whose HR top-1 class is among the SR's 5 highest scores. {_CLS}",
                "MIT (RVSA)",
            ),
            Metric(
                "cls_kappa",
                "higher",
                "set",
                True,
                ("rvsa_ucm_vit_b",),
                _RVSA,
                "Cohen's kappa of the SR and HR top-1 labels over the set, (p_o - p_e) / (1 - p_e), 1.0 when "
                f"p_e = 1. {_CLS}",
                "MIT (RVSA)",
            ),
            Metric(
                "seg_miou_vs_hr",
                "higher",
                "set",
                True,
                ("rvsa_loveda_upernet",),
                _RVSA,
                "mIoU of the SR segmentation with the HR segmentation as label, confusion accumulated over the "
                f"set, mean over the classes present in either (mmseg style). {_SEG}",
                "MIT (RVSA)",
            ),
            Metric(
                "seg_pixel_agree",
                "higher",
                "set",
                True,
                ("rvsa_loveda_upernet",),
                _RVSA,
                f"Fraction of pixels whose SR and HR segmentation classes agree, over the set. {_SEG}",
                "MIT (RVSA)",
            ),
            Metric(
                "map_miou",
                "higher",
                "set",
                False,
                (),
                _RVSA,
                f"Map agreement mIoU over the class groups present. {_MAP}.",
            ),
            Metric(
                "map_pixel_acc",
                "higher",
                "set",
                False,
                (),
                _RVSA,
                f"Map agreement pixel accuracy: fraction of pixels whose predicted class group is the mask's. {_MAP}.",
            ),
        ]
    }
)

DEFAULT_METRICS = ("psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb", "lpips", "dists", "musiq", "clipiqa", "fid", "kid")


def get(name: str) -> Metric:
    if name not in METRICS:
        raise InputError(f"metric {name!r}", "unknown", f"choose from {sorted(METRICS)}")
    return METRICS[name]


def parse_names(text: str | Sequence[str] | None) -> list[str]:
    """`"psnr_y,lpips"` / `"default"` / `"all"` / `"default,map_miou"` -> metric names (validated); `default`
    and `all` inside a list stand for their metrics."""
    if text is None:
        return list(DEFAULT_METRICS)
    names = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    groups = {"default": list(DEFAULT_METRICS), "all": list(METRICS)}
    names = [m for n in names for m in groups.get(n, [n])]
    for n in names:
        if n:
            get(n)
    return list(dict.fromkeys(n for n in names if n))


def _attr(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def build_image_metric(
    name: str, device: str = "cpu", crop_border: int = 0
) -> Callable[[Sequence[np.ndarray], Sequence[np.ndarray]], list[float]]:
    """An image-level metric as `f(sr_images, hr_images) -> per-image values` (uint8 HxWx3 inputs)."""
    m = get(name)
    if m.level != "image":
        raise InputError(f"metric {name!r}", "is a set-level metric", "compute it with compute_set_metrics")
    fn = _attr(m.factory)
    if name in ("psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb"):
        y = name.endswith("_y")
        return lambda sr, hr: [fn(a, b, crop_border=crop_border, y_channel=y) for a, b in zip(sr, hr)]
    return fn(device=device)


def compute_set_metrics(
    names: Sequence[str], sr: Sequence[Any], hr: Sequence[Any], device: str = "cpu", label: str = ""
) -> dict[str, Any]:
    """Set-level metrics (FID/KID in one torch-fidelity pass, patch-FID) -> values and their settings.

    `sr`/`hr` are uint8 HxWx3 arrays or PNG paths (read lazily); `label` names the progress bars."""
    from .distribution import fid_kid, patch_fid

    tag = f" {label}" if label else ""
    out: dict[str, Any] = {}
    if "fid" in names or "kid" in names:
        asked = ",".join(n for n in ("fid", "kid") if n in names)
        res = fid_kid(sr, hr, device=device, kid="kid" in names, desc=f"scoring {asked}{tag}")
        out.update({k: v for k, v in res.items() if k != "fid" or "fid" in names})
    if "patch_fid" in names:
        out.update(patch_fid(sr, hr, device=device, desc=f"scoring patch_fid{tag}"))
    return out
