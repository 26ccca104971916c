"""Classical SwinIR (Liang et al., ICCVW 2021) with a 2^n pixel-shuffle upsampler for x16/x32.

Parameter names follow the official repository (`conv_first`, `patch_embed.norm`,
`layers.I.residual_group.blocks.J.{norm1,attn.qkv,attn.proj,attn.relative_position_bias_table,norm2,
mlp.fc1,mlp.fc2}`, `layers.I.conv`, `norm`, `conv_after_body`, `conv_before_upsample.0`,
`upsample.{0,2,...}`, `conv_last`), so the official `params` checkpoints load directly. The official
`relative_position_index` and `attn_mask` buffers are derived from the geometry; they are rebuilt here
(not stored) and the loader drops them, so one network runs at any input size.

`img_size` is the official constructor's training LR patch size. As in the official
`SwinTransformerBlock`, a patch no larger than one window (`img_size <= window_size`, e.g. the 8 px LR of
x32 at 256 px HR) is attended as one window of `img_size` with no shifted blocks; larger patches use
`window_size` windows, every second block shifted by half a window.

The LR is reflect-padded to a multiple of the window size and the output cropped back, as the
official test script does. Attention runs through `scaled_dot_product_attention` with the
relative-position bias (and the shifted-window mask) as an additive float mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
from timm.layers import DropPath, trunc_normal_
from torch import nn
from torch.nn import functional as F

from ..registry import register_arch

RGB_MEAN = (0.4488, 0.4371, 0.4040)  # DIV2K mean used by the official classical models


def block_geometry(img_size: int, window_size: int) -> tuple[int, int]:
    """(window, shift of the odd blocks) the official code uses for a training patch of `img_size`:
    `if min(input_resolution) <= window_size: shift_size = 0; window_size = min(input_resolution)`."""
    if img_size <= window_size:
        return img_size, 0
    return window_size, window_size // 2


def official_img_size(state: dict[str, torch.Tensor]) -> int | None:
    """The `img_size` an official-layout state dict (derived buffers included) was built with: from the
    first shifted block's `attn_mask` (nW windows), or, when a second block exists but has no mask, the
    single-window size (then img_size equals the block window). None when the buffers are absent."""
    index = state.get("layers.0.residual_group.blocks.0.attn.relative_position_index")
    if index is None or "layers.0.residual_group.blocks.1.norm1.weight" not in state:
        return None
    window = math.isqrt(index.shape[0])
    mask = state.get("layers.0.residual_group.blocks.1.attn_mask")
    return window if mask is None else math.isqrt(mask.shape[0]) * window


def relative_position_index(window: int) -> torch.Tensor:
    """(w*w, w*w) index into the (2w-1)^2 bias table for every query/key pair in a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


@lru_cache(maxsize=32)
def _shift_mask_cpu(h: int, w: int, window: int, shift: int) -> torch.Tensor:
    """(nW, w*w, w*w) additive mask: -100 between tokens that were not neighbours before the cyclic
    shift (so shifted windows never attend across the image border wrap)."""
    region = torch.zeros(1, h, w, 1)
    label = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            region[:, hs, ws, :] = label
            label += 1
    win = window_partition(region, window).squeeze(-1)  # nW, w*w
    diff = win[:, None, :] - win[:, :, None]
    return diff.ne(0).float() * -100.0


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """B, H, W, C -> B*nW, window*window, C."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """B*nW, window*window, C -> B, H, W, C."""
    c = windows.shape[-1]
    b = windows.shape[0] // ((h // window) * (w // window))
    x = windows.view(b, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside a window with a learned relative-position bias."""

    def __init__(
        self,
        dim: int,
        window: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        self.dim, self.window, self.num_heads = dim, window, num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        bw, n, c = x.shape
        q, k, v = self.qkv(x).view(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        bias = bias.view(n, n, self.num_heads).permute(2, 0, 1)  # heads, N, N
        if mask is None:
            attn_mask = bias.unsqueeze(0)
        else:
            nw = mask.shape[0]
            attn_mask = (bias.unsqueeze(0) + mask.unsqueeze(1)).repeat(bw // nw, 1, 1, 1)
        attn_mask = attn_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop if self.training else 0.0
        )
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(bw, n, c)))


