"""`cmsrd-bench weights list|verify|fetch`: the offline weight cache from the command line."""

from __future__ import annotations

import sys

import click

from baselines import weights as wcache


def _users(entry: wcache.WeightEntry) -> str:
    return ", ".join(entry.used_by) or "-"


@click.group("weights")
def weights() -> None:
    """Inspect, verify and fetch the weights metrics and methods load (cache: $TORCH_HOME/hub)."""


@weights.command("list")
def list_command() -> None:
    """Every manifest entry: key, file, cache folder, who uses it, licence."""
    manifest = wcache.load_manifest()
    click.echo(f"cache: {wcache.hub_dir()}  (manifest: {wcache.manifest_path()})")
    for key, e in manifest.items():
        h = e.sha256[:12] + "..." if e.sha256 else (f"prefix {e.sha256_prefix}" if e.sha256_prefix else "no hash")
        click.echo(f"{key:22s} {e.subdir + '/' + e.file:55s} {h:22s} {_users(e)}")
        if not e.url:
            click.echo(f"{'':22s} not downloadable: {e.note or 'no URL'}")


@weights.command("verify")
@click.argument("keys", nargs=-1)
def verify_command(keys: tuple[str, ...]) -> None:
    """Per metric and per method: which files are present, missing or corrupt, and where to put them.

    Exits 1 when a file used by a metric is missing or corrupt."""
    manifest = wcache.load_manifest()
    selected = list(keys) or list(manifest)
    checks = {k: wcache.check(k, manifest) for k in selected}
    users: dict[str, list[str]] = {}
    for k in selected:
        for u in manifest[k].used_by or ("unused",):
            users.setdefault(u, []).append(k)
    bad_metric = False
    for user in sorted(users, key=lambda u: (not u.startswith("metric:"), u)):
        states = [checks[k].status for k in users[user]]
        ready = "ready" if all(s == "present" for s in states) else "NOT ready"
        click.echo(f"{user}: {ready}")
        for k in users[user]:
            c, e = checks[k], manifest[k]
            line = f"  {c.status:8s} {e.file}"
            if c.status == "present":
                line += f"  ({c.path}{'' if c.verified else ', hash unknown: not verified'})"
            else:
                line += f"  -> put it at {e.expected_path()}  (from {e.source()})"
                if c.status == "corrupt":
                    line += f"  [{c.detail}]"
                if user.startswith("metric:"):
                    bad_metric = True
            click.echo(line)
    if bad_metric:
        sys.exit(1)


@weights.command("fetch")
@click.argument("keys", nargs=-1)
@click.option("--metrics-only", is_flag=True, help="Only the files metrics need (the default when no KEYS are given).")
@click.option("--all", "all_", is_flag=True, help="Every downloadable entry, methods included.")
@click.option("--base-url", default=None, help="Mirror holding the files by name: URL becomes BASE/<file>.")
@click.option("--force", is_flag=True, help="Download again even when a good copy is present.")
@click.option("--timeout", default=60.0, show_default=True, type=float)
def fetch_command(keys: tuple[str, ...], metrics_only: bool, all_: bool, base_url: str | None, force: bool, timeout: float) -> None:
    """Download weights into the cache with hash checks (atomic; one failure does not stop the others)."""
    manifest = wcache.load_manifest()
    if keys:
        selected = list(keys)
        for k in selected:
            wcache._entry(k, manifest)  # unknown key -> one clear error
    elif all_:
        selected = list(manifest)
    else:
        selected = [k for k, e in manifest.items() if any(u.startswith("metric:") for u in e.used_by)]
    failed = 0

    def show(r: wcache.FetchResult) -> None:
        nonlocal failed
        failed += r.outcome == "failed"
        click.echo(f"{r.outcome:16s} {r.key}: {r.path}" + (f"  ({r.detail})" if r.detail and r.outcome != "fetched" else ""))

    wcache.fetch(selected, base_url_override=base_url, manifest=manifest, timeout=timeout, force=force, on_result=show)
    if failed:
        sys.exit(1)
