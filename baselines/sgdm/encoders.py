"""SGDM's content-style encoders (official `model/vgg16.py`, `model/spade.py`), written for diffusers.

Three variants, each mapping the upsampled LR `sr` and the map `ref` (N x 3 x H x W in [-1, 1]) to a
condition feature at 1/8 resolution (the latent grid):

- `AdaINEncoder` (real, SGDM+): 32-channel LR and map branches; SPADE modulates the *LR* features with
  cat[map, LR]; a style encoder (tanh output) gives the target statistics for AdaIN; output 1x1 conv over
  cat[map, LR, styled LR] (96 -> out).
- `MapSPADEEncoder` (synthetic, SGDM): branches widen 32 -> 64 -> 128 -> 256; SPADE modulates the *map*
  features with cat[map, LR]; output 1x1 conv over cat[map, LR] (512 -> 384). No style path.
- `LREncoder` (synthetic no-map ablation): LR only, 3 stride-2 stages, 3x3 conv 256 -> 384.

Attribute names follow the authors' modules so their checkpoints load by name (see `convert.py`).
The official code differs from the paper in two places kept here (reference section 13, items 1-2):
synthetic SPADE acts on map features, and the real output conv sees all three features.
"""

from __future__ import annotations

import torch
from torch import nn

STYLE_DIM = 32


class ConvBlock(nn.Module):
    """3x3 conv -> LeakyReLU(0.1)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv_in = nn.Conv2d(cin, cout, 3, 1, 1)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv_in(x))


class ResBlock(nn.Module):
    """x + conv(lrelu(conv(x))), no normalisation."""

    def __init__(self, ch: int):
        super().__init__()
        self.res_block = nn.Sequential(nn.Conv2d(ch, ch, 3, 1, 1), nn.LeakyReLU(0.1), nn.Conv2d(ch, ch, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res_block(x)


class Downsample(nn.Module):
    """Pixel-unshuffle by 2 (c -> 4c) then 1x1 conv back to c: a lossless-then-learned downsampling."""

    def __init__(self, ch: int):
        super().__init__()
        self.downsample = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(4 * ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(x)


class SPADE(nn.Module):
    """BatchNorm(x) * (1 + gamma(seg)) + beta(seg); seg already has x's resolution (no resize)."""

    def __init__(self, norm_nc: int, label_nc: int, hidden: int = 128):
        super().__init__()
        self.param_free_norm = nn.BatchNorm2d(norm_nc, affine=True)
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_nc, hidden, 3, 1, 1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden, norm_nc, 3, 1, 1)
        self.mlp_beta = nn.Conv2d(hidden, norm_nc, 3, 1, 1)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        actv = self.mlp_shared(seg)
        return self.param_free_norm(x) * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


def _lr_level(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(ConvBlock(cin, cout), ResBlock(cout), Downsample(cout))


def _map_level(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1), nn.LeakyReLU(0.1), Downsample(cout))


