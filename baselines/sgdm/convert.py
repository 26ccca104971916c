"""Convert the authors' SGDM checkpoints (PyTorch Lightning, original SD layout) to our modules.

`SGDM-syn.ckpt` / `SGDM-real.ckpt` hold `state_dict` with
- `model.diffusion_model.*`: the ldm UNet -> diffusers `UNet2DConditionModel` keys via diffusers' own
  `convert_ldm_unet_checkpoint` (the SD converter; the UNet is plain SD2.1 with fine-tuned attention);
- `adapter.*`: our `SGDMAdapter` uses the authors' attribute names, so only the prefix is stripped;
- `first_stage_model.*` / `cond_stage_model.*`: SD2.1's VAE and OpenCLIP text tower (see `backbone.py`).
The style flows are separate files (normflows state dicts, same names): the released
`flow_tanh_mini_mean` / `flow_tanh_mini_std` (no extension) or `flow_mean.pt` / `flow_std.pt`.

Everything loads with `weights_only=True`: no pickled code runs. A PyTorch-Lightning 1.4 `.ckpt` also pickles
training metadata (callback states keyed by the callback *class*, omegaconf hyper-parameters); each class or
function it names from a known metadata package is bound to an inert stub for the load and then dropped with
everything but `state_dict`. A checkpoint naming anything else (e.g. `os.system`) is refused.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from cmsrd.errors import InputError

UNET_PREFIX = "model.diffusion_model."
ADAPTER_PREFIX = "adapter."
# flow file pairs looked for next to a checkpoint, in order: the released names (official repo
# `model/Flows/checkpoints/`, README `checkpoints/`), then what the official training script saves
FLOW_FILES = (
    ("flow_tanh_mini_mean", "flow_tanh_mini_std"),
    ("flow_tanh_mini_mean.pt", "flow_tanh_mini_std.pt"),
    ("flow_mean.pt", "flow_std.pt"),
    ("flow_mean", "flow_std"),
)
# Where the classes pickled in Lightning/ldm training metadata live (`model.*`, `ldm.*`: the official repo).
METADATA_MODULES = frozenset(
    {
        "pytorch_lightning",
        "lightning",
        "lightning_fabric",
        "omegaconf",
        "ldm",
        "model",
        "argparse",
        "pathlib",
        "typing",
        "collections",
        "enum",
        "numpy",
    }
)
# builtin types that omegaconf metadata names (`object_type=dict`); never eval/exec/getattr and the like
METADATA_BUILTINS = frozenset(
    f"builtins.{t}" for t in ("dict", "list", "tuple", "int", "float", "str", "bool", "bytes", "frozenset", "object")
)
STATE_FIX = "pass the authors' .ckpt, a flow .pt state dict, or a .safetensors file"


def _extract_fix(path: Path) -> str:
    """What to do with a file whose metadata cannot be loaded safely: extract its weights once where it is trusted
    (a shell-quoted command, valid for any path; plain state dicts work as well as Lightning files)."""
    import shlex

    code = (
        f"import torch; p = {str(path)!r}; o = torch.load(p, weights_only=False); "
        "torch.save(o.get('state_dict', o) if isinstance(o, dict) else o, p + '.weights.pt')"
    )
    return (
        f"in an environment where you trust the file, extract its weights once: python -c {shlex.quote(code)} "
        "(or save that dict with safetensors.torch.save_file) and pass the new file"
    )


class _Inert:
    """Stand-in for a class or function named by checkpoint metadata: creating, calling or restoring it runs
    no code of that package and keeps nothing (only `state_dict` is used)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _metadata_stubs(path: Path) -> list[tuple[type, str]]:
    """(stub class, "module.Name") for every global outside torch's weights-only allowlist, or an InputError
    when one is not training metadata."""
    names = _unsafe_globals(path)
    if names is None:  # damaged or not a pickle: the weights-only load below reports it
        return []
    refused = [n for n in names if n.split(".")[0] not in METADATA_MODULES and n not in METADATA_BUILTINS]
    if refused:
        raise InputError(
            f"checkpoint {path}",
            f"its pickle references {', '.join(refused[:5])}, which is not "
            "checkpoint metadata; refusing to unpickle it",
            "load only the authors' released files, or re-save the weights as .safetensors",
        )
    # each stub carries the real name, so an error naming it names what the file holds
    return [(type(n.rpartition(".")[2], (_Inert,), {"__module__": n.rpartition(".")[0]}), n) for n in names]


def _unsafe_globals(path: Path) -> list[str] | None:
    """The "module.Name" globals the file's pickle names outside torch's weights-only allowlist (nothing is
    executed), or None when the file cannot be scanned."""
    if zipfile.is_zipfile(path):
        try:
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception:  # damaged zip
            return None
    from torch._weights_only_unpickler import _get_allowed_globals

    allowed = _get_allowed_globals()
    names = _legacy_pickle_globals(path)
    return (
        None
        if names is None
        else sorted(n for n in names if n not in allowed and not (n.startswith("torch.") and n.endswith("Storage")))
    )


