"""UPerNet decode head (Xiao et al. 2018) as mmseg 0.x builds it, and the RVSA LoveDA segmenter.

Module names are mmseg's (`psp_modules.{i}.1`, `bottleneck`, `lateral_convs`, `fpn_convs`, `fpn_bottleneck`,
`conv_seg`; each ConvModule as `.conv` without bias + `.bn` + ReLU), so `decode_head.*` tensors of an mmseg
checkpoint load unchanged. The training-time SyncBN is plain BatchNorm here (identical at inference), the
0.1 dropout before `conv_seg` is a no-op at inference and left out, and the FCN auxiliary head, a training
loss only, is not built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .rvsa import RVSABackbone

LOVEDA_CLASSES = ("background", "building", "road", "water", "barren", "forest", "agricultural")
# mmseg's LoveDADataset palette, for drawing segmentations
LOVEDA_PALETTE = (
    (255, 255, 255),
    (255, 0, 0),
    (255, 255, 0),
    (0, 0, 255),
    (159, 129, 183),
    (0, 255, 0),
    (255, 195, 128),
)


class ConvModule(nn.Module):
    def __init__(self, cin: int, cout: int, k: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _resize(x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class UPerHead(nn.Module):
    """Pyramid pooling on the coarsest map, then a top-down FPN; all levels fused at stride 4."""

    def __init__(
        self, in_channels: int = 768, channels: int = 512, num_classes: int = 7, pool_scales=(1, 2, 3, 6), levels=4
    ):
        super().__init__()
        self.pool_scales, self.num_classes = tuple(pool_scales), num_classes
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels, channels, 1)) for s in self.pool_scales
        )
        self.bottleneck = ConvModule(in_channels + len(self.pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvModule(in_channels, channels, 1) for _ in range(levels - 1))
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3) for _ in range(levels - 1))
        self.fpn_bottleneck = ConvModule(levels * channels, channels, 3)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        top = feats[-1]
        pooled = [top] + [_resize(m(top), top.shape[2:]) for m in self.psp_modules]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)] + [self.bottleneck(torch.cat(pooled, 1))]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        outs = [outs[0]] + [_resize(o, outs[0].shape[2:]) for o in outs[1:]]
        return self.conv_seg(self.fpn_bottleneck(torch.cat(outs, 1)))


class RVSASegmenter(nn.Module):
    """RVSA backbone + UPerHead (mmseg `EncoderDecoder` at test time): logits at the input resolution.

    Names `backbone.*` and `decode_head.*` are the mmseg checkpoint's."""

    def __init__(self, num_classes: int = 7, img_size: int = 512, dim: int = 768, heads: int = 12, channels=512):
        super().__init__()
        self.backbone = RVSABackbone(img_size=img_size, dim=dim, heads=heads)
        self.decode_head = UPerHead(in_channels=dim, channels=channels, num_classes=num_classes)
        self.num_classes, self.img_size = num_classes, img_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _resize(self.decode_head(self.backbone(x)), x.shape[2:])
