"""The trainer shared by every method (`cmsrd-bench train`).

A method owns its losses and optimizers (`configure_optimizers`, `training_step`); the trainer owns the rest
once, so runs of different methods are comparable: resumable batch order and RNG streams, LR schedules, mixed
precision, accumulation, EMA, checkpoints, step and time budgets, Ctrl-C between whole steps, and validation
through `benchmark.evaluate` (the runner's path, so a validation score is the benchmark's score of those
images). The run folder it writes and the resume rules: README, "Training runs".
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import json
import math
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from baselines.base import SRMethod, TrainContext
from baselines.checkpoint import (
    BEST_EXPORT_FILE,
    EXPORT_FILE,
    latest_checkpoint,
    load_strict,
    load_training_checkpoint,
    restore_scheduler,
    save_training_checkpoint,
    save_weights,
    set_rng_state,
)
from baselines.conditions import Conditions, partners
from baselines.device import autocast_context, resolve_device
from baselines.method_config import (
    TRAINER_KEYS,
    TrainConfig,
    build_scheduler,
    parse_config,
    train_config,
    train_type,
)
from baselines.seeding import SEED_RULE
from cmsrd.errors import InputError, MissingWeightsError, unknown_name
from cmsrd.io import atomic_path, atomic_write_text
from cmsrd.typed import build, to_dict

from . import metrics as M
from .evaluate import SRPass, mean_finite, score_images
from .metrics import get as get_metric

# the trainer's `train.*` defaults as config.yaml records them (one place: `TrainConfig`)
DEFAULTS: dict[str, Any] = to_dict(TrainConfig())
DATASET_KINDS = ("lr", "sr", "map", "mask")
# Config keys a `--resume` may change: how the run is driven and observed, not what it computes.
# `pretrain_network_g` (ESRGAN's GAN stage start) is read only when a run starts, never on resume;
# `val_batch_size` changes no score (one generator per image), so a resume may lower it after an OOM.
RUN_CONTROL_KEYS = frozenset(
    f"train.{k}"
    for k in (
        "max_minutes",
        "log_every",
        "val_every",
        "val_every_minutes",
        "save_every",
        "keep_checkpoints",
        "num_workers",
        "lpips",
        "keep_best",
        "pretrain_network_g",
        "val_batch_size",
    )
)


class _EpochIndexed(torch.utils.data.Dataset):
    """Items addressed by (epoch, index) so the official augmentation varies per epoch even inside
    DataLoader workers (which hold their own copy of the dataset)."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        self.dataset.set_epoch(epoch)
        return self.dataset[index]


class _ResumableBatches(torch.utils.data.Sampler):
    """Infinite batches: epoch e is a permutation seeded by (seed, e), cut into full batches.
    Starting at global batch `start` reproduces exactly the batches an uninterrupted run would see."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0):
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.per_epoch = n // batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        b = self.start
        while True:
            epoch, pos = divmod(b, self.per_epoch)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
            for p in range(pos, self.per_epoch):
                yield [(epoch, i) for i in perm[p * self.batch_size : (p + 1) * self.batch_size]]
                b += 1

    def __len__(self) -> int:  # batches per epoch (the sampler itself never ends)
        return self.per_epoch


class CSVLog:
    """Append-only CSV whose header grows when new columns appear; on resume, rows after the
    resumed step are dropped (they were logged after the checkpoint and will be redone)."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and path.exists():
            with open(path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(float(r["step"])) <= resume_step]
        self.fields: list[str] = list(self.rows[0].keys()) if self.rows else []
        self._rewrite()

    def _rewrite(self) -> None:
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields)
            if self.fields:
                w.writeheader()
                w.writerows(self.rows)

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        new = [k for k in row if k not in self.fields]
        if new or not self.path.exists() or not self.fields:
            self.fields += new
            self._rewrite()
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerow(row)


