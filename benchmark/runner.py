"""Benchmark runner: registry methods x conditions over one split of a built dataset, timed and scored.

For each method and condition it builds the method from the registry, loads its weights, super-resolves
the split in batches (autocast bf16/fp16 on GPU, seeded generators), saves the SR PNGs, then scores the
saved PNGs (so metrics see exactly the published bytes). Timing is honest: one untimed warm-up batch,
CUDA synchronisation around every timed forward, images/s and seconds/image over model time only, peak
GPU memory, NFE. A killed run resumes: images already written are not redone, finished method x
condition pairs are not rebuilt. One method failing (missing weights, unsupported condition, out of
memory even at batch size 1, any exception) is recorded with its reason and the others continue.

A method is built from its default config (`baselines/configs/<name>.yaml`), the `network` geometry a
checkpoint of our trainer records, and the user's `--config NAME=YAML`, in that order of precedence
(later wins) with one rule: the user may not change a geometry value the checkpoint records (the weights
would not fit; that pair fails with the conflicting keys named) - only where the frozen parts come from
(`LOCATION_KEYS`: `pretrained`, `tokenizer`), so an SD2.1 backbone path on this machine can replace the
one recorded at training time. The file, its sha256 and the merged override go into run.json.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from baselines import registry
from baselines import weights as wcache
from baselines.checkpoint import read_metadata
from baselines.conditions import Conditions, UnsupportedCondition, apply_conditions, partners
from cmsrd.errors import InputError, MissingWeightsError
from cmsrd.io import atomic_write_text, read_png, sha256_file, write_png
from cmsrd.layout import DatasetLayout, read_dataset_json

from . import leaderboard as lb
from . import metrics as M

log = logging.getLogger(__name__)

INFERENCE_JSON = "inference.json"
ALL_AVAILABLE = "all-available"


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


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}", "CUDA is not available on this machine", "use --device cpu or auto")
    return device


def autocast_dtype(device: str, precision: str) -> torch.dtype | None:
    """dtype for torch.autocast, or None for full fp32. `auto`: bf16 on GPUs that have it, else fp16; fp32 on CPU."""
    if precision == "fp32" or (precision == "auto" and not device.startswith("cuda")):
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    raise InputError(f"--precision {precision}", "unknown", "use auto, fp32, bf16 or fp16")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


# ---- method weights --------------------------------------------------------------------------------


def method_weights(name: str, spec: registry.MethodSpec, scale: int, given: dict[str, Path]) -> Path | None:
    """Weights file for a method: `--weights name=PATH`, else the manifest entry for (method, scale),
    else none for interpolation methods. Raises MissingWeightsError / InputError otherwise."""
    if name in given:
        path = Path(given[name]).expanduser()
        if not path.is_file():
            raise InputError(f"--weights {name}={path}", "file not found", "give the path of a checkpoint file")
        return path
    key = wcache.method_weights_key(name, scale)
    if key is not None:
        return wcache.resolve(key)
    if spec.kind == "interp":
        return None
    raise InputError(f"method {name!r}", f"needs trained x{scale} weights and none were given",
                     f"pass --weights {name}=PATH (train with `cmsrd-bench train {name}`)")


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
        raise InputError(f"--config {name}", "changes the network geometry the checkpoint was trained with: " + "; ".join(conflicts),
                         f"drop those keys (only {sorted(LOCATION_KEYS)} may differ), or give the checkpoint that matches the config")
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


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().clamp_(0, 1).mul_(255).round_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def infer(method: Any, cond: Conditions, layout: DatasetLayout, split: str, ids: Sequence[str], todo: Sequence[str],
          out_dir: Path, device: str, batch_size: int, amp: torch.dtype | None, seed: int, warmup: bool,
          partner: dict[str, str]) -> dict[str, Any]:
    """Super-resolve `todo` ids, write PNGs, return timing. Halves the batch on OOM down to 1."""
    from baselines.inference import super_resolve_batch
    from cmsrd.data import CMSRDDataset

    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp]
    if not todo:
        return {"n_timed": 0, "model_seconds": 0.0, "wall_seconds": 0.0, "images_per_s": None, "sec_per_image": None,
                "peak_mem_gb": None, "final_batch_size": batch_size, "autocast": str(amp).replace("torch.", "") if amp else "fp32"}
    inputs = ["lr", "sr", "map"] + (["hr"] if cond.style in ("gt",) else [])
    ds = CMSRDDataset(layout.root, split, inputs=inputs, ids=list(todo))
    index_of = {sid: i for i, sid in enumerate(ids)}
    is_cuda = device.startswith("cuda")
    if is_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    def collate(items: list[dict]) -> dict[str, Any]:
        b: dict[str, Any] = {"id": [it["id"] for it in items]}
        for k in items[0]:
            if k != "id":
                b[k] = torch.stack([it[k] for it in items])
        return b

    def forward(batch: dict[str, Any]) -> torch.Tensor:
        batch = apply_conditions(batch, cond, layout, split, partner)
        gen = torch.Generator(device=device).manual_seed(seed + index_of[batch["id"][0]])
        # baselines.inference: declared inputs only, autocast, no-grad, output shape check, clamp to [0, 1]
        return super_resolve_batch(method, batch, cond, device, precision, gen)

    bs = max(1, batch_size)
    pos, model_s, n_timed, warmed = 0, 0.0, 0, not warmup
    wall0 = time.perf_counter()
    bar = tqdm(total=len(todo), desc=f"{method.spec.name} [{cond.name}]", unit="img", leave=False)
    while pos < len(todo):
        items = [ds[i] for i in range(pos, min(pos + bs, len(todo)))]
        try:
            if not warmed:  # untimed warm-up (kernel selection, lazy init, caches)
                forward(collate(items))
                _sync(device)
                warmed = True
            _sync(device)
            t0 = time.perf_counter()
            out = forward(collate(items))
            _sync(device)
            model_s += time.perf_counter() - t0
        except Exception as e:
            if is_cuda and _is_oom(e) and bs > 1:
                bs //= 2
                torch.cuda.empty_cache()
                log.warning("%s: out of memory, retrying with batch size %d", method.spec.name, bs)
                continue
            if _is_oom(e):
                raise RuntimeError(f"out of memory even at batch size 1: {e}") from e
            raise
        for sid, arr in zip([it["id"] for it in items], _to_uint8(out)):
            write_png(out_dir / f"{sid}.png", arr)
        n_timed += len(items)
        pos += len(items)
        bar.update(len(items))
    bar.close()
    timing = {
        "n_timed": n_timed, "model_seconds": model_s, "wall_seconds": time.perf_counter() - wall0,
        "images_per_s": (n_timed / model_s) if model_s > 0 else None,
        "sec_per_image": (model_s / n_timed) if n_timed else None,
        "peak_mem_gb": (torch.cuda.max_memory_allocated() / 1e9) if is_cuda else None,
        "final_batch_size": bs, "autocast": str(amp).replace("torch.", "") if amp else "fp32",
    }
    return timing


def run_method_condition(name: str, cond_text: str, cfg: RunConfig, layout: DatasetLayout, ids: Sequence[str],
                         device: str, amp: torch.dtype | None, cache: dict[str, Any]) -> Outcome:
    cond = Conditions.parse(cond_text)
    out_dir = lb.sr_dir(cfg.out, name, cond.name)
    done_file = out_dir / INFERENCE_JSON
    outcome = Outcome(name, cond.name, "ok", n_images=len(ids))
    try:
        spec = registry.get(name)
        cond.check_supported(name, spec.conditions)
        if layout.scale not in spec.scales:
            raise InputError(f"method {name!r}", f"does not support x{layout.scale}", f"it supports {list(spec.scales)}")
        todo = [i for i in ids if not (out_dir / f"{i}.png").exists()]
        prev = json.loads(done_file.read_text()) if done_file.exists() else None
        if not todo and prev is not None:
            outcome.timing, outcome.info = prev["timing"], prev["info"]
            outcome.info["resumed"] = True
            return outcome
        wpath = method_weights(name, spec, layout.scale, cfg.weights)
        # A checkpoint saved by our trainer names its network geometry; build that geometry so a small
        # model trained with a non-default config loads without the user repeating the config. A user
        # config (--config) goes on top, e.g. local backbone/tokenizer paths for the authors' .ckpt.
        network = read_metadata(wpath).get("network") if wpath is not None else None
        user, config_record = load_user_config(name, cfg.configs.get(name))
        override = build_config(name, user, network)
        method = registry.build(name, layout.scale, config=override or None, device=device)
        if wpath is not None:
            method.load_checkpoint(wpath)
        method = method.to(device).eval()
        total, trainable = method.parameter_counts()
        info = {"nfe": method.nfe(cond), "params_m": total / 1e6, "trainable_params_m": trainable / 1e6,
                "weights": str(wpath) if wpath else None, "weights_sha256": sha256_file(wpath) if wpath else None,
                "kind": spec.kind, "license": spec.license, "resumed_images": len(ids) - len(todo),
                "config": {**config_record, "network_from_checkpoint": network, "effective_override": override}}
        part = cache.setdefault("partners", partners(list(ids), cfg.seed))
        timing = infer(method, cond, layout, cfg.split, ids, todo, out_dir, device, cfg.batch_size, amp, cfg.seed,
                       cfg.warmup, part)
        if prev is not None and not timing["n_timed"]:
            timing = prev["timing"]
        outcome.timing, outcome.info = timing, info
        atomic_write_text(done_file, json.dumps({"timing": timing, "info": info}, indent=2, default=str))
        del method
        if device.startswith("cuda"):
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
                lines.append(f"  {n}: {e.file} {c.status} -> {e.expected_path()} (from {e.source()})")
        raise InputError(
            "metric weights", "missing or corrupt:\n" + "\n".join(lines) + "\n",
            "put the files there (`cmsrd-bench weights fetch` on a machine with network, then copy the cache), "
            "or pass --skip-missing to run without these metrics, or --metrics to choose others",
        )
    skipped = {n: "; ".join(f"{manifest[c.key].file} {c.status}" for c in bad) for n, bad in problems.items()}
    return [n for n in names if n not in problems], skipped


def score(outcome: Outcome, cfg: RunConfig, layout: DatasetLayout, ids: Sequence[str], metric_names: Sequence[str],
          device: str, scorers: dict[str, Any], metric_errors: dict[str, str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Image-level metrics per image (averaged for the row) and set-level metrics on the saved PNGs."""
    d = lb.sr_dir(cfg.out, outcome.method, outcome.condition)
    sr = [read_png(d / f"{i}.png") for i in ids]
    hr = [read_png(layout.image_path(cfg.split, "hr", i)) for i in ids]
    per_image = [{"method": outcome.method, "condition": outcome.condition, "split": cfg.split, "id": i} for i in ids]
    row: dict[str, Any] = {}
    for name in metric_names:
        m = M.get(name)
        if m.level != "image" or name in metric_errors:
            continue
        try:
            if name not in scorers:
                scorers[name] = M.build_image_metric(name, device=device, crop_border=cfg.crop_border)
            vals = scorers[name](sr, hr)
        except Exception as e:
            log.exception("metric %s failed", name)
            metric_errors[name] = f"{type(e).__name__}: {e}"
            continue
        for r, v in zip(per_image, vals):
            r[name] = v
        finite = [v for v in vals if np.isfinite(v)]
        row[name] = float(np.mean(finite)) if finite else float("inf")
    set_names = [n for n in metric_names if M.get(n).level == "set" and n not in metric_errors]
    if set_names:
        try:
            res = M.compute_set_metrics(set_names, sr, hr, device=device)
            row.update({k: v for k, v in res.items() if k in set_names})
            outcome.info["set_metric_settings"] = {k: v for k, v in res.items() if k not in set_names}
        except Exception as e:
            log.exception("set metrics failed")
            for n in set_names:
                outcome.info.setdefault("metric_errors", {})[n] = f"{type(e).__name__}: {e}"
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
    return {"root": str(layout.root), "name": meta.get("name"), "version": meta.get("version"), "scale": layout.scale,
            "hr_px": layout.hr_px, "lr_px": layout.lr_px,
            "manifest_sha256": sha256_file(layout.manifest_parquet) if layout.manifest_parquet.exists() else None}


