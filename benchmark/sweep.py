"""Quality versus NFE: `cmsrd-bench run --sweep "nfe=5,10,20,50"` expands into method x condition pairs.

Each diffusion method that takes `steps=` gets, per NFE value n, a pure-noise point (`steps=n,start=noise`,
or `steps=n` where it has no `start` condition) and, where it takes `start=`, an LR-start point at its LR start
timestep T (`MethodSpec.extra["lr_start_t"]`, 400 if unset; `--sweep "nfe=...;start=lr@T"` overrides). How its
sampler places steps below T decides the condition (`extra["lr_start"]`, see `baselines.diffusion.sampling`):
- `respace` (csdiff): `steps=n,start=lr@T`, NFE n exactly; n must be <= T;
- `truncate` (SGDM): the smallest `steps=s` whose grid (default config's sampler) keeps n timesteps <= T.
Each point is combined with every `--conditions` entry (`style=gt` stays on every SGDM+ point; their own
steps/start give way to the sweep's). Methods that are not diffusion, or take no `steps=` (resshift's fixed
chain), keep the run's `--conditions` and are drawn as flat reference lines; a sweep with no method to sweep,
or a value out of range, is one InputError naming the condition and the valid range.
Every pair (swept or from `--conditions`) has its steps/start checked here, before any inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from baselines import registry
from baselines.conditions import Conditions
from cmsrd.errors import InputError

DEFAULT_LR_START_T = 400


@dataclass(frozen=True)
class Sweep:
    nfe: tuple[int, ...]
    start_t: int | None = None  # LR start timestep for every method (None: each method's own)
    text: str = ""


def parse_sweep(text: str) -> Sweep:
    """`"nfe=5,10,20"` or `"nfe=5,10,20;start=lr@300"` -> Sweep."""
    nfe: tuple[int, ...] | None = None
    start_t = None
    for part in (p.strip() for p in text.split(";")):
        key, sep, value = part.partition("=")
        if key == "nfe" and sep:
            items = [v.strip() for v in value.split(",") if v.strip()]
            if not items or not all(v.isdigit() and int(v) >= 1 for v in items):
                raise InputError(f"--sweep {text}", "nfe= needs positive integers", 'e.g. --sweep "nfe=5,10,20,50"')
            nfe = tuple(dict.fromkeys(int(v) for v in items))
        elif key == "start" and value.startswith("lr@") and value[3:].isdigit():
            start_t = int(value[3:])
        else:
            raise InputError(
                f"--sweep {text}", f"cannot read {part!r}", 'use "nfe=5,10,20,50" or "nfe=5,10,20;start=lr@300"'
            )
    if nfe is None:
        raise InputError(f"--sweep {text}", "has no nfe= list", 'e.g. --sweep "nfe=5,10,20,50"')
    return Sweep(nfe, start_t, text)


def sweepable(spec: registry.MethodSpec) -> bool:
    return spec.kind == "diffusion" and "steps" in spec.conditions


def _sampler_name(spec: registry.MethodSpec) -> str:
    return str((spec.default_config().get("sampler") or {}).get("name", "ddpm"))


def _truncated_steps(spec: registry.MethodSpec, n: int, start_t: int) -> int | None:
    """The smallest step count whose grid keeps exactly n timesteps <= start_t (None when there is none)."""
    from baselines.diffusion import lr_start_nfe

    sampler = _sampler_name(spec)
    for s in range(max(n, int(0.9 * n * 999 / max(start_t, 1))), 1001):
        if _keeps_any(sampler, s, start_t) and lr_start_nfe(sampler, s, start_t, "truncate") == n:
            return s
    return None


def _keeps_any(sampler: str, steps: int, start_t: int) -> bool:
    from baselines.diffusion import make_scheduler

    return bool((make_scheduler(sampler, steps).timesteps <= start_t).any())


def method_conditions(name: str, sweep: Sweep) -> list[str]:
    """The condition strings of one diffusion method's sweep (noise start first, then the LR start)."""
    spec = registry.get(name)
    mode = spec.extra.get("lr_start", "truncate")
    start_t = sweep.start_t if sweep.start_t is not None else int(spec.extra.get("lr_start_t", DEFAULT_LR_START_T))
    noise, lr = [], []
    for n in sweep.nfe:
        if n > 1000:
            raise InputError(f"--sweep nfe={n} ({name}: steps={n})", "valid: steps=1..1000 on the 1000-step schedule")
        noise.append(f"steps={n},start=noise" if "start" in spec.conditions else f"steps={n}")
        if "start" not in spec.conditions:
            continue
        if mode == "respace":
            lr.append(f"steps={n},start=lr@{start_t}")
            continue
        steps = _truncated_steps(spec, n, start_t) if 0 <= start_t <= 999 else None
        if steps is None:
            raise InputError(
                f"--sweep nfe={n} ({name}: start=lr@{start_t})",
                f"no steps=1..1000 keeps exactly {n} timesteps <= {start_t} of its {_sampler_name(spec)} grid",
                "use smaller nfe values or a later start (--sweep 'nfe=...;start=lr@T')",
            )
        lr.append(f"steps={steps},start=lr@{start_t}")
    return noise + lr


def check_condition(name: str, cond_text: str) -> None:
    """Refuse, before any inference, steps/start values a diffusion method cannot run (one InputError)."""
    from baselines.diffusion import check_lr_start, make_scheduler

    if name not in registry.names():  # the HR reference row (downstream agreement) is no registry method
        return
    spec = registry.get(name)
    cond = Conditions.parse(cond_text)
    if spec.kind != "diffusion" or not ({"steps", "start"} & cond.keys_used) or not sweepable(spec):
        return
    steps = cond.steps or spec.nfe
    try:
        make_scheduler("ddpm", steps)
        if cond.start_t is not None:
            check_lr_start(steps, cond.start_t, spec.extra.get("lr_start", "truncate"))
    except InputError as e:
        raise InputError(f"{name} [{cond.name}]: {e.what}", e.problem, e.fix) from None


def plan_pairs(methods: Sequence[str], conditions: Sequence[str], sweep: str | None) -> list[tuple[str, str]]:
    """(method, condition) pairs of a run: `--conditions` for every method, or the sweep's for diffusion ones."""
    if not sweep:
        pairs = [(name, cond) for name in methods for cond in conditions]
    else:
        sw = parse_sweep(sweep)
        swept = [n for n in methods if sweepable(registry.get(n))]
        if not swept:
            kinds = ", ".join(f"{n} ({registry.get(n).kind})" for n in methods)
            diffusion = [n for n in registry.names() if sweepable(registry.get(n))]
            raise InputError(
                f"--sweep {sweep}",
                f"needs a diffusion method with a steps= condition; this run has {kinds}",
                f"add one of {diffusion} to --methods (non-diffusion methods then run once as references)",
            )
        pairs = []
        for name in methods:
            if name not in swept:
                pairs += [(name, c) for c in conditions]
                continue
            for base in conditions:  # e.g. --conditions style=gt: every point keeps style=gt
                for c in method_conditions(name, sw):
                    pairs.append((name, Conditions.parse(c if base == "default" else f"{base},{c}").name))
    for name, cond in pairs:
        check_condition(name, cond)
    return pairs
