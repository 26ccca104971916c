"""`cmsrd-bench weights list|verify|fetch`: the offline weight cache from the command line."""

from __future__ import annotations

import sys

import click

from baselines import weights as wcache


def metric_weights() -> dict[str, list[str]]:
    """`metric:<name>` -> the manifest keys that metric loads, taken from `benchmark.metrics.METRICS`.

    METRICS is what `cmsrd-bench run` resolves, so it (not the manifest's `used_by` tags, which a test keeps
    equal to it) decides which files gate `verify` and which `fetch` downloads by default. Keys the manifest
    lacks are kept: a custom $CMSRD_WEIGHTS_MANIFEST without them cannot run that metric, and `verify` says so."""
    from .metrics import METRICS

    return {f"metric:{n}": list(m.weights) for n, m in METRICS.items() if m.weights}


def _not_in_manifest(key: str) -> str:
    """One wording for `verify` and `fetch`: a metric's file the (custom) manifest has no entry for."""
    return f"{key}: not in the manifest {wcache.manifest_path()} -> add its entry (copy it from {wcache.MANIFEST_PATH})"


def _users_by_key(manifest: dict[str, wcache.WeightEntry]) -> dict[str, list[str]]:
    """key -> its users: metrics from METRICS, methods and cross-checks from the manifest's `used_by`."""
    users = {k: [u for u in e.used_by if not u.startswith("metric:")] for k, e in manifest.items()}
    for user, keys in metric_weights().items():
        for k in keys:
            if k in manifest:
                users[k].append(user)
    return users


@click.group("weights")
def weights() -> None:
    """Inspect, verify and fetch the weights metrics and methods load (cache: $TORCH_HOME/hub)."""


@weights.command("list")
def list_command() -> None:
    """Every manifest entry: key, file, cache folder, who uses it, licence."""
    manifest = wcache.load_manifest()
    click.echo(f"cache: {wcache.hub_dir()}  (manifest: {wcache.manifest_path()})")
    by_key = _users_by_key(manifest)
    for key, e in manifest.items():
        h = e.sha256[:12] + "..." if e.sha256 else (f"prefix {e.sha256_prefix}" if e.sha256_prefix else "no hash")
        click.echo(f"{key:22s} {e.subdir + '/' + e.file:55s} {h:22s} {', '.join(by_key[key]) or '-'}")
        if not e.url:
            click.echo(f"{'':22s} not downloadable: {e.note or 'no URL'}")


@weights.command("verify")
@click.argument("keys", nargs=-1)
def verify_command(keys: tuple[str, ...]) -> None:
    """Per metric and per method: which files are present, missing or corrupt, and where to put them.

    Exits 1 when a file a benchmark metric loads is missing or corrupt, or (without KEYS) has no entry in
    the manifest; files used only by methods or by cross-checks (`crosscheck:<name>`) are reported but do
    not fail the preflight."""
    manifest = wcache.load_manifest()
    selected = list(keys) or list(manifest)
    checks = {k: wcache.check(k, manifest) for k in selected}  # unknown key -> one clear error
    by_key = _users_by_key(manifest)
    users: dict[str, list[str]] = {}
    for k in selected:
        for u in by_key[k] or ["unused"]:
            users.setdefault(u, []).append(k)
    absent = {} if keys else {u: [k for k in ks if k not in manifest] for u, ks in metric_weights().items()}
    absent = {u: ks for u, ks in absent.items() if ks}
    for u in absent:
        users.setdefault(u, [])
    bad_metric = bool(absent)
    for user in sorted(users, key=lambda u: (not u.startswith("metric:"), u)):
        states = [checks[k].status for k in users[user]]
        ready = "ready" if all(s == "present" for s in states) and user not in absent else "NOT ready"
        click.echo(f"{user}: {ready}")
        for k in absent.get(user, []):
            click.echo(f"  {'absent':8s} {_not_in_manifest(k)}")
        for k in users[user]:
            c, e = checks[k], manifest[k]
            line = f"  {c.status:8s} {e.file}"
            if c.status == "present":
                line += f"  ({c.path}{'' if c.verified else ', hash unknown: not verified'})"
            else:
                line += f"  -> put it at {e.expected_path()}  ({e.origin()})"
                if c.status == "corrupt":
                    line += f"  [{c.detail}]"
                if user.startswith("metric:"):
                    bad_metric = True
            click.echo(line)
    if bad_metric:
        sys.exit(1)


@weights.command("fetch")
@click.argument("keys", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Every downloadable entry, methods included.")
@click.option("--base-url", default=None, help="Mirror holding the files by name: URL becomes BASE/<file>.")
@click.option("--force", is_flag=True, help="Download again even when a good copy is present.")
@click.option("--timeout", default=60.0, show_default=True, type=float)
def fetch_command(keys: tuple[str, ...], all_: bool, base_url: str | None, force: bool, timeout: float) -> None:
    """Download weights into the cache with hash checks (atomic; one failure does not stop the others).

    Without KEYS or --all: the files the benchmark metrics load (cross-check and method weights are left out)."""
    manifest = wcache.load_manifest()
    failed = 0
    if keys:
        selected = list(keys)
        for k in selected:
            wcache._entry(k, manifest)  # unknown key -> one clear error
    elif all_:
        selected = list(manifest)
    else:
        wanted = list(dict.fromkeys(k for keys_ in metric_weights().values() for k in keys_))
        selected = [k for k in wanted if k in manifest]
        for k in wanted:
            if k not in manifest:  # a custom manifest without a metric's file: nothing to fetch it from
                failed += 1
                click.echo(f"{'failed':16s} {_not_in_manifest(k)}")

    def show(r: wcache.FetchResult) -> None:
        nonlocal failed
        failed += r.outcome == "failed"
        click.echo(
            f"{r.outcome:16s} {r.key}: {r.path}" + (f"  ({r.detail})" if r.detail and r.outcome != "fetched" else "")
        )

    wcache.fetch(selected, base_url_override=base_url, manifest=manifest, timeout=timeout, force=force, on_result=show)
    if failed:
        sys.exit(1)
