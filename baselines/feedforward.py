"""Shared base of single-network SR methods (ESRGAN, SwinIR): one generator `net_g` built from the
config's `network` block, one forward pass per image, L1 training, checkpoints in our safetensors or
the authors' layouts (subclasses convert keys)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmsrd.errors import InputError

from . import archs  # noqa: F401  (registers the architectures)
from .base import Batch, SRMethod, TrainContext
from .checkpoint import load_strict, read_metadata, read_state_dict
from .conditions import Conditions
from .losses import L1Loss
from .method_config import Adam, MethodConfig, Optimizer, TrainConfig, build_optimizer
from .registry import MethodSpec, build_arch
from .seeding import Generators

__all__ = ["FeedForwardConfig", "FeedForwardMethod", "FeedForwardTrain", "build_optimizer"]


@dataclass(frozen=True)
class FeedForwardTrain(TrainConfig):
    """L1 training of the generator (BasicSR's PSNR-oriented recipe)."""

    optim_g: Optimizer = field(default_factory=lambda: Adam(lr=2e-4, betas=(0.9, 0.99)))
    pixel_weight: float = 1.0


@dataclass(frozen=True)
class PathConfig:
    param_key: str | None = None  # key of the weights inside an authors' .pth; null: params_ema, else params


@dataclass(frozen=True)
class FeedForwardConfig(MethodConfig):
    path: PathConfig = field(default_factory=PathConfig)
    train: FeedForwardTrain = field(default_factory=FeedForwardTrain)


class FeedForwardMethod(SRMethod):
    """A generator network mapping `lr` to SR. Subclasses set `scale_arg` and `convert_state`."""

    config_type = FeedForwardConfig
    scale_arg = "scale"  # constructor argument of the architecture that holds the scale
    key_layouts = "ours"  # the checkpoint key layouts `convert_state` reads, named in load errors

    def __init__(self, spec: MethodSpec, scale: int, config: dict[str, Any], device: Any = "cpu"):
        super().__init__(spec, scale, config, device)
        net_opt = dict(config.get("network") or {})
        if not net_opt.get("type"):
            raise InputError(f"config of method {spec.name!r}", "has no `network: {type: ...}` block")
        given = net_opt.get(self.scale_arg)
        if given is not None and int(given) != scale:
            raise InputError(
                f"network.{self.scale_arg} = {given} in the {spec.name} config",
                f"disagrees with the requested scale x{scale}",
                f"drop network.{self.scale_arg} (it follows --scale) or set it to {scale}",
            )
        net_opt[self.scale_arg] = scale
        self.net_g = build_arch(self.resolve_network(net_opt)).to(device)
        self.losses: dict[str, nn.Module] = {}  # not submodules: never saved in checkpoints

    def resolve_network(self, net_opt: dict[str, Any]) -> dict[str, Any]:
        """The constructor options actually built: fill in those that follow the scale or data (SwinIR's
        img_size). Identity by default; `self.config` keeps what the user wrote."""
        return net_opt

    # ---- inference ------------------------------------------------------------------------------
    def super_resolve(self, batch: Batch, cond: Conditions, generator: Generators = None) -> torch.Tensor:
        return self.net_g(batch["lr"])

    # ---- weights --------------------------------------------------------------------------------
    def convert_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Authors' key layout -> ours (identity by default)."""
        return state

    def checkpoint_scale(self, state: dict[str, torch.Tensor]) -> int | None:
        """The scale a (converted) state dict was built for, when the keys tell."""
        return None

    def match_checkpoint(self, state: dict[str, torch.Tensor], meta: dict[str, Any], path: Path) -> None:
        """Adopt (or refuse) build settings a checkpoint fixes that own no parameters, before the strict load;
        `state` is as read (authors' keys and buffers), `meta` our safetensors metadata. May replace `net_g`
        (put back if the load then fails). Nothing by default."""

    def load_checkpoint(self, path: str | Path, param_key: str | None = None) -> None:
        path = Path(path)
        meta = read_metadata(path)
        self.check_saved_by(path, meta)
        param_key = param_key or self.settings.path.param_key
        try:
            raw = read_state_dict(path, param_key)
            state = self.convert_state(raw)
        except InputError:
            raise
        except ValueError as e:  # a layout recognised by its keys but not convertible
            raise InputError(
                f"checkpoint {path}",
                str(e),
                f"use a checkpoint in one of the key layouts {self.spec.name} reads: {self.key_layouts}",
            ) from e
        ck_scale = self.checkpoint_scale(state)
        if ck_scale is not None and ck_scale != self.scale:
            raise InputError(
                f"checkpoint {path}",
                f"has the upsampler of a x{ck_scale} model but the method was built for x{self.scale}",
                f"use a x{self.scale} checkpoint or build with scale {ck_scale}",
            )
        previous = self.net_g  # match_checkpoint may rebuild it: a failed load must leave the method as it was
        try:
            self.match_checkpoint(raw, meta, path)
            load_strict(
                self.net_g,
                state,
                f"checkpoint {path}",
                "use a checkpoint of the same network size (see `network:` in the config) and scale",
                self.key_layouts,
            )
        except BaseException:
            self.net_g = previous
            raise
        self.loaded_from = path

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.net_g.state_dict())

    # ---- training -------------------------------------------------------------------------------
    def configure_optimizers(self, train_cfg: FeedForwardTrain) -> dict[str, torch.optim.Optimizer]:
        self.losses["pixel"] = L1Loss(train_cfg.pixel_weight)
        return {"g": build_optimizer(train_cfg.optim_g, self.net_g.parameters())}

    def training_step(self, batch: Batch, ctx: TrainContext) -> dict[str, float]:
        with ctx.autocast():
            sr = self.net_g(batch["lr"])
            loss = self.losses["pixel"](sr.float(), batch["hr"])
        ctx.backward(loss, "g")
        return {"l_pix": float(loss.detach())}
