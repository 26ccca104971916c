"""The typed `ldm` config (`configs/ldm*.yaml` parsed by `cmsrd.typed`): the backbone and sampler blocks are
SGDM's (same keys, same meaning); the train block adds SRLDM's AdamW settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..method_config import MethodConfig, TrainConfig
from ..sgdm.config import BackboneConfig, SamplerConfig


@dataclass(frozen=True)
class LDMNetwork:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)


@dataclass(frozen=True)
class LDMTrain(TrainConfig):
    lr: float = 1e-5  # official SRLDM learning_rate (AdamW over the whole UNet)
    weight_decay: float = 0.01  # AdamW (torch's default, as the official run)
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class LDMConfig(MethodConfig):
    network: LDMNetwork = field(default_factory=LDMNetwork)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    train: LDMTrain = field(default_factory=LDMTrain)
