"""TTST (Xiao et al., IEEE TIP 2024), the network of the released code, with 2^n pixel-shuffle stages.

TTST is HAT with HAT's channel-attention conv branch (`conv_block`) replaced by top-k selective
attention (TTSA): channel-to-channel ("transposed") attention over the whole image, per head, whose
scores are kept at the k largest per row for four k (C/2, 2C/3, 3C/4, 4C/5, C = channels per head),
softmaxed separately and mixed with four learned weights (`attn1..attn4`). The paper's multi-scale
feed-forward layer and global context attention are commented out in the released code (and absent
from `ttst_4x.pth`), so blocks keep HAT's MLP and groups have no GCA, as released.

Parameter names follow the official module tree (`layers.I.residual_group.blocks.J.{norm1, attn,
conv_block, norm2, mlp}`, `layers.I.residual_group.overlap_attn`, `layers.I.conv`, ...), so the
official state dict loads once its two geometry buffers (`relative_position_index_SA/_OCA`) are dropped;
they are rebuilt here. No mean/range normalisation (commented out in the released code).

Attention geometry follows the project's SwinIR rule (`block_geometry`): `img_size` is the training LR
patch; a patch no larger than one window (x32's 8 px LR) is one unshifted window. The LR is padded to a
multiple of the window size (reflect) and the output cropped back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from timm.layers import DropPath, trunc_normal_
from torch import nn
from torch.nn import functional as F

from ..registry import register_arch
from .swinir import (
    ConvSkipGroup,
    Mlp,
    WindowAttention,
    WindowedSR,
    block_geometry,
    drop_path_rates,
    pixelshuffle_stages,
    relative_position_index,
    shifted_window_attention,
    window_partition,
    window_reverse,
)

TOPK_FRACTIONS = ((1, 2), (2, 3), (3, 4), (4, 5))  # k = int(C * a / b), C channels per head, as released


def topk_sizes(head_channels: int) -> tuple[int, ...]:
    """The four k of TTSA for `head_channels` channels per head, computed as the released code does
    (`int(C*2/3)`: 30 channels give 15, 20, 22, 24)."""
    return tuple(int(head_channels * a / b) for a, b in TOPK_FRACTIONS)


def overlap_window(window: int, overlap_ratio: float) -> int:
    """Side of HAT's overlapping key/value window (8 and 0.5 give 12)."""
    return window + int(window * overlap_ratio)


def overlap_position_index(window: int, overlap: int) -> torch.Tensor:
    """(w*w, o*o) index into OCAB's (w+o-1)^2 bias table, with HAT's offsets. HAT shifts the offsets
    by `w - o + 1`, which leaves some negative; torch indexing wraps those, so the released weights
    were trained with that wrapped table layout. Taken modulo the table size here: the same entries."""
    ori = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    ext = torch.stack(torch.meshgrid(torch.arange(overlap), torch.arange(overlap), indexing="ij")).flatten(1)
    rel = (ext[:, None, :] - ori[:, :, None]).permute(1, 2, 0) + (window - overlap + 1)
    side = window + overlap - 1
    return (rel[..., 0] * side + rel[..., 1]) % (side * side)


