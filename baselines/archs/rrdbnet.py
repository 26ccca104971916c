"""RRDBNet (ESRGAN's generator) with one nearest+conv x2 stage per factor of two.

BasicSR's RRDBNet has exactly two upsampling convs, so any `scale` other than 4 silently builds a x4
network (BasicSR#390, Real-ESRGAN#233). Here the number of stages is log2(scale): x16 has 4
(`conv_up1..conv_up4`), x32 has 5. Parameter names follow BasicSR (`conv_first`, `body.N.rdbK.convJ`,
`conv_body`, `conv_upN`, `conv_hr`, `conv_last`); `convert_esrgan_keys` maps the two layouts of the
ESRGAN repository onto it: the original flat Sequential (`model.0`, `model.1.sub.N.RDB1.conv1.0`, ...)
and the one its current release files use (`RRDB_trunk.N.RDB1.conv1`, `trunk_conv`, `upconvN`, `HRconv`).
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn
from torch.nn import functional as F

from ..registry import register_arch


def _scaled_kaiming_(module: nn.Module, scale: float) -> None:
    """Kaiming-normal init scaled down (ESRGAN's trick: residual branches start near identity)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
            m.weight.data.mul_(scale)
            if m.bias is not None:
                m.bias.data.zero_()


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convs; the output is scaled by 0.2 and added to the input."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)
        _scaled_kaiming_(self, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(self.lrelu(conv(torch.cat(feats, 1))))
        return self.conv5(torch.cat(feats, 1)) * 0.2 + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three RDBs inside a 0.2-scaled residual."""

    def __init__(self, num_feat: int, num_grow_ch: int = 32):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


def upsample_stages(scale: int) -> int:
    """Number of x2 stages for a power-of-two scale (x16 -> 4, x32 -> 5)."""
    n = int(round(math.log2(scale))) if scale >= 1 else -1
    if scale < 2 or 2**n != scale:
        raise ValueError(f"RRDBNet scale must be a power of two >= 2, got {scale}")
    return n


@register_arch
class RRDBNet(nn.Module):
    """ESRGAN generator. Input N x C x h x w in [0, 1]; output N x C x (h*scale) x (w*scale).

    `global_skip` (not in ESRGAN) adds the bilinearly upsampled LR to the output, so the net learns a
    residual: a small net trained for a few CPU minutes then follows the LR instead of its mean colour."""

    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        scale: int = 16,
        num_feat: int = 64,
        num_block: int = 23,
        num_grow_ch: int = 32,
        global_skip: bool = False,
    ):
        super().__init__()
        sizes = {
            "num_in_ch": num_in_ch,
            "num_out_ch": num_out_ch,
            "num_feat": num_feat,
            "num_block": num_block,
            "num_grow_ch": num_grow_ch,
        }
        for name, value in sizes.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"RRDBNet {name} must be a positive integer, got {value!r}")
        self.scale, self.global_skip = scale, bool(global_skip)
        self.num_up = upsample_stages(scale)
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        for i in range(1, self.num_up + 1):
            self.add_module(f"conv_up{i}", nn.Conv2d(num_feat, num_feat, 3, 1, 1))
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for i in range(1, self.num_up + 1):
            conv = getattr(self, f"conv_up{i}")
            feat = self.lrelu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")))
        out = self.conv_last(self.lrelu(self.conv_hr(feat)))
        if self.global_skip:  # learn a residual over the bilinear LR (no parameters; off for ESRGAN's own weights)
            out = out + F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return out


_OLD_RDB = re.compile(r"^model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$")
_OLD_SEQ = re.compile(r"^model\.(\d+)\.(weight|bias)$")


def is_old_esrgan_layout(state: dict[str, torch.Tensor]) -> bool:
    return "model.0.weight" in state and any(k.startswith("model.1.sub.") for k in state)


def convert_old_esrgan_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original ESRGAN keys -> BasicSR keys.

    The original generator is one flat Sequential: 0 first conv, 1 the trunk (RRDBs then the trunk
    conv at `sub.<nb>`), then per x2 stage (upsample, conv, lrelu), then HR conv, lrelu, last conv.
    So upsampling convs sit at indices 3, 6, 9, ... and the two final convs after them."""
    n_rrdb = 1 + max((int(m.group(1)) for k in state if (m := _OLD_RDB.match(k))), default=-1)
    seq_idx = sorted({int(m.group(1)) for k in state if (m := _OLD_SEQ.match(k))} - {0})
    if len(seq_idx) < 3:
        raise ValueError("not an ESRGAN state dict: fewer than three convs after the trunk")
    *ups, hr, last = seq_idx
    mapping = {0: "conv_first", hr: "conv_hr", last: "conv_last"}
    mapping.update({idx: f"conv_up{i}" for i, idx in enumerate(ups, start=1)})
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if m := _OLD_RDB.match(key):
            block, rdb, conv, kind = m.groups()
            out[f"body.{block}.rdb{rdb}.conv{conv}.{kind}"] = value
        elif key.startswith(f"model.1.sub.{n_rrdb}."):
            out["conv_body." + key.rsplit(".", 1)[1]] = value
        elif m := _OLD_SEQ.match(key):
            out[f"{mapping[int(m.group(1))]}.{m.group(2)}"] = value
        else:
            raise ValueError(f"unexpected key {key!r} in an ESRGAN (old layout) state dict")
    return out


# xinntao/ESRGAN's RRDBNet_arch.py names (the layout `transer_RRDB_models.py` gave RRDB_ESRGAN_x4.pth and
# RRDB_PSNR_x4.pth) -> ours; conv_first and conv_last are named alike in both.
_REPO_NAMES = (
    (re.compile(r"^RRDB_trunk\.(\d+)\.RDB(\d)\."), r"body.\1.rdb\2."),
    (re.compile(r"^trunk_conv\."), "conv_body."),
    (re.compile(r"^upconv(\d+)\."), r"conv_up\1."),
    (re.compile(r"^HRconv\."), "conv_hr."),
)


def is_esrgan_repo_layout(state: dict[str, torch.Tensor]) -> bool:
    return "trunk_conv.weight" in state or any(k.startswith("RRDB_trunk.") for k in state)


def convert_esrgan_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any ESRGAN key layout -> ours (BasicSR names). A state dict already in our names, or in a layout
    not recognised here, is returned unchanged (the strict load then names the keys that differ).

    Raises ValueError for an original-layout state dict with keys that layout does not have."""
    if is_old_esrgan_layout(state):
        return convert_old_esrgan_keys(state)
    if not is_esrgan_repo_layout(state):
        return state
    out = {}
    for key, value in state.items():
        for pattern, repl in _REPO_NAMES:
            key = pattern.sub(repl, key)
        out[key] = value
    return out
