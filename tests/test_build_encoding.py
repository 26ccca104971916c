"""Build throughput changes that must not change results: shared co-registration, the sparse resampling
of the shift fit (equal to the dense one, and independent of the BLAS thread count), the PNG level option,
the HR placeholder bound and the cached resize matrices."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from cmsrd import qa, shiftcache
from cmsrd.align import _Fit
from cmsrd.config import QAConfig, load_config
from cmsrd.degrade import imresize, weight_matrix
from cmsrd.errors import InputError
from cmsrd.io import read_png, write_png


@pytest.mark.parametrize("lr_len", [8, 32, 64])
def test_sparse_row_resampling_equals_the_dense_contraction(lr_len):
    hr = np.random.default_rng(lr_len).integers(0, 256, (256, 40, 3)).astype(np.float64)
    fit = _Fit(np.zeros((lr_len, 40, 3)), hr, 2)
    for offset in np.linspace(-2.5, 2.5, 11):
        my = weight_matrix(256, lr_len, lr_len / 256, True, float(offset))[2:-2]
        dense = np.einsum("rh,hwc->crw", my, hr).reshape(-1, 40)
        np.testing.assert_allclose(fit.rows(float(offset)), dense, rtol=1e-12, atol=1e-9)


_SHIFT_SCRIPT = """
import numpy as np
from cmsrd.align import measure_shift
from cmsrd.degrade import imresize, weight_matrix
for seed in range(1, 4):
    rng = np.random.default_rng(seed)
    hr = np.kron(rng.integers(0, 256, (64, 64, 3)), np.ones((4, 4, 1))) + rng.normal(0, 20, (256, 256, 3))
    hr = hr.clip(0, 255).astype(np.uint8)
    lr = imresize(np.roll(hr, (3, -5), axis=(0, 1)), output_shape=(64, 64)).astype(np.float64)
    lr = (lr[..., ::-1] * 0.7 + 20 + rng.normal(0, 3, lr.shape)).clip(0, 255).astype(np.uint8)
    print(repr(measure_shift(lr, hr, max_shift=3.1531407462622)))  # a co-registration window's bound
