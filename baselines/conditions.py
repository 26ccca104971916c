"""Benchmark conditions (`map=shuffle`, `style=gt`, `steps=20`, `start=lr@400`, ...) parsed and applied once.

The runner resolves data-level conditions here, so methods never see how a shuffled map was chosen:
- `map=gt` (default) keeps the sample's own map; `map=shuffle` gives each sample another sample's map
  (a seeded derangement over the split); `map=none` removes the map from the batch.
- `style=gt` puts the HR into `batch["style"]`; `style=shuffle` puts another sample's HR there;
  `style=sample` leaves no style image: the method samples a style (SGDM's flows) with the generator.
- `steps=N`, `start=lr@t` and `start=noise` (the pure-noise start, for methods whose default is the LR start)
  are sampler settings passed through to diffusion methods.
A method declares which condition keys it supports (`MethodSpec.conditions`); asking for one it does not
support raises `UnsupportedCondition`, so nothing is silently run without it.

`partners` and `apply_conditions` are the one implementation of the data-level conditions, used by the
benchmark runner and by the trainer's validation (`train.val_conditions`), so a validated score and a
benchmarked one see the same inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from cmsrd.errors import InputError

if TYPE_CHECKING:
    import torch

    from cmsrd.layout import DatasetLayout

MAP_VALUES = ("gt", "shuffle", "none")
STYLE_VALUES = ("gt", "shuffle", "sample")


class UnsupportedCondition(InputError):
    pass


@dataclass(frozen=True)
class Conditions:
    map: str = "gt"
    style: str | None = None
    steps: int | None = None
    start_t: int | None = None  # start=lr@t: start from the noised upsampled LR at timestep t
    noise_start: bool = False  # start=noise: start from pure noise even where the method's default is the LR

    @classmethod
    def parse(cls, text: str | None) -> Conditions:
        """`"map=shuffle,steps=20"` -> Conditions. Empty / "default" -> defaults."""
        cond = cls()
        if not text or text == "default":
            return cond
        for part in text.replace(";", ",").split(","):
            part = part.strip()
            if not part:
                continue
            if "=" not in part:
                raise InputError(
                    f"condition {part!r}", "expected key=value", "e.g. map=shuffle, style=gt, steps=20, start=lr@400"
                )
            key, value = (s.strip() for s in part.split("=", 1))
            if key == "map":
                if value not in MAP_VALUES:
                    raise InputError(f"condition map={value}", f"unknown value; use one of {MAP_VALUES}")
                cond = replace(cond, map=value)
            elif key == "style":
                if value not in STYLE_VALUES:
                    raise InputError(f"condition style={value}", f"unknown value; use one of {STYLE_VALUES}")
                cond = replace(cond, style=value)
            elif key == "steps":
                if not value.isdigit() or int(value) < 1:
                    raise InputError(f"condition steps={value}", "must be a positive integer")
                cond = replace(cond, steps=int(value))
            elif key == "start":
                if value == "noise":
                    cond = replace(cond, start_t=None, noise_start=True)
                    continue
                if not value.startswith("lr@") or not value[3:].isdigit():
                    raise InputError(
                        f"condition start={value}",
                        "expected lr@T with an integer timestep T, or noise",
                        "e.g. start=lr@400 or start=noise",
                    )
                cond = replace(cond, start_t=int(value[3:]), noise_start=False)
            else:
                raise InputError(f"condition key {key!r}", "unknown", "use map, style, steps or start")
        return cond

    @property
    def keys_used(self) -> set[str]:
        """Condition keys that differ from the default (what a method must support)."""
        used = set()
        if self.map != "gt":
            used.add("map")
        if self.style is not None:
            used.add("style")
        if self.steps is not None:
            used.add("steps")
        if self.start_t is not None or self.noise_start:
            used.add("start")
        return used

    @property
    def name(self) -> str:
        parts = []
        if self.map != "gt":
            parts.append(f"map={self.map}")
        if self.style is not None:
            parts.append(f"style={self.style}")
        if self.steps is not None:
            parts.append(f"steps={self.steps}")
        if self.start_t is not None:
            parts.append(f"start=lr@{self.start_t}")
        if self.noise_start:
            parts.append("start=noise")
        return ",".join(parts) or "default"

    def check_supported(self, method_name: str, supported: tuple[str, ...]) -> None:
        missing = self.keys_used - set(supported)
        if missing:
            raise UnsupportedCondition(
                f"method {method_name!r}",
                f"does not support condition(s) {sorted(missing)} (asked: {self.name})",
                f"drop them for this method; it supports {list(supported) or 'no conditions'}",
            )


def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of range(n) with no fixed point (for n >= 2): index i takes partner p[i]."""
    if n < 2:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    while True:
        p = rng.permutation(n)
        if not np.any(p == np.arange(n)):
            return p


def partners(ids: Sequence[str], seed: int) -> dict[str, str]:
    """Seeded derangement over the split: sample i borrows partner p[i]'s map/style (never its own)."""
    p = derangement(len(ids), seed)
    return {ids[i]: ids[int(p[i])] for i in range(len(ids))}


def apply_conditions(
    batch: dict[str, Any], cond: Conditions, layout: DatasetLayout, split: str, partner: dict[str, str]
) -> dict[str, Any]:
    """Resolve map=shuffle|none and style=gt|shuffle on a loaded batch, in place (sampler settings pass
    through). The batch needs `id`, and `hr` for style=gt; `hr` is removed afterwards, so a method never
    sees the HR unless it is the asked-for style (keep a reference first if you score against it)."""
    import torch

    from cmsrd.io import read_png

    def load(kind: str, ids: Sequence[str]) -> torch.Tensor:
        arrs = [read_png(layout.image_path(split, kind, partner[i])) for i in ids]
        return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float().div_(255.0)

    ids = list(batch["id"])
    if cond.map == "shuffle":
        batch["map"] = load("map", ids)
    elif cond.map == "none":
        batch.pop("map", None)
    if cond.style == "gt":
        if "hr" not in batch:
            raise InputError(
                "condition style=gt",
                "the batch has no HR image to use as the style",
                "load the split with the hr input",
            )
        batch["style"] = batch["hr"]
    elif cond.style == "shuffle":
        batch["style"] = load("hr", ids)
    batch.pop("hr", None)
    return batch
