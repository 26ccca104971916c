"""Sampling throughput of SGDM (and `ldm`, its SRLDM baseline) at SD2.1-base geometry with random weights (images/s).

Superseded by `python -m perf.throughput` (fp32-eager, bf16-eager and the shared fast path in one process,
FLOP-bound fraction, probed batch, every diffusion method); kept for the figures already quoted with it.

    python -m baselines.sgdm.throughput --method sgdm --batch 16 64 --precision fp32 bf16 --start-t 400
    python -m baselines.sgdm.throughput --method ldm --batch 16 --precision bf16

Random init is enough for speed (same FLOPs as the real weights); nothing is downloaded. After a warm-up
run, wall-clock time is taken between CUDA synchronisations; the JSON lines it prints are the figures to
report. `--geometry tiny` runs the same path on a CPU (smoke test only). fp32 means IEEE fp32: TF32 is
switched off for matmuls and cuDNN convolutions (both default on for convolutions on Ampere+), and each line
records both flags.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from ..conditions import Conditions
from ..registry import build

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SCALE = {"sgdm": 32, "sgdm+": 16, "sgdm-nomap": 32, "ldm": 32}


def measure(
    method: Any, batch: int, size: int, precision: str, cond: Conditions, repeats: int = 2, seed: int = 0
) -> dict[str, Any]:
    """images/s of `method.super_resolve` on random inputs of `batch` x 3 x size x size."""
    dev = method.device
    g = torch.Generator(device=dev).manual_seed(seed)
    inputs = {k: torch.rand(batch, 3, size, size, generator=g, device=dev) for k in ("sr", "map", "style")}
    dtype = DTYPES[precision]

    def run() -> None:
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            method.super_resolve(inputs, cond, torch.Generator(device=dev).manual_seed(seed))

    run()  # warm-up (kernels, prompt cache)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(repeats):
        run()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / repeats
    return {
        "method": method.spec.name,
        "geometry": method.backbone_source,
        "batch": batch,
        "size": size,
        "precision": precision,
        "condition": cond.name,
        "nfe": method.nfe(cond),
        "seconds_per_batch": round(dt, 3),
        "images_per_s": round(batch / dt, 3),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else None,
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
    }


def disable_tf32() -> None:
    """Full fp32 for the fp32 figures; bf16/fp16 autocast runs are unaffected."""
    torch.set_float32_matmul_precision("highest")  # also clears torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="sgdm", choices=sorted(SCALE))
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--start-t", type=int, default=None, help="also measure start=lr@T")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--geometry", default="sd21-base", help="backbone geometry (tiny/small: smoke runs on CPU)")
    args = ap.parse_args(argv)
    disable_tf32()
    random_init = {"network": {"backbone": {"pretrained": None, "geometry": args.geometry}}}
    m = build(args.method, SCALE[args.method], random_init, device=args.device).eval()
    conds = [Conditions(steps=args.steps)]
    if args.start_t is not None:
        conds.append(Conditions(steps=args.steps, start_t=args.start_t))
    for cond in conds:
        for precision in args.precision:
            for b in args.batch:
                print(json.dumps(measure(m, b, args.size, precision, cond, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
