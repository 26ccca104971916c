"""`cmsrd-bench list`: the registry's methods, their scales, inputs, licences and weights."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

# Exact (total, trainable) parameters of every method at every scale it declares, at its default config: data,
# so `list` (text and --json) needs no torch. `--recount` recomputes them; tests hold the file to the models
# and its scales to the specs'. Regenerate: `python -c "import baselines.cli as c; c.write_parameter_counts()"`.
PARAM_COUNTS = Path(__file__).with_name("param_counts.json")
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


def recorded_parameter_counts() -> dict[str, dict[str, dict[str, int]]]:
    """name -> scale (a string, as in JSON) -> {"total", "trainable"}, read from `param_counts.json`."""
    return json.loads(PARAM_COUNTS.read_text())


def count_all() -> dict[str, dict[str, dict[str, int]]]:
    """What `param_counts.json` holds, counted now: each of the toolkit's methods built on the meta device at
    every scale its spec declares (a scale the class cannot build fails here)."""
    from . import registry

    out = {}
    for name in registry.names():
        spec = registry.get(name)
        if spec.target.startswith("baselines."):  # not methods a caller registered for the session
            out[name] = {str(s): dict(zip(("total", "trainable"), parameter_counts(name, s))) for s in spec.scales}
    return out


def write_parameter_counts(path: Path = PARAM_COUNTS) -> None:
    from cmsrd.io import atomic_write_text

    atomic_write_text(path, json.dumps(count_all(), indent=1) + "\n")


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


def method_rows(with_params: bool, recount: bool = False) -> list[dict[str, Any]]:
    """One dict per registered method (the `--json` rows). Parameter counts come from `param_counts.json`;
    `recount` (or a method the file does not hold) builds the method on the meta device to count them."""
    from . import registry

    recorded = {} if recount else recorded_parameter_counts()
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
                known = recorded.get(name, {}).get(str(s))
                if known is not None:
                    by_scale[str(s)] = {"scale": s, "total": known["total"], "trainable": known["trainable"]}
                    continue
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
@click.option(
    "--recount",
    is_flag=True,
    help="Count parameters by building each method on the meta device (slow: imports torch) instead of "
    "reading the recorded baselines/param_counts.json.",
)
def list_command(as_json: bool, recount: bool) -> None:
    """List registered SR methods: kind, scales, inputs, NFE, params, licence, weights present.

    Reads plain specs and recorded counts (no torch import), so it answers at once.

    Example: `cmsrd-bench list --json`"""
    rows = method_rows(with_params=True, recount=recount)
    if as_json:
        click.echo(json.dumps({"methods": rows}, indent=2))
        return
    header = ("name", "kind", "scales", "inputs", "NFE", "params", "licence", "weights x16", "weights x32")
    table = [header] + [
        (
            r["name"],
            r["kind"],
            ",".join(map(str, r["scales"])),
            ",".join(r["inputs"]),
            str(r["nfe"]),
            _human(r["params"]["total"]) if "total" in r["params"] else "?",
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
