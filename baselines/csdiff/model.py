"""csdiff (Miao et al., JSTARS 2025, seeds/000): prior-feature-conditioned pixel-space diffusion SR with the
LR-start sampler. Train: eps objective on the shared 1000-step schedule (`baselines.diffusion`). Sample: by
default from q(x_t | upsampled LR) at `sampler.start_t` with `sampler.steps` steps spread over t..1
(`lr_start="respace"`, NFE = steps); `start=noise` (ablation) or `steps=`/`start=lr@t` conditions override.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from cmsrd.errors import InputError

from ..base import Batch, SRMethod, TrainContext
from ..conditions import Conditions
from ..diffusion import check_lr_start, make_scheduler, sample_latents, training_scheduler
from ..feedforward import FeedForwardConfig, FeedForwardMethod, FeedForwardTrain
from ..method_config import Adam, Optimizer, build_optimizer
from ..registry import MethodSpec, build_arch
from ..seeding import Generators
from . import net as _net  # noqa: F401  (registers CSDiffNet)

LR_START = "respace"  # how `steps` are placed below an LR start (see baselines.diffusion.sampling)


@dataclass(frozen=True)
class SamplerConfig:
    name: Literal["ddpm", "ddim", "dpm-solver"] = "ddim"
    steps: int = 20
    start: Literal["lr", "noise"] = "lr"  # lr: q(x_t | upsampled LR) at start_t; noise: the pure-noise ablation
    start_t: int = 400

    def validate(self, where: str) -> None:
        make_scheduler(self.name, self.steps)
        if self.start == "lr":
            check_lr_start(self.steps, self.start_t, LR_START)


@dataclass(frozen=True)
class CSDiffTrain(FeedForwardTrain):
    optim_g: Optimizer = field(default_factory=lambda: Adam(lr=1e-4, betas=(0.9, 0.999)))
    crop_px: int | None = None  # random aligned HR/SR crops of this side for training (null: whole tiles)

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.crop_px is not None and self.crop_px < 8:
            raise InputError(f"{where}.crop_px = {self.crop_px}", "must be >= 8 px (or null for whole tiles)")


@dataclass(frozen=True)
class CSDiffConfig(FeedForwardConfig):
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    train: CSDiffTrain = field(default_factory=CSDiffTrain)


class CSDiff(FeedForwardMethod):
    """`net_g` (a CSDiffNet: prior module + UNet) is the one trained, EMA'd and saved network."""

    config_type = CSDiffConfig
    key_layouts = "ours (prior_encoder.*, conv_in, down/up/mid SFT blocks, out)"

    def __init__(self, spec: MethodSpec, scale: int, config: dict[str, Any], device: Any = "cpu"):
        SRMethod.__init__(self, spec, scale, config, device)
        net_opt = dict(config.get("network") or {})
        if net_opt.get("type") != "CSDiffNet":
            raise InputError(f"config of method {spec.name!r}", "needs `network: {type: CSDiffNet, ...}`")
        self.net_g = build_arch(net_opt).to(device)
        self.noise_schedule = training_scheduler()
        self.losses = {}

    # ---- training -------------------------------------------------------------------------------
    def configure_optimizers(self, train_cfg: CSDiffTrain) -> dict[str, torch.optim.Optimizer]:
        self.crop_px = train_cfg.crop_px
        return {"g": build_optimizer(train_cfg.optim_g, self.net_g.parameters())}

    def _crop(self, sr: torch.Tensor, hr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One random aligned crop per batch (the UNet is convolutional: trained on crops, run on tiles)."""
        c = getattr(self, "crop_px", None)
        if not c or c >= hr.shape[-1]:
            return sr, hr
        y, x = (int(v) for v in torch.randint(0, hr.shape[-1] - c + 1, (2,)))
        return sr[..., y : y + c, x : x + c], hr[..., y : y + c, x : x + c]

    def diffusion_loss(self, batch: Batch, t: torch.Tensor | None = None) -> torch.Tensor:
        """MSE between the true and predicted noise of q(x_t | HR) at random t, conditioned on the SR."""
        sr, hr = self._crop(batch["sr"], batch["hr"])
        x0, cond = hr * 2 - 1, sr * 2 - 1
        if t is None:
            t = torch.randint(0, self.noise_schedule.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        xt = self.noise_schedule.add_noise(x0, noise, t)
        return F.mse_loss(self.net_g(xt, t, cond).float(), noise)

    def training_step(self, batch: Batch, ctx: TrainContext) -> dict[str, float]:
        with ctx.autocast():
            loss = self.diffusion_loss(batch)
        ctx.backward(loss, "g")
        return {"l_eps": float(loss.detach())}

    # ---- inference ------------------------------------------------------------------------------
    def _plan(self, cond: Conditions) -> tuple[int, int | None]:
        """(steps, start_t or None for pure noise) under `cond`; out-of-range values are one InputError."""
        s = self.settings.sampler
        steps = cond.steps or s.steps
        if cond.start_t is not None:
            start_t = cond.start_t
        else:
            start_t = s.start_t if s.start == "lr" and not cond.noise_start else None
        if start_t is not None:
            check_lr_start(steps, start_t, LR_START)
        else:
            make_scheduler(s.name, steps)
        return steps, start_t

    def nfe(self, cond: Conditions) -> int:
        return self._plan(cond)[0]

    def super_resolve(self, batch: Batch, cond: Conditions, generator: Generators = None) -> torch.Tensor:
        steps, start_t = self._plan(cond)
        sr = batch["sr"]
        lr_img = sr * 2 - 1
        net = self.net_g
        feats = net.prior(lr_img)
        x, _ = sample_latents(
            lambda z, t: net.denoise(z, t, feats),
            tuple(sr.shape),
            sampler=self.settings.sampler.name,
            steps=steps,
            start_latent=lr_img if start_t is not None else None,
            start_t=start_t,
            lr_start=LR_START,
            generator=generator,
            device=sr.device,
            dtype=sr.dtype,
        )
        return ((x.float() + 1) / 2).clamp(0, 1)
