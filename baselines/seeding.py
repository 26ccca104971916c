"""Per-image random streams, so a stochastic method's output for an image depends only on the seed and that
image's position in the split, not on the batch size, on out-of-memory batch halving or on which images a
resumed run still had to do.

Each image gets its own `torch.Generator` seeded `seed + index`; methods draw every random tensor with
`randn(shape, generators)`, which takes sample i's slice from generator i (diffusers' `randn_tensor`, the
same convention as a diffusers pipeline given a list of generators). A single generator is still accepted
(one stream for the whole batch) for callers that do not care about batching.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor

Generators = torch.Generator | list[torch.Generator] | None

SEED_RULE = "one torch.Generator per image, seeded with seed + the image's index in the split (independent of batching)"


def seeded_generators(seed: int, indices: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One generator per image of a batch, seeded `seed + index` (index in the split's id order)."""
    return [torch.Generator(device=device).manual_seed(int(seed) + int(i)) for i in indices]


def randn(
    shape: Sequence[int], generator: Generators, device: str | torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Standard-normal noise of `shape` drawn in float32 where the generator(s) live, then moved to
    `device`/`dtype`; with a list, sample i (along dim 0) comes from generator i alone."""
    if isinstance(generator, list) and len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}: give one per sample")
    first = generator[0] if isinstance(generator, list) else generator
    where = first.device if first is not None else torch.device("cpu")
    noise = randn_tensor(tuple(shape), generator=generator, device=where, dtype=torch.float32)
    return noise.to(device=device, dtype=dtype)
