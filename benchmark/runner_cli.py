"""`cmsrd-bench run`: benchmark registry methods on a built dataset (see `benchmark.runner`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cmsrd.errors import InputError


def _parse_pairs(
    items: tuple[str, ...], option: str = "--weights", example: str = "esrgan=runs/esrgan/model.safetensors"
) -> dict[str, Path]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise InputError(f"{option} {item}", "expected NAME=PATH", f"e.g. {option} {example}")
        if name.strip() in out:
            raise InputError(f"{option} {item}", f"{name.strip()!r} given twice", "give one per method")
        out[name.strip()] = Path(path.strip())
    return out


def _parse_weights(items: tuple[str, ...]) -> dict[str, Path]:
    return _parse_pairs(items)


@click.command("run")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="A dataset built by `cmsrd build`.")
@click.option(
    "--methods",
    default="all-available",
    show_default=True,
    help="Comma-separated registry names, or all-available (every method with weights at hand).",
)
@click.option(
    "--conditions",
    default="default",
    show_default=True,
    help='Semicolon-separated conditions, e.g. "default;map=shuffle;style=gt,steps=20".',
)
@click.option(
    "--sweep",
    default=None,
    help='Quality vs NFE: "nfe=5,10,20,50" (optionally ";start=lr@T") runs each diffusion method at those NFE '
    "from pure noise and from the LR; other methods run once under --conditions (see benchmark.sweep).",
)
@click.option("--split", default="test", show_default=True)
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Run folder. An existing one is resumed, but only the method x condition folders made with the same "
    "weights, config, seed, precision, dataset, split and condition; others are refused (see --overwrite).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Delete the SR folder of every method x condition of this run in --out first and redo it (no resume).",
)
@click.option(
    "--weights",
    "weights",
    multiple=True,
    metavar="NAME=PATH",
    help="Checkpoint of a method, or a `cmsrd-bench train` run folder (its model-best.safetensors when "
    "kept, else model.safetensors); repeatable.",
)
@click.option(
    "--config",
    "configs",
    multiple=True,
    metavar="NAME=YAML",
    help="Method config merged over its default (repeatable), e.g. local SD2.1 backbone/tokenizer paths for "
    "SGDM-real.ckpt. Over a checkpoint's recorded network it may change only pretrained/tokenizer paths.",
)
@click.option("--metrics", default="default", show_default=True, help="Comma-separated metric names, default or all.")
@click.option(
    "--skip-missing", is_flag=True, help="Skip metrics/methods whose weights are missing (recorded in run.json)."
)
@click.option(
    "--crop-border",
    default=0,
    show_default=True,
    type=int,
    help="Pixels cropped from each edge for PSNR/SSIM (0 as in the SGDM paper; the scale for BasicSR's convention).",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    default="auto",
    show_default=True,
    help="Autocast dtype on GPU (auto: bf16 where supported, else fp16); CPU runs fp32.",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--limit", default=None, type=int, help="Only the first N images of the split.")
@click.option(
    "--allow-failures",
    is_flag=True,
    help="Exit 0 even when a method or metric failed (the failures stay recorded in run.json and the leaderboard).",
)
@click.option(
    "--rvsa-init",
    type=click.Choice(["official", "random"]),
    default="official",
    show_default=True,
    help="Downstream RVSA weights for cls_*/seg_* agreement: the official files, or seeded random init "
    "(test/demo only: exercises the pipeline, measures nothing).",
)
@click.option(
    "--map-segmenter",
    type=click.Path(path_type=Path),
    default=None,
    help="Map segmenter for map_miou/map_pixel_acc (mapseg.safetensors from `cmsrd-bench train-downstream`).",
)
def run_command(
    data,
    methods,
    conditions,
    sweep,
    split,
    out,
    overwrite,
    weights,
    configs,
    metrics,
    skip_missing,
    crop_border,
    device,
    batch_size,
    precision,
    seed,
    limit,
    allow_failures,
    rvsa_init,
    map_segmenter,
) -> None:
    """Run methods x conditions over a split; write SR images, leaderboard.csv, per_image.csv, run.json.

    Exits 1 when any method x condition or metric failed (unless --allow-failures)."""
    from .runner import RunConfig, run_benchmark

    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size}", "must be >= 1")
    if limit is not None and limit < 1:
        raise InputError(f"--limit {limit}", "must be >= 1", "leave --limit out to use every image of the split")
    check_out_dir(out)
    quiet_tracebacks()
    cfg = RunConfig(
        data=data,
        out=out,
        methods=methods,  # split, stripped and checked by runner.parse_methods
        conditions=[c.strip() for c in conditions.split(";") if c.strip()] or ["default"],
        split=split,
        weights=_parse_weights(weights),
        configs=_parse_pairs(configs, "--config", "sgdm+=sgdm-local.yaml"),
        skip_missing=skip_missing,
        crop_border=crop_border,
        device=device,
        batch_size=batch_size,
        metrics=metrics,
        seed=seed,
        precision=precision,
        limit=limit,
        command=list(sys.argv),
        overwrite=overwrite,
        sweep=sweep,
        rvsa_init=rvsa_init,
        map_segmenter=map_segmenter,
    )
    info = run_benchmark(cfg, progress=lambda s: click.echo(s, err=True))
    failed = [k for k, v in info["methods"].items() if v["status"] == "failed"]
    click.echo(
        f"wrote {out / 'leaderboard.csv'} ({len(info['methods'])} method x condition rows"
        f"{', ' + str(len(failed)) + ' failed' if failed else ''})"
    )
    for name, why in info["metrics_skipped"].items():
        click.echo(f"metric {name} skipped: {why}", err=True)
    for name, where in info["metrics_failed"].items():
        for pair, why in where.items():
            click.echo(f"metric {name} failed on {pair}: {why}", err=True)
    for pair in failed:
        click.echo(f"method {pair} failed: {info['methods'][pair]['reason']}", err=True)
    if (failed or info["metrics_failed"]) and not allow_failures:
        click.echo("error: the benchmark did not fully succeed (see above; --allow-failures exits 0)", err=True)
        click.get_current_context().exit(1)


def check_out_dir(out: Path) -> None:
    """--out must be a folder or creatable as one: an existing file, or a file on the way, is refused
    before anything runs."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                what = "is an existing file" if p == out else f"lies under {p}, which is a file"
                raise InputError(f"--out {out}", what, "give a folder path for the run")
            return


def quiet_tracebacks() -> None:
    """A failing method or metric is recorded and reported in one line; its traceback is shown only with
    CMSRD_DEBUG=1 (the runner logs it with log.exception for that case)."""
    import logging
    import os

    if os.environ.get("CMSRD_DEBUG") or logging.getLogger().handlers:  # someone configured logging: theirs
        return

    class _NoTraceback(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
            return super().format(record)

    log = logging.getLogger("benchmark")
    if not any(getattr(h, "_cmsrd_quiet", False) for h in log.handlers):
        h = logging.StreamHandler()
        h.setFormatter(_NoTraceback("%(levelname)s: %(message)s"))
        h._cmsrd_quiet = True  # type: ignore[attr-defined]
        log.addHandler(h)
        log.propagate = False
