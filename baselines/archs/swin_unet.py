"""ResShift's denoiser `UNetModelSwin` (Yue et al., NeurIPS 2023 / TPAMI 2024), written from its description.

An ADM-style UNet (scale-shift ResBlocks, GroupNorm 32, sinusoidal time embedding of the step index) whose
attention is a Swin layer (1x1 patch embed -> `swin_depth` window-attention blocks, every second one
shifted -> 1x1 unembed, *no* residual around the layer) after the first ResBlock of each level listed in
`attention_resolutions` and in the middle block. The LR condition is concatenated to the input channels.
Parameter names follow the official checkpoints (`input_blocks.I.J...`, `middle_block`, `output_blocks`,
`out`), so an official state dict loads after its derived buffers are dropped (`strip_derived_buffers`).

Two behaviours of the official code are kept on purpose, because the released weights were trained with them:
- a level whose build resolution is no larger than the window attends one unshifted window of that size;
- the shifted-window mask is the official one: region labels vary along rows only and are flattened
  column-first inside each window (`shifted_window_mask`). It is always recomputed from the input size, as
  the official forward does, so it is a derived buffer like `relative_position_index`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import nn
from torch.nn import functional as F

from ..registry import register_arch
from .swinir import relative_position_index

GROUPS = 32  # the official `normalization()`: GroupNorm(32, C), computed in float32
DERIVED_BUFFERS = ("attn_mask", "relative_position_index")


class GroupNorm32(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


def norm(channels: int) -> GroupNorm32:
    if channels % GROUPS:
        raise ValueError(f"{channels} channels: every width must be a multiple of {GROUPS} (GroupNorm 32)")
    return GroupNorm32(GROUPS, channels)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[cos | sin] of t * max_period^(-k/half), the ADM embedding ResShift uses (t = step index 0..T-1)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        conv = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
        self.out_layers = nn.Sequential(norm(out_channels), nn.SiLU(), nn.Dropout(dropout), conv)
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        scale, shift = self.emb_layers(emb).to(h.dtype)[..., None, None].chunk(2, dim=1)
        h = self.out_layers[0](h) * (1 + scale) + shift
        return self.skip_connection(x) + self.out_layers[1:](h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


@lru_cache(maxsize=32)
def _mask_cpu(h: int, w: int, window: int, shift: int) -> torch.Tensor:
    rows = torch.full((h,), 2, dtype=torch.int64)  # official labels: only the row bands matter
    rows[: h - window] = 0
    rows[h - window : h - shift] = 1
    labels = rows[:, None].expand(h, w)
    win = labels.reshape(h // window, window, w // window, window).permute(0, 2, 3, 1)  # column-first flatten
    win = win.reshape(-1, window * window)
    return torch.where(win[:, None, :] == win[:, :, None], 0.0, -100.0)


def shifted_window_mask(h: int, w: int, window: int, shift: int, device=None, dtype=None) -> torch.Tensor:
    """(nW, w*w, w*w) additive mask (0 / -100) of the official shifted blocks for an h x w feature map."""
    return _mask_cpu(h, w, window, shift).to(device=device, dtype=dtype)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window: int, heads: int):
        super().__init__()
        self.window, self.heads = window, heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B*nW, N, C); mask: (nW, N, N) or None."""
        bn, n, c = x.shape
        q, k, v = self.qkv(x).reshape(bn, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        bias = bias.permute(2, 0, 1).to(q.dtype)[None]  # 1, heads, N, N
        if mask is not None:
            nw = mask.shape[0]
            bias = (bias + mask[:, None].to(q.dtype))[None].expand(bn // nw, -1, -1, -1, -1).reshape(bn, -1, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(bn, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """Window attention on a B x C x H x W map (GroupNorm instead of LayerNorm, 1x1-conv MLP)."""

    def __init__(self, dim: int, resolution: int, heads: int, window: int, shift: int, mlp_ratio: float):
        super().__init__()
        if resolution <= window:  # official: one unshifted window as large as the map it was built for
            window, shift = resolution, 0
        self.window, self.shift = window, shift
        self.norm1 = norm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        ws, s = self.window, self.shift
        y = self.norm1(x)
        if s:
            y = torch.roll(y, shifts=(-s, -s), dims=(2, 3))
        win = y.reshape(b, c, h // ws, ws, w // ws, ws).permute(0, 2, 4, 3, 5, 1).reshape(-1, ws * ws, c)
        mask = shifted_window_mask(h, w, ws, s, x.device) if s else None
        win = self.attn(win, mask)
        y = win.reshape(b, h // ws, w // ws, ws, ws, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
        if s:
            y = torch.roll(y, shifts=(s, s), dims=(2, 3))
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchProj(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class SwinLayer(nn.Module):
    """Official `BasicLayer` with patch size 1: embed -> blocks -> unembed (replaces its input, no skip)."""

    def __init__(self, channels: int, embed_dim: int, heads: int, window: int, depth: int, resolution: int, mlp_ratio):
        super().__init__()
        self.patch_embed = PatchProj(channels, embed_dim)
        self.blocks = nn.ModuleList(
            SwinBlock(embed_dim, resolution, heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio)
            for i in range(depth)
        )
        self.patch_unembed = PatchProj(embed_dim, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for blk in self.blocks:
            x = blk(x)
        return self.patch_unembed(x)


class TimestepSequential(nn.ModuleList):
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


@register_arch
class UNetModelSwin(nn.Module):
    """ResShift UNet. `image_size` is the latent size it is built for (64 = 256 px HR through VQ-f4); it
    fixes each level's window (see module doc). Inputs: x (B, in_channels, H, W), t (B,) step indices,
    lq (B, lq_channels, H, W) concatenated to x. H and W must be multiples of `size_multiple` and at least
    `image_size` (smaller maps would be smaller than the windows the weights were trained with)."""

    def __init__(
        self,
        image_size: int = 64,
        in_channels: int = 3,
        model_channels: int = 160,
        out_channels: int = 3,
        num_res_blocks: int | Sequence[int] = 2,
        attention_resolutions: Sequence[int] = (64, 32, 16, 8),
        channel_mult: Sequence[int] = (1, 2, 2, 4),
        num_head_channels: int = 32,
        swin_depth: int = 2,
        swin_embed_dim: int = 192,
        window_size: int = 8,
        mlp_ratio: float = 4.0,
        lq_channels: int = 3,
        dropout: float = 0.0,
    ):
        super().__init__()
        levels = len(channel_mult)
        blocks = [int(num_res_blocks)] * levels if isinstance(num_res_blocks, int) else [int(n) for n in num_res_blocks]
        if len(blocks) != levels:
            raise ValueError(f"num_res_blocks {num_res_blocks} needs one entry per channel_mult level ({levels})")
        if swin_embed_dim % num_head_channels:
            raise ValueError(f"swin_embed_dim {swin_embed_dim} is not a multiple of num_head_channels")
        if image_size % (2 ** (levels - 1)):
            raise ValueError(f"image_size {image_size} is not divisible by 2^{levels - 1}")
        self.image_size, self.in_channels, self.model_channels = image_size, in_channels, model_channels
        self.lq_channels, self.out_channels = lq_channels, out_channels
        heads = swin_embed_dim // num_head_channels
        emb_dim = 4 * model_channels

        def swin(ch: int, res: int) -> SwinLayer:
            return SwinLayer(ch, swin_embed_dim, heads, window_size, swin_depth, res, mlp_ratio)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        ch = model_channels * channel_mult[0]
        self.input_blocks = nn.ModuleList(
            [TimestepSequential([nn.Conv2d(in_channels + lq_channels, ch, 3, padding=1)])]
        )
        skips, res = [ch], image_size
        self._windows: list[tuple[int, int]] = []  # (resolution factor, window) the runtime sizes must honour
        for level, mult in enumerate(channel_mult):
            for j in range(blocks[level]):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, model_channels * mult, dropout)]
                ch = model_channels * mult
                if res in attention_resolutions and j == 0:
                    layers.append(swin(ch, res))
                    self._windows.append((2**level, min(res, window_size)))
                self.input_blocks.append(TimestepSequential(layers))
                skips.append(ch)
            if level != levels - 1:
                self.input_blocks.append(TimestepSequential([Downsample(ch)]))
                skips.append(ch)
                res //= 2
        self.middle_block = TimestepSequential(
            [ResBlock(ch, emb_dim, ch, dropout), swin(ch, res), ResBlock(ch, emb_dim, ch, dropout)]
        )
        self._windows.append((2 ** (levels - 1), min(res, window_size)))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(blocks[level] + 1):
                layers = [ResBlock(ch + skips.pop(), emb_dim, model_channels * mult, dropout)]
                ch = model_channels * mult
                if res in attention_resolutions and i == 0:
                    layers.append(swin(ch, res))
                if level and i == blocks[level]:
                    layers.append(Upsample(ch))
                    res *= 2
                self.output_blocks.append(TimestepSequential(layers))
        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))
        self.size_multiple = math.lcm(*(f * w for f, w in self._windows), 2 ** (levels - 1))

    def check_size(self, h: int, w: int) -> str | None:
        """None when an h x w input runs with the trained windows, else why not."""
        if min(h, w) < self.image_size or h % self.size_multiple or w % self.size_multiple:
            return (
                f"the network needs maps of at least {self.image_size} px and multiples of {self.size_multiple} "
                f"(got {h}x{w})"
            )
        return None

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        problem = self.check_size(*x.shape[2:])
        if problem:
            raise ValueError(problem)
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(self.time_embed[0].weight.dtype))
        h = torch.cat([x, lq.to(x.dtype)], dim=1)
        hs = []
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


def strip_derived_buffers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the official geometry-derived buffers (`attn_mask`, `relative_position_index`): rebuilt here."""
    return {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in DERIVED_BUFFERS}
