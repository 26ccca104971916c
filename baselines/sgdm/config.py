"""Typed SGDM configs (`configs/sgdm*.yaml` parsed by `cmsrd.typed`): what each key means and its default.

Top-level `lr` is the official config's base learning rate; `train.lr`, when set, wins (the shipped YAMLs set
both to 5e-5 and keep both, so the configs recorded by earlier runs and benchmark fingerprints stay equal).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from cmsrd.errors import InputError

from ..method_config import MethodConfig, TrainConfig
from .flows import FlowTrainConfig


@dataclass(frozen=True)
class BackboneConfig:
    pretrained: str | None = None  # hub id, diffusers folder or single-file .ckpt of SD2.1-base; null: random init
    geometry: str = "sd21-base"  # named geometry (sd21-base | small | tiny)
    tokenizer: str | None = None  # SD2.1 tokenizer/ folder; null: beside pretrained or the .ckpt, else the hub id
    overrides: dict | None = None  # per-part geometry overrides {unet: {...}, vae: {...}, text: {...}}


@dataclass(frozen=True)
class SGDMNetwork:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    cond_channels: int = 384


@dataclass(frozen=True)
class SamplerConfig:
    name: str = "ddpm"  # official 50-step respaced DDPM; ddim / dpm-solver also available
    steps: int = 50


@dataclass(frozen=True)
class FlowsConfig:
    """Stage 2 of sgdm+ (fitting the style flows; null: `FlowTrainConfig`'s default) and trained flow files."""

    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    step_size: int | None = None
    gamma: float | None = None
    seed: int | None = None
    collect_batch_size: int | None = None  # images per batch while collecting style statistics; null: 16
    augment: bool | None = None  # official flips/rotations while collecting them; null: true
    mean: str | None = None  # trained flows to load (both or neither)
    std: str | None = None

    def validate(self, where: str) -> None:
        if bool(self.mean) != bool(self.std):
            raise InputError(
                where or "flows", "names only one of mean/std", "give both: flows: {mean: PATH, std: PATH}"
            )

    def fit_settings(self) -> FlowTrainConfig:
        given = {f.name: getattr(self, f.name) for f in fields(FlowTrainConfig) if getattr(self, f.name) is not None}
        return FlowTrainConfig(**given)


@dataclass(frozen=True)
class SGDMTrain(TrainConfig):
    lr: float | None = None  # AdamW learning rate; null: the top-level `lr`
    weight_decay: float = 0.01  # AdamW (torch's default)
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class SGDMPlusTrain(SGDMTrain):
    flows: FlowsConfig | None = None  # stage 2 settings over the top-level `flows`


@dataclass(frozen=True)
class SGDMConfig(MethodConfig):
    network: SGDMNetwork = field(default_factory=SGDMNetwork)
    lr: float = 5e-5  # official base learning rate
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    flows: FlowsConfig = field(default_factory=FlowsConfig)
    train: SGDMTrain = field(default_factory=SGDMTrain)


@dataclass(frozen=True)
class SGDMPlusConfig(SGDMConfig):
    train: SGDMPlusTrain = field(default_factory=SGDMPlusTrain)


def merged_flows(top: FlowsConfig, over: FlowsConfig | None) -> FlowsConfig:
    """`train.flows` over the top-level `flows`: the keys the train block sets win."""
    if over is None:
        return top
    return replace(top, **{f.name: getattr(over, f.name) for f in fields(over) if getattr(over, f.name) is not None})
