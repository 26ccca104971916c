"""SGDM methods in the registry: `sgdm` (synthetic x32), `sgdm+` (real x16), `sgdm-nomap` (ablation).

One class per official variant over shared machinery: SD2.1-base UNet/VAE/text encoder (`backbone.py`),
the CS-encoder + adapter injected at the official six points (`adapter.py`), the map-colour prompt
(`prompt.py`), style flows for SGDM+ (`flows.py`) and the shared diffusion samplers
(`baselines.diffusion`). Checkpoints and backbone sources: `loading.py`; SGDM+ stage 2: `stage2.py`.

Deviations from the official code, chosen on purpose:
- outputs are clamped to [0, 1] (the toolkit's output contract); the official sampler does not clamp;
- `map=none` feeds a blank land-coloured map (prompt "land, "), the natural "no map information" input;
- sampling draws style vectors and noise from the runner's per-image generators (`baselines.seeding`)
  instead of re-seeding per batch;
- BatchNorm in SPADE is plain BN (SyncBN only matters under DDP, which the shared trainer may convert).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from cmsrd.classes import BY_NAME
from cmsrd.errors import InputError

from ..base import Batch, SRMethod, TrainContext
from ..conditions import Conditions
from ..diffusion import lr_start_timesteps, make_scheduler, sample_latents, training_scheduler
from ..seeding import Generators
from . import loading, stage2
from .adapter import FEATURE_SCALE, FeatureInjector, SGDMAdapter
from .backbone import LATENT_SCALE, set_trainable
from .config import SGDMConfig, SGDMPlusConfig, SGDMPlusTrain, SGDMTrain
from .flows import StyleFlows
from .loading import FLOW_HINT
from .prompt import PromptEncoder, prompts_from_maps

LAND_RGB = torch.tensor(BY_NAME["land"].rgb, dtype=torch.float32) / 255.0


class SGDMBase(SRMethod):
    """Shared SGDM network, training step and sampler; subclasses fix `variant`.

    Config keys: `SGDMConfig` (`config.py`). Where weights come from
    is `loading.py` (`checkpoint` is read at build, even for a resumed run: an official file carries the frozen
    backbone and flows sit beside checkpoints); stage 2 of sgdm+ is `stage2.py`."""

    variant = "simu"
    config_type = SGDMConfig

    def __init__(self, spec, scale: int, config: dict[str, Any], device: Any = "cpu"):
        super().__init__(spec, scale, config, device)
        settings = self.settings
        net, bcfg = settings.network, settings.network.backbone
        on_meta = str(device) == "meta"
        ckpt = settings.checkpoint
        # an official .ckpt is read once, here: it may carry the whole backbone
        state, whole = loading.read_build_checkpoint(ckpt, on_meta)
        official = state if whole else None
        if official is not None:  # before the tokenizer and an SD2.1-size conversion, not after
            loading.check_variant(self, official, Path(ckpt))
        # random init is built directly on the target device (fast on GPU, free on meta)
        build_on = torch.device(device) if on_meta or (official is None and bcfg.pretrained is None) else None
        with build_on if build_on is not None else contextlib.nullcontext():
            bb = loading.build_backbone(spec.name, bcfg, ckpt, official, on_meta)
            self.unet, self.vae, self.text_encoder = bb.unet, bb.vae, bb.text_encoder
            self.adapter = SGDMAdapter(self.variant, self.unet.config.block_out_channels[:3], net.cond_channels)
            self.flows = StyleFlows() if self.variant == "real" else None
        self.tokenizer, self.backbone_source = bb.tokenizer, bb.source
        self.loaded_from: Path | None = None
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        set_trainable(self.unet)
        if self.flows is not None:
            self.flows.requires_grad_(False)
        self.injector = FeatureInjector(self.unet)
        self.prompt_encoder = PromptEncoder(self.tokenizer, self.text_encoder)
        self.noise_schedule = training_scheduler()
        self.sampler_name, self.default_steps = settings.sampler.name, settings.sampler.steps
        make_scheduler(self.sampler_name, self.default_steps)  # validate early
        if settings.train.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        named_flows = [k for k in ("mean", "std") if getattr(settings.flows, k)]
        if named_flows and self.flows is None:
            raise InputError(
                f"config flows.{sorted(named_flows)[0]}",
                f"{spec.name} has no style flows (only sgdm+ does)",
                "remove flows.mean/flows.std from this config",
            )
        if on_meta:  # structure only: no file is read
            return
        self.to(device)
        if ckpt:
            self.load_checkpoint(ckpt, state, backbone_loaded=official is not None)
        if named_flows:
            loading.load_named_flows(self, settings.flows)

    # ---- pieces ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # frozen parts never switch to train behaviour
        self.text_encoder.eval()
        return self

    @torch.no_grad()
    def encode(self, images01: torch.Tensor, sample: bool = True, generator: Generators = None) -> torch.Tensor:
        """Images in [0, 1] -> latents x 0.18215 (posterior sample for training targets, mode for LR start)."""
        dist = self.vae.encode(images01.to(self.vae.dtype) * 2 - 1).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return z * LATENT_SCALE

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return (self.vae.decode(z.to(self.vae.dtype) / LATENT_SCALE).sample + 1) / 2

    def _map(self, batch: Batch, like: torch.Tensor) -> torch.Tensor:
        m = batch.get("map")
        if m is None:
            return LAND_RGB.to(like).view(1, 3, 1, 1).expand_as(like)
        return m

    def adapter_features(
        self, batch: Batch, style_stats: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """The three scaled adapter features for a batch (inputs mapped [0, 1] -> [-1, 1])."""
        sr = batch["sr"]
        ref = self._map(batch, sr) * 2 - 1
        style = batch.get("style")
        style = style * 2 - 1 if style is not None and style_stats is None else None
        feats = self.adapter(sr * 2 - 1, ref, style=style, style_stats=style_stats)
        return [f * FEATURE_SCALE for f in feats]

    def text_context(self, batch: Batch, dtype: torch.dtype | None = None) -> torch.Tensor:
        n = batch["sr"].shape[0]
        return self.prompt_encoder(prompts_from_maps(batch.get("map"), n), self.device, dtype or self.unet.dtype)

    def eps(self, zt: torch.Tensor, t: torch.Tensor, context: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        with self.injector.inject(feats):
            return self.unet(zt, t, encoder_hidden_states=context).sample

    # ---- training (stage 1) ---------------------------------------------------------------------
    def configure_optimizers(self, train_cfg: SGDMTrain) -> dict[str, torch.optim.Optimizer]:
        lr = train_cfg.lr if train_cfg.lr is not None else self.settings.lr
        params = [p for p in self.parameters() if p.requires_grad]
        return {"main": torch.optim.AdamW(params, lr=lr, weight_decay=train_cfg.weight_decay)}

    def training_step(self, batch: Batch, ctx: TrainContext) -> dict[str, float]:
        hr = batch["hr"]
        z0 = self.encode(hr)
        noise = torch.randn_like(z0)
        t = torch.randint(0, self.noise_schedule.config.num_train_timesteps, (z0.shape[0],), device=z0.device)
        zt = self.noise_schedule.add_noise(z0, noise, t)
        if self.variant == "real":
            batch = {**batch, "style": hr}  # official: the HR GT is the style image in training
        context = self.text_context(batch, torch.float32)
        with ctx.autocast():
            feats = self.adapter_features(batch)
            pred = self.eps(zt, t, context, feats)
        loss = F.mse_loss(pred.float(), noise)
        ctx.backward(loss, "main")
        return {"l_eps": float(loss.detach())}

    # ---- inference ------------------------------------------------------------------------------
    def _style_stats(self, batch: Batch, cond: Conditions, generator: Generators):
        return None

    def nfe(self, cond: Conditions) -> int:
        steps = cond.steps or self.default_steps
        if cond.start_t is None:
            return steps
        return int(lr_start_timesteps(make_scheduler(self.sampler_name, steps).timesteps, cond.start_t).numel())

    @torch.no_grad()
    def super_resolve(self, batch: Batch, cond: Conditions, generator: Generators = None) -> torch.Tensor:
        sr = batch["sr"]
        n, _, h, w = sr.shape
        if h % 8 or w % 8:
            raise InputError(f"sr images {h}x{w}", "must be multiples of 8 (VAE factor)")
        check_inputs(batch)
        feats = self.adapter_features(batch, self._style_stats(batch, cond, generator))
        context = self.text_context(batch)
        start_latent = self.encode(sr, sample=False) if cond.start_t is not None else None
        z, _ = sample_latents(
            lambda z, t: self.eps(z, t, context, feats),
            (n, self.unet.config.in_channels, h // 8, w // 8),
            sampler=self.sampler_name,
            steps=cond.steps or self.default_steps,
            start_latent=start_latent,
            start_t=cond.start_t,
            generator=generator,
            device=sr.device,
            dtype=self.unet.dtype,
        )
        return self.decode(z).float().clamp(0, 1)

    # ---- weights --------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter (incl. BN buffers), the trained UNet attention projections and, once trained, flows."""
        out = {f"adapter.{k}": v for k, v in self.adapter.state_dict().items()}
        out.update({f"unet.{k}": p.detach() for k, p in self.unet.named_parameters() if p.requires_grad})
        if self.flows is not None and bool(self.flows.trained):
            out.update({f"flows.{k}": v for k, v in self.flows.state_dict().items()})
        return out

    def load_checkpoint(
        self, path: str | Path, state: dict[str, torch.Tensor] | None = None, backbone_loaded: bool = False
    ) -> None:
        """Our safetensors or the authors' `.ckpt` (and flows beside it): see `loading.load_checkpoint`."""
        loading.load_checkpoint(self, path, state, backbone_loaded)


