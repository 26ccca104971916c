"""Training losses of the baselines: L1 pixel loss, ESRGAN's VGG19 perceptual loss, and the
relativistic average GAN loss (Wang et al., ESRGAN, ECCVW 2018).

The perceptual loss compares VGG19 `conv5_4` features *before* the ReLU (ESRGAN Sec. 3.3: features
before activation keep more information and give consistent brightness), on ImageNet-normalised
[0, 1] images, with an L1 criterion (BasicSR's `PerceptualLoss` defaults for ESRGAN). VGG19 weights
come only from the offline cache (`baselines.weights`, key `tv_vgg19`), never from the network.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from cmsrd.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision vgg19().features indices of the convolutions, named as in the VGG paper / BasicSR.
VGG19_CONVS = {
    "conv1_1": 0,
    "conv1_2": 2,
    "conv2_1": 5,
    "conv2_2": 7,
    "conv3_1": 10,
    "conv3_2": 12,
    "conv3_3": 14,
    "conv3_4": 16,
    "conv4_1": 19,
    "conv4_2": 21,
    "conv4_3": 23,
    "conv4_4": 25,
    "conv5_1": 28,
    "conv5_2": 30,
    "conv5_3": 32,
    "conv5_4": 34,
}
VGG19_WEIGHTS_KEY = "tv_vgg19"


class L1Loss(nn.Module):
    """Weighted mean absolute error."""

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = weight

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.weight * F.l1_loss(pred, target)


def load_vgg19_features(last_layer: str = "conv5_4", path: str | None = None) -> nn.Sequential:
    """torchvision VGG19 `features` up to and including `last_layer` (pre-activation), frozen, in eval.

    Weights: `path` if given, else the cached torchvision file (`MissingWeightsError` naming the file
    and where to put it when absent). Files holding only the `features.*` part are accepted."""
    from torchvision.models import vgg19

    from .checkpoint import read_state_dict

    if last_layer not in VGG19_CONVS:
        raise InputError(f"perceptual layer {last_layer!r}", f"unknown; choose from {list(VGG19_CONVS)}")
    if path is None:
        from .weights import resolve

        path = resolve(VGG19_WEIGHTS_KEY)
    state = read_state_dict(path)
    feats = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    model = vgg19(weights=None).features[: VGG19_CONVS[last_layer] + 1]
    wanted = model.state_dict()
    missing = [k for k in wanted if k not in feats]
    if missing:
        raise InputError(
            f"VGG19 weights {path}", f"lack features {missing[:4]}", "use torchvision's vgg19-dcbb9e9d.pth"
        )
    bad = [k for k in wanted if feats[k].shape != wanted[k].shape]
    if bad:
        raise InputError(
            f"VGG19 weights {path}", f"shape mismatch at {bad[:4]}", "use torchvision's vgg19-dcbb9e9d.pth"
        )
    model.load_state_dict({k: feats[k] for k in wanted})
    return model.eval().requires_grad_(False)


class PerceptualLoss(nn.Module):
    """Weighted L1 distance between VGG19 features (default conv5_4 before ReLU) of SR and HR."""

    def __init__(self, weight: float = 1.0, layer: str = "conv5_4", weights_path: str | None = None):
        super().__init__()
        self.weight = weight
        self.vgg = load_vgg19_features(layer, weights_path)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> PerceptualLoss:
        super().train(mode)
        self.vgg.eval()  # the frozen feature extractor never switches to training behaviour
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.vgg((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target_feat = self.features(target.detach())
        return self.weight * F.l1_loss(self.features(pred), target_feat)


class RelativisticGANLoss(nn.Module):
    """Relativistic average GAN (RaGAN) loss on discriminator logits.

    D_Ra(a, b) = sigmoid(C(a) - mean C(b)). The discriminator is trained so that real looks more
    realistic than fake on average; the generator gets the symmetric objective, so it benefits from
    gradients of both real and fake logits."""

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = weight

    @staticmethod
    def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))

    def generator_loss(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        real_rel = real_logits.detach() - fake_logits.mean()
        fake_rel = fake_logits - real_logits.detach().mean()
        return self.weight * (self._bce(real_rel, 0.0) + self._bce(fake_rel, 1.0)) / 2

    def discriminator_loss(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        """Unweighted (the D objective is not mixed with other terms). The opposite side's mean is
        detached, as in BasicSR, so each half back-propagates through its own logits only."""
        real_rel = real_logits - fake_logits.detach().mean()
        fake_rel = fake_logits - real_logits.detach().mean()
        return (self._bce(real_rel, 1.0) + self._bce(fake_rel, 0.0)) / 2
