"""`cmsrd-bench list`: the registry's methods, their scales, inputs, licences and weights."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

PARAM_COUNTS = Path(__file__).with_name("param_counts.json")  # recorded; tests check them against the models
# One vocabulary for a method's weights at a scale (the table's legend says the same).
WEIGHT_STATES = {
    "present": "in the weights cache",
    "corrupt": "in the cache but its hash does not match: fetch or copy it again",
    "fetch": "missing, published with a URL: `cmsrd-bench weights fetch KEY` (KEY from `cmsrd-bench weights list`)",
    "download": "missing, published without a direct URL: download it by hand (`cmsrd-bench weights list` says where)",
    "train": "missing, not published: train a checkpoint and pass --weights NAME=PATH",
    "none needed": "the method has no weights",
    "-": "the method does not offer this scale",
}


def _weights_status(name: str, scale: int, kind: str = "", scales: tuple[int, ...] = ()) -> str:
    """A WEIGHT_STATES key for a method's weights at a scale."""
    from . import weights

    if scales and scale not in scales:
        return "-"
    if kind == "interp":
        return "none needed"
    manifest = weights.load_manifest()
    key = weights.method_weights_key(name, scale, manifest)
    if key is None:  # no checkpoint anyone publishes at this scale: it must be trained
        return "train"
    status = weights.status(key, manifest)
    if status == "missing":
        entry = manifest[key]
        return ("fetch" if entry.url else "download") if entry.published else "train"
    return status


def recorded_parameter_counts() -> dict[str, dict[str, int]]:
    """Exact counts at each method's default scale, read from data so the table needs no torch."""
    return json.loads(PARAM_COUNTS.read_text())


def _human(n: int) -> str:
    return "0" if not n else f"{n / 1e6:.1f}M" if n < 1e9 else f"{n / 1e9:.2f}B"


def default_scale(spec: Any) -> int:
    return int(spec.extra.get("default_scale", 16 if 16 in spec.scales else spec.scales[0]))


def parameter_counts(name: str, scale: int) -> tuple[int, int]:
    """(total, trainable) parameters at the method's default config, built on the meta device
    (no memory, no weights, no random init cost)."""
    import torch

    from . import registry

    with _offline(), torch.device("meta"):
        method = registry.build(name, scale, device="meta")
    return method.parameter_counts()


def _offline():
    """Counting parameters must never reach the network (Hugging Face config look-ups included)."""
    from unittest import mock

    return mock.patch.dict(
        os.environ, {k: "1" for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    )


def method_rows(with_params: bool) -> list[dict[str, Any]]:
    from . import registry

    rows = []
    for name in registry.names():
        spec = registry.get(name)
        scale = default_scale(spec)
        row: dict[str, Any] = {
            "name": name,
            "kind": spec.kind,
            "scales": list(spec.scales),
            "inputs": list(spec.inputs),
            "nfe": spec.nfe,
            "license": spec.license,
            "citation": spec.citation,
            "conditions": list(spec.conditions),
            "weights": {str(s): _weights_status(name, s, spec.kind, tuple(spec.scales)) for s in (16, 32)},
        }
        if with_params:
            # counts at the default scale (`params`) and at each benchmark scale the method supports: the
            # upsampler of a regression network grows with the scale (TTST x16 vs x32)
            by_scale = {}
            for s in sorted({scale} | {s for s in (16, 32) if s in spec.scales}):
                try:
                    total, trainable = parameter_counts(name, s)
                    by_scale[str(s)] = {"scale": s, "total": total, "trainable": trainable}
                except Exception as e:  # noqa: BLE001 - one method failing to build must not hide the others
                    by_scale[str(s)] = {"scale": s, "error": f"{type(e).__name__}: {e}"}
            row["params"] = by_scale[str(scale)]
            row["params_by_scale"] = by_scale
        rows.append(row)
    return rows


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with total/trainable parameter counts).")
def list_command(as_json: bool) -> None:
    """List registered SR methods: kind, scales, inputs, NFE, licence, weights present."""
    rows = method_rows(with_params=as_json)
    if as_json:
        click.echo(json.dumps({"methods": rows}, indent=2))
        return
    params = recorded_parameter_counts()
    header = ("name", "kind", "scales", "inputs", "NFE", "params", "licence", "weights x16", "weights x32")
    table = [header] + [
        (
            r["name"],
            r["kind"],
            ",".join(map(str, r["scales"])),
            ",".join(r["inputs"]),
            str(r["nfe"]),
            _human(params[r["name"]]["total"]) if r["name"] in params else "?",
            r["license"].split(" (")[0].split(";")[0].split(", ")[0],
            r["weights"].get("16", "-"),
            r["weights"].get("32", "-"),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            click.echo("  ".join("-" * w for w in widths))
    click.echo("\nparams: total at the default scale (`--json` for trainable).  weights:")
    for state, meaning in WEIGHT_STATES.items():
        click.echo(f"  {state:12s} {meaning}")
