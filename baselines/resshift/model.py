"""`resshift`: the residual-shifting chain (`baselines.diffusion.resshift`) with `UNetModelSwin` on VQ-f4.

At x16/x32 the LR is bicubic-upsampled to HR/4 (64 px at 256 px HR) and the official x4 pipeline runs on that
image unchanged: it is the concatenated condition `lq` (in [-1, 1]) and, upsampled x4 again and encoded, the
chain's end point y. So the released x4 weights load strictly and can be fine-tuned at x16/x32. See
`baselines/resshift/README.md` for the official settings and the deliberate deviations.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from cmsrd.errors import InputError

from .. import archs  # noqa: F401  (registers the architectures)
from ..archs.swin_unet import UNetModelSwin, strip_derived_buffers
from ..archs.vqf4 import FACTOR, build_vq_f4, is_ldm_layout, load_vq_f4
from ..base import Batch, SRMethod, TrainContext
from ..checkpoint import load_strict, read_metadata, read_state_dict
from ..conditions import Conditions
from ..diffusion.resshift import ResShiftChain, ResShiftSchedule
from ..method_config import MethodConfig, TrainConfig
from ..registry import build_arch
from ..seeding import Generators

log = logging.getLogger(__name__)

LATENT_SCALE = 1.0  # official `scale_factor: 1.0`
LAYOUTS = (
    "ours (model.safetensors) and the official ResShift .pth (plain, `state_dict`, `module.`/`_orig_mod.` prefixes)"
)
PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class AutoencoderConfig:
    geometry: str = "vq-f4"  # named VQ-f4 geometry (`archs.vqf4.GEOMETRIES`), frozen
    weights: str | None = None  # a path or a weights-manifest key (resshift_vq_f4); null: random init


@dataclass(frozen=True)
class ResShiftTrain(TrainConfig):
    lr: float = 5e-5  # AdamW over the UNet (official)
    weight_decay: float = 0.0
    warmup_steps: int = 0  # official linear warm-up (5000 in resshift.yaml), then the trainer's schedule


@dataclass(frozen=True)
class ResShiftConfig(MethodConfig):
    """`network`: UNetModelSwin kwargs (checked against its signature); `chain`: the residual-shifting chain
    (`ResShiftSchedule`, v1/v2 defaults); `checkpoint`: the UNet, ours or official."""

    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    chain: ResShiftSchedule = field(default_factory=ResShiftSchedule)
    train: ResShiftTrain = field(default_factory=ResShiftTrain)


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DataParallel/DDP `module.` and torch.compile `_orig_mod.` prefixes, in any order."""
    out = {}
    for k, v in state.items():
        while k.startswith(PREFIXES):
            k = k.removeprefix("module.").removeprefix("_orig_mod.")
        out[k] = v
    return out


def resolve_autoencoder(weights: str | None) -> Path | None:
    """`autoencoder.weights`: null (random init), a file path, or a weights-manifest key (`resshift_vq_f4`)."""
    if weights is None:
        return None
    path = Path(str(weights)).expanduser()
    if path.suffix or "/" in str(weights) or path.exists():
        if not path.is_file():
            raise InputError(
                f"autoencoder.weights {weights}",
                "file not found",
                "point it at autoencoder_vq_f4.pth (ResShift release v2.0) or use the manifest key resshift_vq_f4",
            )
        return path
    from .. import weights as manifest

    return manifest.resolve(str(weights))


