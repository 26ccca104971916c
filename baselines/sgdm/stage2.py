"""SGDM+ stage 2: fit the two style flows to the stage-1 style encoder's statistics of the HR images.

A separate stage because it needs finished stage-1 weights (the style encoder) and no gradient loop of the
shared trainer; `cmsrd-bench train --stage 2` reaches it through `SGDMPlus.run_stage`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from cmsrd.errors import InputError
from cmsrd.io import atomic_path, atomic_write_text, sha256_file

from ..checkpoint import run_weights
from .config import merged_flows
from .flows import train_style_flows
from .loading import FLOWS_FILE

if TYPE_CHECKING:
    from .config import SGDMPlusTrain
    from .model import SGDMPlus

log = logging.getLogger(__name__)


@torch.no_grad()
def collect_style_stats(
    m: SGDMPlus, data_root: Path, batch_size: int = 16, augment: bool = True, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Style-encoder mean/std (N x 32 each) of the HR training images in [-1, 1]."""
    from tqdm.auto import tqdm

    from cmsrd.data import CMSRDDataset

    ds = CMSRDDataset(data_root, "train", inputs=("hr",), augment=augment, seed=seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
    enc = m.adapter.merge_encoder.HR_Style_Encoder
    was_training = enc.training
    enc.eval()
    means, stds = [], []
    for item in tqdm(loader, desc="style stats", leave=False):
        mean, std = enc.stats(item["hr"].to(m.device) * 2 - 1)
        means.append(mean.flatten(1).float().cpu())
        stds.append(std.flatten(1).float().cpu())
    enc.train(was_training)
    return torch.cat(means).numpy(), torch.cat(stds).numpy()


def run_stage2(m: SGDMPlus, data_root: Path, train_cfg: SGDMPlusTrain, out_dir: Path) -> None:
    """Collect HR style statistics with the stage-1 style encoder and fit the two flows.

    Reads `model-best.safetensors` from `out_dir` when present (else `model.safetensors`) unless a checkpoint
    was loaded. Writes `style_mean.npy`, `style_std.npy`, `flows.safetensors` and `flows_history.json` beside
    the stage-1 file (where loading finds the flows); both record `stage1_weights` (its name and sha256)."""
    from safetensors.torch import save_file

    fcfg = merged_flows(m.settings.flows, train_cfg.flows)  # typed: a misspelt key was refused when parsed
    out_dir = Path(out_dir)
    if m.loaded_from is None:
        # the LPIPS-best stage-1 weights (train.keep_best, as the official ModelCheckpoint), else the last
        stage1 = run_weights(out_dir)
        if stage1 is None:
            raise InputError(
                f"stage 2 of {m.spec.name}",
                "needs the stage-1 weights (the style encoder), none were loaded",
                "run it with --out set to the stage-1 run folder (holding model.safetensors), or set "
                "`checkpoint:` in the config",
            )
        log.info("%s stage 2: style encoder from %s", m.spec.name, stage1)
        m.load_checkpoint(stage1)
    if torch.cuda.is_available() and m.device.type == "cpu":
        m.to("cuda")
    means, stds = collect_style_stats(
        m,
        Path(data_root),
        fcfg.collect_batch_size if fcfg.collect_batch_size is not None else 16,
        fcfg.augment if fcfg.augment is not None else True,
        train_cfg.seed,
    )
    for name, arr in (("style_mean.npy", means), ("style_std.npy", stds)):
        with atomic_path(out_dir / name) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, arr)
    cfg = fcfg.fit_settings()
    m.flows.requires_grad_(True)
    try:
        history = train_style_flows(m.flows, means, stds, cfg)
    finally:
        m.flows.requires_grad_(False)
    state = {k: v.detach().cpu().contiguous() for k, v in m.flows.state_dict().items()}
    # the flows model this file's style space: recorded so loading can spot another stage-1 file
    stage1_weights = {"name": m.loaded_from.name, "sha256": sha256_file(m.loaded_from)}
    with atomic_path(out_dir / FLOWS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"stage1_weights": json.dumps(stage1_weights)})
    atomic_write_text(
        out_dir / "flows_history.json", json.dumps({"n": len(means), "stage1_weights": stage1_weights, **history})
    )
