"""SwinIR (Liang et al., ICCVW 2021), classical SR with a 2^n pixel-shuffle upsampler for x16/x32.

L1 training with the authors' Adam + MultiStepLR settings (`configs/swinir.yaml`). Loads our
safetensors and the official checkpoints (`params` or `params_ema` inside a `.pth`, official key
names; geometry-derived buffers `attn_mask` / `relative_position_index` are dropped and rebuilt).

`network.img_size` is the official training LR patch size (KAIR: HR patch / scale). It decides the
attention geometry: at x32 with 256 px HR the LR is 8 px, one whole window, so no block shifts. Left
null it follows the data: 256 px HR tiles at build time (x16: 16, x32: 8), then the dataset's LR size
when training starts, or the img_size a checkpoint was built with when one is loaded. `config["network"]`
keeps what the user wrote; the img_size built is recorded in exported weights (`export_metadata`).

Older checkpoints (trained before this rule, when the default was 64) carry `img_size: 64` in their
metadata and are evaluated with that geometry, i.e. with shifted windows even where the LR fits one window.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from cmsrd.errors import InputError

from .archs.swinir import block_geometry, official_img_size, strip_derived_buffers
from .checkpoint import describe_mismatch
from .feedforward import FeedForwardMethod, FeedForwardTrain
from .registry import build_arch
from .specs import SWINIR

SPEC = SWINIR  # the registry's spec (`baselines.specs`): listing methods needs no torch

_UP = re.compile(r"^upsample\.(\d+)\.weight$")


class SwinIRMethod(FeedForwardMethod):
    scale_arg = "upscale"
    key_layouts = (
        "ours, and the official repository's (`params` / `params_ema`, official key names, "
        "with or without attn_mask buffers)"
    )
    img_size_follows_data = False  # network.img_size left null

    def resolve_network(self, net_opt: dict[str, Any]) -> dict[str, Any]:
        from cmsrd.layout import DatasetLayout

        self.img_size_follows_data = net_opt.get("img_size") is None
        if self.img_size_follows_data:  # the LR patch of the benchmark's HR tiles until data or a checkpoint tell
            net_opt = {**net_opt, "img_size": max(1, DatasetLayout.hr_px // self.scale)}
        return net_opt

    def use_img_size(self, img_size: int, source: str, keep_weights: bool = True) -> None:
        """Give the network the attention geometry of training patches of `img_size` px (from `source`).

        Only a null `network.img_size` follows (`config` keeps the null; `export_metadata` records the value
        built); an explicit one that gives other windows is an error. With
        `keep_weights` the weights are carried over, which fails only for loaded weights whose block window
        (the relative-position tables' shape) would change."""
        net = self.net_g
        if not self.img_size_follows_data:
            if block_geometry(img_size, net.window_size) != block_geometry(net.img_size, net.window_size):
                raise InputError(
                    f"network.img_size = {net.img_size}",
                    f"gives other attention windows than {source} ({img_size} px)",
                    f"set network.img_size to {img_size}, or to null to follow the data and checkpoints",
                )
            return
        if img_size == net.img_size:
            return
        opt = {**self.config["network"], self.scale_arg: self.scale, "img_size": img_size}
        with torch.random.fork_rng(devices=[]):  # reconfiguring leaves the seeded random streams where they were
            new = build_arch(opt).to(next(net.parameters()).device)
        if keep_weights and describe_mismatch(new.state_dict(), net.state_dict()) is None:
            new.load_state_dict(net.state_dict())
        elif keep_weights and self.loaded_from is not None:
            raise InputError(
                f"{source} ({img_size} px patches)",
                f"needs other relative-position tables than checkpoint {self.loaded_from}",
                f"train on data whose LR is {net.img_size} px, or start without that checkpoint",
            )
        self.net_g = new

    def match_checkpoint(self, state: dict[str, torch.Tensor], meta: dict[str, Any], path: Path) -> None:
        img_size = (meta.get("network") or {}).get("img_size") or official_img_size(state)
        if img_size is not None:
            self.use_img_size(int(img_size), f"checkpoint {path}", keep_weights=False)

    def configure_optimizers(self, train_cfg: FeedForwardTrain) -> dict[str, torch.optim.Optimizer]:
        if train_cfg.hr_px:
            try:
                self.use_img_size(train_cfg.hr_px // self.scale, "the training LR patches")
            except InputError as e:
                if not train_cfg.resuming:
                    raise
                # changing img_size is refused by the resume check, so the usual fix would send the user in a
                # circle. Two causes: a run recorded before the single-window rule, or another dataset (other LR px)
                raise InputError(
                    e.what,
                    e.problem,
                    "if this run's img_size was recorded before the official single-window rule "
                    "(old default 64), it cannot continue under that rule: train into a new --out (network.img_size "
                    "null), or use its model.safetensors as it is. Otherwise resume on the run's own dataset",
                ) from e
        return super().configure_optimizers(train_cfg)

    def export_metadata(self) -> dict[str, Any]:
        meta = super().export_metadata()
        return {**meta, "network": {**meta["network"], "img_size": self.net_g.img_size}}

    def convert_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return strip_derived_buffers(state)

    def checkpoint_scale(self, state: dict[str, torch.Tensor]) -> int | None:
        n = sum(1 for k in state if _UP.match(k))
        return 2**n if n else None