def _legacy_pickle_globals(path: Path) -> set[str] | None:
    """Every global named by the pickles of a legacy torch.save file (magic, protocol, sys info, the object,
    storage keys; raw storage bytes follow) or of a plain pickle, read with `pickletools.genops`, which runs
    nothing. A STACK_GLOBAL whose strings cannot be followed is named "<unresolved>", so it is refused."""
    import pickletools

    names: set[str] = set()
    with open(path, "rb") as f:
        for i in range(5):
            strings: list[str] = []  # strings pushed so far, for STACK_GLOBAL
            memo: dict[int, str] = {}
            try:
                for op, arg, _ in pickletools.genops(f):
                    if op.name in ("GLOBAL", "INST"):
                        module, _, name = str(arg).partition(" ")
                        names.add(f"{'builtins' if module == '__builtin__' else module}.{name}")
                    elif op.name == "STACK_GLOBAL":
                        names.add(".".join(strings[-2:]) if len(strings) >= 2 else "<unresolved>")
                        strings = []
                    elif isinstance(arg, str) and "UNICODE" in op.name:
                        strings.append(arg)
                    elif op.name in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE") and strings:
                        memo[arg if op.name != "MEMOIZE" else len(memo)] = strings[-1]
                    elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                        strings.append(memo.get(arg, "<unresolved>"))
            except ValueError:  # the raw storage bytes after the last pickle, or not a pickle at all
                return names if i > 0 else None
    return names


def load_torch_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .ckpt/.pt/.pth (Lightning `state_dict` unwrapped) or .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path}", "file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    stubs = _metadata_stubs(path)
    try:
        with torch.serialization.safe_globals(stubs):
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) and _is_torch_file(path):  # weights-only refused part of the pickle
            if not stubs and _unsafe_globals(path) != []:  # unscannable, or names outside metadata and allowlist
                raise InputError(
                    f"checkpoint {path}",
                    f"its pickle cannot be loaded safely ({_unpickler_reason(e)}); refusing to unpickle it",
                    STATE_FIX,
                ) from e
            legacy = "" if zipfile.is_zipfile(path) else " (legacy non-zip torch format)"
            raise InputError(
                f"checkpoint {path}",
                f"holds training metadata this loader cannot rebuild safely{legacy}: {_unpickler_reason(e)}",
                _extract_fix(path),
            ) from e
        # truncated or damaged files, non-torch files
        raise InputError(
            f"checkpoint {path}", f"cannot be read as a tensor state dict ({type(e).__name__}: {e})", STATE_FIX
        ) from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InputError(f"checkpoint {path}", f"holds a {type(state).__name__}, not a state dict", STATE_FIX)
    odd = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise InputError(f"checkpoint {path}", f"its state dict holds non-tensor entries, e.g. {odd[:3]}", STATE_FIX)
    return state


def _is_torch_file(path: Path) -> bool:
    """A torch.save file: a zip, or the legacy format (a pickle: protocol 2+ starts with PROTO 0x80)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def _unpickler_reason(e: Exception) -> str:
    """The one informative sentence of torch's weights-only error (not its advice to set weights_only=False,
    which this loader never does)."""
    text = str(e)
    head, found, tail = text.partition("WeightsUnpickler error:")
    lines = [
        ln.strip()
        for ln in (tail if found else text).split("Check the documentation")[0].splitlines()
        if ln.strip() and "weights_only" not in ln and "Weights only load failed" not in ln
    ]
    return lines[0].split(". Please use")[0] if lines else type(e).__name__


def is_official(state: dict[str, Any]) -> bool:
    return any(k.startswith(UNET_PREFIX) for k in state) and any(k.startswith(ADAPTER_PREFIX) for k in state)


def has_backbone(state: dict[str, Any]) -> bool:
    """An official SGDM checkpoint carrying the whole SD2.1 backbone (UNet, VAE, text tower), as released."""
    return is_official(state) and all(
        any(k.startswith(p) for k in state) for p in ("first_stage_model.", "cond_stage_model.model.")
    )


def detect_variant(state: dict[str, Any]) -> str:
    """'real' (SGDM+), 'simu' (SGDM) or 'simu_nomap' from the adapter keys."""
    if any(k.startswith("adapter.merge_encoder.HR_Style_Encoder.") for k in state):
        return "real"
    if any(k.startswith("adapter.merge_encoder.spade1.") for k in state):
        return "simu"
    if any(k.startswith("adapter.merge_encoder.layer1_sr.") for k in state):
        return "simu_nomap"
    raise InputError("checkpoint", "has no recognisable SGDM adapter (adapter.merge_encoder.*)")


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`SGDMAdapter` keys of an official state (the authors' attribute names: only the prefix goes)."""
    return {k[len(ADAPTER_PREFIX) :]: v for k, v in state.items() if k.startswith(ADAPTER_PREFIX)}


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict that names missing/unexpected/mis-shaped keys in one InputError."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        raise InputError(
            what,
            f"does not match the model: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), shape mismatches {shapes[:3]}",
            "check the checkpoint variant (sgdm / sgdm+ / sgdm-nomap) and backbone geometry",
        )
    module.load_state_dict(state, strict=True)


def find_flow_files(directory: Path) -> tuple[Path, Path] | None:
    """The first (mean, std) pair of `FLOW_FILES` present in `directory`."""
    for mean_name, std_name in FLOW_FILES:
        if (directory / mean_name).is_file() and (directory / std_name).is_file():
            return directory / mean_name, directory / std_name
    return None
