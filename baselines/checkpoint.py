"""Weights and resumable training state on disk.

Weights are safetensors (no code runs on load). Foreign checkpoints (`.pth`, `.pt`, `.ckpt`) are read
with `torch.load(weights_only=True)`, so a pickle that would execute code is refused with a clear
error instead of being trusted. The training state (optimizers, schedulers, GradScaler, RNG streams,
step) is one `torch.save` file that also loads with `weights_only=True`, plus a JSON summary; the
model and EMA tensors are safetensors files beside it. A checkpoint folder is written under a
temporary name and renamed into place, so a killed run never leaves a half-written checkpoint.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import random
import re
import shutil
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cmsrd.errors import InputError
from cmsrd.io import atomic_path, atomic_write_text

# What torch.load raises on a cut or damaged file: zip files fail in the zip reader, legacy (pre-1.6) pickles
# cut inside their header in the unpickler (IndexError, struct.error, ValueError).
_CORRUPT = (RuntimeError, EOFError, zipfile.BadZipFile, OSError, IndexError, struct.error, ValueError)

WRAPPER_KEYS = ("params_ema", "params-ema", "params", "state_dict", "model_state_dict", "model", "net", "netG")


def save_weights(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write tensors as safetensors atomically; `metadata` values are stored JSON-encoded."""
    path = Path(path)
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(data, str(tmp), metadata=meta)
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors writes 0600; weights get the mode of every other output
    return path


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON-decoded metadata of one of our safetensors files ({} for other formats)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    if not path.is_file():
        raise InputError(f"checkpoint {path}", "file not found", "check the path")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise InputError(
            f"checkpoint {path}", f"is not a readable safetensors file ({e})", "re-export or re-download it"
        ) from e
    out = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _unwrap(obj: Any, path: Path, param_key: str | None, strip_module: bool = True) -> dict[str, torch.Tensor]:
    """Find the state dict inside common wrappers (BasicSR `params`/`params_ema`, Lightning
    `state_dict`, ...) and strip DataParallel's `module.` prefix."""
    if param_key is not None:
        if not isinstance(obj, dict) or param_key not in obj:
            keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
            raise InputError(
                f"checkpoint {path}",
                f"has no {param_key!r} entry (top level: {keys})",
                "drop the param key or pick one that exists",
            )
        obj = obj[param_key]
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None:
            if len(obj) == 1 and isinstance(next(iter(obj.values())), dict):
                obj = next(iter(obj.values()))
                continue
            raise InputError(
                f"checkpoint {path}",
                f"holds no tensors at top level nor under {list(WRAPPER_KEYS)}",
                "pass a state dict file",
            )
        obj = obj[key]
    if not isinstance(obj, dict):
        raise InputError(
            f"checkpoint {path}",
            f"contains a {type(obj).__name__}, not a state dict",
            "save model.state_dict(), not the model object",
        )
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out[k.removeprefix("module.") if strip_module else k] = v
    return out


def read_state_dict(
    path: str | os.PathLike, param_key: str | None = None, strip_module: bool = True
) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file (safetensors or a weights-only torch pickle), on CPU.
    DataParallel's `module.` prefix is stripped unless `strip_module` is False.

    Raises one `InputError` for a missing, truncated or corrupt file, or a pickle that is not
    weights-only (it could run code)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path}", "file not found", "check the path")
    if path.stat().st_size == 0:
        raise InputError(
            f"checkpoint {path}", "is empty (0 bytes)", "the copy or download was interrupted; fetch it again"
        )
    with open(path, "rb") as f:
        head = f.read(8)
    if not head.startswith((b"PK", b"\x80")):  # neither a torch zip nor a legacy pickle
        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(
                f"checkpoint {path}", f"is truncated or not a valid safetensors file ({e})", "fetch or export it again"
            ) from e
        return (
            _unwrap(state, path, None, strip_module)
            if param_key is None
            else _unwrap({param_key: state}, path, param_key, strip_module)
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e):
            raise InputError(
                f"checkpoint {path}",
                "is a pickle that is not weights-only (it stores code objects, which could run on load)",
                "re-save it as a plain state dict (torch.save(model.state_dict())) or as safetensors "
                "from a trusted environment",
            ) from e
        raise InputError(f"checkpoint {path}", f"is corrupt ({e})", "fetch it again") from e
    except _CORRUPT as e:
        raise InputError(
            f"checkpoint {path}",
            f"is truncated or corrupt ({type(e).__name__}: {str(e)[:120]})",
            "fetch or copy it again",
        ) from e
    return _unwrap(obj, path, param_key, strip_module)


def describe_mismatch(
    expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], limit: int = 6
) -> str | None:
    """None when keys and shapes agree; otherwise which keys are missing/unexpected and which shapes differ."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in got and tuple(got[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts) or None


def foreign_keys(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of `got` that no size of the `expected` network has: unknown even with every number (block
    index, stage) wildcarded. Such keys mean another key layout or architecture, not another size."""
    names = {re.sub(r"\d+", "#", k) for k in expected}
    return [k for k in got if k not in expected and re.sub(r"\d+", "#", k) not in names]


