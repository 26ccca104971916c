"""Full-reference perceptual metrics: LPIPS (alex, v0.1, the `lpips` package) and DISTS (pyiqa).

Weights come only from the offline cache (`baselines.weights`), never from the network: the LPIPS
AlexNet backbone is built without weights and filled from `alexnet-owt-7be5be79.pth` (conv `features.*`
only, the part LPIPS uses), the linear heads from the v0.1 file; DISTS is built by pyiqa with its VGG16
read by torchvision from `$TORCH_HOME/hub/checkpoints`, then its alpha/beta loaded from the DISTS file.
Inputs are uint8 HxWx3 images (the saved PNGs), scored in [0, 1] float.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from baselines.weights import resolve
from cmsrd.errors import InputError

LPIPS_WEIGHTS = ("tv_alexnet", "lpips_alex_v0.1")
DISTS_WEIGHTS = ("tv_vgg16", "dists")


def images_to_tensor(images: Sequence[np.ndarray], device: torch.device | str) -> torch.Tensor:
    """uint8 HxWx3 images -> float N x 3 x H x W in [0, 1] on `device`."""
    arr = np.stack([np.asarray(a) for a in images])
    return torch.from_numpy(arr).to(device).permute(0, 3, 1, 2).float().div_(255.0)


def _load_state_dict(path) -> dict[str, torch.Tensor]:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("params", "state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return {k.removeprefix("module."): v for k, v in sd.items()}


class _PairedMetric:
    """Batches uint8 image pairs through `score` (N x 3 x H x W in [0, 1] -> N scores)."""

    device: torch.device
    batch_size: int

    def score(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def __call__(self, sr: Sequence[np.ndarray], hr: Sequence[np.ndarray]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(sr), self.batch_size):
            a = images_to_tensor(sr[i : i + self.batch_size], self.device)
            b = images_to_tensor(hr[i : i + self.batch_size], self.device)
            out += self.score(a, b).flatten().float().cpu().tolist()
        return out


class LPIPS(_PairedMetric):
    """LPIPS v0.1 with AlexNet (Zhang et al. 2018) as SGDM and opensr-test use it; lower is better."""

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 16):
        import lpips

        alex_path, head_path = (resolve(k) for k in LPIPS_WEIGHTS)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lpips.LPIPS(
                pretrained=True, net="alex", version="0.1", pnet_rand=True, model_path=str(head_path), verbose=False
            )
        sd = _load_state_dict(alex_path)
        mapped = {}
        for name, _ in model.net.named_parameters():
            m = re.fullmatch(r"slice\d+\.(\d+)\.(weight|bias)", name)
            mapped[name] = sd[f"features.{m.group(1)}.{m.group(2)}"]
        model.net.load_state_dict(mapped, strict=True)
        self.model = model.eval().requires_grad_(False).to(device)
        self.device, self.batch_size = torch.device(device), batch_size

    def score(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        return self.model(sr, hr, normalize=True)


class DISTS(_PairedMetric):
    """DISTS (Ding et al. 2020) through pyiqa's implementation; lower is better."""

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 8):
        import pyiqa

        resolve("tv_vgg16")  # torchvision reads it from the hub cache; fail early and clearly if absent
        dists_path = resolve("dists")
        metric = pyiqa.create_metric("dists", pretrained=False, device=torch.device("cpu"))
        sd = _load_state_dict(dists_path)
        if not {"alpha", "beta"} <= set(sd):
            raise InputError(
                f"weights {dists_path}",
                "is not a DISTS checkpoint (no alpha/beta tensors)",
                "delete it and run `cmsrd-bench weights fetch dists`",
            )
        metric.net.load_state_dict(sd, strict=False)  # the file holds alpha/beta (VGG16 comes from torchvision)
        self.metric = metric.eval().requires_grad_(False).to(device)
        self.device, self.batch_size = torch.device(device), batch_size

    def score(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        return self.metric(sr, hr)
