"""Typed method and training configs: the YAML under `baselines/configs/` (with `--config`/`--set` merged
over it) is parsed into these dataclasses by `cmsrd.typed`, the loader of the dataset presets, so a misspelt
key at any level (top-level `network_g:` included) is refused with the closest valid key, and each default
is written once, here or in the method's own subclass.

A method declares `config_type`, a `MethodConfig` subclass that types its `train` block (a `TrainConfig`
subclass adding the method's keys: its `train_keys` are those extra fields) and whatever else it reads.
`network` stays a mapping: it is the architecture's constructor arguments, checked against that signature by
`registry.build_arch` (the arguments of a component are its config, as in diffusers).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_type_hints

import torch

from cmsrd.errors import InputError
from cmsrd.typed import INTERNAL, build, coerce, to_dict, user_fields

# ---- optimizers (`optim_g: {type: Adam, lr: 2e-4, ...}`; unset values are torch's defaults) ------------


@dataclass(frozen=True)
class Adam:
    type: Literal["Adam"] = "Adam"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False


@dataclass(frozen=True)
class AdamW:
    type: Literal["AdamW"] = "AdamW"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    amsgrad: bool = False


@dataclass(frozen=True)
class SGD:
    type: Literal["SGD"] = "SGD"
    lr: float = 1e-3
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False


@dataclass(frozen=True)
class RMSprop:
    type: Literal["RMSprop"] = "RMSprop"
    lr: float = 1e-2
    alpha: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    centered: bool = False


Optimizer = Adam | AdamW | SGD | RMSprop


def build_optimizer(cfg: Optimizer | dict[str, Any], params: Any, where: str = "optimizer") -> torch.optim.Optimizer:
    """A typed optimizer block (or the mapping it is parsed from) -> the torch optimizer."""
    opt = coerce(cfg, Optimizer, where) if isinstance(cfg, dict) else cfg
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in to_dict(opt).items() if k != "type"}
    return getattr(torch.optim, opt.type)(params, **kwargs)


# ---- learning-rate schedules, stepped once per optimisation step ---------------------------------------


@dataclass(frozen=True)
class ConstantLR:
    type: Literal["constant"] = "constant"


@dataclass(frozen=True)
class MultiStepLR:
    type: Literal["MultiStepLR"] = "MultiStepLR"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.5

    def validate(self, where: str) -> None:
        if not self.milestones:  # an empty list would silently train at a constant learning rate
            raise InputError(
                f"{where}.milestones",
                "is missing or empty for MultiStepLR",
                "give the steps at which lr is multiplied by gamma, or use type: constant",
            )


@dataclass(frozen=True)
class CosineAnnealingLR:
    type: Literal["CosineAnnealingLR"] = "CosineAnnealingLR"
    T_max: int | None = None  # null: train.total_steps
    eta_min: float = 0.0


Scheduler = ConstantLR | MultiStepLR | CosineAnnealingLR  # the first is the default when `type` is left out


def build_scheduler(cfg: Scheduler, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    sched = torch.optim.lr_scheduler
    if isinstance(cfg, MultiStepLR):
        return sched.MultiStepLR(optimizer, milestones=list(cfg.milestones), gamma=cfg.gamma)
    if isinstance(cfg, CosineAnnealingLR):
        t_max = cfg.T_max if cfg.T_max is not None else total_steps
        return sched.CosineAnnealingLR(optimizer, T_max=t_max, eta_min=cfg.eta_min)
    return sched.LambdaLR(optimizer, lambda _: 1.0)


# ---- training -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """The trainer's own `train.*` keys (`benchmark.train`); methods subclass it to add theirs."""

    batch_size: int = 16
    total_steps: int = 100000
    max_minutes: float | None = None  # training-time budget (optimisation only, summed over resumes)
    scheduler: Scheduler = field(default_factory=ConstantLR)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    accumulate: int = 1  # micro-batches per optimisation step
    ema_decay: float = 0.0  # EMA of net_g; 0: none
    grad_clip: float | None = None
    num_workers: int = 0
    seed: int = 0
    log_every: int = 100
    val_every: int = 5000
    val_every_minutes: float | None = None
    save_every: int = 5000
    keep_checkpoints: int = 2
    val_max_images: int = 100
    val_batch_size: int = 4
    val_crop_border: int = 0
    val_conditions: str = "default"
    lpips: bool | str = "auto"  # auto (when its weights are cached) | on | off (YAML `off` reads as false)
    keep_best: Literal["lpips", "psnr_y"] | None = None
    # set by the trainer for `configure_optimizers`, never by a config
    hr_px: int | None = field(default=None, metadata=INTERNAL)  # the dataset's HR size
    resuming: bool = field(default=False, metadata=INTERNAL)  # weights will come from the run's checkpoint

    @property
    def lpips_mode(self) -> str:
        mode = str(self.lpips).lower()
        return "off" if mode in ("false", "off", "no") else "auto" if mode == "auto" else "on"

    def validate(self, where: str) -> None:
        for key in ("batch_size", "accumulate", "log_every", "val_every", "save_every", "val_batch_size"):
            if getattr(self, key) < 1:
                raise InputError(f"{where}.{key} = {getattr(self, key)}", "must be >= 1")
        for key in ("max_minutes", "val_every_minutes"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise InputError(f"{where}.{key} {value}", "must be a positive number of minutes")
        if self.keep_best == "lpips" and self.lpips_mode == "off":
            raise InputError(
                f"{where}.keep_best lpips",
                "needs LPIPS but train.lpips is off",
                "set train.lpips to auto, or keep_best psnr_y",
            )


TRAINER_KEYS = frozenset(user_fields(TrainConfig))


@dataclass(frozen=True)
class MethodConfig:
    """The top level of a method config; a method's subclass types `train` (and any block it adds)."""

    network: dict = field(default_factory=dict)  # {type: ArchName, ...constructor arguments}
    checkpoint: str | None = None  # weights loaded when the method is built (a training run's start weights)
    train: TrainConfig = field(default_factory=TrainConfig)


def train_type(config_type: type) -> type:
    """The `train` block's dataclass of a method config type."""
    return get_type_hints(config_type)["train"]


def method_train_keys(config_type: type) -> frozenset[str]:
    """The `train.*` keys a method reads beyond the trainer's: its train block's extra fields."""
    return frozenset(user_fields(train_type(config_type))) - TRAINER_KEYS


def parse_config(config_type: type, config: dict[str, Any], name: str) -> Any:
    """A merged config mapping -> the method's typed config; unknown keys at any level are refused."""
    return build(config_type, config, "", problem=f"is not a key of the {name} config")


def train_config(train: TrainConfig, hr_px: int | None = None, resuming: bool = False, **keys: Any) -> TrainConfig:
    """What the trainer hands `configure_optimizers`: the train block `train` with the config `keys` set over
    it (parsed, so checked as in a config file), the dataset's HR size and whether the run resumes."""
    if keys:
        train = build(type(train), {**to_dict(train), **keys}, "train")
    return dataclasses.replace(train, hr_px=hr_px, resuming=resuming)
