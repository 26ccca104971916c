"""`cmsrd-bench train-downstream` (the map segmenter) and `cmsrd-bench downstream list` (the models, exact sizes)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from cmsrd.errors import InputError

CLASSIFIER_KEY = "rvsa_ucm_vit_b"
SEGMENTER_KEY = "rvsa_loveda_upernet"


def models() -> list[dict[str, Any]]:
    """The downstream models with exact parameter counts (built on the meta device: no memory, no weights)."""
    import torch

    from .inference import CLS_POLICY, SEG_POLICY
    from .mapseg import MapSegNet, groups_text
    from .rvsa import RVSAClassifier, count_parameters
    from .uperhead import LOVEDA_CLASSES, RVSASegmenter

    with torch.device("meta"):
        cls, seg, mapseg = RVSAClassifier(), RVSASegmenter(), MapSegNet()
    return [
        {
            "name": "rvsa_classifier",
            "task": "scene classification (UCM, 21 classes)",
            "architecture": "ViT-B + RVSA (ViT_Win_RVSA), 224 px",
            "parameters": count_parameters(cls),
            "weights": CLASSIFIER_KEY,
            "input": CLS_POLICY,
            "metrics": ["cls_top1_agree", "cls_top5_agree", "cls_kappa"],
        },
        {
            "name": "rvsa_segmenter",
            "task": f"semantic segmentation (LoveDA, {len(LOVEDA_CLASSES)} classes: {', '.join(LOVEDA_CLASSES)})",
            "architecture": "UperNet, ViT-B + RVSA backbone (ViT_Win_RVSA_V3_WSZ7), 512 px; auxiliary FCN head dropped",
            "parameters": count_parameters(seg),
            "backbone_parameters": count_parameters(seg.backbone),
            "decode_head_parameters": count_parameters(seg.decode_head),
            "weights": SEGMENTER_KEY,
            "input": SEG_POLICY,
            "metrics": ["seg_miou_vs_hr", "seg_pixel_agree"],
        },
        {
            "name": "map_segmenter",
            "task": f"OSM map classes of the dataset legend, scored on groups ({groups_text()})",
            "architecture": "small U-Net (benchmark.downstream.mapseg), trained per dataset",
            "parameters": count_parameters(mapseg),
            "weights": "trained: `cmsrd-bench train-downstream --data DATASET --out DIR` -> DIR/mapseg.safetensors",
            "input": "HR-size RGB, average-pooled x4 inside the model",
            "metrics": ["map_miou", "map_pixel_acc"],
        },
    ]


@click.group("downstream")
def downstream() -> None:
    """Downstream models of the agreement metrics (RVSA classifier and segmenter, map segmenter)."""


@downstream.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_command(as_json: bool) -> None:
    """Each downstream model: task, architecture, exact parameter count, weights, input policy."""
    rows = models()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        extra = (
            f" (backbone {r['backbone_parameters']:,}, decode head {r['decode_head_parameters']:,})"
            if "backbone_parameters" in r
            else ""
        )
        click.echo(f"{r['name']}: {r['parameters']:,} parameters{extra}")
        click.echo(f"  {r['task']}; {r['architecture']}")
        click.echo(f"  weights: {r['weights']}; metrics: {', '.join(r['metrics'])}")


@click.command("train-downstream")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="A dataset built by `cmsrd build`.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder (mapseg.safetensors).")
@click.option("--max-minutes", type=float, default=3.0, show_default=True, help="Training-time budget.")
@click.option("--max-steps", type=int, default=None, help="Stop after this many steps (whichever comes first).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--crop", type=int, default=None, help="Random square crop (default: whole tiles).")
@click.option("--width", type=int, default=16, show_default=True, help="U-Net base width.")
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
def train_downstream_command(
    data: Path,
    out: Path,
    max_minutes: float,
    max_steps: int | None,
    batch_size: int,
    crop: int | None,
    width: int,
    lr: float,
    seed: int,
    device: str,
) -> None:
    """Train the map segmenter of the map-agreement metrics on DATA's train split (HR -> OSM mask classes)."""
    from .train_mapseg import train_map_segmenter

    if max_minutes <= 0 and max_steps is None:
        raise InputError(f"--max-minutes {max_minutes}", "must be positive", "e.g. --max-minutes 3")
    summary = train_map_segmenter(
        data,
        out,
        max_minutes=max_minutes if max_minutes > 0 else None,
        max_steps=max_steps,
        batch_size=batch_size,
        crop=crop,
        lr=lr,
        width=width,
        seed=seed,
        device=device,
        echo=lambda s: click.echo(s, err=True),
    )
    click.echo(json.dumps({k: summary[k] for k in ("weights", "sha256", "hr_test_score")}, indent=2))
    if summary["train"]["steps"] == 0:
        sys.exit(1)
