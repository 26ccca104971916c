"""Prepare what a GPU session carries (run here, on the development machine):

    python perf/gpu/prepare.py [--samples 256] [--real DIR] [--synthetic DIR] [--no-wheels]

The lent GPU machine has torch but none of the build stack (rasterio, osmium, dask, ...) and no network,
so the datasets are built here and travel as PNG folders, and the packages it lacks travel as wheels:

    .gpu/real        demo-real (x16) pruned to what training/benchmarking reads (no GeoTIFFs, no masks)
    .gpu/synthetic   demo-synthetic (x32), pruned the same way
    .gpu/whl         wheels at requirements/lock.txt's versions (pure Python, plus abi3 cp312 builds)

The device tool sends the repository plus the carried paths, 64 MiB per call: the sizes are printed so
each call can carry only what its part needs (see perf/gpu/README.md).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEST = REPO / ".gpu"
# What the GPU image lacks (device KINDS.md package list): installed there from these wheels.
PURE = (
    "diffusers",
    "normflows",
    "lpips",
    "torch_fidelity",
    "pyiqa",
    "spandrel",
    "importlib_metadata",
    "huggingface_hub",
    "transformers",
    "httpx2",
    "httpcore2",
    "openai_clip",
    "ftfy",
    "setuptools",
)
ABI3 = ("tokenizers", "wcwidth")  # not hf_xet: only for Xet downloads, and nothing downloads there
KINDS = ("hr", "lr", "sr", "map")  # what the trainer, the runner and the metric bench read
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def lock_versions() -> dict[str, str]:
    """name (normalised to '_') -> pinned version from requirements/lock.txt."""
    out = {}
    for line in (REPO / "requirements" / "lock.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[name.strip().lower().replace("-", "_")] = version.strip()
    return out


def prune_dataset(src: Path, dst: Path, kinds: tuple[str, ...] = KINDS) -> None:
    """Copy dataset.json, the manifest and the PNG folders of `kinds` (both splits) from src to dst."""
    from cmsrd.layout import DatasetLayout

    layout = DatasetLayout.open(src)
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in (layout.dataset_json, layout.manifest_parquet, layout.manifest_csv):
        shutil.copy2(f, dst / f.name)
    for split in ("train", "test"):
        for kind in kinds:
            folder = layout.image_dir(split, kind)
            if folder.is_dir():
                shutil.copytree(folder, dst / folder.relative_to(src))


def build(preset: str, out: Path, samples: int) -> Path:
    if not (out / "dataset.json").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "cmsrd.cli",
                "build",
                preset,
                "--out",
                str(out),
                "--samples",
                str(samples),
                "--quiet",
            ],
            check=True,
            cwd=REPO,
        )
    return out


def wheels(dest: Path) -> None:
    pins = lock_versions()
    missing = [n for n in PURE + ABI3 if n not in pins]
    if missing:
        raise SystemExit(f"requirements/lock.txt does not pin {missing}")
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "-w", str(dest)] + [f"{n}=={pins[n]}" for n in PURE], check=True)
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run(
        pip
        + [
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--implementation",
            "cp",
            *plat,
            "-d",
            str(dest),
        ]
        + [f"{n}=={pins[n]}" for n in ABI3],
        check=True,
    )


def size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=256, help="samples per demo dataset (the default world holds ~270)")
    ap.add_argument("--real", type=Path, help="an already built demo-real dataset (else built into out/gpu-build)")
    ap.add_argument("--synthetic", type=Path, help="an already built demo-synthetic dataset")
    ap.add_argument("--no-wheels", action="store_true")
    args = ap.parse_args(argv)
    work = REPO / "out" / "gpu-build"
    real = args.real or build("demo-real", work / "real", args.samples)
    syn = args.synthetic or build("demo-synthetic", work / "synthetic", args.samples)
    prune_dataset(real, DEST / "real")
    prune_dataset(syn, DEST / "synthetic")
    if not args.no_wheels:
        wheels(DEST / "whl")
    repo = (
        sum(
            (REPO / p).stat().st_size
            for p in subprocess.run(
                ["git", "ls-files"], capture_output=True, text=True, cwd=REPO, check=True
            ).stdout.split()
        )
        / 2**20
    )
    print(f"repository (tracked) {repo:.1f} MiB")
    for part in ("real", "synthetic", "whl"):
        if (DEST / part).exists():
            print(f".gpu/{part:<10} {size_mib(DEST / part):6.1f} MiB")
    whl = size_mib(DEST / "whl") if (DEST / "whl").exists() else 0.0
    for part in ("real", "synthetic"):
        total = repo + whl + size_mib(DEST / part)
        print(
            f"call carrying .gpu/whl + .gpu/{part}: {total:.1f} MiB"
            + ("  <-- over the 64 MiB limit: lower --samples" if total > 63.5 else "")
        )
    print(".gpu/ is git-ignored; name its parts in the device call's carry")


if __name__ == "__main__":
    main()