def run_benchmark(cfg: RunConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run everything `cfg` asks for and write leaderboard.csv, per_image.csv and run.json into `cfg.out`."""
    from cmsrd.data import CMSRDDataset

    say = progress or (lambda s: None)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    cfg.out = Path(cfg.out)
    cfg.out.mkdir(parents=True, exist_ok=True)
    layout = DatasetLayout.open(cfg.data)
    device = pick_device(cfg.device)
    amp = autocast_dtype(device, cfg.precision)
    if cfg.crop_border < 0:
        raise InputError(f"--crop-border {cfg.crop_border}", "must be >= 0")
    ids = list(CMSRDDataset(layout.root, cfg.split, inputs=("hr",)).ids)
    if cfg.limit:
        ids = ids[: cfg.limit]

    metric_names = M.parse_names(cfg.metrics)
    runnable_metrics, skipped_metrics = check_metric_weights(metric_names, cfg.skip_missing)

    skipped_methods: dict[str, str] = {}
    if isinstance(cfg.methods, str) and cfg.methods == ALL_AVAILABLE or list(cfg.methods) == [ALL_AVAILABLE]:
        methods, skipped_methods = available_methods(layout.scale, cfg.weights)
    else:
        methods = list(cfg.methods)
    if not methods:
        raise InputError("--methods", "no runnable method", "pass --methods NAME or provide weights with --weights NAME=PATH")
    conditions = [Conditions.parse(c).name for c in cfg.conditions] or ["default"]
    for name, source in cfg.configs.items():  # typos and unreadable files fail once, before any method runs
        if name not in methods:
            raise InputError(f"--config {name}=...", f"names no method of this run ({', '.join(methods)})", "use NAME=YAML with a method in --methods")
        load_user_config(name, source)

    rows, per_image_rows, outcomes = [], [], []
    scorers: dict[str, Any] = {}
    metric_errors: dict[str, str] = {}
    for name in methods:
        for cond in dict.fromkeys(conditions):
            say(f"{name} [{cond}]")
            o = run_method_condition(name, cond, cfg, layout, ids, device, amp, {})
            row = {"method": name, "condition": o.condition, "split": cfg.split, "n_images": len(ids) if o.status == "ok" else 0,
                   "scale": layout.scale, "status": o.status, "reason": o.reason}
            if o.status == "ok":
                values, per_image = score(o, cfg, layout, ids, runnable_metrics, device, scorers, metric_errors)
                row.update(values)
                per_image_rows += per_image
                t = o.timing
                row.update(images_per_s=t.get("images_per_s"), sec_per_image=t.get("sec_per_image"), peak_mem_gb=t.get("peak_mem_gb"),
                           nfe=o.info.get("nfe"), params_m=o.info.get("params_m"), trainable_params_m=o.info.get("trainable_params_m"),
                           weights_sha256=o.info.get("weights_sha256"))
            rows.append(row)
            outcomes.append(o)
            say(f"  -> {o.status}{': ' + o.reason if o.reason else ''}")

    for n, err in metric_errors.items():
        skipped_metrics[n] = f"failed: {err}"
    lb.write_leaderboard(cfg.out, rows, metric_names)
    lb.write_per_image(cfg.out, per_image_rows, [n for n in metric_names if M.get(n).level == "image"])
    manifest = wcache.load_manifest()
    weights_hashes = {}
    for n in runnable_metrics:
        for k in M.get(n).weights:
            c = wcache.check(k, manifest)
            weights_hashes[k] = {"file": manifest[k].file, "path": str(c.path), "sha256": c.sha256, "verified": c.verified}
    for o in outcomes:
        if o.info.get("weights"):
            weights_hashes[f"method:{o.method}"] = {"path": o.info["weights"], "sha256": o.info["weights_sha256"]}
    info = {
        "started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": cfg.command or lb.command_line(),
        "versions": lb.package_versions(), "git": lb.git_info(), "device": lb.device_info(device),
        "precision": str(amp).replace("torch.", "") if amp else "fp32",
        "seeds": {"seed": cfg.seed, "generator": "one torch.Generator per batch, seeded with seed + index of the batch's first image",
                  "derangement_seed": cfg.seed},
        "dataset": dataset_identity(layout), "split": cfg.split, "n_images": len(ids), "ids": ids,
        "crop_border": cfg.crop_border, "batch_size": cfg.batch_size,
        "metrics": {n: {"direction": M.get(n).direction, "level": M.get(n).level, "definition": M.get(n).describe(cfg.crop_border),
                        "weights": list(M.get(n).weights), "status": "skipped" if n in skipped_metrics else "ok",
                        **({"reason": skipped_metrics[n]} if n in skipped_metrics else {})} for n in metric_names},
        "metrics_skipped": skipped_metrics,
        "methods": {f"{o.method}|{o.condition}": {"status": o.status, "reason": o.reason, "timing": o.timing, **o.info} for o in outcomes},
        "methods_skipped": skipped_methods,
        "conditions": conditions,
        "configs": {n: (str(v) if not isinstance(v, dict) else v) for n, v in cfg.configs.items()},
        "weights": weights_hashes,
    }
    lb.write_run_json(cfg.out, info)
    return info
