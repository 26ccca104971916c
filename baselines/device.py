"""Device and precision, chosen one way for inference, benchmark runs and training.

`auto` means CUDA when present (else CPU) for the device, and bf16 where the GPU has it (else fp16) for
the precision, fp32 on CPU. A CUDA request on a machine without CUDA is an InputError, not a crash later.
"""

from __future__ import annotations

import contextlib

import torch

from cmsrd.errors import InputError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device | None, option: str = "device") -> torch.device:
    """`None`/"auto" -> CUDA when available, else CPU; a CUDA request without CUDA is an InputError
    naming `option` (the CLI flag or config key the device came from)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{option} {str(device)!r}", "CUDA is not available on this machine", "use --device cpu")
    return dev


def resolve_precision(device: str | torch.device, precision: str, option: str = "precision") -> str:
    """`auto` -> bf16 on GPUs that have it, else fp16; fp32 on CPU. Other values are checked and returned."""
    if precision == "auto":
        if torch.device(device).type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision not in PRECISIONS:
        raise InputError(f"{option} {precision!r}", "unknown", f"use auto or one of {', '.join(PRECISIONS)}")
    return precision


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """torch.autocast for bf16/fp16, a no-op for fp32."""
    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r}", f"unknown; choose from {list(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])
