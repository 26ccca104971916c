"""Batched inference, handled once for every method: device placement, precision/autocast, no-grad,
condition checks and output validation.

    for ids, sr, batch in super_resolve_loader(method, loader, device="cuda", precision="bf16"):
        ...   # sr: N x 3 x H x W float32 in [0, 1] on the CPU

Only the tensors a method's spec declares (`MethodSpec.inputs`) are moved to the device, so a method
that needs just `lr` never pays for copying maps and HR images.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cmsrd.errors import InputError

from .base import Batch, SRMethod
from .conditions import Conditions
from .device import PRECISIONS, autocast_context, resolve_device  # noqa: F401  (PRECISIONS re-exported)
from .seeding import Generators


def method_inputs(method: SRMethod, batch: Batch, cond: Conditions) -> dict[str, torch.Tensor]:
    """The batch tensors the method's spec asks for; an InputError names any required one that is absent.

    `style` is optional (a method may sample it), and `map` is optional under `map=none`."""
    optional = {"style"} | ({"map"} if cond.map == "none" else set())
    missing = [k for k in method.spec.inputs if k not in batch and k not in optional]
    if missing:
        raise InputError(
            f"batch for method {method.spec.name!r}",
            f"lacks {missing} (has {sorted(k for k in batch if isinstance(batch[k], torch.Tensor))})",
            f"load the dataset with inputs {list(method.spec.inputs)}",
        )
    return {k: batch[k] for k in method.spec.inputs if k in batch and isinstance(batch[k], torch.Tensor)}


def expected_hr_size(method: SRMethod, batch: Batch) -> tuple[int, int] | None:
    if isinstance(batch.get("lr"), torch.Tensor):
        h, w = batch["lr"].shape[-2:]
        return h * method.scale, w * method.scale
    for k in ("sr", "hr", "map"):
        if isinstance(batch.get(k), torch.Tensor):
            return tuple(batch[k].shape[-2:])
    return None


def _device_of(method: SRMethod) -> torch.device | None:
    for t in method.parameters():
        return t.device
    for t in method.buffers():
        return t.device
    return None


def super_resolve_batch(
    method: SRMethod,
    batch: Batch,
    cond: Conditions | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    generator: Generators = None,
) -> torch.Tensor:
    """One batch -> SR N x 3 x H x W float32 in [0, 1] on `device` (the method is moved there)."""
    cond = cond or Conditions()
    cond.check_supported(method.spec.name, method.spec.conditions)
    dev = resolve_device(device) if device is not None else (_device_of(method) or torch.device("cpu"))
    if _device_of(method) not in (None, dev):
        method.to(dev)
    method.eval()
    inputs = {k: v.to(dev, non_blocking=True) for k, v in method_inputs(method, batch, cond).items()}
    with torch.no_grad(), autocast_context(dev, precision):
        sr = method.super_resolve(inputs, cond, generator)
    want = expected_hr_size(method, batch)
    n = next(iter(inputs.values())).shape[0] if inputs else sr.shape[0]
    if (
        sr.ndim != 4
        or sr.shape[0] != n
        or sr.shape[1] != 3
        or (want is not None and tuple(sr.shape[-2:]) != tuple(want))
    ):
        raise ValueError(
            f"method {method.spec.name!r} returned shape {tuple(sr.shape)}, "
            f"expected ({n}, 3, {want[0] if want else 'H'}, {want[1] if want else 'W'})"
        )
    return sr.float().clamp(0.0, 1.0)


def super_resolve_loader(
    method: SRMethod,
    loader: Iterable[Batch],
    device: str | torch.device | None = None,
    precision: str = "fp32",
    cond: Conditions | None = None,
    generator: Generators = None,
    progress: bool = True,
    desc: str | None = None,
) -> Iterator[tuple[list[str], torch.Tensor, Batch]]:
    """Yield (ids, SR on the CPU, the original batch) for every batch of `loader`."""
    dev = resolve_device(device)
    method.to(dev)
    total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    for batch in tqdm(
        loader, total=total, desc=desc or f"{method.spec.name} x{method.scale}", disable=not progress, leave=False
    ):
        sr = super_resolve_batch(method, batch, cond, dev, precision, generator)
        ids: Any = batch.get("id", [])
        yield list(ids) if not isinstance(ids, str) else [ids], sr.cpu(), batch


NONFINITE = "nonfinite_output"  # the recorded reason of an SR image holding NaN or inf


def nonfinite_images(x: torch.Tensor) -> list[bool]:
    """Per image of an N x C x H x W batch: whether it holds NaN or inf. Such an image is a failure
    (`NONFINITE`), never converted and scored: `to_uint8_images` would turn NaN into black pixels that
    score as a (bad) image with status ok."""
    return (~torch.isfinite(x.detach())).flatten(1).any(dim=1).tolist()


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """N x 3 x H x W in [0, 1] -> N x H x W x 3 uint8, rounded as BasicSR's tensor2img: the bytes the runner
    saves and scores, and what training validation scores, so both see the same images."""
    return x.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
