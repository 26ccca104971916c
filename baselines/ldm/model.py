"""`ldm`: SGDM's Table-2 LDM baseline (the SGDM repo's SRLDM) on the SGDM backbone code.

The SD2.1-base UNet sees the noisy latent concatenated with the VAE latent (mode x 0.18215) of the upsampled
LR, so `conv_in` takes 8 channels; the map only shapes the text prompt, as in SGDM. Every UNet weight trains;
VAE and text tower stay frozen. Sampling uses the shared samplers (official: 50-step respaced DDPM from noise).

Deliberate deviations: outputs clamped to [0, 1]; noise drawn from the runner's per-image generators; the 4 new
`conv_in` channels are zero whatever the backbone source (official: only the SD2.1 initialisation says so).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from cmsrd.errors import InputError

from ..base import Batch, SRMethod, TrainContext
from ..conditions import Conditions
from ..diffusion import lr_start_timesteps, make_scheduler, sample_latents, training_scheduler
from ..seeding import Generators
from ..sgdm.backbone import (
    LATENT_SCALE,
    Backbone,
    load_backbone,
    load_original_parts,
    random_backbone,
    resolve_tokenizer,
)
from ..sgdm.config import BackboneConfig
from ..sgdm.model import check_inputs
from ..sgdm.prompt import PromptEncoder, prompts_from_maps
from .config import LDMConfig, LDMTrain
from .loading import (
    LATENT_CHANNELS,
    TEXT_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    check_layout,
    convert_official_unet,
    is_official,
    ours_unet_state,
    read_checkpoint,
)

log = logging.getLogger(__name__)
IN_CHANNELS = 2 * LATENT_CHANNELS  # noisy latent + LR latent


def widen_conv_in(unet: nn.Module, channels: int = IN_CHANNELS) -> None:
    """Give `unet.conv_in` `channels` inputs: the existing weights stay on the first ones, the new ones start
    at zero, so an SD2.1 UNet computes exactly what it did until training uses the LR latent."""
    old = unet.conv_in
    if old.in_channels == channels:
        return
    new = nn.Conv2d(channels, old.out_channels, old.kernel_size, old.stride, old.padding, device=old.weight.device).to(
        old.weight.dtype
    )
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels].copy_(old.weight)
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=channels)


class LDM(SRMethod):
    """SRLDM. Config keys: `network` {backbone: {pretrained, geometry, tokenizer, overrides}} (as SGDM), `sampler`
    {name, steps}, `train` {lr, weight_decay, gradient_checkpointing, ...}, `checkpoint` (an SRLDM `.ckpt`,
    which may carry the whole backbone, or our `model.safetensors`)."""

    config_type = LDMConfig

    def __init__(self, spec, scale: int, config: dict[str, Any], device: Any = "cpu"):
        super().__init__(spec, scale, config, device)
        settings: LDMConfig = self.settings
        bcfg = settings.network.backbone
        on_meta = str(device) == "meta"
        ckpt = None if on_meta or not settings.checkpoint else Path(settings.checkpoint)
        state = None
        if ckpt is not None:  # read once, before the build: an SRLDM .ckpt may carry the whole backbone
            state = read_checkpoint(ckpt)
            check_layout(state, ckpt, spec.name)
        whole = state is not None and is_official(state) and _has(state, VAE_PREFIX) and _has(state, TEXT_PREFIX)
        random_init = on_meta or (not whole and bcfg.pretrained is None)
        with (
            torch.device(device) if random_init else contextlib.nullcontext()
        ):  # random init straight on the target device
            bb = self._backbone(bcfg, ckpt if whole else None, state, on_meta)
        self.unet, self.vae, self.text_encoder = bb.unet, bb.vae, bb.text_encoder
        self.tokenizer, self.backbone_source = bb.tokenizer, bb.source
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        self.unet.requires_grad_(True)
        self.prompt_encoder = PromptEncoder(self.tokenizer, self.text_encoder)
        self.noise_schedule = training_scheduler()
        self.sampler_name, self.default_steps = settings.sampler.name, settings.sampler.steps
        make_scheduler(self.sampler_name, self.default_steps)  # validate early
        if settings.train.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        if on_meta:
            return
        self.to(device)
        if ckpt is not None:
            self._load(ckpt, state, backbone_loaded=whole)

    def _backbone(self, bcfg: BackboneConfig, official: Path | None, state: dict | None, on_meta: bool) -> Backbone:
        """An SRLDM file with VAE and text tower builds everything (8-channel UNet as stored); otherwise the SD2.1
        backbone of `pretrained` (None: random init) with `conv_in` widened."""
        geometry_name, overrides = bcfg.geometry, dict(bcfg.overrides or {})
        if official is not None:
            overrides["unet"] = {**(overrides.get("unet") or {}), "in_channels": IN_CHANNELS}
            bb = random_backbone(geometry_name, overrides)
            convert_official_unet(state, bb.unet, official)  # names differing keys before any load
            bb.tokenizer = resolve_tokenizer(bcfg.tokenizer, bcfg.pretrained, official)
            parts = load_original_parts(bb.unet, bb.vae, bb.text_encoder, state, str(official))
            log.info("%s: %s loaded from %s", self.spec.name, ", ".join(parts), official)
            bb.source = f"official:{official}"
            return bb
        bb = (
            random_backbone(geometry_name, overrides)
            if on_meta
            else load_backbone(bcfg.pretrained, geometry_name, bcfg.tokenizer, overrides)
        )
        widen_conv_in(bb.unet)
        return bb

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
    def encode(self, images01: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """Images in [0, 1] -> latents x 0.18215 (posterior sample for the HR target, mode for the LR)."""
        dist = self.vae.encode(images01.to(self.vae.dtype) * 2 - 1).latent_dist
        return (dist.sample() if sample else dist.mode()) * LATENT_SCALE

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return (self.vae.decode(z.to(self.vae.dtype) / LATENT_SCALE).sample + 1) / 2

    def text_context(self, batch: Batch, dtype: torch.dtype | None = None) -> torch.Tensor:
        n = batch["sr"].shape[0]
        return self.prompt_encoder(prompts_from_maps(batch.get("map"), n), self.device, dtype or self.unet.dtype)

    def eps(self, zt: torch.Tensor, t: torch.Tensor, context: torch.Tensor, lr_latent: torch.Tensor) -> torch.Tensor:
        return self.unet(torch.cat([zt, lr_latent.to(zt.dtype)], 1), t, encoder_hidden_states=context).sample

    # ---- training -------------------------------------------------------------------------------
    def configure_optimizers(self, train_cfg: LDMTrain) -> dict[str, torch.optim.Optimizer]:
        """AdamW over the whole UNet (official SRLDM: lr 1e-5, torch's other defaults)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return {"main": torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)}

    def training_step(self, batch: Batch, ctx: TrainContext) -> dict[str, float]:
        z0 = self.encode(batch["hr"])
        lr_latent = self.encode(batch["sr"], sample=False)
        noise = torch.randn_like(z0)
        t = torch.randint(0, self.noise_schedule.config.num_train_timesteps, (z0.shape[0],), device=z0.device)
        zt = self.noise_schedule.add_noise(z0, noise, t)
        context = self.text_context(batch, torch.float32)
        with ctx.autocast():
            pred = self.eps(zt, t, context, lr_latent)
        loss = F.mse_loss(pred.float(), noise)
        ctx.backward(loss, "main")
        return {"l_eps": float(loss.detach())}

    # ---- inference ------------------------------------------------------------------------------
    def nfe(self, cond: Conditions) -> int:
        steps = cond.steps or self.default_steps
        if cond.start_t is None:
            return steps
        return int(lr_start_timesteps(make_scheduler(self.sampler_name, steps).timesteps, cond.start_t).numel())

    @torch.no_grad()
    def super_resolve(self, batch: Batch, cond: Conditions, generator: Generators = None) -> torch.Tensor:
        sr = batch["sr"]
        n, _, h, w = sr.shape
        _check_inputs(batch)
        context = self.text_context(batch)
        lr_latent = self.encode(sr, sample=False)  # the conditioning, and the start of `start=lr@t`
        z, _ = sample_latents(
            lambda z, t: self.eps(z, t, context, lr_latent),
            (n, LATENT_CHANNELS, h // 8, w // 8),
            sampler=self.sampler_name,
            steps=cond.steps or self.default_steps,
            start_latent=lr_latent if cond.start_t is not None else None,
            start_t=cond.start_t,
            generator=generator,
            device=sr.device,
            dtype=self.unet.dtype,
        )
        return self.decode(z).float().clamp(0, 1)

    # ---- weights --------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every UNet tensor (all of them train); VAE and text tower come from the backbone source."""
        return {f"unet.{k}": v for k, v in self.unet.state_dict().items()}

    def load_checkpoint(self, path: str | Path) -> None:
        path = Path(path)
        state = read_checkpoint(path)
        check_layout(state, path, self.spec.name)
        self._load(state=state, path=path, backbone_loaded=False)

    def _load(self, path: Path, state: dict[str, torch.Tensor], backbone_loaded: bool) -> None:
        if is_official(state):
            if not backbone_loaded:  # a UNet-only SRLDM file (or VAE/text tower too) over the built backbone
                unet_state = convert_official_unet(state, self.unet, path)
                self.unet.load_state_dict(unet_state, strict=True)
                if _has(state, VAE_PREFIX) or _has(state, TEXT_PREFIX):
                    skip_unet = {k: v for k, v in state.items() if not k.startswith(UNET_PREFIX)}
                    _load_frozen_parts(self, skip_unet, path)
        else:
            self.unet.load_state_dict(ours_unet_state(state, self.unet, path, self.spec.name, self.scale), strict=True)
        self.loaded_from = path


def _load_frozen_parts(m: LDM, state: dict[str, torch.Tensor], path: Path) -> None:
    """VAE and/or text tower of an SRLDM file over a built backbone (real text weights need the real vocabulary)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from ..sgdm.backbone import load_text_tower
    from ..sgdm.convert import load_strict

    if _has(state, VAE_PREFIX):
        vae_state = {k: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
        load_strict(m.vae, convert_ldm_vae_checkpoint(vae_state, m.vae.config), f"checkpoint {path} (VAE)")
    if _has(state, TEXT_PREFIX):
        if m.backbone_source.startswith("random:"):
            bcfg = m.settings.network.backbone
            m.tokenizer = resolve_tokenizer(bcfg.tokenizer, bcfg.pretrained, path)
            m.prompt_encoder = PromptEncoder(m.tokenizer, m.text_encoder)
        load_text_tower(m.text_encoder, state, str(path))
    m.prompt_encoder.clear()
    m.backbone_source = f"official:{path}"


def _has(state: dict[str, Any], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in state)


def _check_inputs(batch: Batch) -> None:
    """SGDM's input checks (sr and map N x 3 x H x W in [0, 1], map at sr's size), plus H and W multiples of 8
    (the VAE factor), which SGDM's fixed 256 px data never needed."""
    h, w = batch["sr"].shape[2:]
    if h % 8 or w % 8:
        raise InputError(f"sr images {h}x{w}", "must be multiples of 8 (VAE factor)")
    check_inputs(batch)