class TopKAttention(nn.Module):
    """TTSA: per-head channel attention over all pixels, q/k L2-normalised over pixels and scaled by a
    learned temperature; four top-k masked softmaxes mixed by learned weights. The mixture is applied as
    one matrix (the sum of the four sparse attention maps) so v is multiplied once."""

    def __init__(self, dim: int, num_heads: int, bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.ks = topk_sizes(dim // num_heads)
        if min(self.ks) < 1:
            raise ValueError(f"top-k attention needs at least 2 channels per head, got {dim // num_heads}")
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, 3, 1, 1, groups=dim * 3, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=bias)
        for i in range(1, 5):
            setattr(self, f"attn{i}", nn.Parameter(torch.full((1,), 0.2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv_dwconv(self.qkv(x)).view(b, 3, self.num_heads, c // self.num_heads, h * w).unbind(1)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        scores = (q @ k.transpose(-2, -1)) * self.temperature  # b, heads, C, C
        top, index = scores.topk(max(self.ks), dim=-1)  # sorted: the k largest are the first k
        mix = torch.zeros_like(scores)
        for n, weight in zip(self.ks, (self.attn1, self.attn2, self.attn3, self.attn4)):
            probs = top[..., :n].softmax(dim=-1) * weight  # CUDA autocast runs softmax in fp32
            mix = mix.scatter_add(-1, index[..., :n], probs.to(mix.dtype))
        return self.project_out((mix @ v).reshape(b, c, h, w))


class TTSTBlock(nn.Module):
    """HAT's hybrid attention block with TTSA as the conv branch: x + WSA(LN x) + 0.01 TTSA(LN x), then MLP."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: int,
        shift: int,
        mlp_ratio: float,
        drop_path: float,
        conv_scale: float,
        qkv_bias: bool,
    ):
        super().__init__()
        self.window, self.shift, self.conv_scale = window, shift, conv_scale
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads, qkv_bias=qkv_bias)
        self.conv_block = TopKAttention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        h, w = size
        b, _, c = x.shape
        y = self.norm1(x).view(b, h, w, c)
        conv_x = self.conv_block(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(b, h * w, c)
        y = shifted_window_attention(self.attn, y, self.window, self.shift)
        x = x + self.drop_path(y.reshape(b, h * w, c)) + conv_x * self.conv_scale
        return x + self.drop_path(self.mlp(self.norm2(x)))


class OverlapCrossAttention(nn.Module):
    """HAT's OCAB: queries from w x w windows, keys/values from the overlapping o x o windows around
    them (zero-padded at the border), relative-position bias, then an MLP; both residual, no drop path."""

    def __init__(self, dim: int, window: int, overlap_ratio: float, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        self.dim, self.window, self.num_heads = dim, window, num_heads
        self.overlap = overlap_window(window, overlap_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((window + self.overlap - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", overlap_position_index(window, self.overlap), persistent=False)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        h, w = size
        b, _, c = x.shape
        heads, d, ws, ow = self.num_heads, c // self.num_heads, self.window, self.overlap
        qkv = self.qkv(self.norm1(x)).view(b, h, w, 3 * c)
        q = window_partition(qkv[..., :c], ws)  # b*nW, ws*ws, c
        kv = F.unfold(qkv[..., c:].permute(0, 3, 1, 2), ow, padding=(ow - ws) // 2, stride=ws)  # b, 2c*ow*ow, nW
        kv = kv.view(b, 2, c, ow * ow, -1).permute(1, 0, 4, 3, 2).reshape(2, -1, ow * ow, c)
        q = q.view(-1, ws * ws, heads, d).transpose(1, 2)
        k, v = (t.view(-1, ow * ow, heads, d).transpose(1, 2) for t in kv)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        bias = bias.view(ws * ws, ow * ow, heads).permute(2, 0, 1).unsqueeze(0).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = window_reverse(out.transpose(1, 2).reshape(-1, ws * ws, c), ws, h, w).reshape(b, h * w, c)
        x = self.proj(out) + x
        return x + self.mlp(self.norm2(x))


class ResidualGroup(nn.Module):
    """HAT's AttenBlocks: `depth` TTST blocks (every second shifted) and one overlapping cross-attention."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        window: int,
        shift: int,
        overlap_ratio: float,
        mlp_ratio: float,
        drop_path: Sequence[float],
        conv_scale: float,
        qkv_bias: bool,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            TTSTBlock(dim, num_heads, window, shift if i % 2 else 0, mlp_ratio, drop_path[i], conv_scale, qkv_bias)
            for i in range(depth)
        )
        self.overlap_attn = OverlapCrossAttention(dim, window_size, overlap_ratio, num_heads, mlp_ratio, qkv_bias)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x, size)
        return self.overlap_attn(x, size)


class RTSG(ConvSkipGroup):
    """Residual token selective group: a residual group, a 3x3 conv in image space, and a long skip."""

    def __init__(self, dim: int, **group: Any):
        super().__init__()
        self.residual_group = ResidualGroup(dim, **group)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)


@register_arch
class TTST(WindowedSR):
    """TTST as released. Input N x C x h x w in [0, 1] (any h, w); output N x C x h*s x w*s.

    `img_size` is the training LR patch size; with `window_size` it sets the blocks' windows and shifts
    (`block_geometry`). The overlapping cross-attention always uses `window_size` windows."""

    def __init__(
        self,
        upscale: int = 16,
        in_chans: int = 3,
        img_size: int = 64,
        window_size: int = 8,
        overlap_ratio: float = 0.5,
        embed_dim: int = 180,
        depths: Sequence[int] = (6, 6, 6, 6, 6, 6),
        num_heads: Sequence[int] = (6, 6, 6, 6, 6, 6),
        mlp_ratio: float = 2.0,
        conv_scale: float = 0.01,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.1,
        num_feat: int = 64,
    ):
        super().__init__()
        n_up = pixelshuffle_stages(upscale, "TTST")
        if len(depths) != len(num_heads):
            raise ValueError("depths and num_heads must have the same length")
        for name, value in (("img_size", img_size), ("window_size", window_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TTST {name} must be a positive integer, got {value!r}")
        if not 0 <= overlap_ratio or (overlap_window(window_size, overlap_ratio) - window_size) % 2:
            raise ValueError(
                f"overlap_ratio {overlap_ratio} must give an even overlap margin at window {window_size} (0.5 at 8: 4)"
            )
        self.upscale, self.window_size, self.img_size = upscale, window_size, img_size
        self.overlap_ratio = overlap_ratio
        window, shift = block_geometry(img_size, window_size)
        self.pad_multiple = math.lcm(window_size, window)  # the overlapping attention needs whole window_size windows

        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        self.patch_embed = nn.Module()
        self.patch_embed.norm = nn.LayerNorm(embed_dim)
        self.layers = nn.ModuleList(
            RTSG(
                embed_dim,
                depth=depth,
                num_heads=heads,
                window_size=window_size,
                window=window,
                shift=shift,
                overlap_ratio=overlap_ratio,
                mlp_ratio=mlp_ratio,
                drop_path=dpr,
                conv_scale=conv_scale,
                qkv_bias=qkv_bias,
            )
            for depth, heads, dpr in zip(depths, num_heads, drop_path_rates(depths, drop_path_rate))
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, 1, 1)
        self._build_tail(embed_dim, num_feat, in_chans, n_up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = self._reconstruct(self._pad(x))
        return x[..., : h * self.upscale, : w * self.upscale]


OFFICIAL_BUFFERS = ("relative_position_index_SA", "relative_position_index_OCA")


def convert_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The released layout (after DataParallel's `module.` is stripped) -> ours: drop the two geometry
    buffers, rebuilt from `window_size` / `overlap_ratio`. Every other name is the same."""
    return {k: v for k, v in state.items() if k not in OFFICIAL_BUFFERS}


def official_state_dict(model: TTST) -> dict[str, torch.Tensor]:
    """The model's weights in the released layout, geometry buffers included (no `module.` prefix)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    overlap = overlap_window(model.window_size, model.overlap_ratio)
    state["relative_position_index_SA"] = relative_position_index(model.window_size)
    state["relative_position_index_OCA"] = overlap_position_index(model.window_size, overlap)
    return state