def channel_stats(x: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel spatial mean and unbiased std (+eps), shaped N x C x 1 x 1."""
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)
    return flat.mean(-1).view(n, c, 1, 1), (flat.std(-1) + eps).view(n, c, 1, 1)


class StyleEncoder(nn.Module):
    """HR style encoder: conv, 3 x [conv, lrelu, stride-2 conv, lrelu], conv, tanh -> 32 x H/8 x W/8."""

    def __init__(self, ch: int = STYLE_DIM):
        super().__init__()
        self.first_layer_sr = nn.Conv2d(3, ch, 3, 1, 1)
        for i in (1, 2, 3):
            setattr(
                self,
                f"layer{i}_sr",
                nn.Sequential(
                    nn.Conv2d(ch, ch, 3, 1, 1), nn.LeakyReLU(0.01), nn.Conv2d(ch, ch, 3, 2, 1), nn.LeakyReLU(0.01)
                ),
            )
        self.last_layer = nn.Sequential(nn.Conv2d(ch, ch, 3, 1, 1), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first_layer_sr(x)
        x = self.layer3_sr(self.layer2_sr(self.layer1_sr(x)))
        return self.last_layer(x)

    def stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """32-d style mean and std of images in [-1, 1] (what the flows model), N x 32 x 1 x 1 each."""
        return channel_stats(self(x))


class ContentEncoder(nn.Module):
    """Real-variant content guided module: 32-wide branches, SPADE on LR features, AdaIN, 96 -> out."""

    def __init__(self, out_channels: int = 320, ch: int = 32):
        super().__init__()
        self.first_layer_sr = ConvBlock(3, ch)
        self.first_layer_ref = ConvBlock(3, ch)
        for i in (1, 2, 3):
            setattr(self, f"layer{i}_sr", _lr_level(ch, ch))
            setattr(self, f"layer{i}_ref", _map_level(ch, ch))
            setattr(self, f"spade{i}", SPADE(ch, 2 * ch))
        self.last_linear = nn.Conv2d(3 * ch, out_channels, 1, bias=False)

    def forward(
        self, sr: torch.Tensor, ref: torch.Tensor, style_mean: torch.Tensor, style_std: torch.Tensor
    ) -> torch.Tensor:
        lr, mp = self.first_layer_sr(sr), self.first_layer_ref(ref)
        for i in (1, 2, 3):
            mp = getattr(self, f"layer{i}_ref")(mp)
            lr = getattr(self, f"layer{i}_sr")(lr)
            lr = getattr(self, f"spade{i}")(lr, torch.cat([mp, lr], 1))
        mu_c, sigma_c = channel_stats(lr)
        styled = (lr - mu_c) / sigma_c * style_std + style_mean
        return self.last_linear(torch.cat([mp, lr, styled], 1))


class AdaINEncoder(nn.Module):
    """SGDM+ (real) CS-encoder: content encoder + HR style encoder. Style from an image or given stats."""

    def __init__(self, out_channels: int = 320):
        super().__init__()
        self.SR_Ref_Encoder = ContentEncoder(out_channels)
        self.HR_Style_Encoder = StyleEncoder()

    def forward(
        self,
        sr: torch.Tensor,
        ref: torch.Tensor,
        style: torch.Tensor | None = None,
        style_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if style_stats is None:
            if style is None:
                raise ValueError("AdaINEncoder needs a style image or sampled style statistics")
            style_stats = self.HR_Style_Encoder.stats(style)
        mean, std = (s.reshape(s.shape[0], -1, 1, 1).to(sr.dtype) for s in style_stats)
        return self.SR_Ref_Encoder(sr, ref, mean, std)


class MapSPADEEncoder(nn.Module):
    """SGDM (synthetic) CS-encoder: widening branches, SPADE on the map features, cat -> 1x1 conv."""

    def __init__(self, out_channels: int = 384, widths: tuple[int, ...] = (32, 64, 128, 256)):
        super().__init__()
        self.first_layer_sr = ConvBlock(3, widths[0])
        self.first_layer_ref = ConvBlock(3, widths[0])
        for i in (1, 2, 3):
            cin, cout = widths[i - 1], widths[i]
            setattr(self, f"layer{i}_sr", _lr_level(cin, cout))
            setattr(self, f"layer{i}_ref", _map_level(cin, cout))
            setattr(self, f"spade{i}", SPADE(cout, 2 * cout))
        self.last_linear = nn.Conv2d(2 * widths[3], out_channels, 1, bias=False)

    def forward(self, sr: torch.Tensor, ref: torch.Tensor, **_: object) -> torch.Tensor:
        lr, mp = self.first_layer_sr(sr), self.first_layer_ref(ref)
        for i in (1, 2, 3):
            mp = getattr(self, f"layer{i}_ref")(mp)
            lr = getattr(self, f"layer{i}_sr")(lr)
            mp = getattr(self, f"spade{i}")(mp, torch.cat([mp, lr], 1))
        return self.last_linear(torch.cat([mp, lr], 1))


class LREncoder(nn.Module):
    """No-map ablation encoder (`SR_Encoder`): LR only; the map reaches the model through the prompt."""

    def __init__(self, out_channels: int = 384, widths: tuple[int, ...] = (32, 64, 128, 256)):
        super().__init__()
        self.first_layer_sr = nn.Conv2d(3, widths[0], 3, 1, 1)
        for i in (1, 2, 3):
            cin, cout = widths[i - 1], widths[i]
            setattr(
                self,
                f"layer{i}_sr",
                nn.Sequential(
                    nn.Conv2d(cin, cout, 3, 1, 1),
                    nn.LeakyReLU(0.01),
                    nn.Conv2d(cout, cout, 3, 2, 1),
                    nn.LeakyReLU(0.01),
                ),
            )
        self.last_linear = nn.Conv2d(widths[3], out_channels, 3, 1, 1, bias=False)

    def forward(self, sr: torch.Tensor, ref: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        x = self.first_layer_sr(sr)
        return self.last_linear(self.layer3_sr(self.layer2_sr(self.layer1_sr(x))))


ENCODERS = {"real": AdaINEncoder, "simu": MapSPADEEncoder, "simu_nomap": LREncoder}