def shifted_window_attention(attn: WindowAttention, y: torch.Tensor, window: int, shift: int) -> torch.Tensor:
    """B, H, W, C -> B, H, W, C: `attn` inside each window; with `shift`, on the cyclically shifted image with
    the wrap masked, then shifted back (Swin's (S)W-MSA; TTST's blocks use the same step)."""
    h, w = y.shape[1:3]
    mask = None
    if shift:
        y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        mask = _shift_mask_cpu(h, w, window, shift).to(y.device)
    y = window_reverse(attn(window_partition(y, window), mask), window, h, w)
    if shift:
        y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
    return y


class SwinTransformerBlock(nn.Module):
    """(Shifted-)window attention + MLP, both pre-norm residual."""

    def __init__(self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        h, w = size
        b, _, c = x.shape
        y = shifted_window_attention(self.attn, self.norm1(x).view(b, h, w, c), self.window, self.shift)
        x = x + self.drop_path(y.reshape(b, h * w, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class BasicLayer(nn.Module):
    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window: int,
        shift: int,
        mlp_ratio: float,
        drop_path: Sequence[float],
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, num_heads, window, 0 if i % 2 == 0 else shift, mlp_ratio, drop_path[i])
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x, size)
        return x


def residual_conv(dim: int, resi_connection: str) -> nn.Module:
    """The image-space conv closing a residual group and the body: one 3x3 conv ("1conv") or the official
    bottlenecked 3x3-1x1-3x3 stack ("3conv")."""
    if resi_connection == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    if resi_connection == "3conv":
        return nn.Sequential(
            nn.Conv2d(dim, dim // 4, 3, 1, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(dim // 4, dim // 4, 1, 1, 0),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(dim // 4, dim, 3, 1, 1),
        )
    raise ValueError(f"resi_connection must be '1conv' or '3conv', got {resi_connection!r}")


class ConvSkipGroup(nn.Module):
    """A token-space `residual_group`, then `conv` in image space, plus a long skip (SwinIR's RSTB, TTST's
    RTSG); subclasses build the two modules under those official names."""

    residual_group: nn.Module
    conv: nn.Module

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        h, w = size
        b, n, c = x.shape
        y = self.residual_group(x, size).transpose(1, 2).reshape(b, c, h, w)
        return self.conv(y).flatten(2).transpose(1, 2) + x


class RSTB(ConvSkipGroup):
    """Residual Swin Transformer block: a BasicLayer, a conv in image space, and a long skip."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window: int,
        shift: int,
        mlp_ratio: float,
        drop_path: Sequence[float],
        resi_connection: str,
    ):
        super().__init__()
        self.residual_group = BasicLayer(dim, depth, num_heads, window, shift, mlp_ratio, drop_path)
        self.conv = residual_conv(dim, resi_connection)


def pixelshuffle_stages(upscale: int, name: str) -> int:
    """How many x2 pixel-shuffle stages make `upscale` (a power of two >= 2)."""
    n_up = int(round(math.log2(upscale))) if upscale >= 2 else 0
    if n_up < 1 or 2**n_up != upscale:
        raise ValueError(f"{name} upscale must be a power of two >= 2 (pixel-shuffle x2 stages), got {upscale}")
    return n_up


def drop_path_rates(depths: Sequence[int], rate: float) -> list[list[float]]:
    """Stochastic depth per block, rising linearly over all blocks as `torch.linspace(0, rate, n)` (plain
    floats: meta-device safe), split by group."""
    n_blocks = sum(depths)
    dpr = [rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
    starts = [sum(depths[:i]) for i in range(len(depths))]
    return [dpr[start : start + depth] for start, depth in zip(starts, depths)]


class WindowedSR(nn.Module):
    """What SwinIR and TTST share around their groups: the official init, window padding, the token trunk
    (`patch_embed.norm`, `layers`, `norm`) and the conv body + pixel-shuffle tail. Subclasses build
    `conv_first`, `patch_embed`, `layers`, `norm`, `conv_after_body` and set `pad_multiple`."""

    pad_multiple: int

    def _build_tail(self, embed_dim: int, num_feat: int, in_chans: int, n_up: int) -> None:
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, 1, 1), nn.LeakyReLU(inplace=True))
        ups: list[nn.Module] = []
        for _ in range(n_up):
            ups += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
        self.upsample = nn.Sequential(*ups)
        self.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.pad_multiple, (-w) % self.pad_multiple
        if not (ph or pw):
            return x
        mode = "reflect" if ph < h and pw < w else "replicate"  # reflect needs pad < size
        return F.pad(x, (0, pw, 0, ph), mode=mode)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = self.patch_embed.norm(x.flatten(2).transpose(1, 2))
        for layer in self.layers:
            x = layer(x, (h, w))
        return self.norm(x).transpose(1, 2).reshape(b, c, h, w)

    def _reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Padded LR (already normalised) -> SR before cropping: shallow conv, trunk with skip, tail."""
        x = self.conv_first(x)
        x = self.conv_after_body(self.forward_features(x)) + x
        return self.conv_last(self.upsample(self.conv_before_upsample(x)))


@register_arch
class SwinIR(WindowedSR):
    """Classical SwinIR. Input N x C x h x w in [0, 1] (any h, w); output N x C x h*s x w*s.

    `img_size` is the training LR patch size; it sets the block windows and shifts (`block_geometry`)."""

    def __init__(
        self,
        upscale: int = 16,
        in_chans: int = 3,
        img_size: int = 64,
        window_size: int = 8,
        img_range: float = 1.0,
        depths: Sequence[int] = (6, 6, 6, 6, 6, 6),
        embed_dim: int = 180,
        num_heads: Sequence[int] = (6, 6, 6, 6, 6, 6),
        mlp_ratio: float = 2.0,
        drop_path_rate: float = 0.1,
        upsampler: str = "pixelshuffle",
        resi_connection: str = "1conv",
        num_feat: int = 64,
    ):
        super().__init__()
        if upsampler != "pixelshuffle":
            raise ValueError(f"only the classical 'pixelshuffle' upsampler is implemented (got {upsampler!r})")
        n_up = pixelshuffle_stages(upscale, "SwinIR")
        if len(depths) != len(num_heads):
            raise ValueError("depths and num_heads must have the same length")
        if embed_dim % num_heads[0]:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads[0]}")
        for name, value in (("img_size", img_size), ("window_size", window_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SwinIR {name} must be a positive integer, got {value!r}")
        self.upscale, self.window_size, self.img_range, self.img_size = upscale, window_size, img_range, img_size
        window, shift = block_geometry(img_size, window_size)
        self.pad_multiple = math.lcm(
            window_size, window
        )  # the official pads to window_size; lcm also fits a smaller block window
        mean = torch.tensor(RGB_MEAN).view(1, 3, 1, 1) if in_chans == 3 else torch.zeros(1, 1, 1, 1)
        self.register_buffer("mean", mean, persistent=False)

        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        self.patch_embed = nn.Module()
        self.patch_embed.norm = nn.LayerNorm(embed_dim)
        self.layers = nn.ModuleList(
            RSTB(embed_dim, depth, heads, window, shift, mlp_ratio, dpr, resi_connection)
            for depth, heads, dpr in zip(depths, num_heads, drop_path_rates(depths, drop_path_rate))
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = residual_conv(embed_dim, resi_connection)
        self._build_tail(embed_dim, num_feat, in_chans, n_up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = self._reconstruct((self._pad(x) - self.mean.to(x.dtype)) * self.img_range)
        x = x / self.img_range + self.mean.to(x.dtype)
        return x[..., : h * self.upscale, : w * self.upscale]


def strip_derived_buffers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop official buffers that depend only on geometry (`attn_mask`, `relative_position_index`)."""
    return {k: v for k, v in state.items() if not k.endswith((".attn_mask", ".relative_position_index"))}


def official_state_dict(model: SwinIR) -> dict[str, torch.Tensor]:
    """The model's weights in the official repository's full layout, derived buffers included
    (`relative_position_index` per block, `attn_mask` of shifted blocks at `img_size`; a single-window
    model has no shifted blocks, hence no masks), so the file reads like an official SwinIR checkpoint
    built with the same `img_size` and strict loading in the official code accepts it."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i, layer in enumerate(model.layers):
        for j, blk in enumerate(layer.residual_group.blocks):
            prefix = f"layers.{i}.residual_group.blocks.{j}"
            state[f"{prefix}.attn.relative_position_index"] = blk.attn.relative_position_index.clone()
            if blk.shift:
                s = model.img_size
                state[f"{prefix}.attn_mask"] = _shift_mask_cpu(s, s, blk.window, blk.shift).clone()
    return state
