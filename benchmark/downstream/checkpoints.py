"""Loaders for the official RVSA files (OneDrive-hosted; see `manifests/weights.yaml`).

Classifier: the MAE fine-tuning script saves `{'model', 'optimizer', 'max_accuracy', 'epoch', 'args'}` with
`args` an `argparse.Namespace`. It is read with `torch.load(weights_only=True)` and only
`argparse.Namespace` added to the allowed globals, so nothing in the file can run code.
Segmenter: an mmseg 0.x checkpoint, `{'meta', 'state_dict', 'optimizer'}`; `backbone.*` goes to the
backbone (prefix stripped), `decode_head.*` to the UPerHead under mmseg's names, `auxiliary_head.*` (a
training loss) is dropped. A file of the wrong kind, class count or size is one `InputError` naming the
file and the fix.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from baselines.checkpoint import load_strict, read_state_dict
from cmsrd.errors import InputError

from .rvsa import RVSAClassifier
from .uperhead import RVSASegmenter

UCM_CLASSES = 21
LOVEDA_CLASSES = 7
_OTHER_CLASSIFIERS = "AID has 30 classes, NWPU-RESISC45 45"
_OTHER_SEGMENTERS = "Potsdam has 6 classes, iSAID 16"
M = TypeVar("M", RVSAClassifier, RVSASegmenter)


def read_official(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of an official RVSA file, weights-only, with `argparse.Namespace` (the classifier's
    saved `args`) as the one extra allowed global."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return read_state_dict(path)


def _kind(state: dict[str, torch.Tensor]) -> str:
    if any(k.startswith("backbone.") for k in state) or any(k.startswith("decode_head.") for k in state):
        return "segmenter"
    if "head.weight" in state and "blocks.0.attn.qkv.weight" in state:
        return "classifier"
    if "blocks.0.attn.qkv.weight" in state:
        return "pretrained"  # MAE pre-training: encoder without a fine-tuned head
    return "unknown"


def _wrong_kind(path: Path, want: str, got: str) -> InputError:
    said = {
        "segmenter": "an mmseg segmentation checkpoint (backbone./decode_head. tensors)",
        "classifier": "an RVSA scene-classification checkpoint (ckpt['model'] with head.weight)",
        "pretrained": "a pre-trained RVSA encoder without a fine-tuned head",
        "unknown": "not an RVSA checkpoint",
    }[got]
    fix = {
        "classifier": "use the UCM fine-tuned ViT-B + RVSA classifier file (manifest key rvsa_ucm_vit_b)",
        "segmenter": "use the LoveDA UperNet ViT-B + RVSA segmentation file (manifest key rvsa_loveda_upernet)",
    }[want]
    return InputError(f"RVSA {want} checkpoint {path}", f"is {said}", fix)


def classifier_state(state: dict[str, torch.Tensor], path: Path, num_classes: int = UCM_CLASSES) -> dict:
    """The classifier's tensors, checked for kind and class count."""
    if (kind := _kind(state)) != "classifier":
        raise _wrong_kind(path, "classifier", kind)
    n = state["head.weight"].shape[0]
    if n != num_classes:
        raise InputError(
            f"RVSA classifier checkpoint {path}",
            f"has {n} classes (head.weight {tuple(state['head.weight'].shape)}), the benchmark needs {num_classes}",
            f"use the UCM fine-tuned file ({num_classes} classes); {_OTHER_CLASSIFIERS}",
        )
    return state


def segmenter_state(state: dict[str, torch.Tensor], path: Path, num_classes: int = LOVEDA_CLASSES) -> dict:
    """`backbone.*` and `decode_head.*` tensors (mmseg names), auxiliary head dropped, class count checked."""
    if (kind := _kind(state)) != "segmenter":
        raise _wrong_kind(path, "segmenter", kind)
    if "decode_head.conv_seg.weight" not in state:
        raise InputError(
            f"RVSA segmenter checkpoint {path}",
            "has no decode_head.conv_seg (not an UperNet checkpoint, or a backbone-only file)",
            "use the LoveDA UperNet ViT-B + RVSA file (manifest key rvsa_loveda_upernet)",
        )
    n = state["decode_head.conv_seg.weight"].shape[0]
    if n != num_classes:
        raise InputError(
            f"RVSA segmenter checkpoint {path}",
            f"has {n} classes (decode_head.conv_seg), the benchmark needs {num_classes} (LoveDA)",
            f"use the LoveDA fine-tuned file; {_OTHER_SEGMENTERS}",
        )
    return {k: v for k, v in state.items() if k.startswith(("backbone.", "decode_head."))}


def load_classifier_state(model: RVSAClassifier, state: dict[str, torch.Tensor], path: Path) -> None:
    load_strict(
        model,
        classifier_state(state, path, model.num_classes),
        f"RVSA classifier checkpoint {path}",
        hint="use the ViT-B + RVSA (not ViTAE, not kvdiff) classifier fine-tuned at 224 px",
        layouts="official ViT_Win_RVSA ckpt['model']",
    )


def load_segmenter_state(model: RVSASegmenter, state: dict[str, torch.Tensor], path: Path) -> None:
    """Backbone (prefix `backbone.` stripped) and decode head loaded strictly, each on its own."""
    state = segmenter_state(state, path, model.num_classes)
    hint = "use the ViT-B + RVSA (not ViTAE, not kvdiff) UperNet trained at 512 px"
    for part in ("backbone", "decode_head"):
        prefix = part + "."
        sub = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        load_strict(
            getattr(model, part), sub, f"RVSA segmenter checkpoint {path} ({part})", hint, "mmseg 0.x state_dict"
        )


def _load_official(
    path: str | os.PathLike,
    device: str | torch.device,
    model: M,
    load_state: Callable[[M, dict[str, torch.Tensor], Path], None],
) -> M:
    path = Path(path)
    load_state(model, read_official(path), path)
    return model.eval().to(device)


def load_classifier(
    path: str | os.PathLike, device: str | torch.device = "cpu", model: RVSAClassifier | None = None
) -> RVSAClassifier:
    """The UCM ViT-B RVSA classifier from its official file, in eval mode (`model`: another size, for tests)."""
    return _load_official(path, device, model or RVSAClassifier(num_classes=UCM_CLASSES), load_classifier_state)


def load_segmenter(
    path: str | os.PathLike, device: str | torch.device = "cpu", model: RVSASegmenter | None = None
) -> RVSASegmenter:
    """The LoveDA UperNet ViT-B RVSA segmenter from its official mmseg file, in eval mode (`model`: for tests)."""
    return _load_official(path, device, model or RVSASegmenter(num_classes=LOVEDA_CLASSES), load_segmenter_state)
