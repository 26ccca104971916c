"""EDiffSR (Xiao et al., IEEE TGRS 2024): a pixel-space IR-SDE whose chain starts from the upsampled LR.

mu = bicubic upsampling of the LR (torch `interpolate`, as the official `util.upscale`); sampling starts at
mu + sigma_max eps and runs the 100-step reverse SDE at HR resolution with `ConditionalNAFNet` predicting the
noise (`baselines.diffusion.irsde`, `baselines.archs.nafnet`). Training: L1 between the predicted and the
optimal reverse-step mean at a random t, AdamW 4e-5, cosine LR decay, EMA (`configs/ediffsr.yaml`).
The network has no scale-dependent part, so one set of weights runs at any scale; the authors' x4 plain
state dict (`180000_G.pth`) loads strictly. Choices and deviations: `baselines/docs/ediffsr.md`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from cmsrd.errors import InputError

from .archs import nafnet  # noqa: F401  (registers ConditionalNAFNet)
from .base import Batch, SRMethod, TrainContext
from .checkpoint import load_strict, read_metadata, read_state_dict
from .conditions import Conditions
from .diffusion.irsde import IRSDE, sample_irsde
from .method_config import AdamW, MethodConfig, Optimizer, TrainConfig, build_optimizer
from .registry import MethodSpec, build_arch
from .seeding import Generators
from .specs import EDIFFSR

log = logging.getLogger(__name__)

SPEC = EDIFFSR  # the registry's spec (`baselines.specs`): listing methods needs no torch

# prefixes the official training scripts may leave on the keys (DataParallel, torch.compile)
_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class SDEConfig:
    """The IR-SDE (`baselines.diffusion.irsde.IRSDE` checks the values)."""

    max_sigma: float = 50  # 8-bit levels (50/255)
    T: int = 100
    schedule: str = "cosine"
    eps: float = 0.005


@dataclass(frozen=True)
class EDiffSRSampler:
    name: Literal["sde", "posterior"] = "sde"  # `sde`: the official reverse SDE over all T steps
    steps: int | None = None  # `posterior` only; null: all T steps


@dataclass(frozen=True)
class EDiffSRTrain(TrainConfig):
    optim_g: Optimizer = field(default_factory=lambda: AdamW(lr=4e-5, betas=(0.9, 0.99), weight_decay=0.0))
    loss_weight: float = 1.0  # official `train.weight` on the L1


@dataclass(frozen=True)
class EDiffSRConfig(MethodConfig):
    sde: SDEConfig = field(default_factory=SDEConfig)
    sampler: EDiffSRSampler = field(default_factory=EDiffSRSampler)
    train: EDiffSRTrain = field(default_factory=EDiffSRTrain)


def upsample_lr(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """mu: the LR bicubic-upsampled by `scale` (torch bicubic, a = -0.75, no antialias, not clamped)."""
    h, w = lr.shape[-2:]
    return F.interpolate(lr.float(), size=(h * scale, w * scale), mode="bicubic", align_corners=False)


def convert_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The authors' plain `ConditionalNAFNet` state dict -> ours: the names are the same, only the
    DataParallel / torch.compile prefixes are dropped."""
    out = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def check_lr(lr: torch.Tensor, what: str = "lr") -> None:
    """N x 3 x h x w with finite values in [0, 1]: one InputError instead of a shape error inside the U-Net."""
    if lr.ndim != 4 or lr.shape[1] != 3 or min(lr.shape[2:]) < 1:
        raise InputError(
            f"{what} of shape {tuple(lr.shape)}", "expected N x 3 x h x w (RGB LR images)", "give RGB LR batches"
        )
    lo, hi = float(lr.min()), float(lr.max())
    if not (-1e-4 <= lo and hi <= 1 + 1e-4):
        raise InputError(f"{what} values", f"span [{lo:.3g}, {hi:.3g}], expected [0, 1]", "divide 8-bit images by 255")


