"""Co-registration: injected sub-pixel LR shifts are recovered, with the documented sign convention.

An LR with a known shift is made the way a shifted sensor would see the scene: crop the HR window moved
by (sx, sy) HR px inside a larger scene and downscale it (MATLAB bicubic). Moving the window east by sx
moves the content west on the LR, so the true shift is (dx, dy) = (-sx, -sy) / ratio LR px.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from cmsrd.align import Shift, measure_shift
from cmsrd.degrade import imresize
from cmsrd.errors import InputError


def _urban_scene(n: int = 640, seed: int = 0) -> np.ndarray:
    """Aerial-like RGB: blocks of roofs with shadows, a street grid, tree canopy and sensor noise."""
    rng = np.random.default_rng(seed)
    img = np.empty((n, n, 3))
    img[:] = (110, 115, 100)
    for _ in range(260):
        y, x = rng.integers(0, n - 40, 2)
        h, w = rng.integers(8, 40, 2)
        img[y: y + h, x: x + w] = rng.uniform(60, 230, 3)
        img[y + h: y + h + 4, x + 3: x + w + 3] *= 0.55  # shadow
    for c in range(0, n, 97):
        img[:, c: c + 9] = (200, 200, 195)
        img[c: c + 7, :] = (190, 190, 185)
    trees = ndimage.gaussian_filter(rng.random((n, n)), 6) > 0.52
    img[trees] = (60, 95, 50)
    img += rng.normal(0, 6, img.shape)
    return np.clip(ndimage.gaussian_filter(img, (0.7, 0.7, 0)), 0, 255).astype(np.uint8)


def _pair(scene: np.ndarray, sx: int, sy: int, hr: int = 256, lr: int = 16, at: tuple[int, int] = (180, 200)):
    oy, ox = at
    hr_img = scene[oy: oy + hr, ox: ox + hr]
    lr_img = imresize(scene[oy + sy: oy + sy + hr, ox + sx: ox + sx + hr], output_shape=(lr, lr))
    return lr_img, hr_img


@pytest.fixture(scope="module")
def scene():
    return _urban_scene()


@pytest.mark.parametrize("sx,sy", [(0, 0), (5, -3), (-11, 7), (14, 13)])
def test_recovers_injected_shift_x16(scene, sx, sy):
    lr, hr = _pair(scene, sx, sy)
    s = measure_shift(lr, hr)
    assert abs(s.dx - (-sx / 16)) < 0.1 and abs(s.dy - (-sy / 16)) < 0.1, s
    assert s.correlation > 0.9 and s.error < 0.5


def test_sign_convention_east_south(scene):
    # Window moved 8 HR px west and 8 north -> the scene appears 0.5 LR px east and south on the LR.
    lr, hr = _pair(scene, -8, -8)
    s = measure_shift(lr, hr)
    assert s.dx == pytest.approx(0.5, abs=0.1) and s.dy == pytest.approx(0.5, abs=0.1)
    # Shifting the LR back by (-dx, -dy) (scipy: (rows, cols)) aligns it with the HR on the LR grid.
    ref = imresize(hr.astype(float), output_shape=(16, 16))[..., 1]
    back = ndimage.shift(lr[..., 1].astype(float), (-s.dy, -s.dx), order=3, mode="nearest")
    inner = (slice(3, -3), slice(3, -3))
    assert np.abs(back[inner] - ref[inner]).mean() < np.abs(lr[..., 1][inner] - ref[inner]).mean() / 2


def test_cross_sensor_radiometry_and_band(scene):
    # A different sensor: other gain/offset per band and noise; the shift must not depend on radiometry.
    lr, hr = _pair(scene, 6, -10, lr=32)
    rng = np.random.default_rng(3)
    lr_other = np.clip(lr * np.array([0.6, 0.8, 1.3]) + 20 + rng.normal(0, 2, lr.shape), 0, 255).astype(np.float32)
    s = measure_shift(lr_other, hr)
    assert abs(s.dx + 6 / 8) < 0.1 and abs(s.dy - 10 / 8) < 0.1, s
    s_band = measure_shift(lr_other, hr, band=1)
    assert abs(s_band.dx + 6 / 8) < 0.1 and abs(s_band.dy - 10 / 8) < 0.1


def test_real_aerial_texture(shared_data):
    rasterio = pytest.importorskip("rasterio")
    with rasterio.open(shared_data / "aerial" / "test_tiled.tif") as ds:
        scene = np.moveaxis(ds.read(), 0, -1)
    for (sx, sy), at in (((9, -4), (300, 420)), ((-13, 15), (560, 120))):
        lr, hr = _pair(scene, sx, sy, at=at)
        s = measure_shift(lr, hr)
        assert abs(s.dx + sx / 16) < 0.1 and abs(s.dy + sy / 16) < 0.1, (sx, sy, s)


def test_unrelated_images_have_low_correlation(scene):
    lr, _ = _pair(scene, 0, 0)
    _, other = _pair(_urban_scene(seed=7), 0, 0)
    s = measure_shift(lr, other)
    assert s.correlation < 0.6


def test_record_and_bad_input(scene):
    lr, hr = _pair(scene, 3, 3)
    rec = measure_shift(lr, hr).to_record()
    assert set(rec) == {"shift_dx_lr_px", "shift_dy_lr_px", "shift_error", "shift_correlation"}
    assert isinstance(Shift(0.1, 0.2, 0.0, 1.0).magnitude, float)
    with pytest.raises(InputError, match="too small"):
        measure_shift(lr[:4, :4], hr)
    with pytest.raises(InputError, match="flat"):
        measure_shift(np.full((16, 16, 3), 9, np.uint8), hr)
    with pytest.raises(InputError, match="band 5"):
        measure_shift(lr, hr, band=5)
