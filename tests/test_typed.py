"""`cmsrd.typed`, the strict loader of every config: what it accepts and how it refuses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from cmsrd.errors import InputError
from cmsrd.typed import INTERNAL, build, to_dict


@dataclass(frozen=True)
class Step:
    type: Literal["step"] = "step"
    every: int = 10

    def validate(self, where: str) -> None:
        if self.every < 1:
            raise InputError(f"{where}.every", "must be >= 1")


@dataclass(frozen=True)
class Cosine:
    type: Literal["cosine"] = "cosine"
    T_max: int | None = None


@dataclass(frozen=True)
class Run:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    mode: Literal["a", "b"] = "a"
    schedule: Step | Cosine = field(default_factory=Step)
    root: str = field(default="", metadata=INTERNAL)


def test_values_are_typed_and_blocks_picked_by_type():
    run = build(Run, yaml.safe_load("lr: 1e-4\nbetas: [0.9, 0.99]\nschedule: {type: cosine, T_max: 5}"))
    assert run.lr == 1e-4  # YAML 1.1 reads `1e-4` as a string: still a number here
    assert run.betas == (0.9, 0.99) and run.schedule == Cosine(T_max=5)
    assert build(Run, {"schedule": None}).schedule == Step()  # a block left null: defaults of the first type
    assert to_dict(run) == {"lr": 1e-4, "betas": [0.9, 0.99], "mode": "a", "schedule": {"type": "cosine", "T_max": 5}}


@pytest.mark.parametrize(
    "data, match",
    [
        ({"lrr": 1}, r"^lrr: unknown key \(did you mean `lr`\?\)"),
        ({"schedule": {"type": "step", "evry": 2}}, r"^run\.schedule\.evry: unknown key \(did you mean `every`"),
        ({"schedule": {"type": "cosin"}}, r"^run\.schedule\.type: unknown type 'cosin' \(did you mean `cosine`"),
        ({"schedule": {"every": 0}}, r"^run\.schedule\.every: must be >= 1"),  # the block's own check, with its path
        ({"mode": "c"}, r"^run\.mode: unknown value 'c'"),
        ({"betas": [0.9]}, r"^run\.betas: must be a list of 2 values"),
        ({"lr": "fast"}, r"^run\.lr: must be a number"),
        ({"root": "/x"}, r"^run\.root: unknown key"),  # set by the program, never by a config
    ],
)
def test_mistakes_name_the_dotted_key(data, match):
    where = "" if "lrr" in data else "run"
    with pytest.raises(InputError, match=match):
        build(Run, data, where)
