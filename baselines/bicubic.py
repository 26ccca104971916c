"""Bicubic interpolation, the floor of every SR table: MATLAB `imresize` semantics (Keys cubic,
a = -0.5) from `cmsrd.degrade.imresize_torch`, the same operator that made the synthetic LR."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from cmsrd.errors import InputError

from .base import Batch, SRMethod
from .conditions import Conditions
from .method_config import MethodConfig, TrainConfig
from .registry import MethodSpec
from .seeding import Generators
from .specs import BICUBIC

SPEC = BICUBIC  # the registry's spec (`baselines.specs`): listing methods needs no torch


@dataclass(frozen=True)
class BicubicNetwork:
    type: Literal["imresize_bicubic"] = "imresize_bicubic"
    clamp: bool = True  # clip the overshoot of the cubic kernel to [0, 1]


@dataclass(frozen=True)
class BicubicConfig(MethodConfig):
    network: BicubicNetwork = field(default_factory=BicubicNetwork)
    train: TrainConfig = field(default_factory=TrainConfig)  # nothing to train: configure_optimizers refuses


class Bicubic(SRMethod):
    """No parameters: upsample `lr` by the method's scale."""

    config_type = BicubicConfig

    def __init__(self, spec: MethodSpec, scale: int, config: dict[str, Any], device: Any = "cpu"):
        super().__init__(spec, scale, config, device)
        self.clamp = self.settings.network.clamp

    def super_resolve(self, batch: Batch, cond: Conditions, generator: Generators = None) -> torch.Tensor:
        from cmsrd.degrade import imresize_torch

        lr = batch["lr"]
        out = imresize_torch(lr.float(), size=(lr.shape[-2] * self.scale, lr.shape[-1] * self.scale))
        return out.clamp(0.0, 1.0) if self.clamp else out

    def load_checkpoint(self, path: str | Path) -> None:
        raise InputError(f"checkpoint {path}", "bicubic has no weights to load", "drop the checkpoint for this method")

    def configure_optimizers(self, train_cfg: TrainConfig) -> dict[str, torch.optim.Optimizer]:
        raise InputError(
            "method 'bicubic'", "has no trainable parameters", "train a learned method (esrgan, swinir, sgdm)"
        )
