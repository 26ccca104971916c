"""Benchmark conditions: parsing, canonical names, support checks, derangements."""

from __future__ import annotations

import numpy as np
import pytest

from baselines.conditions import Conditions, UnsupportedCondition, derangement
from cmsrd.errors import InputError


def test_parse_and_name_round_trip():
    c = Conditions.parse("map=shuffle, style=sample,steps=20,start=lr@400")
    assert (c.map, c.style, c.steps, c.start_t) == ("shuffle", "sample", 20, 400)
    assert Conditions.parse(c.name) == c
    assert Conditions.parse("default") == Conditions() and Conditions().name == "default"
    assert c.keys_used == {"map", "style", "steps", "start"}


@pytest.mark.parametrize("bad", ["map=maybe", "steps=0", "steps=x", "start=400", "start=lr@x", "colour=red", "map"])
def test_bad_conditions_are_clear_errors(bad):
    with pytest.raises(InputError):
        Conditions.parse(bad)


def test_unsupported_condition_is_reported_not_ignored():
    c = Conditions.parse("map=shuffle")
    c.check_supported("sgdm", ("map", "style"))
    with pytest.raises(UnsupportedCondition, match="esrgan.*map"):
        c.check_supported("esrgan", ())


def test_derangement_has_no_fixed_point_and_is_seeded():
    for n in (2, 3, 10, 57):
        p = derangement(n, seed=1)
        assert sorted(p) == list(range(n)) and not np.any(p == np.arange(n))
    assert np.array_equal(derangement(20, 3), derangement(20, 3))