class _StopRequest:
    """While active (main thread only), Ctrl-C (SIGINT) only sets `requested`; the loop checks it between
    whole steps, so a checkpoint never holds a half-done step. A second Ctrl-C raises KeyboardInterrupt
    at once. The previous handler is put back on exit."""

    def __init__(self) -> None:
        self.requested = False
        self._installed = False
        self._previous: Any = None

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.SIG_DFL)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write(
            "Ctrl-C: stopping after the current step and saving a checkpoint (Ctrl-C again aborts without saving)"
        )


def _ignore_sigint(worker_id: int) -> None:
    """DataLoader workers ignore Ctrl-C: the main process stops the run between steps and ends them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


_ABSENT = "(absent)"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old, new) for every leaf that differs (`(absent)` where a side lacks the key)."""
    a, b = _flatten(old), _flatten(new)
    return {
        k: (a.get(k, _ABSENT), b.get(k, _ABSENT))
        for k in sorted(a.keys() | b.keys())
        if a.get(k, _ABSENT) != b.get(k, _ABSENT)
    }


@contextlib.contextmanager
def _swap_generator(method: SRMethod, module: nn.Module | None) -> Iterator[None]:
    """Temporarily run the method with `module` (the EMA copy) as its `net_g`."""
    if module is None:
        yield
        return
    original = method.net_g
    method.net_g = module
    try:
        yield
    finally:
        method.net_g = original