class SGDM(SGDMBase):
    """Synthetic x32 model: map-SPADE encoder, no style path."""

    variant = "simu"


class SGDMNoMap(SGDMBase):
    """No-map ablation: LR-only encoder; the map only shapes the prompt."""

    variant = "simu_nomap"


class SGDMPlus(SGDMBase):
    """Real-world x16 model with style guidance (image, GT, shuffled) or flow-sampled styles."""

    variant = "real"
    config_type = SGDMPlusConfig  # adds `train.flows` (stage 2) over the top-level `flows`

    def _style_stats(self, batch: Batch, cond: Conditions, generator: Generators):
        """None (style from the batch's style image) or flow samples. With neither, an InputError: the
        official code has no style-free mode (it crashes), and the paper's SGDM+ numbers use flow samples."""
        if batch.get("style") is not None and cond.style != "sample":
            return None  # encoded from the style image by the adapter
        if not bool(self.flows.trained):
            raise InputError(
                f"{self.spec.name} condition {cond.name!r}",
                "needs a style: no style image, and the style flows are untrained",
                f"run with style=gt or style=shuffle, name trained flows ({FLOW_HINT}), or train stage 2 "
                "(`cmsrd-bench train --method sgdm+ --stage 2 --data DATA --out RUN`)",
            )
        n = batch["sr"].shape[0]
        dt = batch["sr"].dtype
        mean, std = self.flows.sample(n, generator)
        return mean.to(self.device, dt).view(n, -1, 1, 1), std.to(self.device, dt).view(n, -1, 1, 1)

    def configure_optimizers(self, train_cfg: SGDMPlusTrain) -> dict[str, torch.optim.Optimizer]:
        """As SGDMBase; first checks that `train.val_conditions` gives validation a style (fails at the start,
        not at the first validation)."""
        cond = Conditions.parse(train_cfg.val_conditions)
        if cond.style in (None, "sample") and not bool(self.flows.trained):
            raise InputError(
                f"train.val_conditions {cond.name!r} for {self.spec.name}",
                "validation would have no style (no style image, flows not trained before stage 2)",
                "use style=gt (official: the HR is the style image; the default in sgdm+.yaml) or style=shuffle",
            )
        return super().configure_optimizers(train_cfg)

    @torch.no_grad()
    def collect_style_stats(
        self, data_root: Path, batch_size: int = 16, augment: bool = True, seed: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Style-encoder mean/std (N x 32 each) of the HR training images (`stage2.collect_style_stats`)."""
        return stage2.collect_style_stats(self, data_root, batch_size, augment, seed)

    def run_stage(self, stage: int, data_root: Path, train_cfg: SGDMPlusTrain, out_dir: Path) -> None:
        """Stage 2 (`stage2.run_stage2`): style statistics of the stage-1 style encoder, then the flows."""
        if stage != 2:
            return super().run_stage(stage, data_root, train_cfg, out_dir)
        stage2.run_stage2(self, data_root, train_cfg, out_dir)


STYLE_MIN_PX = 16  # the style encoder downsamples 8x, then takes a spatial (unbiased) std: >= 2 x 2 values


def check_inputs(batch: Batch) -> None:
    """sr/map/style must be N x 3 x H x W in [0, 1]; the map at sr's size (it is rendered at HR size), the
    style image at any size of at least STYLE_MIN_PX (the style encoder keeps only global channel statistics,
    so any reference image works): one InputError instead of a shape error inside SPADE, a NaN style or a
    map matching no class colour."""
    sr = batch["sr"]
    n = sr.shape[0]
    for key in ("sr", "map", "style"):
        x = batch.get(key)
        if x is None:
            continue
        if key == "style":
            if x.ndim != 4 or x.shape[:2] != (n, 3) or min(x.shape[2:]) < STYLE_MIN_PX:
                raise InputError(
                    f"style of shape {tuple(x.shape)}",
                    f"expected N x 3 x H x W with N = {n} and H, W >= {STYLE_MIN_PX} (any size otherwise)",
                    "give one RGB style image per sr image",
                )
        elif tuple(x.shape) != (n, 3, *sr.shape[2:]):
            raise InputError(
                f"{key} of shape {tuple(x.shape)}",
                f"expected N x 3 x H x W = {(n, 3, *sr.shape[2:])} (the size of sr)",
                "render the map at the SR/HR size" if key == "map" else "give sr as N x 3 x H x W",
            )
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-4 or hi > 1 + 1e-4:
            raise InputError(
                f"{key} values",
                f"span [{lo:.3g}, {hi:.3g}], expected [0, 1]",
                "divide 8-bit images by 255 (and clamp interpolated images to [0, 1])",
            )
