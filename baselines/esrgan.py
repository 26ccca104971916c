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
from pathlib import Path
from typing import Any

import torch

from cmsrd.errors import InputError

from .archs.discriminator import VGGStyleDiscriminator
from .archs.rrdbnet import convert_esrgan_keys
from .base import Batch, TrainContext
from .feedforward import FeedForwardMethod, build_optimizer
from .losses import L1Loss, PerceptualLoss, RelativisticGANLoss
from .registry import MethodSpec, register

SPEC = register(
    MethodSpec(
        name="esrgan",
        target="baselines.esrgan:ESRGAN",
        kind="gan",
        scales=(4, 8, 16, 32),
        inputs=("lr",),
        nfe=1,
        license="Apache-2.0 (xinntao/ESRGAN; RRDBNet via BasicSR)",
        citation=(
            "X. Wang et al., ESRGAN: Enhanced Super-Resolution Generative Adversarial Networks, ECCV Workshops 2018"
        ),
        config="esrgan.yaml",
        description=(
            "RRDBNet (nf 64, nb 23, gc 32) with log2(scale) nearest+conv stages; "
            "L1 pre-training then RaGAN + VGG19 conv5_4."
        ),
        extra={"default_scale": 16, "stages": ("psnr", "gan")},
    )
)

_UP = re.compile(r"^conv_up(\d+)\.weight$")


class ESRGAN(FeedForwardMethod):
    scale_arg = "scale"
    key_layouts = (
        "ours/BasicSR (conv_first, body.N.rdbK.convJ, conv_upN, conv_hr), "
        "original ESRGAN (model.0, model.1.sub.N.RDBK.convJ.0), "
        "ESRGAN repository (RRDB_trunk.N.RDBK.convJ, trunk_conv, upconvN, HRconv)"
    )

    train_keys = FeedForwardMethod.train_keys | {
        "stage",
        "pretrain_network_g",
        "network_d",
        "optim_d",
        "perceptual_weight",
        "perceptual_layer",
        "vgg19_weights",
        "gan_weight",
    }

    def convert_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return convert_esrgan_keys(state)

    def checkpoint_scale(self, state: dict[str, torch.Tensor]) -> int | None:
        n = sum(1 for k in state if _UP.match(k))
        return 2**n if n else None

    def configure_optimizers(self, train_cfg: dict[str, Any]) -> dict[str, torch.optim.Optimizer]:
        stage = train_cfg.get("stage", "psnr")
        if stage not in ("psnr", "gan"):
            raise InputError(f"train.stage {stage!r} of esrgan", "unknown", "use psnr (L1 pre-training) or gan")
        self.stage = stage
        pretrained = train_cfg.get("pretrain_network_g")
        if pretrained and self.config.get("checkpoint"):  # both name the generator's start weights
            raise InputError(
                "train.pretrain_network_g and checkpoint",
                "are both set, and both name the generator's start weights",
                "keep one (train.pretrain_network_g is the GAN stage's usual key)",
            )
        if pretrained and not train_cfg.get("resuming"):  # a resumed run restores its own weights: the file may be gone
            self.load_checkpoint(pretrained)
        if stage == "psnr":
            return super().configure_optimizers(train_cfg)
        if not pretrained and not self.config.get("checkpoint"):
            raise InputError(
                "train.pretrain_network_g",
                "is empty but the GAN stage starts from the PSNR-oriented generator",
                "set it to the model.safetensors of a `train.stage: psnr` run",
            )
        d_opt = dict(train_cfg.get("network_d") or {})
        d_opt.pop("type", None)
        hr_px = int(train_cfg.get("hr_px", 256))
        if d_opt.setdefault("input_size", hr_px) != hr_px:
            raise InputError(
                "train.network_d.input_size",
                f"is {d_opt['input_size']} but the dataset's HR is {hr_px} px",
                "drop it (it follows the dataset)",
            )
        device = next(self.net_g.parameters()).device
        self.net_d = VGGStyleDiscriminator(**d_opt).to(device)
        self.losses["pixel"] = L1Loss(float(train_cfg.get("pixel_weight", 1e-2)))
        self.losses["perceptual"] = PerceptualLoss(
            float(train_cfg.get("perceptual_weight", 1.0)),
            train_cfg.get("perceptual_layer", "conv5_4"),
            train_cfg.get("vgg19_weights"),
        ).to(device)
        self.losses["gan"] = RelativisticGANLoss(float(train_cfg.get("gan_weight", 5e-3)))
        return {
            "g": build_optimizer(
                train_cfg.get("optim_g") or {"type": "Adam", "lr": 1e-4, "betas": [0.9, 0.99]}, self.net_g.parameters()
            ),
            "d": build_optimizer(
                train_cfg.get("optim_d") or {"type": "Adam", "lr": 1e-4, "betas": [0.9, 0.99]}, self.net_d.parameters()
            ),
        }

    def run_stage(self, stage: int, data_root: Path, train_cfg: dict[str, Any], out_dir: Path) -> None:
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
