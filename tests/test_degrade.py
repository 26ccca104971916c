"""MATLAB `imresize` (bicubic) reproduced from first principles.

The oracle is MATLAB's documented algorithm (imresize.m), worked out by hand here, not another package:

* kernel (a = -0.5): k(0.25) = 0.8671875, k(0.75) = 0.2265625, k(1.25) = -0.0703125, k(1.75) = -0.0234375;
* x2 upscale of a length-4 vector: output pixel 1 sits at u = 1/2 + 0.5*(1 - 2) ... = 0.75 (1-based), taps
  -2..3 at distances 2.75 .. -2.25 -> weights [0, -0.0234375, 0.2265625, 0.8671875, -0.0703125, 0];
  taps -1 and 0 mirror to input 2 and 1 ([1..n, n..1] rule), so out(1) = 1.09375*v1 - 0.09375*v2;
* antialiased x2 shrink: kernel 0.5*k(x/2), width 8; output 1 sits at u = 1.5; the 8 non-zero weights
  are [-0.01171875, -0.03515625, 0.11328125, 0.43359375] mirrored; taps -2..5 mirror to inputs
  3,2,1,1,2,3,4,5, so on the ramp v_i = i, out(1) = 1.44921875;
* sizes: scale s -> ceil(s*n) pixels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmsrd.degrade import contributions, cubic, imresize, imresize_torch, synthetic_lr, upsample
from cmsrd.errors import InputError


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth-ish RGB texture with edges, like aerial imagery."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = 120 + 60 * np.sin(9 * xx + 3 * yy)[..., None] + rng.normal(0, 20, (h, w, 3))
    base[h // 4 : h // 2, w // 3 : w // 2] += 70  # a "roof"
    return np.clip(base, 0, 255).astype(np.uint8)


def test_kernel_values_by_hand():
    x = np.array([0, 0.25, 0.75, 1.0, 1.25, 1.75, 2.0, 2.5])
    np.testing.assert_allclose(cubic(x), [1, 0.8671875, 0.2265625, 0, -0.0703125, -0.0234375, 0, 0])


def test_upscale_weights_and_mirrored_border_by_hand():
    idx, w = contributions(4, 8, 2.0)
    np.testing.assert_allclose(w[0], [0, -0.0234375, 0.2265625, 0.8671875, -0.0703125, 0])
    assert list(idx[0]) == [2, 1, 0, 0, 1, 2]  # 0-based; 1-based taps -2..3 mirror to 3,2,1,1,2,3
    v = np.array([10.0, 20, 30, 40])[:, None]
    out = imresize(v, output_shape=(8, 1))[:, 0]
    assert out[0] == pytest.approx(1.09375 * 10 - 0.09375 * 20)  # 9.0625
    assert out[-1] == pytest.approx(1.09375 * 40 - 0.09375 * 30)  # symmetric at the far edge
    np.testing.assert_allclose(out, [9.0625, 11.796875, 17.265625, 22.5, 27.5, 32.734375, 38.203125, 40.9375])


def test_antialiased_shrink_by_hand():
    idx, w = contributions(8, 4, 0.5)
    half = [-0.01171875, -0.03515625, 0.11328125, 0.43359375]
    np.testing.assert_allclose(w[0], [0] + half + half[::-1] + [0])
    assert list(idx[0][1:9]) == [2, 1, 0, 0, 1, 2, 3, 4]
    ramp = np.arange(1, 9, dtype=np.float64)[:, None]
    assert imresize(ramp, output_shape=(4, 1))[0, 0] == pytest.approx(1.44921875)
    # Without antialiasing MATLAB uses the plain kernel: weights at distance 0.5/1.5 only.
    _, w_plain = contributions(8, 4, 0.5, antialias=False)
    assert np.count_nonzero(np.abs(w_plain[1]) > 1e-12) == 4


def test_constant_stays_constant_uint8_and_float():
    for img in (np.full((37, 29, 3), 173, np.uint8), np.full((37, 29), 0.3, np.float32)):
        for kw in ({"scale": 0.25}, {"scale": 3}, {"output_shape": (5, 90)}):
            out = imresize(img, **kw)
            assert out.dtype == img.dtype
            np.testing.assert_allclose(out, img.flat[0], atol=1e-6)


def test_linear_ramp_reproduced_in_interior():
    ramp = np.add.outer(np.arange(20.0) * 2, np.arange(24.0) * 0.5)  # f(r, c) = 2r + 0.5c
    up = imresize(ramp, scale=4)
    rr, cc = np.mgrid[0:80, 0:96]
    # output pixel x (1-based) samples input coordinate x/4 + 0.5*(1 - 1/4) (1-based)
    expect = 2 * ((rr + 1) / 4 + 0.375 - 1) + 0.5 * ((cc + 1) / 4 + 0.375 - 1)
    np.testing.assert_allclose(up[8:-8, 8:-8], expect[8:-8, 8:-8], atol=1e-9)
    down = imresize(np.add.outer(np.arange(64.0), np.arange(64.0)), scale=0.25)  # antialiased shrink
    centre = np.arange(16) * 4 + 2.5 - 1  # 0-based centre of each 4-pixel block
    np.testing.assert_allclose(down[4:-4, 4:-4], np.add.outer(centre, centre)[4:-4, 4:-4], atol=1e-9)


def test_output_size_rules_and_axis_order():
    img = _texture(50, 30)
    assert imresize(img, scale=0.3).shape == (15, 9, 3)  # ceil(15.0), ceil(9.0)
    assert imresize(img, scale=0.33).shape == (17, 10, 3)  # ceil(16.5), ceil(9.9)
    assert imresize(img, scale=(0.5, 2)).shape == (25, 60, 3)
    assert imresize(img[..., 0], output_shape=(7, 11)).shape == (7, 11)
    # uint8 passes round after each axis, so order matters; MATLAB shrinks the smaller-scale axis first.
    a = imresize(img, scale=(0.5, 2))
    rows_first = imresize(imresize(img, output_shape=(25, 30)), output_shape=(25, 60))
    np.testing.assert_array_equal(a, rows_first)


def test_uint8_rounding_saturation_and_float_passthrough():
    img = np.zeros((8, 8), np.uint8)
    img[:, 4:] = 255  # a step overshoots with a = -0.5 -> must saturate, not wrap
    up = imresize(img, scale=4)
    assert up.dtype == np.uint8 and up.min() == 0 and up.max() == 255
    f = imresize(img.astype(np.float64), scale=4)
    assert f.min() < 0 and f.max() > 255  # float keeps the overshoot
    np.testing.assert_array_equal(up, np.clip(np.floor(f + 0.5), 0, 255))


def test_torch_equals_numpy_and_batches():
    imgs = np.stack([_texture(64, 48, s) for s in range(3)]).astype(np.float64) / 255
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2)
    for kw_np, kw_t in (({"output_shape": (4, 3)}, {"size": (4, 3)}), ({"scale": 2.5}, {"scale": 2.5})):
        y = imresize_torch(x, **kw_t)
        for i in range(3):
            np.testing.assert_allclose(y[i].permute(1, 2, 0).numpy(), imresize(imgs[i], **kw_np), atol=1e-10)
    y32 = imresize_torch(x.float(), size=16)
    assert y32.dtype == torch.float32 and y32.shape == (3, 3, 16, 16)
    with pytest.raises(InputError):
        imresize_torch(x[0], size=4)


def test_synthetic_lr_and_upsample():
    hr = _texture(256, 256)
    lr = synthetic_lr(hr, 32)
    assert lr.shape == (8, 8, 3) and lr.dtype == np.uint8
    np.testing.assert_array_equal(lr, imresize(hr, scale=1 / 32))
    sr = upsample(lr, 256)
    assert sr.shape == (256, 256, 3) and sr.dtype == np.uint8
    # x32 antialiasing averages ~32x32 blocks: LR means track block means of the HR
    blocks = hr.reshape(8, 32, 8, 32, 3).astype(float).mean(axis=(1, 3))
    assert np.abs(lr.astype(float) - blocks).mean() < 6
    with pytest.raises(InputError, match="multiple of 32"):
        synthetic_lr(hr[:250], 32)
    with pytest.raises(InputError, match="uint8"):
        synthetic_lr(hr.astype(np.float32), 32)


def test_bad_arguments():
    with pytest.raises(InputError, match="exactly one"):
        imresize(np.zeros((4, 4)), scale=0.5, output_shape=(2, 2))
    with pytest.raises(InputError):
        imresize(np.zeros((4, 4)), scale=-1)
    with pytest.raises(InputError):
        imresize(np.zeros((2, 2, 2, 2)), scale=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_on_gpu_matches_cpu():
    x = torch.from_numpy(np.stack([_texture(256, 256, s) for s in range(2)])).permute(0, 3, 1, 2).float() / 255
    cpu = imresize_torch(x, size=8)
    gpu = imresize_torch(x.cuda(), size=8)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-5)
    up = imresize_torch(cpu.double().cuda(), size=256).cpu().numpy()
    np.testing.assert_allclose(
        up[0].transpose(1, 2, 0), imresize(cpu[0].double().permute(1, 2, 0).numpy(), output_shape=(256, 256)), atol=1e-9
    )
