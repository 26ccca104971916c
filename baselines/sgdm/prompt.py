"""SGDM's text prompt from the map's colours (official `dataset/LRHRRef.py`) and its cached embeddings.

The rule (`cmsrd.classes.PROMPT_RULE`): "land, " then, in fixed order, the words of every class with at
least one pixel exactly equal to one of its colours. No dropout, no negative prompt, no CFG.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cmsrd.classes import PROMPT_RULE

BASE_PROMPT = "land, "


def prompt_from_map(rgb: np.ndarray | torch.Tensor) -> str:
    """One map (H x W x 3 uint8, or 3 x H x W float in [0, 1]) -> the official prompt."""
    if isinstance(rgb, torch.Tensor):
        t = rgb.detach().float().cpu()
        if t.ndim == 3 and t.shape[0] == 3:
            t = t.permute(1, 2, 0)
        arr = (t.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    else:
        arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"map must be HxWx3 uint8 or 3xHxW float, got {arr.shape} {arr.dtype}")
    packed = np.unique((arr[..., 0].astype(np.uint32) << 16) | (arr[..., 1].astype(np.uint32) << 8) | arr[..., 2])
    present = set(packed.tolist())
    words = [w for w, colours in PROMPT_RULE if any(((r << 16) | (g << 8) | b) in present for r, g, b in colours)]
    return BASE_PROMPT + "".join(words)


def prompts_from_maps(maps: torch.Tensor | None, n: int) -> list[str]:
    """Prompts for a batch of maps (N x 3 x H x W in [0, 1]); `None` (map=none) gives "land, "."""
    if maps is None:
        return [BASE_PROMPT] * n
    return [prompt_from_map(m) for m in maps]


class PromptEncoder:
    """Text-encoder embeddings (N x 77 x D) for prompts, cached per distinct prompt and device/dtype.

    The vocabulary of official prompts is 16 strings, so caching removes the text encoder from the
    training and sampling loops after the first few batches."""

    def __init__(self, tokenizer: Any, text_encoder: torch.nn.Module, max_cache: int = 256):
        self.tokenizer, self.text_encoder, self.max_cache = tokenizer, text_encoder, max_cache
        self._cache: dict[tuple[str, str, torch.dtype], torch.Tensor] = {}

    @torch.no_grad()
    def _encode(self, prompt: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (prompt, str(device), dtype)
        if key not in self._cache:
            ids = self.tokenizer(
                prompt,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            enc_device = next(self.text_encoder.parameters()).device
            out = self.text_encoder(ids.to(enc_device)).last_hidden_state[0]
            if len(self._cache) >= self.max_cache:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = out.to(device=device, dtype=dtype)
        return self._cache[key]

    def __call__(
        self, prompts: list[str], device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        device = torch.device(device)
        return torch.stack([self._encode(p, device, dtype) for p in prompts])

    def clear(self) -> None:
        self._cache.clear()
