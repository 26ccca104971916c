"""Sampling throughput of the registry's diffusion methods: fp32-eager, bf16-eager and the fast path, one process.

    python -m perf.throughput --method sgdm ldm resshift --out throughput.json      # SD2.1-base, 50 steps, 256 px
    python -m perf.throughput --method ldm --geometry tiny --size 64 --steps 4 --device cpu   # CPU smoke run

Successor of `baselines.sgdm.throughput`. Per method: one random-init build (the same FLOPs as real weights;
nothing is downloaded), then three modes on the same model, so their ratios are comparable:

    fp32-eager   IEEE fp32 (TF32 off for matmuls and cuDNN), no fast switches; batch --batch-fp32
    bf16-eager   bf16 autocast, no fast switches; batch --batch-bf16
    fast         bf16 autocast + `baselines.diffusion.fast` switches (--fast, default `auto` for the device);
                 batch `auto` = memory-probed: doubled from --batch-bf16 while a 2-step call at that size fits
                 and its peak stays under 45% of the card (capped by --max-batch); CPU keeps --batch-bf16

Per mode: images/s and s/image over --repeats timed calls after one untimed warm-up (its seconds are reported
as `warmup_s`: compile and CUDA-graph capture live there), peak memory, and `flop_bound_fraction` = achieved
FLOP/s / the device's dense bf16 peak. FLOPs per image are counted once with `torch.utils.flop_counter` on a
batch-1 call at the benchmark's geometry and steps (matmuls, convolutions, attention: what the bound is about).
Peaks (dense, no sparsity; NVIDIA datasheets, "H100 Tensor Core GPU" and "H200 Tensor Core GPU": the BF16
Tensor Core figures of 1,979 / 1,671 / 1,513 TFLOP/s are with sparsity, halved here): H100 SXM 989.4,
H100 NVL 835.5, H100 PCIe 756.5, H200 989.4, A100 312 TFLOP/s; `--peak-tflops` overrides. On a CPU there
is no bound (null). `max_abs_diff_vs_fp32` compares each mode's images with fp32-eager on the same seeded
batch of 2: the GPU equality check that decides which fast switches become the default.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from baselines.conditions import Conditions
from baselines.diffusion import fast
from baselines.inference import super_resolve_batch
from baselines.registry import build
from baselines.seeding import seeded_generators
from cmsrd.io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
SCALE = {"sgdm": 32, "sgdm+": 16, "sgdm-nomap": 32, "ldm": 32, "resshift": 16}
PEAK_BF16_TFLOPS = (("H100 NVL", 835.5), ("H100 PCIe", 756.5), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0))
MODES = ("fp32-eager", "bf16-eager", "fast")


def peak_tflops(device: torch.device) -> tuple[float | None, str]:
    """(dense bf16 TFLOP/s, device name) for the device; None where no figure is known (CPUs included)."""
    if device.type != "cuda":
        return None, platform.processor() or "cpu"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops, name
    return None, name


def random_init(method: str, geometry: str) -> dict[str, Any]:
    """Random-init config at a backbone geometry (`sd21-base` for the SD methods; resshift has its own)."""
    if method == "resshift":
        if geometry == "sd21-base":  # resshift's own full geometry, random VQ-f4
            return {"autoencoder": {"weights": None}}
        tiny = yaml.safe_load((REPO / "baselines" / "configs" / f"resshift-{geometry}.yaml").read_text())
        return {k: tiny[k] for k in ("network", "autoencoder", "chain")}
    return {"network": {"backbone": {"pretrained": None, "geometry": geometry}}}


def inputs(method: Any, batch: int, size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lr = max(1, size // method.scale)
    out = {k: torch.rand(batch, 3, size, size, generator=g) for k in ("sr", "map", "style", "hr")}
    return {**out, "lr": torch.rand(batch, 3, lr, lr, generator=g)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call(method: Any, batch: dict, cond: Conditions, device: torch.device, precision: str, seed: int = 0):
    n = batch["sr"].shape[0]
    # one generator per image on the device, as the runner seeds (benchmark.evaluate.SRPass)
    return super_resolve_batch(method, batch, cond, device, precision, seeded_generators(seed, range(n), device))


def count_flops(method: Any, size: int, cond: Conditions, device: torch.device) -> float:
    """FLOPs of one image's super-resolution (batch 1, fp32 eager, the benchmark's steps)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        call(method, inputs(method, 1, size), cond, device, "fp32")
    return float(counter.get_total_flops())


