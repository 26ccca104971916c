"""Benchmark runner: registry methods x conditions over one split of a built dataset, timed and scored.

SR images go through `benchmark.evaluate` and are saved as PNGs, then the saved PNGs are scored (metrics see
the published bytes), streamed from disk in chunks. Only the method's super-resolve is timed
(`TIMING_DEFINITION`); a batch that runs out of memory is retried at half the size. A killed run resumes,
but only into SR folders whose fingerprint (`inference.json`: weights, effective config, seed, device type,
precision, data, condition) matches; one method failing is recorded and the others go on. A method's config
is its default YAML, then the network geometry its checkpoint records, then the user's `--config`, which may
change only where frozen parts come from (`LOCATION_KEYS`), not the recorded geometry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from baselines import registry
from baselines import weights as wcache
from baselines.checkpoint import BEST_EXPORT_FILE, EXPORT_FILE, read_metadata, run_weights
from baselines.conditions import Conditions, UnsupportedCondition, partners
from baselines.device import resolve_device, resolve_precision
from baselines.inference import NONFINITE
from baselines.seeding import SEED_RULE
from cmsrd.errors import InputError, MissingWeightsError
from cmsrd.io import atomic_write_text, read_png, sha256_file, write_png
from cmsrd.layout import DatasetLayout, read_dataset_json

from . import leaderboard as lb
from . import metrics as M
from .downstream import bench as DS
from .evaluate import MEAN_DEFINITION, SRPass, finite_images, mean_finite, score_images
from .metrics.distribution import check_set_size
from .sweep import plan_pairs

log = logging.getLogger(__name__)

INFERENCE_JSON = "inference.json"
ALL_AVAILABLE = "all-available"
SCORE_CHUNK = 32  # images read per step while scoring image-level metrics (memory stays bounded)

TIMING_DEFINITION = " ".join(f"{c}: {text}" for c, text in lb.TIMING_COLUMNS.items())  # one text per column, shared
AGGREGATION_DEFINITION = MEAN_DEFINITION


@dataclass
class RunConfig:
    data: Path
    out: Path
    methods: Sequence[str] | str = ALL_AVAILABLE
    conditions: Sequence[str] = ("default",)
    split: str = "test"
    weights: dict[str, Path] = field(default_factory=dict)
    skip_missing: bool = False
    crop_border: int = 0
    device: str = "auto"
    batch_size: int = 8
    metrics: Sequence[str] | str | None = None
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    limit: int | None = None
    warmup: bool = True
    command: list[str] = field(default_factory=list)
    configs: dict[str, Path | dict[str, Any]] = field(default_factory=dict)  # --config NAME=YAML (or a dict)
    overwrite: bool = False  # delete each method x condition folder of this run first instead of resuming it
    sweep: str | None = None  # "nfe=5,10,20": quality-vs-NFE conditions per diffusion method (benchmark.sweep)
    rvsa_init: str = "official"  # downstream RVSA weights: official files | random (test/demo; benchmark.downstream)
    map_segmenter: Path | None = None  # map-agreement segmenter (`cmsrd-bench train-downstream`)
    fast: str = "auto"  # diffusion fast-path switches (`baselines.diffusion.fast.parse`); recorded in run.json


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _is_oom(e: BaseException) -> bool:
    """An allocation failure on any device (CUDA's OutOfMemoryError, or a RuntimeError saying so)."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


# ---- method weights --------------------------------------------------------------------------------


def method_weights(name: str, spec: registry.MethodSpec, scale: int, given: dict[str, Path]) -> Path | None:
    """Weights file for a method: `--weights name=PATH` (a file, or a training run folder: its
    model-best.safetensors when kept, else model.safetensors), else the manifest entry for (method, scale),
    else none for interpolation methods. Raises MissingWeightsError / InputError otherwise."""
    if name in given:
        path = Path(given[name]).expanduser()
        if path.is_dir():
            found = run_weights(path)
            if found is None:
                raise InputError(
                    f"--weights {name}={path}",
                    f"is a folder without {BEST_EXPORT_FILE} or {EXPORT_FILE}",
                    "give a checkpoint file, or the --out folder of a `cmsrd-bench train` run",
                )
            return found
        if not path.is_file():
            raise InputError(f"--weights {name}={path}", "file not found", "give the path of a checkpoint file")
        return path
    key = wcache.method_weights_key(name, scale)
    if key is not None:
        return wcache.resolve(key)
    if spec.kind == "interp":
        return None
    raise InputError(
        f"method {name!r}",
        f"needs trained x{scale} weights and none were given",
        f"pass --weights {name}=PATH "
        f"(train with `cmsrd-bench train --method {name} --data DATA --scale {scale} --out RUN`)",
    )


# ---- method configs --------------------------------------------------------------------------------

# Config leaves that say where frozen pretrained parts come from, not what shape the network has: a user's
# --config may replace the value a checkpoint recorded (a local SD2.1 folder instead of the hub id).
LOCATION_KEYS = frozenset({"pretrained", "tokenizer"})


def load_user_config(name: str, source: Path | dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """`--config NAME=YAML` -> (override dict, what run.json records about it)."""
    if source is None:
        return {}, {}
    if isinstance(source, dict):
        return source, {"file": None, "override": source}
    path = Path(source).expanduser()
    if not path.is_file():
        raise InputError(f"--config {name}={path}", "file not found", "give the path of a YAML method config")
    data = registry.load_yaml(path)
    return data, {"file": str(path), "sha256": sha256_file(path), "override": data}


def _geometry_conflicts(user: Any, recorded: Any, where: str = "network") -> list[str]:
    """Leaves set in both with different values, location keys excepted."""
    if isinstance(user, dict) and isinstance(recorded, dict):
        out = []
        for k in user.keys() & recorded.keys():
            if k not in LOCATION_KEYS:
                out += _geometry_conflicts(user[k], recorded[k], f"{where}.{k}")
        return out
    return [] if user == recorded else [f"{where}: {user!r} (config) vs {recorded!r} (checkpoint)"]


def build_config(name: str, user: dict[str, Any], recorded_network: dict[str, Any] | None) -> dict[str, Any]:
    """The override merged over the method's default config: the checkpoint's recorded `network`, then the
    user's config on top; a user value that changes recorded geometry is an InputError."""
    if not recorded_network:
        return user
    conflicts = _geometry_conflicts(user.get("network") or {}, recorded_network)
    if conflicts:
        raise InputError(
            f"--config {name}",
            "changes the network geometry the checkpoint was trained with: " + "; ".join(conflicts),
            f"drop those keys (only {sorted(LOCATION_KEYS)} may differ), "
            "or give the checkpoint that matches the config",
        )
    return registry.merge_config({"network": recorded_network}, user)


# ---- data-level conditions -------------------------------------------------------------------------


# `partners` and `apply_conditions` live in baselines.conditions (shared with the trainer's validation).


# ---- one method x condition ------------------------------------------------------------------------


@dataclass
class Outcome:
    method: str
    condition: str
    status: str  # ok | failed | unsupported | skipped
    reason: str = ""
    n_images: int = 0
    timing: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodSetup:
    """What a method x condition is built from, resolved without building it (so resume can be decided cheaply)."""

    spec: registry.MethodSpec
    weights: Path | None  # hashed at each use (`fingerprint`), not here: the file may be rewritten mid-run
    network: dict[str, Any] | None  # geometry recorded by the checkpoint
    config_record: dict[str, Any]  # what run.json says about --config
    override: dict[str, Any]  # merged over the default config when building
    effective_config: dict[str, Any]  # default config + override: what the method is built with


@dataclass
class RunContext:
    """Per-run facts every method x condition needs (computed once)."""

    layout: DatasetLayout
    ids: list[str]
    device: str
    precision: str  # fp32 | bf16 | fp16 (`baselines.device.resolve_precision`)
    dataset_sha256: str | None
    partner: dict[str, str]
    hashes: dict[tuple[str, int, int], str] = field(default_factory=dict)  # file sha256 by (path, size, mtime)
    setups: dict[str, MethodSetup] = field(default_factory=dict)  # by method name (see setup_method)

    def sha256(self, path: Path) -> str:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in self.hashes:
            self.hashes[key] = sha256_file(path)
        return self.hashes[key]


def setup_method(name: str, cfg: RunConfig, ctx: RunContext) -> MethodSetup:
    """Registry spec, weights file and its hash, and the effective config of a method (not built); computed
    once per run (the folder check and the inference of every condition share it)."""
    if name not in ctx.setups:
        ctx.setups[name] = _setup_method(name, cfg, ctx)
    return ctx.setups[name]


def _setup_method(name: str, cfg: RunConfig, ctx: RunContext) -> MethodSetup:
    spec = registry.get(name)
    if ctx.layout.scale not in spec.scales:
        raise InputError(
            f"method {name!r}", f"does not support x{ctx.layout.scale}", f"it supports {list(spec.scales)}"
        )
    wpath = method_weights(name, spec, ctx.layout.scale, cfg.weights)
    # A checkpoint saved by our trainer names its network geometry; build that geometry so a small
    # model trained with a non-default config loads without the user repeating the config. A user
    # config (--config) goes on top, e.g. local backbone/tokenizer paths for the authors' .ckpt.
    network = read_metadata(wpath).get("network") if wpath is not None else None
    user, config_record = load_user_config(name, cfg.configs.get(name))
    override = build_config(name, user, network)
    return MethodSetup(
        spec, wpath, network, config_record, override, registry.merge_config(spec.default_config(), override)
    )


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def config_files(config: Any, where: str = "") -> dict[str, Path]:
    """Config leaves naming an existing single file (SGDM's `flows.mean/std`, a `backbone.pretrained` .ckpt),
    by dotted key. Folders (a diffusers backbone, a tokenizer) are not listed: hashing them is too costly;
    nor is the trainer's `train` section, which inference does not read."""
    if isinstance(config, dict):
        return {
            k: p
            for key, v in config.items()
            if not (where == "" and key == "train")
            for k, p in config_files(v, f"{where}.{key}" if where else str(key)).items()
        }
    if isinstance(config, str) and config:
        path = Path(config).expanduser()
        if path.is_file():
            return {where: path}
    return {}


def fingerprint(setup: MethodSetup, cond: Conditions, cfg: RunConfig, ctx: RunContext) -> dict[str, Any]:
    """What an SR image depends on, except the batch size: resume only into a folder with equal values.

    Keyed: the weights file's bytes, the effective config and the bytes of the single files it names
    (`config_files`), seed, device type (CPU and CUDA generators give different noise for one seed),
    precision, dataset manifest, split, scale, condition and shuffle partners. Not keyed: the contents of
    folders a config names (a diffusers backbone, a tokenizer) and files a method finds next to its weights
    (SGDM's flows.safetensors / released flow files): replacing those in place is not detected."""
    shuffled = cond.map == "shuffle" or cond.style == "shuffle"
    files = {k: ctx.sha256(p) for k, p in config_files(setup.effective_config).items()}
    weights = ctx.sha256(setup.weights) if setup.weights else None  # a stat when the file is unchanged
    return {
        "method": setup.spec.name,
        "weights_sha256": weights,
        "config_sha256": _digest(setup.effective_config),
        "config_files_sha256": files or None,
        "seed": cfg.seed,
        "device": torch.device(ctx.device).type,
        "precision": ctx.precision,
        "dataset_manifest_sha256": ctx.dataset_sha256,
        "scale": ctx.layout.scale,
        "split": cfg.split,
        "condition": cond.name,
        "partners_sha256": _digest(ctx.partner) if shuffled else None,
    }


def resume_state(out_dir: Path, fp: dict[str, Any]) -> dict[str, Any] | None:
    """The folder's previous inference.json if it may be resumed under `fp`; None for a fresh folder.

    Raises an InputError naming the differing fields when the folder holds results of something else."""
    done_file = out_dir / INFERENCE_JSON
    prev = json.loads(done_file.read_text()) if done_file.is_file() else None
    if prev is None:
        n_png = sum(1 for _ in out_dir.glob("*.png")) if out_dir.is_dir() else 0
        if not n_png:
            return None
        why = f"holds {n_png} SR image(s) but no {INFERENCE_JSON} saying what made them"
    elif "fingerprint" not in prev:
        why = f"was written by an older version ({INFERENCE_JSON} has no fingerprint)"
    else:
        old = prev["fingerprint"]
        diff = [
            f"{k} {old.get(k)!r} -> {fp.get(k)!r}" for k in sorted(fp.keys() | old.keys()) if old.get(k) != fp.get(k)
        ]
        if not diff:
            return prev
        why = "was made with different settings: " + "; ".join(diff)
    raise InputError(
        f"SR folder {out_dir}", why, "use a new --out, or pass --overwrite to delete this folder and redo it"
    )


def _timing(
    n_timed: int, model_s: float, wall_s: float, peak: float | None, bs: int, halvings: int, precision: str
) -> dict[str, Any]:
    return {
        "n_timed": n_timed,
        "model_seconds": model_s,
        "wall_seconds": wall_s,
        "images_per_s": (n_timed / model_s) if model_s > 0 else None,
        "sec_per_image": (model_s / n_timed) if n_timed and model_s > 0 else None,
        "peak_mem_gb": peak,
        "final_batch_size": bs,
        "oom_halvings": halvings,
        "autocast": precision,
    }


def infer(
    method: Any,
    cond: Conditions,
    cfg: RunConfig,
    ctx: RunContext,
    todo: Sequence[str],
    out_dir: Path,
    failed: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Super-resolve `todo` ids, write PNGs, return timing (`TIMING_DEFINITION`). On out of memory the
    batch is halved (down to 1), peak-memory stats are reset and the new size is warmed up again.
    An image with NaN/inf output is not written; its id goes into `failed` (`evaluate.finite_images`)."""
    from cmsrd.data import CMSRDDataset

    layout, split, device, precision = ctx.layout, cfg.split, ctx.device, ctx.precision
    if not todo:
        return _timing(0, 0.0, 0.0, None, cfg.batch_size, 0, precision)
    inputs = ["lr", "sr", "map"] + (["hr"] if cond.style in ("gt",) else [])
    ds = CMSRDDataset(layout.root, split, inputs=inputs, ids=list(todo))
    # benchmark.evaluate: condition, declared inputs on the device, one generator per image (seed + its index
    # in the split: outputs do not depend on batching), autocast, no-grad, output shape check, clamp to [0, 1]
    sr_pass = SRPass(method, cond, layout, split, ctx.ids, ctx.partner, cfg.seed, device, precision)
    is_cuda = device.startswith("cuda")
    if is_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    bs = max(1, cfg.batch_size)
    pos, model_s, n_timed, halvings, warmed = 0, 0.0, 0, 0, not cfg.warmup
    wall0 = time.perf_counter()
    bar = tqdm(total=len(todo), desc=f"{method.spec.name} [{cond.name}]", unit="img", leave=False)
    while pos < len(todo):
        items = [ds[i] for i in range(pos, min(pos + bs, len(todo)))]
        try:
            batch = sr_pass.prepare(sr_pass.collate(items))
            if not warmed:  # untimed warm-up (kernel selection, lazy init, caches) on a copy of the inputs
                sr_pass.forward({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
                _sync(device)
                warmed = True
            _sync(device)
            t0 = time.perf_counter()
            out = sr_pass.forward(batch)
            _sync(device)
            model_s += time.perf_counter() - t0
        except Exception as e:
            if not (_is_oom(e) and bs > 1):
                if _is_oom(e):
                    raise RuntimeError(f"out of memory even at batch size 1: {e}") from e
                raise
            bs, halvings, warmed = bs // 2, halvings + 1, not cfg.warmup
            batch = out = None
            if is_cuda:  # the failed attempt's high-water mark is not what the smaller batch needs
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            log.warning("%s: out of memory, retrying with batch size %d", method.spec.name, bs)
            continue
        images, bad = finite_images(batch["id"], out)
        for sid, arr in images:
            write_png(out_dir / f"{sid}.png", arr)
        if failed is not None:
            failed.update(bad)
        n_timed += len(items)
        pos += len(items)
        bar.update(len(items))
    bar.close()
    peak = (torch.cuda.max_memory_allocated() / 1e9) if is_cuda else None
    return _timing(n_timed, model_s, time.perf_counter() - wall0, peak, bs, halvings, precision)


def run_method_condition(name: str, cond_text: str, cfg: RunConfig, ctx: RunContext) -> Outcome:
    """Infer one method x condition into its SR folder (resuming a matching one); never raises."""
    cond = Conditions.parse(cond_text)
    out_dir = lb.sr_dir(cfg.out, name, cond.name)
    done_file = out_dir / INFERENCE_JSON
    ids = ctx.ids
    outcome = Outcome(name, cond.name, "ok", n_images=len(ids))
    if name == DS.REFERENCE:  # the HR tiles as the output: the reference row of the agreement metrics
        outcome.info = DS.write_reference(ctx.layout, cfg.split, ids, out_dir)
        return outcome
    try:
        cond.check_supported(name, registry.get(name).conditions)
        setup = setup_method(name, cfg, ctx)
        fp = fingerprint(setup, cond, cfg, ctx)
        prev = resume_state(out_dir, fp)
        todo = [i for i in ids if not (out_dir / f"{i}.png").exists()]
        if not todo and prev is not None:  # same model, same data, every image there: nothing to build
            # the old session's timing describes this row only if it super-resolved the same images
            same_images = prev.get("ids_sha256") == _digest(ids) and prev.get("timing")
            outcome.timing = (
                prev["timing"] if same_images else _timing(0, 0.0, 0.0, None, cfg.batch_size, 0, ctx.precision)
            )
            outcome.info = {**prev["info"], "resumed": True, "resumed_images": len(ids)}
            return outcome
        # the weights go in as `checkpoint:`, so a method whose file carries its frozen parts too (the authors'
        # SGDM .ckpt) builds them from it instead of resolving its default pretrained backbone first
        weights = {"checkpoint": str(setup.weights)} if setup.weights is not None else {}
        method = registry.build(name, ctx.layout.scale, config={**(setup.override or {}), **weights}, device=ctx.device)
        method = method.to(ctx.device).eval()
        from baselines.diffusion import fast  # (diffusers: imported only when a method is built)

        fast.apply(method, fast.parse(cfg.fast, ctx.device))  # same images within tolerance: not in the fingerprint
        total, trainable = method.parameter_counts()
        info = {
            "nfe": method.nfe(cond),
            "params_m": total / 1e6,
            "trainable_params_m": trainable / 1e6,
            "weights": str(setup.weights) if setup.weights else None,
            "weights_sha256": fp["weights_sha256"],
            "kind": setup.spec.kind,
            "license": setup.spec.license,
            "resumed_images": len(ids) - len(todo),
            "config": {
                **setup.config_record,
                "network_from_checkpoint": setup.network,
                "effective_override": setup.override,
            },
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        # written before the first image, so a killed run leaves a record of what its images came from
        atomic_write_text(
            done_file, json.dumps({"status": "started", "fingerprint": fp, "info": info}, indent=2, default=str)
        )
        failed: dict[str, str] = {}
        timing = infer(method, cond, cfg, ctx, todo, out_dir, failed)
        outcome.timing, outcome.info = timing, info
        if failed:  # not "done": a rerun retries these images; the row is not scored on a subset
            outcome.status, outcome.reason = "failed", f"{NONFINITE}: {len(failed)} of {len(todo)} images"
            outcome.info["failed_images"] = failed
            return outcome
        atomic_write_text(
            done_file,
            json.dumps(
                {"status": "done", "fingerprint": fp, "ids_sha256": _digest(ids), "timing": timing, "info": info},
                indent=2,
                default=str,
            ),
        )
        del method
        if ctx.device.startswith("cuda"):
            torch.cuda.empty_cache()
    except UnsupportedCondition as e:
        outcome.status, outcome.reason = "unsupported", str(e)
    except MissingWeightsError as e:
        outcome.status, outcome.reason = ("skipped" if cfg.skip_missing else "failed"), f"missing weights: {e}"
    except Exception as e:  # one method failing never stops the others
        log.exception("method %s (%s) failed", name, cond.name)
        outcome.status, outcome.reason = "failed", f"{type(e).__name__}: {e}"
    return outcome


# ---- metrics ---------------------------------------------------------------------------------------


def check_metric_weights(names: Sequence[str], skip_missing: bool) -> tuple[list[str], dict[str, str]]:
    """Metrics that can run, and those skipped with the reason. Without `skip_missing`, any missing or
    corrupt weights file raises one InputError listing every file and where to put it."""
    manifest = wcache.load_manifest()
    problems: dict[str, list[wcache.Check]] = {}
    for n in names:
        bad = wcache.missing_report(M.get(n).weights, manifest)
        if bad:
            problems[n] = bad
    if problems and not skip_missing:
        lines = []
        for n, bad in problems.items():
            for c in bad:
                e = manifest[c.key]
                lines.append(f"  {n}: {e.file} {c.status} -> {e.expected_path()} ({e.origin()})")
        raise InputError(
            "metric weights",
            "missing or corrupt:\n" + "\n".join(lines) + "\n",
            "put the files there (`cmsrd-bench weights fetch` on a machine with network, then copy the cache), "
            "or pass --skip-missing to run without these metrics, or --metrics to choose others",
        )
    skipped = {n: "; ".join(f"{manifest[c.key].file} {c.status}" for c in bad) for n, bad in problems.items()}
    return [n for n in names if n not in problems], skipped


def score(
    outcome: Outcome,
    cfg: RunConfig,
    ctx: RunContext,
    metric_names: Sequence[str],
    scorers: dict[str, Any],
    failures: dict[str, dict[str, str]],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Image-level metrics per image (averaged for the row) and set-level metrics on the saved PNGs.

    Images are read from disk `SCORE_CHUNK` at a time per metric (a bar per metric), never the whole split.
    A metric that fails here is recorded in `failures[metric][method|condition]` and `info["metric_errors"]`;
    one whose scorer could not be built is not retried for the next pairs."""
    ids, key = ctx.ids, f"{outcome.method}|{outcome.condition}"
    d = lb.sr_dir(cfg.out, outcome.method, outcome.condition)
    sr_paths = [d / f"{i}.png" for i in ids]
    hr_paths = [ctx.layout.image_path(cfg.split, "hr", i) for i in ids]
    per_image = [{"method": outcome.method, "condition": outcome.condition, "split": cfg.split, "id": i} for i in ids]
    row: dict[str, Any] = {}
    errors: dict[str, str] = {}
    n_finite: dict[str, int] = {}
    for name in metric_names:
        m = M.get(name)
        if m.level != "image":
            continue
        if name not in scorers:
            try:
                scorers[name] = M.build_image_metric(name, device=ctx.device, crop_border=cfg.crop_border)
            except Exception as e:
                log.exception("metric %s could not be built", name)
                scorers[name] = f"{type(e).__name__}: {e}"  # the reason, reported for every pair
        if isinstance(scorers[name], str):
            errors[name] = scorers[name]
            continue
        vals: list[float] = []
        try:
            with tqdm(
                total=len(ids), desc=f"scoring {name} {outcome.method} [{outcome.condition}]", unit="img", leave=False
            ) as bar:
                for a in range(0, len(ids), SCORE_CHUNK):
                    sr = [read_png(p) for p in sr_paths[a : a + SCORE_CHUNK]]
                    hr = [read_png(p) for p in hr_paths[a : a + SCORE_CHUNK]] if m.reference else None
                    vals += score_images({name: scorers[name]}, sr, hr)[name]
                    bar.update(len(sr))
        except Exception as e:
            log.exception("metric %s failed on %s", name, key)
            errors[name] = f"{type(e).__name__}: {e}"
            continue
        for r, v in zip(per_image, vals):
            r[name] = v
        row[name], n_finite[name] = mean_finite(vals)
    down = [n for n in metric_names if DS.is_downstream(n)]
    if down:
        try:
            row.update(scorers[DS.SCORER].score(down, sr_paths, save_to=d))
            outcome.info["downstream_iou"] = scorers[DS.SCORER].last_iou  # per class: the report's bars
        except Exception as e:
            log.exception("downstream metrics failed on %s", key)
            errors.update({n: f"{type(e).__name__}: {e}" for n in down})
    set_names = [n for n in metric_names if M.get(n).level == "set" and not DS.is_downstream(n)]
    if set_names:
        try:
            res = M.compute_set_metrics(
                set_names, sr_paths, hr_paths, device=ctx.device, label=f"{outcome.method} [{outcome.condition}]"
            )
            row.update({k: v for k, v in res.items() if k in set_names})
            outcome.info["set_metric_settings"] = {k: v for k, v in res.items() if k not in set_names}
        except Exception as e:
            log.exception("set metrics failed on %s", key)
            errors.update({n: f"{type(e).__name__}: {e}" for n in set_names})
    for n, why in errors.items():
        failures.setdefault(n, {})[key] = why
    if errors:
        outcome.info["metric_errors"] = errors
        row["metric_errors"] = "; ".join(f"{n}: {why}" for n, why in errors.items())
    outcome.info["n_finite"] = n_finite
    return row, per_image


# ---- the whole run ---------------------------------------------------------------------------------


def available_methods(scale: int, given: dict[str, Path]) -> tuple[list[str], dict[str, str]]:
    """Registry methods runnable at `scale` with weights at hand, and the others with the reason."""
    ok, skipped = [], {}
    for name in registry.names():
        spec = registry.get(name)
        if scale not in spec.scales:
            skipped[name] = f"does not support x{scale}"
            continue
        try:
            method_weights(name, spec, scale, given)
            ok.append(name)
        except InputError as e:
            skipped[name] = str(e)
    return ok, skipped


def dataset_identity(layout: DatasetLayout) -> dict[str, Any]:
    meta = read_dataset_json(layout.root)
    return {
        "root": str(layout.root),
        "name": meta.get("name"),
        "version": meta.get("version"),
        "scale": layout.scale,
        "hr_px": layout.hr_px,
        "lr_px": layout.lr_px,
        "manifest_sha256": sha256_file(layout.manifest_parquet) if layout.manifest_parquet.exists() else None,
    }


def parse_methods(methods: Sequence[str] | str) -> list[str]:
    """`RunConfig.methods` as a list of names: a string is comma-separated (as --methods); `all-available`
    stands alone."""
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else [str(m).strip() for m in methods]
    names = list(dict.fromkeys(n for n in names if n))
    if ALL_AVAILABLE in names and len(names) > 1:
        raise InputError(
            f"--methods {','.join(names)}",
            f"mixes {ALL_AVAILABLE} with method names",
            f"pass either {ALL_AVAILABLE} or the names of the methods to run",
        )
    return names


def _check_methods(names: Sequence[str]) -> None:
    """Every explicitly asked method exists in the registry (one error for all typos, before any inference)."""
    known = registry.names()
    unknown = [n for n in names if n not in known and n != DS.REFERENCE]
    if unknown:
        raise InputError(
            f"--methods {','.join(unknown)}", "not in the registry", f"choose from {known} (`cmsrd-bench list`)"
        )


def _check_conditions(conditions: Sequence[str], n_images: int) -> None:
    """A shuffle condition needs a partner other than the sample itself, so at least 2 images."""
    shuffled = [c.name for c in map(Conditions.parse, conditions) if "shuffle" in (c.map, c.style)]
    if shuffled and n_images < 2:
        raise InputError(
            f"--conditions {';'.join(shuffled)}",
            f"shuffles maps/styles between samples, but the run has {n_images} image(s)",
            "run on at least 2 images (--limit, --split) or drop the shuffle conditions",
        )


def _prepare_folders(cfg: RunConfig, ctx: RunContext, pairs: Sequence[tuple[str, str]]) -> None:
    """Before any inference: with `overwrite`, delete the SR folder of every pair of this run; otherwise
    refuse (one InputError for all) any folder made with another fingerprint. A pair whose setup fails
    (missing weights, ...) is left to run_method_condition, which records the reason."""
    problems = []
    for name, cond_text in pairs:
        cond = Conditions.parse(cond_text)
        out_dir = lb.sr_dir(cfg.out, name, cond.name)
        if not out_dir.exists():
            continue
        if cfg.overwrite:
            shutil.rmtree(out_dir)
            continue
        if name == DS.REFERENCE:  # copies of the HR tiles: nothing to mix up
            continue
        try:
            fp = fingerprint(setup_method(name, cfg, ctx), cond, cfg, ctx)
        except Exception:  # this pair will fail when it runs, with its reason recorded in its row
            continue
        try:
            resume_state(out_dir, fp)
        except InputError as e:
            problems.append(f"  {name} [{cond.name}]: {e.problem}")
    if problems:
        raise InputError(
            f"--out {cfg.out}",
            "holds SR images that this run would mix with its own:\n" + "\n".join(problems) + "\n",
            "use a new --out, or pass --overwrite to delete these method x condition folders and redo them",
        )


def run_benchmark(cfg: RunConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run everything `cfg` asks for and write leaderboard.csv, per_image.csv and run.json into `cfg.out`.

    Everything that can be checked without inference is checked first (metric weights and set sizes,
    method names, conditions, configs, resumability of existing SR folders), so a typo costs no GPU time."""
    from cmsrd.data import CMSRDDataset

    say = progress or (lambda s: None)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    cfg.out = Path(cfg.out)
    layout = DatasetLayout.open(cfg.data)
    device = str(resolve_device(cfg.device, "--device"))
    precision = resolve_precision(device, cfg.precision, "--precision")
    from baselines.diffusion import fast

    fast_options = fast.parse(cfg.fast, device)  # a switch this device cannot run fails here, before any work
    if cfg.crop_border < 0:
        raise InputError(f"--crop-border {cfg.crop_border}", "must be >= 0")
    ids = list(CMSRDDataset(layout.root, cfg.split, inputs=("hr",)).ids)
    if cfg.limit:
        ids = ids[: cfg.limit]

    asked = parse_methods(cfg.methods)
    if asked != [ALL_AVAILABLE]:
        _check_methods(asked)  # a typo in --methods is said first, before any missing metric weights
    metric_names = M.parse_names(cfg.metrics)
    waived = DS.waived_weights(metric_names, cfg.rvsa_init)  # random-init RVSA needs no weights files
    checked = [n for n in metric_names if n not in waived]
    runnable_metrics, skipped_metrics = check_metric_weights(checked, cfg.skip_missing)
    skipped_metrics.update(DS.check_options(metric_names, cfg.rvsa_init, cfg.map_segmenter, cfg.skip_missing))
    runnable_metrics = [n for n in metric_names if (n in runnable_metrics or n in waived) and n not in skipped_metrics]
    check_set_size([n for n in runnable_metrics if M.get(n).level == "set"], len(ids), (layout.hr_px, layout.hr_px))

    skipped_methods: dict[str, str] = {}
    if asked == [ALL_AVAILABLE]:
        methods, skipped_methods = available_methods(layout.scale, cfg.weights)
    else:
        methods = asked
    if not methods:
        raise InputError(
            "--methods", "no runnable method", "pass --methods NAME or provide weights with --weights NAME=PATH"
        )
    conditions = list(dict.fromkeys(Conditions.parse(c).name for c in cfg.conditions)) or ["default"]
    pairs = plan_pairs(methods, conditions, cfg.sweep)  # --sweep: per-method NFE conditions (benchmark.sweep)
    conditions = list(dict.fromkeys(Conditions.parse(c).name for _, c in pairs))
    _check_conditions(conditions, len(ids))
    for name, source in cfg.configs.items():  # typos and unreadable files fail once, before any method runs
        if name not in methods:
            raise InputError(
                f"--config {name}=...",
                f"names no method of this run ({', '.join(methods)})",
                "use NAME=YAML with a method in --methods",
            )
        load_user_config(name, source)

    manifest_sha256 = dataset_identity(layout)["manifest_sha256"]
    ctx = RunContext(layout, ids, device, precision, manifest_sha256, partners(ids, cfg.seed))
    _prepare_folders(cfg, ctx, pairs)
    cfg.out.mkdir(parents=True, exist_ok=True)

    rows, per_image_rows, outcomes = [], [], []
    scorers: dict[str, Any] = {
        DS.SCORER: DS.DownstreamScorer(layout, cfg.split, ids, device, cfg.rvsa_init, cfg.map_segmenter, cfg.seed)
    }
    failures: dict[str, dict[str, str]] = {}
    for name, cond in pairs:
        say(f"{name} [{cond}]")
        o = run_method_condition(name, cond, cfg, ctx)
        row = {
            "method": name,
            "condition": o.condition,
            "split": cfg.split,
            "n_images": len(ids) if o.status == "ok" else 0,
            "scale": layout.scale,
            "status": o.status,
            "reason": o.reason,
        }
        if o.status == "ok":
            values, per_image = score(o, cfg, ctx, runnable_metrics, scorers, failures)
            row.update(values)
            per_image_rows += per_image
            t = o.timing
            row.update(
                images_per_s=t.get("images_per_s"),
                sec_per_image=t.get("sec_per_image"),
                peak_mem_gb=t.get("peak_mem_gb"),
                nfe=o.info.get("nfe"),
                params_m=o.info.get("params_m"),
                trainable_params_m=o.info.get("trainable_params_m"),
                weights_sha256=o.info.get("weights_sha256"),
                n_timed=t.get("n_timed"),
                final_batch_size=t.get("final_batch_size"),
                oom_halvings=t.get("oom_halvings"),
            )
        if name == DS.REFERENCE and o.status == "ok":
            row["status"] = "reference"  # shown, never ranked (the report ranks status "ok" rows only)
        rows.append(row)
        outcomes.append(o)
        say(f"  -> {o.status}{': ' + o.reason if o.reason else ''}")

    lb.write_leaderboard(cfg.out, rows, metric_names)
    lb.write_per_image(cfg.out, per_image_rows, [n for n in metric_names if M.get(n).level == "image"])
    manifest = wcache.load_manifest()
    weights_hashes = {}
    for n in runnable_metrics:
        for k in M.get(n).weights:
            c = wcache.check(k, manifest)
            weights_hashes[k] = {
                "file": manifest[k].file,
                "path": str(c.path),
                "sha256": c.sha256,
                "verified": c.verified,
            }
    for o in outcomes:
        if o.info.get("weights"):
            weights_hashes[f"method:{o.method}"] = {"path": o.info["weights"], "sha256": o.info["weights_sha256"]}

    def metric_status(n: str) -> dict[str, Any]:
        if n in skipped_metrics:
            return {"status": "skipped", "reason": skipped_metrics[n]}
        if n in failures:
            return {
                "status": "failed",
                "reason": "; ".join(f"{k}: {why}" for k, why in failures[n].items()),
                "failed_for": failures[n],
            }
        return {"status": "ok"}

    info = {
        "started": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": cfg.command or lb.command_line(),
        "versions": lb.package_versions(),
        "git": lb.git_info(),
        "device": lb.device_info(device),
        "precision": ctx.precision,
        "fast_sampling": {"requested": cfg.fast, **fast_options.as_record()},
        "seeds": {"seed": cfg.seed, "generator": SEED_RULE, "derangement_seed": cfg.seed},
        "dataset": dataset_identity(layout),
        "split": cfg.split,
        "n_images": len(ids),
        "ids": ids,
        "crop_border": cfg.crop_border,
        "batch_size": cfg.batch_size,
        "metrics": {
            n: {
                "direction": M.get(n).direction,
                "level": M.get(n).level,
                "definition": M.get(n).describe(cfg.crop_border, len(ids)),
                "weights": list(M.get(n).weights),
                **metric_status(n),
            }
            for n in metric_names
        },
        "metrics_skipped": skipped_metrics,
        "metrics_failed": failures,
        "definitions": {"timing": TIMING_DEFINITION, "image_metric_mean": AGGREGATION_DEFINITION},
        "methods": {
            f"{o.method}|{o.condition}": {"status": o.status, "reason": o.reason, "timing": o.timing, **o.info}
            for o in outcomes
        },
        "methods_skipped": skipped_methods,
        "conditions": conditions,
        "sweep": cfg.sweep,
        "configs": {n: (str(v) if not isinstance(v, dict) else v) for n, v in cfg.configs.items()},
        "weights": weights_hashes,
        "downstream": scorers[DS.SCORER].record,
    }
    lb.write_run_json(cfg.out, info)
    return info
