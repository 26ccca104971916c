"""ESRGAN (Wang et al., ECCVW 2018) at x16/x32: RRDBNet with log2(scale) upsampling stages.

Two training stages, as in the paper and BasicSR: PSNR-oriented pre-training with L1
(`configs/esrgan.yaml`, `train.stage: psnr`), then GAN training from that generator with a
relativistic VGG-style discriminator, the VGG19 conv5_4 perceptual loss and L1
(`configs/esrgan_gan.yaml`, `train.stage: gan`); the three loss weights are config keys. The generator
starts from `train.pretrain_network_g` (or, in either stage, the config's `checkpoint:`; setting both is refused).
Checkpoints load from our safetensors, BasicSR files (`params`/`params_ema`, `conv_first`, `body.N.rdb1`,
`conv_upN`), the original ESRGAN layout (`model.0`, `model.1.sub.N.RDB1...`) and the layout of the ESRGAN
repository's current release files (`RRDB_trunk.N.RDB1`, `trunk_conv`, `upconvN`, `HRconv`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from cmsrd.errors import InputError

from .archs.discriminator import VGGStyleDiscriminator
from .archs.rrdbnet import convert_esrgan_keys
from .base import Batch, TrainContext
from .feedforward import FeedForwardConfig, FeedForwardMethod, FeedForwardTrain
from .losses import L1Loss, PerceptualLoss, RelativisticGANLoss
from .method_config import Adam, Optimizer, build_optimizer
from .specs import ESRGAN

SPEC = ESRGAN  # the registry's spec (`baselines.specs`): listing methods needs no torch

_UP = re.compile(r"^conv_up(\d+)\.weight$")


@dataclass(frozen=True)
class DiscriminatorConfig:
    type: Literal["VGGStyleDiscriminator"] = "VGGStyleDiscriminator"
    num_in_ch: int = 3
    num_feat: int = 64
    input_size: int | None = None  # null: the dataset's HR size (the only size it can take)


@dataclass(frozen=True)
class ESRGANTrain(FeedForwardTrain):
    """Stage `psnr` is FeedForwardTrain's L1 recipe; stage `gan` adds the discriminator and its losses
    (the paper's loss weights are in configs/esrgan_gan.yaml)."""

    stage: Literal["psnr", "gan"] = "psnr"
    pretrain_network_g: str | None = None  # the GAN stage's start generator (model.safetensors of a psnr run)
    network_d: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    optim_d: Optimizer = field(default_factory=lambda: Adam(lr=1e-4, betas=(0.9, 0.99)))
    perceptual_weight: float = 1.0
    perceptual_layer: str = "conv5_4"
    vgg19_weights: str | None = None  # null: torchvision's vgg19 file from the weights cache
    gan_weight: float = 5e-3


@dataclass(frozen=True)
class ESRGANConfig(FeedForwardConfig):
    train: ESRGANTrain = field(default_factory=ESRGANTrain)


class ESRGAN(FeedForwardMethod):
    config_type = ESRGANConfig
    scale_arg = "scale"
    key_layouts = (
        "ours/BasicSR (conv_first, body.N.rdbK.convJ, conv_upN, conv_hr), "
        "original ESRGAN (model.0, model.1.sub.N.RDBK.convJ.0), "
        "ESRGAN repository (RRDB_trunk.N.RDBK.convJ, trunk_conv, upconvN, HRconv)"
    )

    def convert_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return convert_esrgan_keys(state)

    def checkpoint_scale(self, state: dict[str, torch.Tensor]) -> int | None:
        n = sum(1 for k in state if _UP.match(k))
        return 2**n if n else None

    def configure_optimizers(self, train_cfg: ESRGANTrain) -> dict[str, torch.optim.Optimizer]:
        self.stage = train_cfg.stage
        pretrained = train_cfg.pretrain_network_g
        if pretrained and self.settings.checkpoint:  # both name the generator's start weights
            raise InputError(
                "train.pretrain_network_g and checkpoint",
                "are both set, and both name the generator's start weights",
                "keep one (train.pretrain_network_g is the GAN stage's usual key)",
            )
        if pretrained and not train_cfg.resuming:  # a resumed run restores its own weights: the file may be gone
            self.load_checkpoint(pretrained)
        if self.stage == "psnr":
            return super().configure_optimizers(train_cfg)
        if not pretrained and not self.settings.checkpoint:
            raise InputError(
                "train.pretrain_network_g",
                "is empty but the GAN stage starts from the PSNR-oriented generator",
                "set it to the model.safetensors of a `train.stage: psnr` run",
            )
        d_cfg, hr_px = train_cfg.network_d, train_cfg.hr_px or 256
        if d_cfg.input_size not in (None, hr_px):
            raise InputError(
                "train.network_d.input_size",
                f"is {d_cfg.input_size} but the dataset's HR is {hr_px} px",
                "drop it (it follows the dataset)",
            )
        device = next(self.net_g.parameters()).device
        self.net_d = VGGStyleDiscriminator(d_cfg.num_in_ch, d_cfg.num_feat, hr_px).to(device)
        self.losses["pixel"] = L1Loss(train_cfg.pixel_weight)
        self.losses["perceptual"] = PerceptualLoss(
            train_cfg.perceptual_weight, train_cfg.perceptual_layer, train_cfg.vgg19_weights
        ).to(device)
        self.losses["gan"] = RelativisticGANLoss(train_cfg.gan_weight)
        return {
            "g": build_optimizer(train_cfg.optim_g, self.net_g.parameters()),
            "d": build_optimizer(train_cfg.optim_d, self.net_d.parameters()),
        }

    def run_stage(self, stage: int, data_root: Path, train_cfg: ESRGANTrain, out_dir: Path) -> None:
        """ESRGAN's second stage (GAN training) is a config of the shared loop, not a `--stage`."""
        raise InputError(
            f"--stage {stage}",
            "esrgan's GAN stage is chosen by its config (train.stage: gan), not by --stage",
            "drop --stage and run `cmsrd-bench train --method esrgan --config baselines/configs/esrgan_gan.yaml "
            "--set train.pretrain_network_g=RUN/model.safetensors ...`, "
            "RUN being the output folder of the psnr-stage run",
        )

    def training_step(self, batch: Batch, ctx: TrainContext) -> dict[str, float]:
        if getattr(self, "stage", "psnr") == "psnr":
            return super().training_step(batch, ctx)
        lr, hr = batch["lr"], batch["hr"]
        for loss in self.losses.values():
            loss.to(hr.device)
        # generator: pixel + perceptual + relativistic adversarial, discriminator frozen
        self.net_d.requires_grad_(False)
        with ctx.autocast():
            sr = self.net_g(lr)
            l_pix = self.losses["pixel"](sr.float(), hr)
            l_percep = self.losses["perceptual"](sr, hr)
            real_logits = self.net_d(hr).detach()
            fake_logits = self.net_d(sr)
            l_gan = self.losses["gan"].generator_loss(real_logits.float(), fake_logits.float())
            l_g = l_pix + l_percep.float() + l_gan
        ctx.backward(l_g, "g")
        # discriminator on real vs the (detached) generated batch
        self.net_d.requires_grad_(True)
        with ctx.autocast():
            l_d = self.losses["gan"].discriminator_loss(self.net_d(hr).float(), self.net_d(sr.detach()).float())
        ctx.backward(l_d, "d")
        return {
            "l_pix": float(l_pix.detach()),
            "l_percep": float(l_percep.detach()),
            "l_gan": float(l_gan.detach()),
            "l_g": float(l_g.detach()),
            "l_d": float(l_d.detach()),
            "d_real": float(real_logits.mean()),
            "d_fake": float(fake_logits.detach().mean()),
        }