def load_strict(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str, hint: str = "", layouts: str = ""
) -> None:
    """load_state_dict(strict) with one clear error naming the keys/shapes that differ.

    `hint` is the fix for a size or scale mismatch; when the names themselves are foreign (another key
    layout or architecture) the error says so instead, listing `layouts` (the layouts the caller reads)."""
    expected = module.state_dict()
    problem = describe_mismatch(expected, state)
    if not problem:
        module.load_state_dict(state, strict=True)
        return
    if foreign := foreign_keys(expected, state):
        known = f" in one of the key layouts it reads: {layouts}" if layouts else ""
        raise InputError(
            what,
            f"uses parameter names this network has at no size (e.g. {foreign[0]!r}), so it is another architecture "
            f"or a key layout this loader does not know: {problem}",
            f"use a checkpoint of this architecture{known}",
        )
    raise InputError(
        what,
        f"does not match the model: {problem}",
        hint or "use a checkpoint of the same architecture, size and scale as the config",
    )


# ---- what a training run publishes ---------------------------------------------------------------------

EXPORT_FILE = "model.safetensors"  # the weights of the last step (EMA when the method uses it)
BEST_EXPORT_FILE = "model-best.safetensors"  # the best validation so far, with `train.keep_best`


def run_weights(folder: str | Path) -> Path | None:
    """The weights a training run folder publishes: its best-validated export when the run kept one
    (`train.keep_best`, as the official SGDM ModelCheckpoint), else the last; None when it has neither."""
    folder = Path(folder)
    return next((p for p in (folder / BEST_EXPORT_FILE, folder / EXPORT_FILE) if p.is_file()), None)


# ---- resumable training state ------------------------------------------------------------------------

STATE_PT = "train_state.pt"
STATE_JSON = "train_state.json"
MODEL_FILE = "method.safetensors"
EMA_FILE = "ema.safetensors"
LATEST = "latest.txt"


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU + CUDA) generator states in weights-only-loadable types."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], *state["numpy_gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(obj: Any) -> Any:
    """Make scheduler/optimizer states weights-only loadable (e.g. MultiStepLR's Counter -> dict)."""
    if isinstance(obj, collections.Counter):
        return {k: v for k, v in obj.items()}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def restore_scheduler(scheduler: Any, state: Mapping[str, Any]) -> None:
    """load_state_dict, giving back the container types the scheduler uses (Counter milestones)."""
    kinds = {k: type(v) for k, v in scheduler.state_dict().items() if isinstance(v, collections.Counter)}
    scheduler.load_state_dict(dict(state))
    for k, t in kinds.items():
        setattr(scheduler, k, t(getattr(scheduler, k)))


def save_training_checkpoint(
    ckpt_dir: str | os.PathLike,
    step: int,
    method_state: Mapping[str, torch.Tensor],
    ema_state: Mapping[str, torch.Tensor] | None,
    optimizers: Mapping[str, torch.optim.Optimizer],
    schedulers: Mapping[str, Any],
    scaler: Any | None,
    extra: Mapping[str, Any] | None = None,
    keep: int = 0,
) -> Path:
    """Write `<ckpt_dir>/step_<N>/` atomically (temp folder + rename), point `latest.txt` at it, and
    keep only the newest `keep` checkpoint folders (0: keep all)."""
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"step_{step:08d}"
    tmp = ckpt_dir / f".step_{step:08d}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in method_state.items()}, str(tmp / MODEL_FILE))
    if ema_state is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema_state.items()}, str(tmp / EMA_FILE))
    torch.save(
        {
            "step": step,
            "optimizers": {k: _plain(o.state_dict()) for k, o in optimizers.items()},
            "schedulers": {k: _plain(s.state_dict()) for k, s in schedulers.items()},
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_state(),
        },
        tmp / STATE_PT,
    )
    (tmp / STATE_JSON).write_text(json.dumps({"step": step, **(extra or {})}, indent=2, default=str))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(ckpt_dir / LATEST, final.name + "\n")
    if keep > 0:
        done = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The folder `latest.txt` names, or None when there is no completed checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    if not pointer.exists():
        return None
    folder = ckpt_dir / pointer.read_text().strip()
    return folder if (folder / STATE_PT).exists() else None


def load_training_checkpoint(folder: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint folder: {"step", "method", "ema" (or None), "optimizers", "schedulers", "scaler", "rng",
    "extra" (the JSON side-car: method, scale, training seconds, ...)}."""
    folder = Path(folder)
    state = read_state_dict_file(folder / STATE_PT)
    side = folder / STATE_JSON
    state["extra"] = json.loads(side.read_text()) if side.is_file() else {}
    state["method"] = read_state_dict(folder / MODEL_FILE, strip_module=False)
    state["ema"] = read_state_dict(folder / EMA_FILE, strip_module=False) if (folder / EMA_FILE).exists() else None
    return state


def read_state_dict_file(path: Path) -> dict[str, Any]:
    """A training-state pickle loaded weights-only, with the same clear errors as `read_state_dict`."""
    if not path.is_file():
        raise InputError(
            f"training state {path}", "file not found", "point --resume at an output folder with checkpoints"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise InputError(
            f"training state {path}",
            f"is not a weights-only file ({str(e)[:120]})",
            "resume from a checkpoint this toolkit wrote",
        ) from e
    except _CORRUPT as e:
        raise InputError(
            f"training state {path}",
            f"is truncated or corrupt ({type(e).__name__})",
            "resume from an earlier checkpoint folder",
        ) from e
