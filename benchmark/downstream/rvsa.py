"""RVSA ViT-B (Wang et al., TGRS 2022): the downstream classifier and segmentation backbone of SGDM 6.4.

Rewritten from the paper and the official repository (ViTAE-Transformer/Remote-Sensing-RVSA, MIT) with
torch + timm helpers, no mmcv/mmseg. Parameter and buffer names follow the official modules exactly, so
official state dicts load without renaming. Every third block (3, 6, 9, 12) is global attention with
decomposed relative positions; the others are rotated varied-size window attention: 7x7 windows whose
key/value sampling grid is scaled, rotated and shifted per window and head (predicted from the pooled
window), keys/values read with `grid_sample`.

Two configurations: `RVSAClassifier` (224 input, absolute position embedding with a cls slot that is never
used, qkv without bias, mean pool -> LayerNorm -> Linear; 86,198,869 parameters with 21 UCM classes) and
`RVSABackbone` (512 input, qkv bias, features of blocks 4/6/8/12 through fpn1-4 at strides 4/8/16/32;
93,945,664 parameters). Inference only: drop-path and dropout of the training recipe are left out.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import trunc_normal_
from torch import nn

WINDOW = 7  # RVSA's base window (the "wsz7" of the official config names)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # both official eval pipelines normalise with ImageNet statistics
IMAGENET_STD = (0.229, 0.224, 0.225)


def rel_pos_bias(q: torch.Tensor, q_hw: tuple[int, int], k_hw: tuple[int, int], table_h, table_w) -> torch.Tensor:
    """Decomposed relative-position term (MViTv2 style) to add to attention logits of shape (B, h, Nq, Nk).

    q: (B, heads, Nq, d). Tables are (2*size-1, d); with equal q/k sizes the index of (i, j) is i - j + size - 1."""
    (qh, qw), (kh, kw) = q_hw, k_hw

    def index(nq: int, nk: int) -> torch.Tensor:
        rq, rk = max(nk / nq, 1.0), max(nq / nk, 1.0)
        d = torch.arange(nq, device=q.device)[:, None] * rq - torch.arange(nk, device=q.device)[None, :] * rk
        return (d + (nk - 1) * rk).long()

    rh, rw = table_h[index(qh, kh)], table_w[index(qw, kw)]
    b, h, _, d = q.shape
    grid = q.reshape(b, h, qh, qw, d)
    bias_h = torch.einsum("bnyxc,ykc->bnyxk", grid, rh)
    bias_w = torch.einsum("bnyxc,xkc->bnyxk", grid, rw)
    return (bias_h[..., :, None] + bias_w[..., None, :]).reshape(b, h, qh * qw, kh * kw)


class GlobalAttention(nn.Module):
    """Full self-attention over the token grid with decomposed relative positions (official `Attention`)."""

    def __init__(self, dim: int, heads: int, grid: tuple[int, int], qkv_bias: bool):
        super().__init__()
        self.heads, self.grid = heads, grid
        head_dim = dim // heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid[1] - 1, head_dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q = q * self.scale  # the official code scales q before the relative-position term
        attn = q @ k.transpose(-2, -1) + rel_pos_bias(q, (h, w), (h, w), self.rel_pos_h, self.rel_pos_w)
        out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(out)


def _window_predictor(dim: int, out: int) -> nn.Sequential:
    # index 2 holds the conv, as in the official Sequential(AvgPool, LeakyReLU, Conv) ("sampling_*.2.*")
    return nn.Sequential(nn.AvgPool2d(WINDOW, WINDOW), nn.LeakyReLU(), nn.Conv2d(dim, out, 1))


class RotatedWindowAttention(nn.Module):
    """Rotated varied-size window attention (official `RotatedVariedSizeWindowAttention`, one sampling
    set per head). Queries stay on the regular 7x7 windows; each window/head predicts a shift, a 2-axis
    scale and an angle for its key/value grid. The feature map is zero-padded (centred) to whole windows."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads, self.dim = heads, dim
        head_dim = dim // heads
        self.scale = head_dim**-0.5
        ws = WINDOW
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * ws - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * ws - 1, head_dim))
        self.sampling_offsets = _window_predictor(dim, heads * 2)
        self.sampling_scales = _window_predictor(dim, heads * 2)
        self.sampling_angles = _window_predictor(dim, heads)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, heads))
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        yy, xx = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
        coords = torch.stack([yy.flatten(), xx.flatten()])  # 2, ws*ws
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * ws - 1) + rel[..., 1])

    def _sample_grid(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Sampling positions in [-1, 1] (x, y) for grid_sample: (B*heads, nh*ws, nw*ws, 2)."""
        ws, dev = WINDOW, x.device
        hp, wp = x.shape[-2:]
        nh, nw = hp // ws, wp // ws
        lin_x, lin_y = torch.linspace(-1, 1, wp, device=dev), torch.linspace(-1, 1, hp, device=dev)
        gy, gx = torch.meshgrid(lin_y, lin_x, indexing="ij")
        image_ref = torch.stack([gx, gy])[None]  # 1, 2(x, y), hp, wp
        centres = F.avg_pool2d(image_ref, ws).reshape(1, 2, nh, 1, nw, 1)
        # offsets of a window's cells from its centre, in the normalised units of the padded map
        cell_y = torch.arange(ws, device=dev) * 2 / (hp - 1)
        cell_x = torch.arange(ws, device=dev) * 2 / (wp - 1)
        cell_y, cell_x = (cell_y - cell_y.mean()).repeat(nh), (cell_x - cell_x.mean()).repeat(nw)
        oy, ox = torch.meshgrid(cell_y, cell_x, indexing="ij")
        local = torch.stack([ox, oy]).reshape(1, 2, nh, ws, nw, ws)

        n = x.shape[0] * self.heads
        shift = self.sampling_offsets(x).reshape(n, 2, nh, nw)
        # as the official code: channel 0 (x) is divided by the window count along h, channel 1 (y) along w
        shift = torch.stack([shift[:, 0] / (h // ws), shift[:, 1] / (w // ws)], 1)
        scale = self.sampling_scales(x).reshape(n, 2, nh, nw)
        angle = self.sampling_angles(x).reshape(n, 1, nh, nw)[:, 0, :, None, :, None]
        local = local * (scale[:, :, :, None, :, None] + 1)
        cos, sin = torch.cos(angle), torch.sin(angle)
        lx, ly = local[:, 0], local[:, 1]
        rotated = torch.stack([lx * cos - ly * sin, lx * sin + ly * cos], 1)
        coords = centres + rotated + shift[:, :, :, None, :, None]
        return coords.permute(0, 2, 3, 4, 5, 1).reshape(n, nh * ws, nw * ws, 2)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        ws, heads, hd = WINDOW, self.heads, c // self.heads
        pad_h, pad_w = (ws - h % ws) % ws, (ws - w % ws) % ws
        top, left = pad_h // 2, pad_w // 2
        pads = (left, pad_w - left, top, pad_h - top)
        hp, wp = h + pad_h, w + pad_w
        nh, nw = hp // ws, wp // ws

        grid = self._sample_grid(F.pad(x.transpose(1, 2).reshape(b, c, h, w), pads), h, w)
        qkv = self.qkv(x).transpose(1, 2).reshape(b, 3, heads, hd, h, w).transpose(0, 1)
        qkv = F.pad(qkv.reshape(3 * b * heads, hd, h, w), pads).reshape(3, b * heads, hd, hp, wp)
        q, k, v = qkv[0], qkv[1], qkv[2]
        k = F.grid_sample(k, grid, padding_mode="zeros", align_corners=True)
        v = F.grid_sample(v, grid, padding_mode="zeros", align_corners=True)

        def windows(t: torch.Tensor) -> torch.Tensor:
            t = t.reshape(b, heads, hd, nh, ws, nw, ws).permute(0, 3, 5, 1, 4, 6, 2)
            return t.reshape(b * nh * nw, heads, ws * ws, hd)

        q, k, v = windows(q), windows(k), windows(v)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn + rel_pos_bias(q, (ws, ws), (ws, ws), self.rel_pos_h, self.rel_pos_w)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        attn = attn + bias.reshape(ws * ws, ws * ws, heads).permute(2, 0, 1)[None]
        out = attn.softmax(-1) @ v
        out = rearrange(out, "(b hh ww) h (y x) d -> b (h d) (hh y) (ww x)", b=b, hh=nh, ww=nw, y=ws, x=ws)
        out = out[:, :, top : top + h, left : left + w].permute(0, 2, 3, 1).reshape(b, n, c)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool, window: bool, grid: tuple[int, int]):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.norm1, self.norm2 = norm(dim), norm(dim)
        self.attn: nn.Module = (
            RotatedWindowAttention(dim, heads, qkv_bias) if window else GlobalAttention(dim, heads, grid, qkv_bias)
        )
        self.mlp = Mlp(dim, dim * 4)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), h, w)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int = 16):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), x.shape[2], x.shape[3]


class _RVSAEncoder(nn.Module):
    """Patch embedding, absolute position embedding and the 12 blocks (global every `interval`-th)."""

    def __init__(self, img_size: int, dim: int, depth: int, heads: int, qkv_bias: bool, cls_slot: bool, interval=3):
        super().__init__()
        grid = (img_size // 16, img_size // 16)
        if grid[0] < WINDOW:  # the official offset scaling divides by the window count (h // 7)
            raise ValueError(f"RVSA needs at least {16 * WINDOW} px input, got {img_size}")
        self.img_size, self.grid = img_size, grid
        self.patch_embed = PatchEmbed(dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1] + int(cls_slot), dim))
        self._cls_slot = cls_slot
        self.blocks = nn.ModuleList(
            Block(dim, heads, qkv_bias, window=(i + 1) % interval != 0, grid=grid) for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        trunc_normal_(self.pos_embed, std=0.02)

    def _init_linear(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"RVSA expects {self.img_size}x{self.img_size} input, got {tuple(x.shape[-2:])}")
        t, h, w = self.patch_embed(x)
        pos = self.pos_embed[:, 1:] if self._cls_slot else self.pos_embed
        return t + pos, h, w


class RVSAClassifier(_RVSAEncoder):
    """ViT-B RVSA scene classifier (official `ViT_Win_RVSA`, `use_abs_pos_emb=True`): logits (B, classes)."""

    def __init__(self, num_classes: int = 21, img_size: int = 224, dim: int = 768, depth: int = 12, heads: int = 12):
        super().__init__(img_size, dim, depth, heads, qkv_bias=False, cls_slot=True)
        self.num_classes = num_classes
        self.head = nn.Linear(dim, num_classes)
        self.apply(self._init_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, h, w = self.tokens(x)
        for blk in self.blocks:
            x = blk(x, h, w)
        return self.head(self.norm(x.mean(1)))


class Norm2d(nn.Module):
    """LayerNorm over channels of an NCHW map (official name: the parameters live under `.ln`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class RVSABackbone(_RVSAEncoder):
    """ViT-B RVSA segmentation backbone (official `ViT_Win_RVSA_V3_WSZ7`): four maps at strides 4/8/16/32.

    `norm` exists in the official module (and checkpoint) but is not applied to the features."""

    OUT_INDICES = (3, 5, 7, 11)

    def __init__(self, img_size: int = 512, dim: int = 768, depth: int = 12, heads: int = 12):
        super().__init__(img_size, dim, depth, heads, qkv_bias=True, cls_slot=False)
        if depth != 12:
            raise ValueError("the RVSA backbone taps blocks 4/6/8/12: depth must be 12")
        self.fpn1 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, 2, 2), Norm2d(dim), nn.GELU(), nn.ConvTranspose2d(dim, dim, 2, 2)
        )
        self.fpn2 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2))
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(2, 2)
        self.apply(self._init_linear)
        for i, blk in enumerate(self.blocks):  # the official fix_init_weight depth rescaling
            blk.attn.proj.weight.data.div_((2.0 * (i + 1)) ** 0.5)
            blk.mlp.fc2.weight.data.div_((2.0 * (i + 1)) ** 0.5)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b = x.shape[0]
        x, h, w = self.tokens(x)
        feats = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, h, w)
            if i in self.OUT_INDICES:
                feats.append(x.transpose(1, 2).reshape(b, -1, h, w))
        return [op(f) for op, f in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), feats)]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
