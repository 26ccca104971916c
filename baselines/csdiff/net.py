"""csdiff's networks: a prior feature module (encoder of the upsampled LR) and a pixel-space eps-UNet whose
every residual block is modulated by the prior features of its resolution (SFT: h * (1 + gamma) + beta).

Reconstruction from the abstract of Miao et al. (JSTARS 2025); see `README.md` beside this file. The prior
module runs once per image; the UNet once per sampler step, so NFE counts UNet evaluations only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register_arch


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (DDPM / ldm convention: cos | sin halves)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _norm(ch: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, ch), ch)


class PriorResBlock(nn.Module):
    """Plain residual block of the prior module (no timestep: the prior does not change along the chain)."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.body = nn.Sequential(
            _norm(cin, groups), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1), _norm(cout, groups), nn.SiLU()
        )
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.conv2(self.body(x))


class PriorEncoder(nn.Module):
    """Upsampled LR (in [-1, 1]) -> one feature map per UNet resolution (channels = that level's width)."""

    def __init__(self, in_ch: int, widths: Sequence[int], blocks: int, groups: int):
        super().__init__()
        self.stem = nn.Conv2d(in_ch, widths[0], 3, padding=1)
        self.levels = nn.ModuleList()
        self.downs = nn.ModuleList()
        cin = widths[0]
        for i, w in enumerate(widths):
            self.levels.append(nn.Sequential(*[PriorResBlock(cin if j == 0 else w, w, groups) for j in range(blocks)]))
            cin = w
            if i < len(widths) - 1:
                self.downs.append(nn.Conv2d(w, w, 3, stride=2, padding=1))

    def forward(self, cond: torch.Tensor) -> list[torch.Tensor]:
        h, feats = self.stem(cond), []
        for i, level in enumerate(self.levels):
            h = level(h)
            feats.append(h)
            if i < len(self.downs):
                h = self.downs[i](h)
        return feats


class SFTResBlock(nn.Module):
    """UNet residual block: timestep added after the first conv, prior features injected by a spatial affine
    (SFT/SPADE) on the second normalisation. The SFT conv has the default init, not zero: with zeros the prior
    module would get no gradient until the SFT weights had moved (ControlNet's zero-conv delay)."""

    def __init__(self, cin: int, cout: int, temb_ch: int, prior_ch: int, groups: int, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(_norm(cin, groups), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.temb = nn.Linear(temb_ch, cout)
        self.norm2 = _norm(cout, groups)
        self.sft = nn.Conv2d(prior_ch, 2 * cout, 3, padding=1)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.temb(temb)[:, :, None, None]
        gamma, beta = self.sft(prior).chunk(2, dim=1)
        h = self.norm2(h) * (1 + gamma) + beta
        return self.skip(x) + self.out_layers(h)


class SelfAttention(nn.Module):
    """Single-head spatial self-attention (DDPM's AttnBlock), used at the coarsest levels only."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = _norm(ch, groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(out.transpose(-1, -2).reshape(n, c, h, w))


@register_arch
class CSDiffNet(nn.Module):
    """Prior module + SFT-conditioned eps-UNet at HR resolution (input side a multiple of 2^(levels-1)).

    `forward(x_t, t, cond)` predicts the noise; `prior(cond)` and `denoise(x_t, t, feats)` split it so a
    sampler computes the prior features once per image."""

    def __init__(
        self,
        in_ch: int = 3,
        base_ch: int = 64,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_levels: Sequence[int] = (4,),
        prior_blocks: int = 2,
        groups: int = 32,
        dropout: float = 0.0,
    ):
        super().__init__()
        if not ch_mult or num_res_blocks < 1 or prior_blocks < 1 or base_ch < 1:
            raise ValueError("ch_mult must be non-empty, num_res_blocks, prior_blocks and base_ch >= 1")
        if any(a < 0 or a >= len(ch_mult) for a in attn_levels):
            raise ValueError(f"attn_levels {list(attn_levels)} must index ch_mult (0..{len(ch_mult) - 1})")
        widths = [base_ch * m for m in ch_mult]
        if any(w % min(groups, w) for w in widths):
            raise ValueError(f"every level width {widths} must be divisible by groups={groups}")
        self.levels = len(widths)
        temb_ch = 4 * base_ch
        self.base_ch = base_ch
        self.temb = nn.Sequential(nn.Linear(base_ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.prior_encoder = PriorEncoder(in_ch, widths, prior_blocks, groups)
        self.conv_in = nn.Conv2d(in_ch, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.down_attn = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips, cin = [widths[0]], widths[0]
        for i, w in enumerate(widths):
            self.down.append(nn.ModuleList())
            self.down_attn.append(nn.ModuleList())
            for _ in range(num_res_blocks):
                self.down[i].append(SFTResBlock(cin, w, temb_ch, w, groups, dropout))
                self.down_attn[i].append(SelfAttention(w, groups) if i in attn_levels else nn.Identity())
                cin = w
                skips.append(w)
            if i < self.levels - 1:
                self.downsample.append(nn.Conv2d(w, w, 3, stride=2, padding=1))
                skips.append(w)
        self.mid1 = SFTResBlock(cin, cin, temb_ch, widths[-1], groups, dropout)
        self.mid_attn = SelfAttention(cin, groups)
        self.mid2 = SFTResBlock(cin, cin, temb_ch, widths[-1], groups, dropout)
        self.up = nn.ModuleList()
        self.up_attn = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(self.levels)):
            w = widths[i]
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(SFTResBlock(cin + skips.pop(), w, temb_ch, w, groups, dropout))
                attns.append(SelfAttention(w, groups) if i in attn_levels else nn.Identity())
                cin = w
            self.up.append(blocks)
            self.up_attn.append(attns)
            if i > 0:
                self.upsample.append(nn.Conv2d(w, w, 3, padding=1))
        self.out = nn.Sequential(_norm(cin, groups), nn.SiLU(), nn.Conv2d(cin, in_ch, 3, padding=1))

    def prior(self, cond: torch.Tensor) -> list[torch.Tensor]:
        return self.prior_encoder(cond)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        side = 2 ** (self.levels - 1)
        if x.shape[-1] % side or x.shape[-2] % side:
            raise ValueError(f"input {tuple(x.shape[-2:])} must be a multiple of {side} (2^(levels-1))")
        temb = self.temb(timestep_embedding(t.expand(x.shape[0]), self.base_ch))
        h = self.conv_in(x)
        hs = [h]
        for i in range(self.levels):
            for block, attn in zip(self.down[i], self.down_attn[i]):
                h = attn(block(h, temb, feats[i]))
                hs.append(h)
            if i < self.levels - 1:
                h = self.downsample[i](h)
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, temb, feats[-1])), temb, feats[-1])
        for k, i in enumerate(reversed(range(self.levels))):
            for block, attn in zip(self.up[k], self.up_attn[k]):
                h = attn(block(torch.cat([h, hs.pop()], dim=1), temb, feats[i]))
            if i > 0:
                h = self.upsample[k](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(h)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.denoise(x, t, self.prior(cond))
