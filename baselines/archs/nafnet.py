"""EDiffSR's noise predictor `ConditionalNAFNet` (Xiao et al., TGRS 2024; github.com/XY-boy/EDiffSR).

A time-conditioned NAFNet U-Net at HR resolution. Its input is cat(x_t - mu, mu) (mu: the bicubic-upsampled
LR), an RCAB after the first convolution is the paper's prior module (CPEM), and each NAF block is modulated by
a sinusoidal embedding of the integer timestep (scale/shift before both of its halves). It predicts the noise
of the IR-SDE state (`baselines.diffusion.irsde`). Module and tensor names follow the official code, so the
authors' plain state dict loads strictly; width 64, encoder blocks [14, 1, 1, 1] is the released model
(20,403,719 parameters).

Kept as in the official forward, on purpose: the prior module's output is added to its own input although
RCAB is already residual (features = 2 x + rcab(x)); the time embedding is not normalised (t = 1..T); the
network output is the noise itself (no global residual); the channel LayerNorm's eps is 1e-5 in float32 and
1e-3 in lower precision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register_arch


class SimpleGate(nn.Module):
    """NAFNet's gate: split the channels in two halves and multiply them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b


class ChannelLayerNorm(nn.Module):
    """LayerNorm over channels of N x C x H x W with a gain only (the official `LayerNorm`, parameter `g`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        mean = x.mean(dim=1, keepdim=True)
        var = x.var(dim=1, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + eps) * self.g


class TimestepEmbedding(nn.Module):
    """Sinusoidal embedding of t (`dim` values: dim/2 sines then dim/2 cosines, periods up to 10000)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * (-math.log(10000) / (half - 1)))
        angles = t.float()[:, None] * freqs[None, :]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


