"""No-reference IQA: MUSIQ (KonIQ-10k head) and CLIP-IQA (RN50), both through pyiqa.

Licence: pyiqa 0.1.16 is PolyForm-Noncommercial-1.0.0 (plus NTU S-Lab terms for some parts). The toolkit
only calls it at run time and never redistributes it; commercial users must not use these two columns.
The note is part of each metric's definition, so it travels with every leaderboard.

Weights come from the offline cache: MUSIQ's network is built without weights and loaded from
`musiq_koniq_ckpt-e95806b9.pth` (weights_only); CLIP-IQA's CLIP RN50 is read by pyiqa's CLIP loader from
`$TORCH_HOME/hub/clip/RN50.pt` after this module has checked that it is there and intact (the checked
path is what pyiqa is given, so its own hash-and-download step never runs). CLIP-IQA also needs the
`openai-clip` package for its prompt tokenizer (its BPE vocabulary ships inside that package).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from baselines.weights import resolve
from cmsrd.errors import InputError

from .perceptual import _load_state_dict, images_to_tensor

PYIQA_LICENCE = "pyiqa 0.1.16: PolyForm-Noncommercial-1.0.0 (non-commercial use only)"
MUSIQ_WEIGHTS = ("musiq_koniq",)
CLIPIQA_WEIGHTS = ("clip_rn50",)


class _NRMetric:
    def __init__(self, metric: torch.nn.Module, device: str | torch.device, batch_size: int):
        self.metric = metric.eval().requires_grad_(False).to(device)
        self.device, self.batch_size = torch.device(device), batch_size

    @torch.inference_mode()
    def __call__(self, sr: Sequence[np.ndarray], hr: Sequence[np.ndarray] | None = None) -> list[float]:
        out: list[float] = []
        for i in range(0, len(sr), self.batch_size):
            x = images_to_tensor(sr[i : i + self.batch_size], self.device)
            out += self.metric(x).flatten().float().cpu().tolist()
        return out


class MUSIQ(_NRMetric):
    """MUSIQ (Ke et al. 2021) trained on KonIQ-10k; MOS on ~0..100, higher is better."""

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 1):
        import pyiqa

        path = resolve("musiq_koniq")
        metric = pyiqa.create_metric("musiq", pretrained=False, device=torch.device("cpu"))
        metric.net.load_state_dict(_load_state_dict(path), strict=True)
        # MUSIQ's multi-scale patching is per image; batch 1 keeps arbitrary sizes valid
        super().__init__(metric, device, batch_size)


class CLIPIQA(_NRMetric):
    """CLIP-IQA (Wang et al. 2023), antonym prompt pairs on CLIP RN50; 0..1, higher is better."""

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 8):
        import pyiqa

        path = resolve("clip_rn50")  # present and matching the manifest's SHA-256, or a clear error
        try:
            import pyiqa.archs.clip_imports  # noqa: F401  (openai-clip: the prompt tokenizer)
        except ImportError as e:
            raise InputError(
                "python package `clip` (PyPI: openai-clip)",
                f"cannot be imported ({type(e).__name__}: {e})",
                "install openai-clip==1.0.1 with ftfy; it imports `pkg_resources`, which setuptools>=81 no "
                "longer ships, so keep setuptools<81 beside it",
            ) from e
        # pyiqa's `load("RN50")` re-hashes the file against OpenAI's URL and downloads it on a mismatch;
        # given the resolved path it loads exactly the file checked above (the manifest is the authority,
        # CMSRD_WEIGHTS_MANIFEST included) and never reaches the network
        metric = pyiqa.create_metric("clipiqa", backbone=str(path), device=torch.device("cpu"))
        super().__init__(metric, device, batch_size)