class ResShift(SRMethod):
    """The residual-shifting chain on a frozen VQ-f4; config: `ResShiftConfig`."""

    config_type = ResShiftConfig

    def __init__(self, spec, scale: int, config: dict[str, Any], device: Any = "cpu"):
        super().__init__(spec, scale, config, device)
        settings: ResShiftConfig = self.settings
        net = dict(settings.network)
        if net.get("type", "UNetModelSwin") != "UNetModelSwin":
            raise InputError(f"network.type {net['type']!r}", "resshift uses UNetModelSwin", "drop network.type")
        self.net_g: UNetModelSwin = build_arch({**net, "type": "UNetModelSwin"}).to(device)
        self.autoencoder = build_vq_f4(settings.autoencoder.geometry).to(device)
        if self.autoencoder.config.latent_channels != self.net_g.in_channels:
            raise InputError(
                "network.in_channels", f"must equal the autoencoder's {self.autoencoder.config.latent_channels}"
            )
        self.chain = ResShiftChain(settings.chain)
        self.autoencoder.requires_grad_(False)
        self.autoencoder.eval()
        self.autoencoder_source = "random"
        if str(device) != "meta":
            path = resolve_autoencoder(settings.autoencoder.weights)
            if path is None:
                log.warning("resshift: VQ-f4 autoencoder has random weights (autoencoder.weights is null)")
            else:
                load_vq_f4(self.autoencoder, path)
                self.autoencoder_source = str(path)

    def train(self, mode: bool = True):
        super().train(mode)
        self.autoencoder.eval()  # frozen: never in training mode
        return self

    # ---- latent space ---------------------------------------------------------------------------
    def lq_image(self, lr01: torch.Tensor) -> torch.Tensor:
        """The LR in [-1, 1], bicubic-upsampled to HR/4: the official x4 model's LR input (condition and y)."""
        n, c, h, w = lr01.shape
        if c != 3:
            raise InputError(f"lr of shape {tuple(lr01.shape)}", "expected N x 3 x h x w RGB")
        size = (h * self.scale // FACTOR, w * self.scale // FACTOR)
        problem = self.net_g.check_size(*size) if (h * self.scale) % FACTOR == 0 else "HR not divisible by 4"
        if problem:
            need = self.net_g.image_size * FACTOR // self.scale
            mult = self.net_g.size_multiple * FACTOR // self.scale
            raise InputError(
                f"LR {h}x{w} at x{self.scale} (latent {size[0]}x{size[1]})",
                f"is smaller than or off the grid the ResShift chain supports: {problem}",
                f"give LR tiles of at least {need} px whose sides are multiples of {max(mult, 1)} px "
                f"(HR {self.net_g.image_size * FACTOR} px and up)",
            )
        x = lr01 * 2 - 1
        return x if size == (h, w) else F.interpolate(x, size=size, mode="bicubic", align_corners=False)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> pre-quantisation VQ latents x LATENT_SCALE."""
        dtype = next(self.autoencoder.parameters()).dtype
        return self.autoencoder.encode(images.to(dtype)).latents * LATENT_SCALE

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        dtype = next(self.autoencoder.parameters()).dtype
        return self.autoencoder.decode(z.to(dtype) / LATENT_SCALE).sample

    def start_latent(self, lq: torch.Tensor) -> torch.Tensor:
        """y: the latent of the lq image upsampled x4 (official `encode_first_stage(y, up_sample=True)`)."""
        return self.encode(F.interpolate(lq, scale_factor=FACTOR, mode="bicubic", align_corners=False))

    # ---- inference ------------------------------------------------------------------------------
    def nfe(self, cond: Conditions) -> int:
        return self.chain.steps

    @torch.no_grad()
    def super_resolve(self, batch: Batch, cond: Conditions, generator: Generators = None) -> torch.Tensor:
        lq = self.lq_image(batch["lr"])
        y = self.start_latent(lq)
        z, _ = self.chain.sample(lambda x, t: self.net_g(x, t, lq), y.float(), generator)
        return ((self.decode(z).float().clamp(-1, 1) + 1) / 2).clamp(0, 1)

    # ---- training -------------------------------------------------------------------------------
    def configure_optimizers(self, train_cfg: ResShiftTrain) -> dict[str, torch.optim.Optimizer]:
        self.warmup_steps = train_cfg.warmup_steps
        self._optimizer = torch.optim.AdamW(
            self.net_g.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay
        )
        return {"main": self._optimizer}

    def training_step(self, batch: Batch, ctx: TrainContext) -> dict[str, float]:
        """Official loss: MSE between the predicted and the true HR latent at a uniform step index."""
        lq = self.lq_image(batch["lr"])
        x0 = self.encode(batch["hr"] * 2 - 1).float()
        y = self.start_latent(lq).float()
        t = torch.randint(0, self.chain.steps, (x0.shape[0],), device=x0.device)
        xt = self.chain.q_sample(x0, y, t, torch.randn_like(x0))
        with ctx.autocast():
            pred = self.net_g(self.chain.scale_input(xt, t), t, lq)
        loss = F.mse_loss(pred.float(), x0)
        self._backward_with_warmup(loss, ctx)
        return {"l_x0": float(loss.detach())}

    def _backward_with_warmup(self, loss: torch.Tensor, ctx: TrainContext) -> None:
        """Official linear warm-up (lr x step / warmup_steps): applied around this step's optimizer update and
        undone afterwards, so the trainer's LR schedule keeps its own state."""
        warm = getattr(self, "warmup_steps", 0)
        opt = getattr(self, "_optimizer", None)
        if warm <= 0 or ctx.step >= warm or opt is None:
            ctx.backward(loss, "main")
            return
        saved = [g["lr"] for g in opt.param_groups]
        for g in opt.param_groups:
            g["lr"] *= (ctx.step + 1) / warm
        try:
            ctx.backward(loss, "main")
        finally:
            for g, lr in zip(opt.param_groups, saved):
                g["lr"] = lr

    # ---- weights --------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.net_g.state_dict())

    def export_metadata(self) -> dict[str, Any]:
        meta = super().export_metadata()
        return {**meta, "chain": self.chain.schedule.__dict__, "autoencoder": self.autoencoder_source}

    def load_checkpoint(self, path: str | Path) -> None:
        """Our model.safetensors or an official ResShift UNet .pth; derived buffers are dropped and rebuilt."""
        path = Path(path)
        meta = read_metadata(path)
        self.check_saved_by(path, meta, check_scale=False)  # one network at every scale
        chain = meta.get("chain")
        if chain is not None and ResShiftSchedule(**chain) != self.chain.schedule:
            raise InputError(
                f"checkpoint {path}",
                f"was trained with chain {chain}, the method is built with {self.chain.schedule.__dict__}",
                f"set `chain:` in the config to {chain}",
            )
        state = strip_derived_buffers(strip_prefixes(read_state_dict(path, strip_module=False)))
        if is_ldm_layout(state) or is_ldm_layout(state, "first_stage_model."):
            raise InputError(
                f"checkpoint {path}",
                "is a VQ autoencoder, not the ResShift UNet",
                "give it as `autoencoder.weights`; the checkpoint is the UNet (resshift_*.pth or model.safetensors)",
            )
        load_strict(
            self.net_g, state, f"checkpoint {path}", "use a ResShift UNet of the configured `network:` size", LAYOUTS
        )
        self.loaded_from = path
