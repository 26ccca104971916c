"""`ldm-sr`: CompVis LDM-SR (bsr_sr) — an eps-prediction UNet on the VQ-f4 latent, the LR concatenated.

The official model is x4, where the LR has the latent's size (autoencoder factor 4). At x16/x32 the LR is
bicubic-upsampled to HR/4 first, so the network is unchanged, the released x4 weights load strictly and can be
fine-tuned. Sampling runs the shared samplers (`baselines.diffusion`) on the bsr_sr schedule (scaled_linear
0.0015-0.0155), DDIM 100 steps at eta 1 by default; `steps=N` and `start=lr@t` work as for SGDM.
See `baselines/ldm_sr/README.md` for the official settings and the deliberate deviations.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.nn import functional as F

from cmsrd.errors import InputError

from ..archs.vqf4 import FACTOR, build_vq_f4, load_vq_f4
from ..base import Batch, SRMethod, TrainContext
from ..conditions import Conditions
from ..diffusion import lr_start_timesteps, make_scheduler, sample_latents, training_scheduler
from ..method_config import AdamW, MethodConfig, Optimizer, TrainConfig, build_optimizer
from ..seeding import Generators
from . import loading
from .unet import DOWNSAMPLES, GEOMETRIES, build_unet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AutoencoderConfig:
    geometry: str = "vq-f4"
    weights: str | None = None  # a file, a diffusers vqvae/ folder or a weights-manifest key; null: random


@dataclass(frozen=True)
class ScheduleConfig:
    beta_start: float = 0.0015  # official linear_start (sqrt-linear, diffusers `scaled_linear`)
    beta_end: float = 0.0155  # official linear_end


@dataclass(frozen=True)
class SamplerConfig:
    name: Literal["ddim-ldm", "ddim", "ddpm", "dpm-solver"] = "ddim-ldm"  # the CompVis DDIMSampler grid
    steps: int = 100
    eta: float = 1.0  # DDIM noise; the diffusers model-card example uses eta 1


@dataclass(frozen=True)
class LDMSRTrain(TrainConfig):
    # official: AdamW at base_learning_rate 1e-6 x batch 64 (Lightning scale_lr, one GPU), torch's weight decay
    optimizer: Optimizer = field(default_factory=lambda: AdamW(lr=6.4e-5))


@dataclass(frozen=True)
class LDMSRConfig(MethodConfig):
    network: dict = field(default_factory=lambda: {"geometry": "bsr-sr"})
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    ema_weights: bool = True  # a CompVis model.ckpt: load model_ema.* (as the official sampling) when present
    train: LDMSRTrain = field(default_factory=LDMSRTrain)


def resolve_autoencoder(weights: str | None) -> Path | None:
    """`autoencoder.weights`: null, a file or diffusers `vqvae/` folder, or a weights-manifest key."""
    if weights is None:
        return None
    path = Path(str(weights)).expanduser()
    if path.suffix or "/" in str(weights) or path.exists():
        if path.is_dir():
            found = loading.diffusers_file(path / "vqvae") or loading.diffusers_file(path)
            if found is not None:
                return found
        if not path.is_file():
            raise InputError(
                f"autoencoder.weights {weights}",
                "no such file (or no diffusion_pytorch_model.* in that folder or its vqvae/)",
                "point it at the VQ-f4 weights (diffusers vqvae/, CompVis vq-f4 model.ckpt) or a manifest key",
            )
        return path
    from .. import weights as manifest

    return manifest.resolve(str(weights))


class LDMSR(SRMethod):
    """UNet (`net_g`, trained) + frozen VQ-f4 autoencoder; config `LDMSRConfig`."""

    config_type = LDMSRConfig

    def __init__(self, spec, scale: int, config: dict[str, Any], device: Any = "cpu"):
        super().__init__(spec, scale, config, device)
        s: LDMSRConfig = self.settings
        net = dict(s.network)
        unknown = sorted(set(net) - {"geometry"})
        if unknown:
            raise InputError(
                f"network.{unknown[0]}", "is not an ldm-sr network key", f"use network.geometry {GEOMETRIES}"
            )
        self.net_g = build_unet(str(net.get("geometry", "bsr-sr"))).to(device)
        self.autoencoder = build_vq_f4(s.autoencoder.geometry).to(device)
        self.autoencoder.requires_grad_(False)
        self.autoencoder.eval()
        self.autoencoder_source = "random"
        self.schedule = {"beta_start": s.schedule.beta_start, "beta_end": s.schedule.beta_end}
        self.noise_schedule = training_scheduler(self.schedule)
        self.sampler_name, self.default_steps, self.eta = s.sampler.name, s.sampler.steps, s.sampler.eta
        if self.eta and not self.sampler_name.startswith("ddim"):
            raise InputError(f"sampler.eta {self.eta}", f"applies to ddim only, not {self.sampler_name}", "set eta: 0")
        make_scheduler(self.sampler_name, self.default_steps, self.schedule)  # validate early
        if str(device) != "meta":
            path = resolve_autoencoder(s.autoencoder.weights)
            if path is None:
                log.warning("ldm-sr: VQ-f4 autoencoder has random weights (autoencoder.weights is null)")
            else:
                load_vq_f4(self.autoencoder, path)
                self.autoencoder_source = str(path)

    def train(self, mode: bool = True):
        super().train(mode)
        self.autoencoder.eval()  # frozen: never in training mode
        return self

    # ---- latent space ---------------------------------------------------------------------------
    def lq_image(self, lr01: torch.Tensor) -> torch.Tensor:
        """The LR in [-1, 1], bicubic-upsampled to HR/4: the official x4 model's LR input (concatenated)."""
        n, c, h, w = lr01.shape
        grid = FACTOR * 2**DOWNSAMPLES  # HR side: VQ factor x the UNet's three downsamplings
        if c != 3 or (h * self.scale) % grid or (w * self.scale) % grid:
            step = max(grid // self.scale, 1)
            raise InputError(
                f"lr of shape {tuple(lr01.shape)} at x{self.scale}",
                f"needs N x 3 x h x w RGB with HR sides (h, w x {self.scale}) multiples of {grid}",
                f"give LR tiles whose sides are multiples of {step} px",
            )
        size = (h * self.scale // FACTOR, w * self.scale // FACTOR)
        x = lr01 * 2 - 1
        return x if size == (h, w) else F.interpolate(x, size=size, mode="bicubic", align_corners=False)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> pre-quantisation VQ latents (official scale_factor 1)."""
        dtype = next(self.autoencoder.parameters()).dtype
        return self.autoencoder.encode(images.to(dtype)).latents.float()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        dtype = next(self.autoencoder.parameters()).dtype
        return self.autoencoder.decode(z.to(dtype)).sample.float()

    def eps(self, z: torch.Tensor, t: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        return self.net_g(torch.cat([z, lq.to(z.dtype)], dim=1), t).sample

    # ---- inference ------------------------------------------------------------------------------
    def nfe(self, cond: Conditions) -> int:
        steps = cond.steps or self.default_steps
        if cond.start_t is None:
            return steps
        sched = make_scheduler(self.sampler_name, steps, self.schedule)
        return int(lr_start_timesteps(sched.timesteps, cond.start_t).numel())

    @torch.no_grad()
    def super_resolve(self, batch: Batch, cond: Conditions, generator: Generators = None) -> torch.Tensor:
        lr = batch["lr"]
        lq = self.lq_image(lr)
        start_latent = None
        if cond.start_t is not None:  # the bicubic HR-size LR, encoded
            sr = F.interpolate(lr * 2 - 1, scale_factor=self.scale, mode="bicubic", align_corners=False)
            start_latent = self.encode(sr.clamp(-1, 1))
        dtype = next(self.net_g.parameters()).dtype
        z, _ = sample_latents(
            lambda z, t: self.eps(z.to(dtype), t, lq).float(),
            (lr.shape[0], self.autoencoder.config.latent_channels, *lq.shape[-2:]),
            sampler=self.sampler_name,
            steps=cond.steps or self.default_steps,
            start_latent=start_latent,
            start_t=cond.start_t,
            generator=generator,
            device=lr.device,
            schedule=self.schedule,
            eta=self.eta,
        )
        return ((self.decode(z).clamp(-1, 1) + 1) / 2).clamp(0, 1)

    # ---- training -------------------------------------------------------------------------------
    def configure_optimizers(self, train_cfg: LDMSRTrain) -> dict[str, torch.optim.Optimizer]:
        return {"main": build_optimizer(train_cfg.optimizer, self.net_g.parameters(), "train.optimizer")}

    def training_step(self, batch: Batch, ctx: TrainContext) -> dict[str, float]:
        """Official loss (`loss_type: l2`, eps-prediction): MSE between the drawn and the predicted noise."""
        lq = self.lq_image(batch["lr"])
        z0 = self.encode(batch["hr"] * 2 - 1)
        noise = torch.randn_like(z0)
        t = torch.randint(0, self.noise_schedule.config.num_train_timesteps, (z0.shape[0],), device=z0.device)
        zt = self.noise_schedule.add_noise(z0, noise, t)
        with ctx.autocast():
            pred = self.eps(zt, t, lq)
        loss = F.mse_loss(pred.float(), noise)
        ctx.backward(loss, "main")
        return {"l_eps": float(loss.detach())}

    # ---- weights --------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.net_g.state_dict())

    def export_metadata(self) -> dict[str, Any]:
        meta = super().export_metadata()
        return {**meta, "schedule": self.schedule, "autoencoder": self.autoencoder_source}

    def load_checkpoint(self, path: str | Path) -> None:
        """Ours, the CompVis bsr_sr Lightning checkpoint or diffusers' layout (`loading`)."""
        loading.load_checkpoint(self, path)