def probe_batch(method: Any, start: int, cap: int, size: int, device: torch.device, precision: str) -> int:
    """Largest power-of-two multiple of `start` (<= cap) whose 2-step call fits with its peak under 45% of the
    card, so the next doubling is not tried blind; a CPU keeps `start` (memory is not what limits it there)."""
    if device.type != "cuda":
        return start
    from benchmark.runner import _is_oom

    total = torch.cuda.get_device_properties(device).total_memory
    bs, cheap = start, Conditions(steps=2)
    while bs * 2 <= cap:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            call(method, inputs(method, bs, size), cheap, device, precision)
        except Exception as e:  # noqa: BLE001
            if not _is_oom(e):
                raise
            return max(1, bs // 2)
        if torch.cuda.max_memory_allocated(device) > 0.45 * total:
            break
        bs *= 2
    return bs


def measure(
    method: Any, mode: str, batch: int, size: int, cond: Conditions, device: torch.device, repeats: int
) -> dict[str, Any]:
    precision = "fp32" if mode == "fp32-eager" else "bf16"
    data = inputs(method, batch, size)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    call(method, data, cond, device, precision)  # warm-up: kernels, compile, prompt caches
    _sync(device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(repeats):
        call(method, data, cond, device, precision)
    _sync(device)
    dt = (time.perf_counter() - t0) / repeats
    return {
        "mode": mode,
        "precision": precision,
        "batch": batch,
        "warmup_s": round(warm, 3),
        "seconds_per_batch": round(dt, 4),
        "images_per_s": round(batch / dt, 3),
        "seconds_per_image": round(dt / batch, 5),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }


def disable_tf32() -> None:
    """IEEE fp32 for the fp32 figures (bf16 autocast runs are unaffected)."""
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False


def bench_method(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    m = build(name, SCALE[name], random_init(name, args.geometry), device=str(device)).eval()
    cond = Conditions(steps=args.steps) if name != "resshift" else Conditions()
    peak, dev_name = peak_tflops(device)
    if args.peak_tflops:
        peak = args.peak_tflops
    flops = count_flops(m, args.size, cond, device)
    check = inputs(m, 2, args.size, seed=1)
    ref = call(m, check, cond, device, "fp32")
    rows = []
    for mode in MODES:
        if mode not in args.modes:
            continue
        if mode == "fast":
            fast.apply(m, fast.parse(args.fast, device))
            bs = args.batch_fast or probe_batch(m, args.batch_bf16, args.max_batch, args.size, device, "bf16")
        else:
            bs = args.batch_fp32 if mode == "fp32-eager" else args.batch_bf16
        fast.GRAPH_FALLBACKS.clear()
        row = measure(m, mode, bs, args.size, cond, device, args.repeats)
        row["cuda_graph_fallbacks"] = sorted(set(fast.GRAPH_FALLBACKS))
        out = call(m, check, cond, device, row["precision"])
        row["max_abs_diff_vs_fp32"] = round(float((out - ref).abs().max()), 5)
        row["mean_abs_diff_vs_fp32"] = round(float((out - ref).abs().mean()), 6)
        row["fast_options"] = getattr(m, "fast_sampling", None) and m.fast_sampling.as_record()
        achieved = flops * row["images_per_s"]
        row["achieved_tflops"] = round(achieved / 1e12, 3)
        row["flop_bound_fraction"] = round(achieved / (peak * 1e12), 4) if peak else None
        rows.append(row)
        print(json.dumps({"method": name, **row}), flush=True)
    return {
        "method": name,
        "geometry": args.geometry,
        "size": args.size,
        "nfe": m.nfe(cond) if hasattr(m, "nfe") else None,
        "steps": cond.steps,
        "gflop_per_image": round(flops / 1e9, 2),
        "bound_images_per_s": round(peak * 1e12 / flops, 2) if peak else None,
        "device": dev_name,
        "peak_bf16_tflops": peak,
        "modes": rows,
        "speedup_fast_vs_fp32": _ratio(rows, "fast", "fp32-eager"),
        "speedup_fast_vs_bf16": _ratio(rows, "fast", "bf16-eager"),
    }


def _ratio(rows: list[dict], a: str, b: str) -> float | None:
    by = {r["mode"]: r["images_per_s"] for r in rows}
    return round(by[a] / by[b], 3) if a in by and b in by and by[b] else None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", nargs="+", default=["sgdm"], choices=sorted(SCALE))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--fast", default="auto", help="fast switches (baselines.diffusion.fast.parse), default auto")
    ap.add_argument("--batch-fp32", type=int, default=16)
    ap.add_argument("--batch-bf16", type=int, default=64)
    ap.add_argument("--batch-fast", type=int, default=0, help="0: memory-probed (see above)")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--geometry", default="sd21-base", help="backbone geometry (tiny/small: smoke runs)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak, overriding the table")
    ap.add_argument("--out", help="write the records as JSON here")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    disable_tf32()
    results, failed = [], []
    for name in args.method:
        try:
            results.append(bench_method(name, args, device))
        except Exception as e:  # noqa: BLE001  (one method failing must not lose the others' figures)
            failed.append({"method": name, "error": f"{type(e).__name__}: {e}"[:2000]})
            print(json.dumps(failed[-1]), file=sys.stderr, flush=True)
    report = {
        "command": "python -m perf.throughput " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "results": results,
        "failed": failed,
    }
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