class EDiffSR(SRMethod):
    """`net_g`: the noise predictor (the trainer keeps its EMA); `sde`: the chain; `sampler_name`: the default
    sampler (`sde`, the official one, or `posterior`); the `steps=N` condition always runs `posterior`."""

    config_type = EDiffSRConfig
    key_layouts = (
        "ours, and the official plain ConditionalNAFNet state dict (e.g. 180000_G.pth; module. prefixes accepted)"
    )

    def __init__(self, spec: MethodSpec, scale: int, config: dict[str, Any], device: Any = "cpu"):
        super().__init__(spec, scale, config, device)
        net_opt = dict(self.settings.network)
        if net_opt.get("type") != "ConditionalNAFNet":
            raise InputError(
                f"network.type {net_opt.get('type')!r} in the {spec.name} config",
                "EDiffSR's chain needs the ConditionalNAFNet noise predictor (inputs x_t, mu, t)",
                "set network.type: ConditionalNAFNet",
            )
        sde = self.settings.sde
        self.sde = IRSDE(max_sigma=sde.max_sigma, T=sde.T, schedule=sde.schedule, eps=sde.eps)
        self.sampler_name = self.settings.sampler.name
        self.default_steps = self.settings.sampler.steps
        if self.sampler_name == "sde" and self.default_steps not in (None, self.sde.T):
            raise InputError(
                f"sampler.steps = {self.default_steps}",
                f"the `sde` sampler always runs all {self.sde.T} steps",
                "drop sampler.steps or use sampler.name: posterior",
            )
        self.sde.grid(self.default_steps)  # validates a posterior step count early
        self.net_g = build_arch(net_opt).to(device)
        self.loss_weight = 1.0  # `train.loss_weight` (official `train.weight`), set by configure_optimizers

    # ---- inference ------------------------------------------------------------------------------
    def _sampler(self, cond: Conditions) -> tuple[str, int | None]:
        if cond.steps is not None:
            return "posterior", cond.steps
        return self.sampler_name, self.default_steps

    def nfe(self, cond: Conditions) -> int:
        name, steps = self._sampler(cond)
        return self.sde.T if name == "sde" else len(self.sde.grid(steps))

    def super_resolve(self, batch: Batch, cond: Conditions, generator: Generators = None) -> torch.Tensor:
        lr = batch["lr"]
        check_lr(lr)
        mu = upsample_lr(lr, self.scale)
        name, steps = self._sampler(cond)
        x, _ = sample_irsde(
            lambda x, t: self.net_g(x, mu, t), mu, self.sde, sampler=name, steps=steps, generator=generator
        )
        return x.clamp(0, 1)

    # ---- weights --------------------------------------------------------------------------------
    def load_checkpoint(self, path: str | Path) -> None:
        """Our safetensors (method and scale checked from its metadata) or the authors' plain `.pth`."""
        path = Path(path)
        meta = read_metadata(path)
        self.check_saved_by(path, meta)
        state = convert_official(read_state_dict(path))
        load_strict(
            self.net_g,
            state,
            f"checkpoint {path}",
            "use a checkpoint of the same network size (width, enc_blk_nums, ...: see `network:` in the config)",
            self.key_layouts,
        )
        if not meta:
            log.info("%s: official-layout weights from %s (the authors released an x4 AID model)", self.spec.name, path)
        self.loaded_from = path

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.net_g.state_dict())

    # ---- training -------------------------------------------------------------------------------
    def configure_optimizers(self, train_cfg: EDiffSRTrain) -> dict[str, torch.optim.Optimizer]:
        self.loss_weight = train_cfg.loss_weight
        return {"g": build_optimizer(train_cfg.optim_g, self.net_g.parameters())}

    def training_step(self, batch: Batch, ctx: TrainContext) -> dict[str, float]:
        """The official objective: L1 between the reverse-SDE step mean under the predicted noise and the
        exact posterior mean E[x_{t-1} | x_t, x0], t uniform in 1..T."""
        lr, hr = batch["lr"], batch["hr"]
        check_lr(lr)
        mu = upsample_lr(lr, self.scale)
        if mu.shape != hr.shape:
            raise InputError(
                f"training pair lr {tuple(lr.shape)} / hr {tuple(hr.shape)}",
                f"the HR is not the LR size x{self.scale}",
                f"train x{self.scale} on a dataset built for that scale",
            )
        n = hr.shape[0]
        t = torch.randint(1, self.sde.T + 1, (n,), device=hr.device)
        xt = self.sde.noisy_state(hr, mu, t, torch.randn_like(hr))
        with ctx.autocast():
            eps = self.net_g(xt, mu, t)
        pred = self.sde.reverse_mean(xt, eps.float(), mu, t)
        loss = self.loss_weight * F.l1_loss(pred, self.sde.optimum_step(xt, hr, mu, t))
        ctx.backward(loss, "g")
        return {"l_mean": float(loss.detach())}
