"""`cmsrd.errors.unknown_name`: the one "unknown key/name" error, so a typo reads the same in a dataset
config, a `network:` block and a `train:` block."""

from __future__ import annotations

import pytest

from baselines import registry
from benchmark.train import check_train_keys
from cmsrd.config import _build
from cmsrd.errors import InputError, unknown_name


def test_close_match_in_the_problem_every_name_in_the_fix():
    e = unknown_name("train.btach_size", "is not a key", "btach_size", {"seed", "batch_size"})
    assert str(e) == "train.btach_size: is not a key (did you mean `batch_size`?) (fix: use one of: batch_size, seed)"
    e = unknown_name("x.zzz", "unknown key", "zzz", ["b", "a"])
    assert str(e) == "x.zzz: unknown key (fix: use one of: a, b)"


def test_config_network_and_train_typos_read_the_same():
    from cmsrd.config import QAConfig

    with pytest.raises(InputError) as conf:
        _build(QAConfig, {"max_clod_fraction": 0.1}, "qa")
    with pytest.raises(InputError) as net:
        registry.build("esrgan", 16, {"network": {"num_feats": 8}})
    with pytest.raises(InputError) as tr:
        check_train_keys({"btach_size": 2}, registry.resolve_class(registry.get("esrgan")), "esrgan")
    for e, close in ((conf.value, "max_cloud_fraction"), (net.value, "num_feat"), (tr.value, "batch_size")):
        assert f"(did you mean `{close}`?)" in e.problem and e.fix.startswith("use one of: ")