"""


def test_measured_shift_is_the_same_whatever_the_blas_thread_count():
    """A dataset must not depend on the machine's core count (dense BLAS products changed shifts by ~1e-7 px
    between 1 and 2 OpenBLAS threads)."""
    import os
    import subprocess
    import sys

    out = []
    for n in ("1", "3"):
        env = dict(os.environ, OPENBLAS_NUM_THREADS=n, OMP_NUM_THREADS=n)
        res = subprocess.run([sys.executable, "-c", _SHIFT_SCRIPT], env=env, capture_output=True, text=True, check=True)
        out.append(res.stdout.strip())
    assert out[0] == out[1] and "Shift(dx=" in out[0]


def test_shared_shift_measures_each_window_once_across_threads_and_processes(tmp_path):
    calls = []

    def measure():
        calls.append(1)
        time.sleep(0.05)  # long enough for every thread to ask while the first measures
        return (0.1, -0.2, 0.3, float("nan"))

    key = ("scene-a", 16, 3, 4)
    got = []
    threads = [
        threading.Thread(target=lambda: got.append(shiftcache.shared_shift(str(tmp_path), key, measure)))
        for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(got) == 6
    shiftcache._MEMORY.clear()  # another worker process: only the file is left
    again = shiftcache.shared_shift(str(tmp_path), key, lambda: pytest.fail("measured twice"))
    assert again[:3] == (0.1, -0.2, 0.3) and np.isnan(again[3])


def test_a_failed_measurement_is_not_stored(tmp_path):
    def fail():
        raise RuntimeError("fetch failed")

    with pytest.raises(RuntimeError):
        shiftcache.shared_shift(str(tmp_path), ("s", 1, 0, 0), fail)
    assert not list(tmp_path.iterdir())
    assert shiftcache.shared_shift(str(tmp_path), ("s", 1, 0, 0), lambda: (1.0, 2.0, 3.0, 4.0)) == (1.0, 2.0, 3.0, 4.0)


def test_png_level_changes_size_not_pixels(tmp_path):
    rng = np.random.default_rng(0)
    img = (np.add.outer(np.arange(256), np.arange(256))[..., None] // 3 + rng.integers(0, 4, (256, 256, 3))) % 256
    img = img.astype(np.uint8)
    fast, small = tmp_path / "fast.png", tmp_path / "small.png"
    write_png(fast, img, compress_level=1)
    write_png(small, img, compress_level=9)
    assert fast.stat().st_size > small.stat().st_size
    assert np.array_equal(read_png(fast), img) and np.array_equal(read_png(small), img)


def test_png_level_is_an_output_option_in_the_fingerprint():
    d = load_config("demo-synthetic").to_dict()
    assert d["output"]["png_level"] == 1
    d["output"]["png_level"] = 9
    cfg9 = load_config(d)
    assert cfg9.content_dict()["output"]["png_level"] == 9  # recorded in dataset.json's config
    assert cfg9.fingerprint() != load_config("demo-synthetic").fingerprint()
    d["output"]["png_level"] = 12
    with pytest.raises(InputError, match="png_level"):
        load_config(d)


def test_hr_placeholder_check_is_exact_past_the_channel_bound():
    cfg = QAConfig()
    rng = np.random.default_rng(1)
    hr = rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)
    hr[:40, :, 0] = 7  # red alone is 62% one value, but no colour is: the exact count decides, and passes
    qa.check_hr(hr, cfg)
    hr[:40] = (7, 8, 9)  # now one colour covers 62%
    with pytest.raises(qa.QARejected) as e:
        qa.check_hr(hr, cfg)
    assert e.value.reason == "hr_placeholder" and "62.5%" in e.value.detail


def test_imresize_is_unchanged_by_its_matrix_cache():
    img = np.random.default_rng(2).integers(0, 256, (64, 64, 3)).astype(np.uint8)
    first = imresize(img, output_shape=(8, 8))
    assert np.array_equal(imresize(img, output_shape=(8, 8)), first)
    assert np.array_equal(imresize(img.copy(), output_shape=(8, 8)), first)


def _placeholder_reference(tile: np.ndarray) -> bool:
    """is_placeholder as it was before its histogram pre-check (the median on every tile)."""
    from cmsrd.sources import worldimagery as wi

    flat = tile.reshape(-1, 3).astype(np.int16)
    med = np.median(flat, axis=0)
    if med.max() - med.min() > wi._PLACEHOLDER_GREY_SPREAD:
        return False
    if not (wi._PLACEHOLDER_LEVELS[0] <= med.mean() <= wi._PLACEHOLDER_LEVELS[1]):
        return False
    return float(np.all(np.abs(flat - med) <= wi._PLACEHOLDER_TOL, axis=1).mean()) >= wi._PLACEHOLDER_SHARE


def test_placeholder_precheck_gives_the_same_decision_near_every_threshold():
    from cmsrd.sources.worldimagery import is_placeholder

    rng = np.random.default_rng(4)
    tiles = []
    for share in (0.80, 0.849, 0.85, 0.851, 0.9, 1.0):
        for grey in ((200, 200, 200), (200, 200, 201), (150, 160, 155), (241, 241, 241), (100, 100, 100)):
            t = rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)
            n = int(round(share * 64 * 64))
            t.reshape(-1, 3)[:n] = grey + rng.integers(-8, 9, (n, 3))  # within the tolerance of the grey
            tiles.append(t)
    half = np.full((64, 64, 3), 200, np.uint8)
    half.reshape(-1, 3)[: 64 * 32] = 201  # median 200.5: the window narrows, must still agree
    half.reshape(-1, 3)[:200] = 192
    tiles.append(half)
    decisions = [is_placeholder(t) for t in tiles]
    assert decisions == [_placeholder_reference(t) for t in tiles]
    assert any(decisions) and not all(decisions)


def test_fast_grey_and_fill_equal_numpy_reductions():
    img = np.random.default_rng(5).integers(0, 256, (97, 61, 3)).astype(np.uint8)
    img[:5] = 0
    img[5:9] = 255
    assert np.array_equal(qa.grey_level(img), img.astype(np.float32).mean(axis=-1))
    assert np.array_equal(qa._all_channels(img, 0), np.all(img == 0, axis=-1))
    assert np.array_equal(qa._all_channels(img, 255), np.all(img == 255, axis=-1))


def test_round_saturate_rounds_half_up_and_saturates():
    from cmsrd.degrade import _round_saturate

    x = np.array([-3.2, -0.5, 0.49, 0.5, 1.5, 254.5, 255.49, 300.0])
    assert _round_saturate(x, np.uint8).tolist() == [0, 0, 0, 1, 2, 255, 255, 255]
