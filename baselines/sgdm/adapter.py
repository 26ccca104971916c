"""SGDM adapter body and its injection into a diffusers UNet at the official six points.

The adapter (official `My_Adapter`, T2I-Adapter-like) turns the CS-encoder output into three features at
the first three UNet levels (SD2.1: 320x32^2, 640x16^2, 1280x8^2). The official `ControlledUnetModel` adds
them, times 0.18215, to the outputs of ldm `input_blocks[1,4,7]` and `output_blocks[3,6,9]`, i.e. the first
(resnet, attention) pair of down levels 0-2 and up levels 1-3. In diffusers that is the output of
`down_blocks[i].attentions[0]` (i = 0, 1, 2) and `up_blocks[j].attentions[0]` (j = 1, 2, 3, features 2, 1, 0).
diffusers' `down_intrablock_additional_residuals` adds after the *last* pair of each down block and has no
decoder path, so we use forward hooks instead (measured in the reference to match the official output).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .encoders import ENCODERS

FEATURE_SCALE = 0.18215


class ResnetBlock(nn.Module):
    """Optional stride-2 3x3 down conv, optional 1x1 channel change, then x + 1x1(relu(3x3(x)))."""

    def __init__(self, cin: int, cout: int, down: bool):
        super().__init__()
        if down:
            self.down_opt = _Down(cin)
        self.in_conv = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.block1 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(cout, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "down_opt"):
            x = self.down_opt(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return x + self.block2(self.act(self.block1(x)))


class _Down(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class SGDMAdapter(nn.Module):
    """CS-encoder (`merge_encoder`) + conv_in + 4 resnet blocks -> 3 feature maps (unscaled).

    Args:
        variant: "real" (SGDM+), "simu" (SGDM) or "simu_nomap".
        channels: the UNet's first three block widths (SD2.1: 320, 640, 1280).
        cond_channels: encoder output width for the synthetic variants (official 384 = 2 * 192).
    """

    def __init__(self, variant: str, channels: Sequence[int] = (320, 640, 1280), cond_channels: int = 384):
        super().__init__()
        if variant not in ENCODERS:
            raise ValueError(f"variant {variant!r} not in {sorted(ENCODERS)}")
        c0, c1, c2 = (int(c) for c in channels[:3])
        self.variant = variant
        enc_out = c0 if variant == "real" else cond_channels
        self.merge_encoder = ENCODERS[variant](enc_out)
        self.conv_in = nn.Conv2d(enc_out, c0, 3, 1, 1)
        self.body = nn.ModuleList(
            [
                ResnetBlock(c0, c1, down=True),
                ResnetBlock(c1, c1, down=False),
                ResnetBlock(c1, c2, down=True),
                ResnetBlock(c2, c2, down=False),
            ]
        )

    def forward(
        self,
        sr: torch.Tensor,
        ref: torch.Tensor | None,
        style: torch.Tensor | None = None,
        style_stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        if self.variant == "real":
            cond = self.merge_encoder(sr, ref, style=style, style_stats=style_stats)
        else:
            cond = self.merge_encoder(sr, ref)
        f0 = self.conv_in(cond)
        f1 = self.body[1](self.body[0](f0))
        f2 = self.body[3](self.body[2](f1))
        return [f0, f1, f2]


def injection_modules(unet: nn.Module) -> list[tuple[nn.Module, int]]:
    """The six (module, feature index) pairs where official SGDM adds adapter features."""
    pairs = [(unet.down_blocks[i].attentions[0], i) for i in (0, 1, 2)]
    pairs += [(unet.up_blocks[j].attentions[0], 3 - j) for j in (1, 2, 3)]
    return pairs


class FeatureInjector:
    """Adds features to the outputs of the six injection modules while `inject(features)` is active.

    Hooks stay registered for the model's lifetime and are no-ops outside `inject`, so the plain UNet is
    untouched (e.g. for LR-start latents or other methods sharing the backbone).
    """

    def __init__(self, unet: nn.Module):
        self._features: list[torch.Tensor | None] | None = None
        self.handles = [m.register_forward_hook(self._hook(idx)) for m, idx in injection_modules(unet)]

    def _hook(self, idx: int):
        def hook(module: nn.Module, args: tuple, output):
            feats = self._features
            if feats is None or feats[idx] is None:
                return output
            feat = feats[idx]
            if isinstance(output, tuple):
                return (output[0] + feat.to(output[0].dtype),) + tuple(output[1:])
            output.sample = output.sample + feat.to(output.sample.dtype)
            return output

        return hook

    @contextlib.contextmanager
    def inject(self, features: Sequence[torch.Tensor | None]) -> Iterator[None]:
        if len(features) != 3:
            raise ValueError(f"expected 3 adapter features, got {len(features)}")
        previous, self._features = self._features, list(features)
        try:
            yield
        finally:
            self._features = previous

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
