"""`cmsrd-bench train`: train a registry method on a built dataset (see `benchmark.train`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from cmsrd.errors import InputError


def _parse_set(items: tuple[str, ...]) -> dict[str, Any]:
    """`--set train.lr=1e-4` pairs -> a nested override dict (values parsed as YAML scalars)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"--set {item!r}", "expected KEY=VALUE", "e.g. --set train.batch_size=8")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out


@click.command("train")
@click.option("--method", "method_name", required=True, help="Registered method name (see `cmsrd-bench list`).")
@click.option(
    "--data", "data_root", required=True, type=click.Path(path_type=Path), help="Built dataset root (dataset.json)."
)
@click.option(
    "--config", "config_path", type=click.Path(path_type=Path), help="YAML merged over the method's default config."
)
@click.option("--set", "overrides", multiple=True, help="Config override KEY=VALUE (dotted keys), repeatable.")
@click.option("--max-steps", type=int, help="Stop after this global step (schedules still follow train.total_steps).")
@click.option("--max-minutes", type=float, help="Stop once the run has trained this many minutes (train.max_minutes).")
@click.option("--stage", type=int, default=1, show_default=True, help="Training stage; >1 runs the method's own stage.")
@click.option(
    "--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output folder (logs, checkpoints, model)."
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the run in --out from its last checkpoint, with the run's config "
    "(only run-control keys such as cadences, num_workers, max_minutes may change; see resumes.jsonl).",
)
@click.option("--scale", type=int, help="Expected scale; must match the dataset's.")
def train_command(
    method_name: str,
    data_root: Path,
    config_path: Path | None,
    overrides: tuple[str, ...],
    max_steps: int | None,
    max_minutes: float | None,
    stage: int,
    out_dir: Path,
    device: str,
    resume: bool,
    scale: int | None,
) -> None:
    """Train a method on a built dataset's train split, validating on its test split."""
    from baselines import registry

    from .train import train

    config: dict[str, Any] = registry.load_yaml(config_path) if config_path else {}
    config = registry.merge_config(config, _parse_set(overrides))
    result = train(
        method_name,
        data_root,
        out_dir,
        scale=scale,
        config=config,
        max_steps=max_steps,
        stage=stage,
        device=None if device == "auto" else device,
        resume=resume,
        max_minutes=max_minutes,
    )
    click.echo(json.dumps(result, indent=2, default=str))