class Trainer:
    """Train `method` on the built dataset at `data_root`, writing to `out_dir`.

    `max_steps` stops early (the schedules still follow `train.total_steps`), so a later `resume`
    with a larger `max_steps` continues the same run; `max_minutes` (default `train.max_minutes`) stops
    once the run's training time reaches it."""

    def __init__(
        self,
        method: SRMethod,
        data_root: str | Path,
        out_dir: str | Path,
        device: str | torch.device | None = None,
        max_steps: int | None = None,
        resume: bool = False,
        progress: bool = True,
        max_minutes: float | None = None,
    ):
        self.method, self.data_root, self.out_dir = method, Path(data_root), Path(out_dir)
        self.train = train_settings(method)  # typed and checked (the config types hold the checks)
        self.cfg = {**DEFAULTS, **(method.config.get("train") or {})}  # as config.yaml records it
        self.device = resolve_device(device)
        self.total_steps = self.train.total_steps
        self.stop_at = min(self.total_steps, int(max_steps)) if max_steps is not None else self.total_steps
        minutes = max_minutes if max_minutes is not None else self.train.max_minutes
        if minutes is not None and not float(minutes) > 0:
            raise InputError(f"max_minutes {minutes}", "must be a positive number of minutes", "e.g. --max-minutes 5")
        self.budget_s = float(minutes) * 60 if minutes is not None else None
        val_min = self.train.val_every_minutes
        self.val_every_s = float(val_min) * 60 if val_min is not None else None
        self.train_seconds = 0.0  # optimisation time of the whole run (restored on resume)
        self._val_slot = 0  # index of the last val_every_minutes slot reached
        self.resume, self.progress = resume, progress
        self.accumulate = self.train.accumulate
        self.precision = self.train.precision
        self.val_cond = _val_condition(method, self.train.val_conditions)
        self.keep_best = self.train.keep_best
        self.best: dict[str, Any] | None = None  # {"metric", "value", "step"} of the best validation (kept on resume)
        self.step = 0
        self._lpips: Any = None
        self._val_metrics_written = False  # val_metrics.json: written at this process's first validation

    # ---- setup ----------------------------------------------------------------------------------
    def _datasets(self) -> tuple[Any, Any]:
        from cmsrd.data import CMSRDDataset

        inputs = tuple(k for k in DATASET_KINDS if k in self.method.spec.inputs) + ("hr",)
        seed = self.train.seed
        train = CMSRDDataset(self.data_root, "train", inputs=inputs, scale=self.method.scale, augment=True, seed=seed)
        test = CMSRDDataset(self.data_root, "test", inputs=inputs, scale=self.method.scale, augment=False)
        n_val = self.train.val_max_images
        if 0 < n_val < len(test):
            test = CMSRDDataset(self.data_root, "test", inputs=inputs, scale=self.method.scale, ids=test.ids[:n_val])
        return train, test

    def _loader(self, train: Any, batch_size: int, start_batch: int) -> Iterator[dict]:
        sampler = _ResumableBatches(len(train), batch_size, self.train.seed, start_batch)
        workers = self.train.num_workers
        loader = torch.utils.data.DataLoader(
            _EpochIndexed(train),
            batch_sampler=sampler,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            worker_init_fn=_ignore_sigint if workers > 0 else None,
        )
        return iter(loader)

    def _check_out_dir(self) -> None:
        ckpts = self.out_dir / "checkpoints"
        if not self.resume and latest_checkpoint(ckpts) is not None:
            raise InputError(
                f"--out {self.out_dir}",
                "already holds a training run",
                "pass --resume to continue it, or choose a new --out",
            )

    def effective_config(self) -> dict[str, Any]:
        """What config.yaml records: method, scale, the method's config, `train` with the trainer defaults
        filled in (YAML round-tripped, so it compares equal to what is read back)."""
        cfg = {"method": self.method.spec.name, "scale": self.method.scale, **self.method.config, "train": self.cfg}
        return yaml.safe_load(yaml.safe_dump(cfg, sort_keys=False))

    def _check_resume_config(self, config: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Compare with the run's config.yaml; return the run-control changes, refuse any other change
        (the restored optimizer/scheduler state would silently keep the old values)."""
        path = self.out_dir / "config.yaml"
        if not path.is_file():
            return {}
        saved = yaml.safe_load(path.read_text()) or {}
        saved["train"] = {**DEFAULTS, **(saved.get("train") or {})}  # runs recorded before defaults were filled in
        changes = config_changes(saved, config)
        refused = {k: v for k, v in changes.items() if k not in RUN_CONTROL_KEYS}
        if refused:
            listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(refused.items())[:12])
            listed += f"; and {len(refused) - 12} more" if len(refused) > 12 else ""
            raise InputError(
                f"--resume {self.out_dir}",
                f"the config differs from the run's config.yaml: {listed}",
                f"resume with the run's config (e.g. --config {path}), or train the new settings into a new --out; "
                f"only {', '.join(sorted(RUN_CONTROL_KEYS))} may change on resume",
            )
        return changes

    def _record_resume(self, changes: dict[str, tuple[Any, Any]]) -> None:
        """Append one line to resumes.jsonl (rewritten atomically): when, from which step, what changed."""
        path = self.out_dir / "resumes.jsonl"
        record = {
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "step": self.step,
            "max_steps": self.stop_at,
            "max_minutes": self.budget_s / 60 if self.budget_s is not None else None,
            "changed": {k: list(v) for k, v in changes.items()},
        }
        before = path.read_text() if path.is_file() else ""
        atomic_write_text(path, before + json.dumps(record, default=str) + "\n")

    # ---- main loop ------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train until `max_steps`/`total_steps`; returns {"step", "elapsed_s", "weights", "val"}
        (+ "best" with keep_best)."""
        self._check_out_dir()
        resume_from = resume_checkpoint(self.out_dir, self.resume)
        config = self.effective_config()
        changes = self._check_resume_config(config) if resume_from is not None else {}
        if self.keep_best == "lpips":
            self._lpips_metric()  # its weights are needed: fail now, not at the first validation
        self.out_dir.mkdir(parents=True, exist_ok=True)
        method, cfg = self.method, self.train
        train_ds, test_ds = self._datasets()
        batch_size = cfg.batch_size
        if batch_size > len(train_ds):
            tqdm.write(f"train.batch_size {batch_size} > {len(train_ds)} training samples; using {len(train_ds)}")
            batch_size = len(train_ds)
        seed = cfg.seed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

        method.to(self.device).train()
        # `resuming`: the checkpoint will overwrite the weights, so start files (e.g. pretrain_network_g) are not read
        run = {"hr_px": train_ds.layout.hr_px, "resuming": resume_from is not None}
        if method.settings is not None:
            optimizers = method.configure_optimizers(train_config(cfg, **run))
        else:  # a method without a config type reads the mapping
            optimizers = method.configure_optimizers({**self.cfg, **run})
        if not optimizers:
            raise InputError(f"method {method.spec.name!r}", "returned no optimizers", "it has nothing to train")
        method.to(self.device)
        schedulers = {k: build_scheduler(cfg.scheduler, o, self.total_steps) for k, o in optimizers.items()}
        scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        ema = self._make_ema()

        resumed_from, rng = None, None
        if resume_from is not None:
            rng = self._restore(resume_from, optimizers, schedulers, scaler, ema)
            resumed_from = self.step
            self._record_resume(changes)
        if resume_from is None or not (self.out_dir / "config.yaml").is_file():
            atomic_write_text(self.out_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        train_log = CSVLog(self.out_dir / "train_log.csv", resumed_from if resumed_from is not None else 0)
        val_log = CSVLog(self.out_dir / "val_log.csv", resumed_from if resumed_from is not None else 0)

        batches = self._loader(train_ds, batch_size, self.step * self.accumulate)
        if rng is not None:  # after the loader drew its base seed, as the uninterrupted run did at step 0
            set_rng_state(rng)
        autocast = lambda: autocast_context(self.device, self.precision)  # noqa: E731
        window: dict[str, list[float]] = {}
        window_start_s, n_window = self.train_seconds, 0  # images/s over optimisation time only
        last_val: dict[str, Any] = {}
        bar = tqdm(
            total=self.stop_at,
            initial=self.step,
            desc=f"train {method.spec.name} x{method.scale}",
            disable=not self.progress,
        )
        try:
            with _StopRequest() as stop:
                while self.step < self.stop_at and not self._out_of_time():
                    t_step = time.perf_counter()
                    n_window += self._one_step(batches, optimizers, schedulers, scaler, ema, autocast, window)
                    self.train_seconds += time.perf_counter() - t_step
                    bar.update(1)
                    # a whole step is done: from here on a Ctrl-C (stop.requested) saves this step and stops
                    last = self.step == self.stop_at or self._out_of_time()
                    if self.step % cfg.log_every == 0 or last or stop.requested:
                        dt = self.train_seconds - window_start_s
                        row = {
                            "step": self.step,
                            "elapsed_s": round(self.train_seconds, 3),
                            **{f"lr_{k}": o.param_groups[0]["lr"] for k, o in optimizers.items()},
                            **{k: float(np.mean(v)) for k, v in window.items()},
                            "images_per_s": n_window / dt if dt > 0 else float("nan"),
                        }
                        train_log.log(row)
                        bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k.startswith("l_")})
                        window, window_start_s, n_window = {}, self.train_seconds, 0
                    time_due = self._val_time_due()  # evaluated every step: it advances the time slot
                    if self.step % cfg.val_every == 0 or last or time_due:
                        last_val = self.validate(test_ds, ema)
                        val_log.log({"step": self.step, "elapsed_s": round(self.train_seconds, 3), **last_val})
                        if (
                            not self._val_metrics_written
                        ):  # nothing in it changes within a run (LPIPS is settled by validate)
                            self._write_val_metrics(test_ds, ema)
                            self._val_metrics_written = True
                        self._keep_if_best(last_val, ema)
                    interrupted = stop.requested and not last
                    if self.step % cfg.save_every == 0 or last or interrupted:
                        self._save(optimizers, schedulers, scaler, ema)
                    if self._out_of_time():
                        tqdm.write(
                            f"time budget of {self.budget_s / 60:g} min reached at step {self.step}; "
                            "continue with --resume and a larger --max-minutes"
                        )
                    if interrupted:
                        tqdm.write(f"interrupted: checkpoint saved at step {self.step}; continue with --resume")
                        raise KeyboardInterrupt
        finally:
            bar.close()
        return {
            "step": self.step,
            "elapsed_s": round(self.train_seconds, 3),
            "weights": str(self.out_dir / EXPORT_FILE),
            "val": last_val,
            **({"best": dict(self.best, weights=str(self.out_dir / BEST_EXPORT_FILE))} if self.best else {}),
        }

    # ---- pieces ---------------------------------------------------------------------------------
    def _one_step(
        self,
        batches: Iterator[dict],
        optimizers: dict[str, torch.optim.Optimizer],
        schedulers: dict[str, Any],
        scaler: Any,
        ema: AveragedModel | None,
        autocast: Any,
        window: dict[str, list[float]],
    ) -> int:
        """One optimisation step (`accumulate` micro-batches, then scaler, schedules, EMA, `self.step += 1`);
        appends the method's logged scalars to `window` and returns the number of images seen."""
        method, n_images = self.method, 0
        for micro in range(self.accumulate):
            batch = next(batches)
            batch = {
                k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
            }
            ctx = TrainContext(
                self.step, self._backward_fn(optimizers, scaler, boundary=micro == self.accumulate - 1), autocast
            )
            for k, v in method.training_step(batch, ctx).items():
                if not math.isfinite(v) and scaler is None:
                    raise InputError(
                        f"training of {method.spec.name!r}",
                        f"{k} became {v} at step {self.step}",
                        "lower the learning rate, enable train.grad_clip, or use precision fp32",
                    )
                window.setdefault(k, []).append(v)
            n_images += batch["hr"].shape[0]
        if scaler is not None:
            scaler.update()
        for s in schedulers.values():
            s.step()
        if ema is not None:
            self._update_ema(ema)
        self.step += 1
        return n_images

    def _out_of_time(self) -> bool:
        return self.budget_s is not None and self.train_seconds >= self.budget_s

    def _val_time_due(self) -> bool:
        """True at the first step of each new `val_every_minutes` slot of training time (slots reached
        before a resume are not repeated)."""
        if self.val_every_s is None:
            return False
        slot = int(self.train_seconds // self.val_every_s)
        due, self._val_slot = slot > self._val_slot, slot
        return due

    def _backward_fn(self, optimizers: dict[str, torch.optim.Optimizer], scaler: Any, boundary: bool):
        """`TrainContext.backward`: scale for accumulation (and fp16), step + zero the named optimizer at
        the last micro-batch of the step."""
        clip = self.train.grad_clip

        def backward(loss: torch.Tensor, name: str) -> None:
            if name not in optimizers:
                raise KeyError(
                    f"training_step called backward for optimizer {name!r}; "
                    f"configure_optimizers returned {sorted(optimizers)}"
                )
            opt = optimizers[name]
            loss = loss / self.accumulate
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if not boundary:
                return
            if clip:
                if scaler is not None:
                    scaler.unscale_(opt)
                params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(params, float(clip))
            if scaler is not None:
                scaler.step(opt)
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)

        return backward

    def _make_ema(self) -> AveragedModel | None:
        decay = self.train.ema_decay
        net = getattr(self.method, "net_g", None)
        if decay <= 0 or not isinstance(net, nn.Module):
            return None
        return AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)

    def _update_ema(self, ema: AveragedModel) -> None:
        ema.update_parameters(self.method.net_g)
        with torch.no_grad():  # buffers (e.g. BatchNorm statistics) follow the live network
            for b_ema, b in zip(ema.module.buffers(), self.method.net_g.buffers()):
                b_ema.copy_(b)

    @torch.no_grad()
    def validate(self, test_ds: Any, ema: AveragedModel | None = None) -> dict[str, Any]:
        """PSNR-Y (benchmark definition, `val_crop_border`) and LPIPS (when its weights are cached).
        Runs on a forked RNG so validating never changes the training run's random streams."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return self._validate(test_ds, ema)

    def _validate(self, test_ds: Any, ema: AveragedModel | None) -> dict[str, Any]:
        loader = torch.utils.data.DataLoader(test_ds, batch_size=self.train.val_batch_size, shuffle=False)
        crop, seed, ids = self.train.val_crop_border, self.train.seed, list(test_ds.ids)
        psnr_y = {"psnr_y": M.build_image_metric("psnr_y", crop_border=crop)}
        psnrs: list[float] = []
        sr_imgs: list[np.ndarray] = []
        hr_imgs: list[np.ndarray] = []
        t0 = time.perf_counter()
        with _swap_generator(self.method, ema.module if ema is not None else None):
            self.method.to(self.device)
            partner = partners(ids, seed)
            cond, layout, split = self.val_cond, test_ds.layout, test_ds.split
            sr_pass = SRPass(self.method, cond, layout, split, ids, partner, seed, self.device, self.precision)
            for _, sr, hr in sr_pass.images(loader):
                psnrs += score_images(psnr_y, sr, hr)["psnr_y"]
                sr_imgs += list(sr)
                hr_imgs += list(hr)
        self.method.train()
        out: dict[str, Any] = {
            "condition": self.val_cond.name,
            "psnr_y": mean_finite(psnrs)[0],
            "n_images": len(psnrs),
            "crop_border": crop,
            "images_per_s": len(psnrs) / max(time.perf_counter() - t0, 1e-9),
        }
        lp = self._lpips_metric()
        out["lpips"] = (
            mean_finite(score_images({"lpips": lp}, sr_imgs, hr_imgs)["lpips"])[0] if lp is not None else float("nan")
        )
        return out

    def _write_val_metrics(self, test_ds: Any, ema: AveragedModel | None) -> None:
        """val_metrics.json: the definitions behind val_log.csv (the benchmark's own text), so a
        validation curve quoted beside leaderboard numbers says what it measured."""
        crop = self.train.val_crop_border
        lpips = (
            get_metric("lpips").describe()
            if self._lpips not in (None, False)
            else "not computed (train.lpips off or weights not cached)"
        )
        doc = {
            "psnr_y": get_metric("psnr_y").describe(crop),
            "lpips": lpips,
            "crop_border": crop,
            "condition": self.val_cond.name,
            "n_images": len(test_ds),
            "split": test_ds.split,
            "weights": f"EMA (decay {self.cfg['ema_decay']})" if ema is not None else "raw (no EMA)",
            "seed": f"{SEED_RULE}; seed {self.train.seed}",
            "val_batch_size": self.train.val_batch_size,
            "precision": self.precision,
            "images_per_s": (
                "validation images per wall-clock second (data, conditions, method and PSNR; LPIPS excluded)"
            ),
        }
        atomic_write_text(self.out_dir / "val_metrics.json", json.dumps(doc, indent=2) + "\n")

    def _keep_if_best(self, val: dict[str, Any], ema: AveragedModel | None) -> None:
        """With `train.keep_best`, export the weights when the metric improves (direction aware)."""
        if self.keep_best is None:
            return
        value = float(val[self.keep_best])
        higher = get_metric(self.keep_best).direction == "higher"
        if not math.isfinite(value) or (
            self.best is not None and not (value > self.best["value"] if higher else value < self.best["value"])
        ):
            return
        self.best = {"metric": self.keep_best, "value": value, "step": self.step}
        self._export(self.out_dir / BEST_EXPORT_FILE, ema)
        doc = {
            **self.best,
            "elapsed_s": round(self.train_seconds, 3),
            "condition": val["condition"],
            "weights": BEST_EXPORT_FILE,
            "definition": get_metric(self.keep_best).describe(self.train.val_crop_border),
        }
        atomic_write_text(self.out_dir / "best.json", json.dumps(doc, indent=2) + "\n")

    def _lpips_metric(self) -> Any:
        mode = self.train.lpips_mode
        if mode == "off" or self._lpips is False:
            return None
        if self._lpips is None:
            try:
                self._lpips = M.build_image_metric("lpips", device=self.device)
            except MissingWeightsError as e:
                if mode != "auto" or self.keep_best == "lpips":
                    raise
                tqdm.write(f"validation without LPIPS: {e}")
                self._lpips = False
                return None
        return self._lpips

    def _save(self, optimizers: dict, schedulers: dict, scaler: Any, ema: AveragedModel | None) -> None:
        method = self.method
        save_training_checkpoint(
            self.out_dir / "checkpoints",
            self.step,
            resumable_state(method, optimizers),
            ema.state_dict() if ema is not None else None,
            optimizers,
            schedulers,
            scaler,
            extra={
                "method": method.spec.name,
                "scale": method.scale,
                "total_steps": self.total_steps,
                "train_seconds": self.train_seconds,
                "best": self.best,
            },
            keep=self.train.keep_checkpoints,
        )
        self._export(self.out_dir / EXPORT_FILE, ema)

    def _export(self, path: Path, ema: AveragedModel | None) -> None:
        """The weights `method.load_checkpoint` reads (EMA when used), written atomically."""
        method = self.method
        with _swap_generator(method, ema.module if ema is not None else None):
            weights = method.trainable_state_dict()
            meta = {**method.export_metadata(), "step": self.step, "ema": ema is not None}
        save_weights(path, weights, meta)

    def _restore(
        self, folder: Path, optimizers: dict, schedulers: dict, scaler: Any, ema: AveragedModel | None
    ) -> dict[str, Any]:
        """Load weights, optimizer/scheduler/scaler state and the step; return the RNG state to set."""
        state = load_training_checkpoint(folder)
        load_resumable_state(self.method, state["method"], f"checkpoint {folder}")
        if ema is not None:
            if state["ema"] is None:
                raise InputError(
                    f"checkpoint {folder}", "has no EMA weights but train.ema_decay > 0", "resume with the run's config"
                )
            load_strict(ema, state["ema"], f"EMA of checkpoint {folder}")
        for k, o in optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        for k, s in schedulers.items():
            restore_scheduler(s, state["schedulers"][k])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.train_seconds = float(state.get("extra", {}).get("train_seconds", 0.0))
        self._val_slot = int(self.train_seconds // self.val_every_s) if self.val_every_s else 0
        best = state.get("extra", {}).get("best")
        self.best = best if best and best.get("metric") == self.keep_best else None  # keep_best switched: track anew
        on_disk = self.out_dir / "best.json"
        if self.keep_best and on_disk.is_file() and json.loads(on_disk.read_text()).get("step", 0) > self.step:
            tqdm.write(
                f"{on_disk} is from a step after the resumed step {self.step} (that part is trained again); "
                "model-best.safetensors is replaced by the next validation better than the best up to this step"
            )
        tqdm.write(f"resumed from {folder} at step {self.step}")
        return state["rng"]


def resume_checkpoint(out_dir: Path, resume: bool) -> Path | None:
    """The checkpoint a `--resume` continues from (None: the run starts anew). The one rule for both
    `train()` (which then skips `checkpoint:`) and `Trainer.fit` (which restores it), so they cannot disagree."""
    return latest_checkpoint(out_dir / "checkpoints") if resume else None


def check_train_keys(train_cfg: dict[str, Any], method: SRMethod | type[SRMethod], name: str | None = None) -> None:
    """Refuse `train.*` keys neither the trainer (`TrainConfig`) nor the method (its config type's train block)
    reads, and values of the wrong type: a misspelt `btach_size` would otherwise train with the default. `method`
    may be the class, so `train()` can check before building (an SGDM build reads GBs of weights)."""
    name = name or method.spec.name
    problem = f"is not a key of the trainer or of {name}"
    if method.config_type is not None:
        build(train_type(method.config_type), train_cfg, "train", problem)
        return
    accepted = TRAINER_KEYS | method.train_keys  # a method without a config type lists its keys by hand
    for key in train_cfg:
        if key not in accepted:
            raise unknown_name(f"train.{key}", problem, key, accepted)


def check_config(config: dict[str, Any], method: type[SRMethod], name: str) -> None:
    """The whole merged config, before the build: `train.*` first (the message names trainer and method),
    then every other key at any level, top-level ones included (`network_g:` is refused, not ignored)."""
    check_train_keys(config.get("train") or {}, method, name)
    if method.config_type is not None:
        parse_config(method.config_type, config, name)


def train_settings(method: SRMethod) -> TrainConfig:
    """The method's typed train block; for a method without a config type, the trainer's keys of its mapping."""
    if method.settings is not None:
        return method.settings.train
    given = method.config.get("train") or {}
    check_train_keys(given, method)
    return build(TrainConfig, {k: v for k, v in given.items() if k in TRAINER_KEYS}, "train")


def _val_condition(method: SRMethod, text: Any) -> Conditions:
    """`train.val_conditions` parsed and checked against what the method supports."""
    try:
        cond = Conditions.parse(None if text is None else str(text))
        cond.check_supported(method.spec.name, method.spec.conditions)
    except InputError as e:
        raise InputError(
            f"train.val_conditions {text!r}", e.problem, e.fix or "use a condition the method supports, or default"
        ) from e
    return cond


def resumable_state(method: nn.Module, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, torch.Tensor]:
    """What a resume needs: every parameter some optimizer updates, plus all buffers.

    Frozen pretrained parts (SGDM's SD UNet body, VAE, text encoder: ~5 GB) are rebuilt from their own
    weights on resume, so they are not copied into every training checkpoint."""
    optimized = {id(p) for o in optimizers.values() for g in o.param_groups for p in g["params"]}
    keep = {n for n, p in method.named_parameters() if id(p) in optimized} | {n for n, _ in method.named_buffers()}
    return {k: v for k, v in method.state_dict().items() if k in keep}


def load_resumable_state(method: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load a `resumable_state` subset; every saved tensor must find its place with the same shape."""
    own = method.state_dict()
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in state if k in own and tuple(own[k].shape) != tuple(state[k].shape))
    if unexpected or wrong:
        detail = "; ".join(
            filter(
                None,
                [
                    f"unexpected keys {unexpected[:6]}" if unexpected else "",
                    f"shape mismatch {wrong[:6]}" if wrong else "",
                ],
            )
        )
        raise InputError(
            what, f"does not match the model: {detail}", "resume with the same method, config and scale as the run"
        )
    method.load_state_dict(state, strict=False)


def train(
    method_name: str,
    data_root: str | Path,
    out_dir: str | Path,
    scale: int | None = None,
    config: dict[str, Any] | str | Path | None = None,
    max_steps: int | None = None,
    stage: int = 1,
    device: str | None = None,
    resume: bool = False,
    progress: bool = True,
    max_minutes: float | None = None,
) -> dict[str, Any]:
    """Build `method_name` at the dataset's scale and train it (stage 1) or run its stage `stage`."""
    from baselines import registry
    from cmsrd.layout import DatasetLayout

    layout = DatasetLayout.open(data_root)
    if scale is not None and scale != layout.scale:
        raise InputError(
            f"dataset {data_root}",
            f"has scale x{layout.scale} but --scale {scale} was asked for",
            f"use a x{scale} dataset or --scale {layout.scale}",
        )
    spec = registry.get(method_name)
    override = registry.load_yaml(config) if isinstance(config, (str, Path)) else (config or {})
    merged = registry.merge_config(spec.default_config(), override)
    check_config(merged, registry.resolve_class(spec), spec.name)  # every stage, before the (costly) build
    seed = int((merged.get("train") or {}).get("seed", DEFAULTS["seed"]))
    torch.manual_seed(seed)  # random init is part of the run: the same seed gives the same network
    # a resumed run's weights come from its own checkpoint: `checkpoint:` (the start file) is not read again
    resuming = stage == 1 and resume_checkpoint(Path(out_dir), resume) is not None
    method = registry.build(method_name, layout.scale, override, device="cpu", load_checkpoint=not resuming)
    if stage > 1:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stage_cfg = method.settings.train if method.settings is not None else method.config.get("train") or {}
        method.run_stage(stage, Path(data_root), stage_cfg, out)
        return {"stage": stage, "out": str(out)}
    return Trainer(
        method,
        data_root,
        out_dir,
        device=device,
        max_steps=max_steps,
        resume=resume,
        progress=progress,
        max_minutes=max_minutes,
    ).fit()
