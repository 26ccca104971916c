"""PSNR and SSIM with the SR literature's exact semantics (BasicSR / SwinIR test scripts).

Why not pyiqa: its `psnry`/`ssim` use YIQ luma (no +16 offset) and float data, so its numbers differ from
the "PSNR_Y / SSIM_Y" that papers report. BasicSR itself cannot be imported with current torchvision, so
the few formulas are written here:

- Images are rounded to uint8 first (`(x.clamp(0, 1) * 255).round()`), as saved PNGs are.
- Y channel: ITU-R BT.601 with MATLAB `rgb2ycbcr` coefficients on [0, 1] RGB,
  Y = 16 + 65.481 R + 128.553 G + 24.966 B, i.e. Y in [16, 235], kept as float64 (not re-rounded).
- `crop_border` pixels are removed from every edge before scoring. Default 0 (as in the SGDM paper's
  evaluation); `crop_border=scale` is the BasicSR/SwinIR convention.
- PSNR = 10 log10(255^2 / MSE) in float64; +inf for identical images.
- SSIM: 11x11 Gaussian window, sigma 1.5, 'valid' filtering (the 5-pixel margin is dropped),
  C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2, mean of the SSIM map; RGB SSIM is the mean over channels.
"""

from __future__ import annotations

import numpy as np

from cmsrd.errors import InputError

# MATLAB rgb2ycbcr, row for Y, on RGB in [0, 1]; result + 16 on the 0..255 scale.
BT601_Y = np.array([65.481, 128.553, 24.966], dtype=np.float64)
Y_OFFSET = 16.0

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
C1 = (0.01 * 255) ** 2
C2 = (0.03 * 255) ** 2


def to_uint8(img: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 as is; float images in [0, 1] (HxWx3 or 3xHxW) are clipped and rounded like saved PNGs."""
    a = np.asarray(img)
    if a.dtype == np.uint8:
        out = a
    elif np.issubdtype(a.dtype, np.floating):
        out = np.round(np.clip(a.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        raise InputError(f"image of dtype {a.dtype}", "expected uint8 [0, 255] or float [0, 1]")
    if out.ndim == 3 and out.shape[0] == 3 and out.shape[-1] != 3:
        out = np.transpose(out, (1, 2, 0))
    return np.ascontiguousarray(out)


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """uint8 (or [0,1] float) RGB HxWx3 -> BT.601 Y in [16, 235], float64 HxW (MATLAB rgb2ycbcr)."""
    a = to_uint8(img)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise InputError(f"image of shape {a.shape}", "expected an RGB image HxWx3")
    a = a.astype(np.float64)
    # element-wise (not a BLAS matmul) so the result is bit-identical whatever the array's memory layout
    return (
        a[..., 0] * (BT601_Y[0] / 255.0)
        + a[..., 1] * (BT601_Y[1] / 255.0)
        + a[..., 2] * (BT601_Y[2] / 255.0)
        + Y_OFFSET
    )


def _prepare(sr: np.ndarray, hr: np.ndarray, crop_border: int, y_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    sr, hr = to_uint8(sr), to_uint8(hr)
    if sr.shape != hr.shape:
        raise InputError(
            f"SR image of shape {sr.shape}", f"does not match HR shape {hr.shape}", "compare images of the same size"
        )
    if crop_border < 0:
        raise InputError(f"crop_border={crop_border}", "must be >= 0")
    if y_channel:
        a, b = rgb_to_y(sr)[..., None], rgb_to_y(hr)[..., None]
    else:
        a, b = sr.astype(np.float64), hr.astype(np.float64)
        if a.ndim == 2:
            a, b = a[..., None], b[..., None]
    if crop_border:
        if 2 * crop_border >= a.shape[0] or 2 * crop_border >= a.shape[1]:
            raise InputError(
                f"crop_border={crop_border}",
                f"leaves nothing of a {a.shape[0]}x{a.shape[1]} image",
                "use a smaller crop border",
            )
        a = a[crop_border:-crop_border, crop_border:-crop_border]
        b = b[crop_border:-crop_border, crop_border:-crop_border]
    return a, b


def psnr(sr: np.ndarray, hr: np.ndarray, crop_border: int = 0, y_channel: bool = True) -> float:
    """PSNR in dB (BasicSR `calculate_psnr`); `y_channel=False` gives RGB PSNR over all three channels."""
    a, b = _prepare(sr, hr, crop_border, y_channel)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(255.0**2 / mse))


def _gaussian_window() -> np.ndarray:
    import cv2

    k = cv2.getGaussianKernel(SSIM_WINDOW, SSIM_SIGMA)
    return k @ k.T


def _ssim_channel(a: np.ndarray, b: np.ndarray, window: np.ndarray) -> float:
    import cv2

    m = SSIM_WINDOW // 2

    def filt(x: np.ndarray) -> np.ndarray:
        return cv2.filter2D(x, -1, window)[m:-m, m:-m]  # 'valid' part only

    mu1, mu2 = filt(a), filt(b)
    mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    s1 = filt(a * a) - mu1_sq
    s2 = filt(b * b) - mu2_sq
    s12 = filt(a * b) - mu12
    ssim_map = ((2 * mu12 + C1) * (2 * s12 + C2)) / ((mu1_sq + mu2_sq + C1) * (s1 + s2 + C2))
    return float(ssim_map.mean())


def ssim(sr: np.ndarray, hr: np.ndarray, crop_border: int = 0, y_channel: bool = True) -> float:
    """SSIM (BasicSR `calculate_ssim`, MATLAB-compatible); RGB variant averages the per-channel SSIM."""
    a, b = _prepare(sr, hr, crop_border, y_channel)
    if a.shape[0] < SSIM_WINDOW or a.shape[1] < SSIM_WINDOW:
        raise InputError(
            f"image of {a.shape[0]}x{a.shape[1]} px after cropping",
            f"is smaller than the {SSIM_WINDOW}x{SSIM_WINDOW} SSIM window",
            "use a smaller crop border",
        )
    window = _gaussian_window()
    return float(np.mean([_ssim_channel(a[..., c], b[..., c], window) for c in range(a.shape[-1])]))


def definition(name: str, crop_border: int) -> str:
    """Text recorded beside the numbers, so every column says exactly what it is."""
    where = (
        "BT.601 Y (MATLAB rgb2ycbcr, Y in [16, 235], float64)" if name.endswith("_y") else "RGB (0..255, all channels)"
    )
    rule = f"uint8-rounded images, crop_border={crop_border} px"
    if name.startswith("psnr"):
        return f"PSNR = 10 log10(255^2/MSE) on {where}; {rule}; BasicSR calculate_psnr semantics"
    return (
        f"SSIM on {where}; 11x11 Gaussian window sigma 1.5, valid filtering, C1=(0.01*255)^2, "
        f"C2=(0.03*255)^2, mean of the map{'' if name.endswith('_y') else ' averaged over channels'}; {rule}; "
        "BasicSR calculate_ssim semantics"
    )