class NAFBlock(nn.Module):
    """NAFNet block (depth-wise conv + simplified channel attention, then a gated 1x1 FFN), each half
    modulated by shift/scale from the time embedding (`mlp`)."""

    def __init__(self, c: int, time_dim: int):
        super().__init__()
        dw = 2 * c
        self.mlp = nn.Sequential(SimpleGate(), nn.Linear(time_dim // 2, 4 * c))
        self.conv1 = nn.Conv2d(c, dw, 1)
        self.conv2 = nn.Conv2d(dw, dw, 3, padding=1, groups=dw)
        self.conv3 = nn.Conv2d(dw // 2, c, 1)
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dw // 2, dw // 2, 1))
        self.sg = SimpleGate()
        self.conv4 = nn.Conv2d(c, 2 * c, 1)
        self.conv5 = nn.Conv2d(c, c, 1)
        self.norm1 = ChannelLayerNorm(c)
        self.norm2 = ChannelLayerNorm(c)
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift_att, scale_att, shift_ffn, scale_ffn = self.mlp(temb)[:, :, None, None].chunk(4, dim=1)
        h = self.norm1(x) * (scale_att + 1) + shift_att
        h = self.sg(self.conv2(self.conv1(h)))
        h = self.conv3(h * self.sca(h))
        y = x + h * self.beta
        h = self.norm2(y) * (scale_ffn + 1) + shift_ffn
        h = self.conv5(self.sg(self.conv4(h)))
        return y + h * self.gamma


class ChannelAttention(nn.Module):
    """RCAN channel attention: global pool, squeeze by `squeeze`, excite, sigmoid gate."""

    def __init__(self, c: int, squeeze: int = 16):
        super().__init__()
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(c, c // squeeze, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c // squeeze, c, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)


class RCAB(nn.Module):
    """RCAN's residual channel-attention block: x + CA(conv(relu(conv(x))))."""

    def __init__(self, c: int, squeeze: int = 16):
        super().__init__()
        self.rcab = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1), nn.ReLU(True), nn.Conv2d(c, c, 3, padding=1), ChannelAttention(c, squeeze)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.rcab(x)


def _positive_ints(name: str, values: Sequence[int]) -> list[int]:
    out = list(values)
    if not out or any(not isinstance(v, int) or v < 1 for v in out):
        raise ValueError(f"ConditionalNAFNet {name} must be a non-empty list of positive integers, got {values!r}")
    return out


@register_arch
class ConditionalNAFNet(nn.Module):
    """eps_theta(x_t, mu, t): N x 3 x H x W (any H, W: padded to a multiple of 2^levels, then cropped)."""

    def __init__(
        self,
        img_channel: int = 3,
        width: int = 64,
        middle_blk_num: int = 1,
        enc_blk_nums: Sequence[int] = (14, 1, 1, 1),
        dec_blk_nums: Sequence[int] = (1, 1, 1, 1),
    ):
        super().__init__()
        if not isinstance(width, int) or width < 16 or width % 2:
            raise ValueError(
                f"ConditionalNAFNet width must be an even integer >= 16 (the prior module's channel attention "
                f"squeezes by 16), got {width!r}"
            )
        enc, dec = _positive_ints("enc_blk_nums", enc_blk_nums), _positive_ints("dec_blk_nums", dec_blk_nums)
        if len(enc) != len(dec):
            raise ValueError(
                f"ConditionalNAFNet needs as many decoder as encoder levels, "
                f"got enc_blk_nums {enc} and dec_blk_nums {dec}"
            )
        if not isinstance(middle_blk_num, int) or middle_blk_num < 1:
            raise ValueError(f"ConditionalNAFNet middle_blk_num must be a positive integer, got {middle_blk_num!r}")
        time_dim = 4 * width
        self.time_mlp = nn.Sequential(
            TimestepEmbedding(width), nn.Linear(width, 2 * time_dim), SimpleGate(), nn.Linear(time_dim, time_dim)
        )
        self.intro = nn.Conv2d(2 * img_channel, width, 3, padding=1)
        self.enhance = RCAB(width)
        self.ending = nn.Conv2d(width, img_channel, 3, padding=1)
        self.encoders, self.downs, self.ups, self.decoders = (nn.ModuleList() for _ in range(4))
        chan = width
        for n in enc:
            self.encoders.append(nn.Sequential(*[NAFBlock(chan, time_dim) for _ in range(n)]))
            self.downs.append(nn.Conv2d(chan, 2 * chan, 2, stride=2))
            chan *= 2
        self.middle_blks = nn.Sequential(*[NAFBlock(chan, time_dim) for _ in range(middle_blk_num)])
        for n in dec:
            self.ups.append(nn.Sequential(nn.Conv2d(chan, 2 * chan, 1, bias=False), nn.PixelShuffle(2)))
            chan //= 2
            self.decoders.append(nn.Sequential(*[NAFBlock(chan, time_dim) for _ in range(n)]))
        self.multiple = 2 ** len(enc)

    @staticmethod
    def _stage(blocks: nn.Sequential, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            x = block(x, temb)
        return x

    def forward(self, x: torch.Tensor, mu: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """x: the state x_t, mu: the upsampled LR, t: timesteps (N values, or one for the whole batch)."""
        t = torch.as_tensor(t, device=x.device).reshape(-1)
        h, w = x.shape[-2:]
        inp = torch.cat([x - mu, mu], dim=1)
        inp = F.pad(inp, (0, -w % self.multiple, 0, -h % self.multiple))
        temb = self.time_mlp(t)
        feat = self.intro(inp)
        feat = feat + self.enhance(feat)
        skips = []
        for blocks, down in zip(self.encoders, self.downs):
            feat = self._stage(blocks, feat, temb)
            skips.append(feat)
            feat = down(feat)
        feat = self._stage(self.middle_blks, feat, temb)
        for blocks, up, skip in zip(self.decoders, self.ups, reversed(skips)):
            feat = self._stage(blocks, up(feat) + skip, temb)
        return self.ending(feat)[..., :h, :w]
