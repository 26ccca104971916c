"""VGG-style discriminator of ESRGAN / BasicSR (`VGGStyleDiscriminator`).

Each stage is conv3x3 (stride 1) then conv4x4 (stride 2), BatchNorm after all but the first conv,
LeakyReLU 0.2; channels nf, 2nf, 4nf, 8nf, then 8nf for the remaining stages. The number of stages
follows the HR size so the last feature map is 4 x 4 (BasicSR: 5 stages at 128 px, 6 at 256 px),
then Linear(8nf*16, 100), LeakyReLU, Linear(100, 1). Parameter names match BasicSR's
(`conv0_0`, `conv0_1`, `bn0_1`, ..., `linear1`, `linear2`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..registry import register_arch


@register_arch
class VGGStyleDiscriminator(nn.Module):
    """Input N x C x S x S (S = `input_size`, a power of two >= 8); output N x 1 logits."""

    def __init__(self, num_in_ch: int = 3, num_feat: int = 64, input_size: int = 256):
        super().__init__()
        n = int(round(math.log2(input_size / 4))) if input_size >= 8 else 0
        if n < 1 or 4 * 2**n != input_size:
            raise ValueError(f"VGGStyleDiscriminator input_size must be a power of two >= 8, got {input_size}")
        self.input_size, self.num_stages = input_size, n
        chans = [num_feat * min(2**i, 8) for i in range(n)]
        prev = num_in_ch
        for i, c in enumerate(chans):
            self.add_module(f"conv{i}_0", nn.Conv2d(prev, c, 3, 1, 1, bias=(i == 0)))
            if i > 0:
                self.add_module(f"bn{i}_0", nn.BatchNorm2d(c, affine=True))
            self.add_module(f"conv{i}_1", nn.Conv2d(c, c, 4, 2, 1, bias=False))
            self.add_module(f"bn{i}_1", nn.BatchNorm2d(c, affine=True))
            prev = c
        self.linear1 = nn.Linear(prev * 4 * 4, 100)
        self.linear2 = nn.Linear(100, 1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"discriminator expects {self.input_size}x{self.input_size} inputs, got {tuple(x.shape[-2:])}"
            )
        for i in range(self.num_stages):
            x = getattr(self, f"conv{i}_0")(x)
            if i > 0:
                x = getattr(self, f"bn{i}_0")(x)
            x = self.lrelu(x)
            x = self.lrelu(getattr(self, f"bn{i}_1")(getattr(self, f"conv{i}_1")(x)))
        return self.linear2(self.lrelu(self.linear1(x.flatten(1))))
