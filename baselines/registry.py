"""Name -> SR method. Spec modules register methods when imported (BasicSR's pattern).

Specs are plain data in light modules (`METHOD_MODULES`), so listing methods imports no torch; the class is
imported on `build` (`resolve_class`).
Method configs are YAML (`baselines/configs/<name>.yaml`): `network: {type: ArchName, ...kwargs}`
selects an architecture from `ARCHS` and passes the rest to its constructor, as in BasicSR.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cmsrd.errors import InputError, unknown_name

CONFIG_DIR = Path(__file__).parent / "configs"

KINDS = ("interp", "regression", "gan", "diffusion")
INPUTS = ("lr", "sr", "map", "style")
CONDITION_KEYS = ("map", "style", "steps", "start")

# Light modules that register method specs (plain data, no torch import: `cmsrd-bench list` and name checks
# import only these); imported by `load_all()`. The class a spec's `target` names is imported by `build`.
# Add a method by adding its spec to `baselines.specs`, or a package whose `__init__` only registers its spec.
METHOD_MODULES = [
    "baselines.specs",  # bicubic, esrgan, swinir, ttst, ediffsr
    "baselines.sgdm",
    "baselines.resshift",
    "baselines.ldm",
    "baselines.ldm_sr",
    "baselines.csdiff",
]


@dataclass(frozen=True)
class MethodSpec:
    """What the benchmark and users need to know about a method without building it."""

    name: str
    target: str  # "module:Class" of the SRMethod subclass
    kind: str  # interp | regression | gan | diffusion
    scales: tuple[int, ...]
    inputs: tuple[str, ...]  # dataset inputs it consumes: lr, sr, map, style
    nfe: int  # network function evaluations per image at default settings (0 for interpolation)
    license: str  # licence of the original work
    citation: str
    conditions: tuple[str, ...] = ()  # runner condition keys it supports
    config: str | None = None  # default YAML under baselines/configs/
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind {self.kind!r} not in {KINDS}")
        if set(self.inputs) - set(INPUTS):
            raise ValueError(f"{self.name}: inputs {self.inputs} not within {INPUTS}")
        if set(self.conditions) - set(CONDITION_KEYS):
            raise ValueError(f"{self.name}: conditions {self.conditions} not within {CONDITION_KEYS}")

    def default_config(self) -> dict[str, Any]:
        if not self.config:
            return {}
        return load_yaml(CONFIG_DIR / self.config)


_METHODS: dict[str, MethodSpec] = {}
ARCHS: dict[str, Callable[..., Any]] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _METHODS and _METHODS[spec.name] != spec:
        raise ValueError(f"method {spec.name!r} registered twice")
    _METHODS[spec.name] = spec
    return spec


@contextlib.contextmanager
def registered(*specs: MethodSpec) -> Iterator[None]:
    """Register `specs` for the duration of the block, then remove them: tests add methods without
    leaving them in the registry for whatever runs next."""
    load_all()  # the built-in methods first, so a clash with one is caught here
    added: list[str] = []
    try:
        for spec in specs:
            new = spec.name not in _METHODS
            register(spec)
            if new:
                added.append(spec.name)
        yield
    finally:
        for name in added:
            _METHODS.pop(name, None)


def register_arch(cls: Callable[..., Any]) -> Callable[..., Any]:
    """Class decorator: make an architecture buildable from `{type: ClassName, ...}`."""
    name = cls.__name__
    if name in ARCHS and ARCHS[name] is not cls:
        raise ValueError(f"architecture {name!r} registered twice")
    ARCHS[name] = cls
    return cls


def build_arch(opt: dict[str, Any]) -> Any:
    """`{type: ArchName, **kwargs}` -> the network. A key the constructor does not take, or a value it
    rejects, is one InputError naming `network.<key>` / the block and the accepted parameters."""
    opt = dict(opt)
    type_ = opt.pop("type", None)
    if type_ not in ARCHS:
        raise InputError(f"network type {type_!r}", f"unknown architecture; known: {sorted(ARCHS)}")
    cls = ARCHS[type_]
    params = inspect.signature(cls).parameters
    accepted = ", ".join(params)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in opt if k not in params]
        if unknown:
            raise unknown_name(f"network.{unknown[0]}", f"is not a parameter of {type_}", unknown[0], params)
    try:
        return cls(**opt)
    except InputError:
        raise
    except (TypeError, ValueError) as e:
        raise InputError(
            f"network ({type_})",
            f"invalid value: {e}",
            f"correct it in the config's `network:` block (parameters of {type_}: {accepted})",
        ) from e


def load_all() -> None:
    for mod in METHOD_MODULES:
        importlib.import_module(mod)


def names() -> list[str]:
    load_all()
    return sorted(_METHODS)


def get(name: str) -> MethodSpec:
    load_all()
    if name not in _METHODS:
        raise InputError(
            f"method {name!r}", "not in the registry", f"choose from {sorted(_METHODS)} (`cmsrd-bench list`)"
        )
    return _METHODS[name]


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise InputError(f"config {path}", "file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise InputError(f"config {path}", f"is not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise InputError(f"config {path}", "top level must be a mapping")
    return data


def merge_config(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `override` into a copy of `base` (dicts merge, everything else replaces).

    A dict whose `type` differs from the base's replaces it whole: another class takes other arguments,
    so switching `scheduler.type` to CosineAnnealingLR must not inherit MultiStepLR's milestones."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        retyped = (
            isinstance(v, dict)
            and isinstance(out.get(k), dict)
            and v.get("type", out[k].get("type")) != out[k].get("type")
        )
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not retyped:
            out[k] = merge_config(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def resolve_class(spec: MethodSpec) -> type:
    module, _, attr = spec.target.partition(":")
    return getattr(importlib.import_module(module), attr)


def build(
    name: str,
    scale: int,
    config: dict[str, Any] | str | Path | None = None,
    device: Any = "cpu",
    load_checkpoint: bool = True,
) -> Any:
    """Build a method with random init (or the frozen pretrained parts its config names).

    `config` may be a dict or a YAML path; it is merged over the method's default config. Its `checkpoint`
    (any method) is loaded after the build unless `load_checkpoint` is False (a resumed training run takes
    its weights from its own checkpoint, and the start file may be gone). A method that reads it while
    building (SGDM: an official .ckpt also carries the backbone, so no separate SD2.1 download is needed)
    has set `loaded_from` and is left as is; `load_checkpoint=False` does not stop such a method reading it.
    """
    spec = get(name)
    if scale not in spec.scales:
        raise InputError(f"scale x{scale}", f"not supported by method {name!r}", f"use one of {list(spec.scales)}")
    cfg = spec.default_config()
    if config is not None:
        override = load_yaml(config) if isinstance(config, (str, Path)) else config
        cfg = merge_config(cfg, override)
    cls = resolve_class(spec)
    method = cls(spec=spec, scale=scale, config=cfg, device=device)
    if load_checkpoint and cfg.get("checkpoint") and str(device) != "meta" and method.loaded_from is None:
        method.load_checkpoint(cfg["checkpoint"])
    return method
