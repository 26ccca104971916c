"""MATLAB-compatible bicubic `imresize`, synthetic LR and the bicubic upsampling behind `sr_<L>_<H>`.

Why our own: the SR literature (and SGDM's CMSRD) makes LR images with MATLAB's `imresize(img, 1/s,
'bicubic')`. PIL, OpenCV and `torch.nn.functional.interpolate(antialias=True)` all differ from it in the
kernel width, the pixel-centre convention or the border rule, which shifts PSNR by tenths of a dB, and no
maintained PyPI package reproduces it with a batched torch path. The operator here follows MATLAB's
`imresize.m` step by step:

* kernel: Keys cubic with a = -0.5 (support 4);
* antialiasing: when shrinking by `scale < 1` the kernel is stretched to `k(scale*x)*scale`, support
  `4/scale`;
* geometry: output pixel `x` (1-based) maps to input coordinate `u = x/scale + 0.5*(1 - 1/scale)`; taps
  `floor(u - width/2) + (0 .. ceil(width)+1)`; weights normalised to sum to 1 per output pixel;
* borders: out-of-range taps are mirrored with MATLAB's symmetric rule (`[1..n, n..1]` repeated);
* sizes: `scale` gives `ceil(scale*n)` output pixels; an output size gives `scale = out/in` per axis;
* order: axes are resized one after another, the axis with the smaller scale first (MATLAB's
  `sort(scale)`, rows first on ties); integer images are rounded (half away from zero) and saturated
  after every pass, as MATLAB's `imresizemex` returns the input class.

Each pass is a linear map: an `out x in` weight matrix (sparse for numpy, dense and cached for torch), so
`imresize_torch` is the same operator, batched and on any device.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from .errors import InputError

if TYPE_CHECKING:  # torch is imported lazily: dataset workers use only the numpy operator
    import torch

KERNEL_WIDTH = 4.0  # support of the a = -0.5 cubic kernel


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic convolution kernel with a = -0.5 (MATLAB's `cubic`)."""
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    return (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1) + (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * (
        (ax > 1) & (ax <= 2)
    )


def contributions(
    in_len: int, out_len: int, scale: float, antialias: bool = True, offset: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Tap indices (0-based, mirrored into range) and normalised weights, both `out_len x P`.

    Mirrors MATLAB's `contributions()`; all-zero tap columns are kept (they add nothing). `offset` (output
    pixels, 0 = MATLAB) moves the content by +offset along the axis: output pixel x samples the input where
    MATLAB's pixel x - offset would (used by `cmsrd.align` to model shifted LR).
    """
    if antialias and scale < 1:
        width = KERNEL_WIDTH / scale

        def kernel(d):
            return scale * cubic(scale * d)
    else:
        width = KERNEL_WIDTH
        kernel = cubic
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = (x - offset) / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - width / 2.0)
    taps = int(math.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]  # 1-based
    w = kernel(u[:, None] - idx)
    w = w / w.sum(axis=1, keepdims=True)
    # MATLAB's symmetric padding: aux = [1:n, n:-1:1], index = aux(mod(idx-1, 2n) + 1)
    aux = np.concatenate([np.arange(in_len), np.arange(in_len - 1, -1, -1)])
    mirrored = aux[np.mod(idx.astype(np.int64) - 1, 2 * in_len)]
    return mirrored, w


@lru_cache(maxsize=64)
def weight_matrix(in_len: int, out_len: int, scale: float, antialias: bool = True, offset: float = 0.0) -> np.ndarray:
    """Dense `out_len x in_len` float64 matrix of one resize pass (taps that mirror to one pixel add up)."""
    idx, w = contributions(in_len, out_len, scale, antialias, offset)
    m = np.zeros((out_len, in_len), dtype=np.float64)
    np.add.at(m, (np.repeat(np.arange(out_len), idx.shape[1]), idx.ravel()), w.ravel())
    m.setflags(write=False)
    return m


@lru_cache(maxsize=64)
def _sparse_matrix(in_len: int, out_len: int, scale: float, antialias: bool) -> sp.csr_matrix:
    """Cached per (in, out) size: a build resizes the same few sizes (256 <-> 8/16) millions of times."""
    idx, w = contributions(in_len, out_len, scale, antialias)
    rows = np.repeat(np.arange(out_len), idx.shape[1])
    return sp.csr_matrix((w.ravel(), (rows, idx.ravel())), shape=(out_len, in_len))  # duplicates summed


def resolve_sizes(
    in_shape: tuple[int, int], scale: float | tuple[float, float] | None, output_shape: tuple[int, int] | None
) -> tuple[tuple[float, float], tuple[int, int]]:
    """MATLAB's size rules: (per-axis scale, output shape) from either a scale or an output shape."""
    if (scale is None) == (output_shape is None):
        raise InputError(
            "imresize arguments", "give exactly one of scale and output_shape", "pass scale=1/32 or output_shape=(8, 8)"
        )
    if scale is not None:
        scales = tuple(float(s) for s in (scale if isinstance(scale, (tuple, list)) else (scale, scale)))
        if len(scales) != 2 or not all(math.isfinite(s) and s > 0 for s in scales):
            raise InputError("imresize scale", f"{scale!r} is not a positive number", "use e.g. scale=0.25")
        out = tuple(int(math.ceil(s * n)) for s, n in zip(scales, in_shape))
        return scales, out  # type: ignore[return-value]
    out = tuple(int(v) for v in output_shape)  # type: ignore[union-attr]
    if len(out) != 2 or min(out) < 1:
        raise InputError(
            "imresize output_shape", f"{output_shape!r} is not two positive sizes", "use e.g. output_shape=(8, 8)"
        )
    return (out[0] / in_shape[0], out[1] / in_shape[1]), out  # type: ignore[return-value]


def _axis_order(scales: tuple[float, float]) -> list[int]:
    return sorted(range(2), key=lambda a: (scales[a], a))  # MATLAB: [~, order] = sort(scale), stable


def _round_saturate(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.clip(np.floor(x + 0.5), info.min, info.max).astype(dtype)  # round half up == MATLAB for >= 0


def imresize(
    img: np.ndarray,
    scale: float | tuple[float, float] | None = None,
    output_shape: tuple[int, int] | None = None,
    antialias: bool = True,
) -> np.ndarray:
    """MATLAB `imresize(img, scale | [rows cols], 'bicubic')` for HxW or HxWxC arrays.

    Integer in -> same integer type out (rounded and saturated after each axis, as MATLAB); float in ->
    float out (same dtype, computed in float64).
    """
    arr = np.asarray(img)
    if arr.ndim not in (2, 3) or min(arr.shape[:2]) < 1:
        raise InputError("imresize image", f"shape {arr.shape} is not HxW or HxWxC", "pass an HxW or HxWxC array")
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InputError("imresize image", f"dtype {arr.dtype} is not supported", "pass uint8/uint16 or float")
    scales, out_shape = resolve_sizes(arr.shape[:2], scale, output_shape)
    is_int = np.issubdtype(arr.dtype, np.integer)
    b = arr
    for axis in _axis_order(scales):
        in_len, out_len = b.shape[axis], out_shape[axis]
        m = _sparse_matrix(in_len, out_len, scales[axis], antialias)
        moved = np.moveaxis(b, axis, 0)
        flat = moved.reshape(in_len, -1).astype(np.float64)
        res = np.asarray(m @ flat).reshape((out_len,) + moved.shape[1:])
        res = np.moveaxis(res, 0, axis)
        b = _round_saturate(res, arr.dtype) if is_int else res
    return b if is_int else b.astype(arr.dtype, copy=False)


@lru_cache(maxsize=64)
def _torch_matrix(in_len: int, out_len: int, scale: float, antialias: bool, device: str, dtype: torch.dtype):
    import torch

    return torch.from_numpy(np.array(weight_matrix(in_len, out_len, scale, antialias))).to(device=device, dtype=dtype)


def imresize_torch(
    x: torch.Tensor,
    scale: float | tuple[float, float] | None = None,
    size: int | tuple[int, int] | None = None,
    antialias: bool = True,
) -> torch.Tensor:
    """The same operator as `imresize`, on an N x C x H x W float tensor (any device), via cached matrices.

    Float only (no per-pass rounding); differentiable. Matches `imresize` on float input to float tolerance.
    """
    import torch

    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise InputError(
            "imresize_torch input",
            "expected a float N x C x H x W tensor",
            "convert with x.float() and add batch/channel dims",
        )
    if isinstance(size, int):
        size = (size, size)
    scales, out_shape = resolve_sizes(tuple(x.shape[-2:]), scale, size)
    dev = str(x.device)
    mh = _torch_matrix(x.shape[-2], out_shape[0], scales[0], antialias, dev, x.dtype)
    mw = _torch_matrix(x.shape[-1], out_shape[1], scales[1], antialias, dev, x.dtype)
    if scales[1] < scales[0]:  # resize the more-shrunk axis first: fewer flops, same order as MATLAB
        return torch.matmul(mh, torch.matmul(x, mw.T))
    return torch.matmul(torch.matmul(mh, x), mw.T)


def _check_u8_image(arr: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise InputError(
            what,
            f"expected a uint8 HxW or HxWxC image, got {arr.dtype} {arr.shape}",
            "pass the 8-bit image as read by cmsrd.io.read_png",
        )
    return arr


def synthetic_lr(hr: np.ndarray, factor: int = 32) -> np.ndarray:
    """Synthetic LR as in the SR literature: MATLAB bicubic (antialiased) downscale by an integer factor."""
    hr = _check_u8_image(hr, "HR image")
    if int(factor) != factor or factor < 1:
        raise InputError("LR factor", f"{factor!r} is not a positive integer", "use e.g. 16 or 32")
    factor = int(factor)
    h, w = hr.shape[:2]
    if h % factor or w % factor:
        raise InputError(
            "HR image",
            f"size {h}x{w} is not divisible by the factor {factor}",
            f"use an HR size that is a multiple of {factor}",
        )
    return imresize(hr, output_shape=(h // factor, w // factor))


def upsample(lr: np.ndarray, size: int | tuple[int, int], mode: str = "bicubic") -> np.ndarray:
    """The LR brought to the HR size (the `sr_<L>_<H>` inputs).

    `bicubic`: MATLAB-compatible bicubic `imresize` (what the SGDM paper says). `official`: what the authors'
    `prepare_lr.py` actually runs, OpenCV's INTER_LINEAR (`cv2.resize(img, (256, 256), cv2.INTER_CUBIC)` puts
    the flag in the `dst` slot, so the default interpolation is used): bilinear, half-pixel centres, edge
    pixels replicated, no antialias, rounded to uint8.
    """
    lr = _check_u8_image(lr, "LR image")
    shape = (size, size) if isinstance(size, int) else tuple(size)
    if mode == "bicubic":
        return imresize(lr, output_shape=shape)  # type: ignore[arg-type]
    if mode != "official":
        raise InputError("sr.upsample", f"unknown mode {mode!r}", "use official or bicubic")
    return upsample_bilinear(lr, shape)  # type: ignore[arg-type]


def upsample_bilinear(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """cv2.resize INTER_LINEAR semantics via torch's bilinear (align_corners=False, no antialias): output
    pixel centre x maps to input (x + 0.5) * in/out - 0.5, clamped at the borders. OpenCV's uint8 path works in
    11-bit fixed point, so single pixels may differ from it by 1 level."""
    import torch
    from torch.nn import functional as F

    arr = np.asarray(img)
    t = torch.from_numpy(arr.astype(np.float32))
    t = t[None, None] if arr.ndim == 2 else t.permute(2, 0, 1)[None]
    out = F.interpolate(t, size=tuple(int(v) for v in shape), mode="bilinear", align_corners=False, antialias=False)
    out = out[0, 0] if arr.ndim == 2 else out[0].permute(1, 2, 0)
    return _round_saturate(out.numpy(), arr.dtype)
