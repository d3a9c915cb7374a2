"""Image-quality metrics as restoration papers report them: PSNR and SSIM, per image.

Both take ``pred`` and ``target`` of shape ``[N, C, H, W]`` (values in
``[0, data_range]``) and return one float64 value per image, ``[N]``. The
numbers come from scikit-image, called per image on float64 arrays:

    psnr   skimage.metrics.peak_signal_noise_ratio(target, pred, data_range=L)
           = 10 log10(L^2 / MSE), MSE over C, H, W          (inf if pred == target)
    ssim   skimage.metrics.structural_similarity(target, pred, data_range=L,
               gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
               channel_axis=0)
           Wang et al. (2004): 11x11 Gaussian window (sigma 1.5), C1 = (0.01 L)^2,
           C2 = (0.03 L)^2, per channel, averaged over channels and over the
           pixels where the window fits -- what BasicSR's ``calculate_ssim``
           (and the MATLAB code before it) computes.

Two options make them the numbers in the papers' tables (BasicSR's
``test_y_channel`` and ``crop_border``):

    y_channel=True   compare luma only: Y of ITU-R BT.601 for RGB in [0, 1],
                     Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255 (MATLAB's
                     ``rgb2ycbcr``, via ``skimage.color.rgb2ycbcr``); SR and
                     JPEG papers report this.
    crop_border=b    leave out b pixels on every side first (SR papers: b =
                     the scale factor).

RGB numbers (the default) are what deblurring and denoising papers report; Y
numbers are higher because luma is smoother than colour.
"""
from __future__ import annotations

import numpy as np
import torch

from restorenet._checks import check_int, check_tensor

__all__ = ["psnr", "ssim", "rgb_to_y", "SSIM_WINDOW"]

SSIM_WINDOW = 11  # skimage's Gaussian window for sigma 1.5 (truncate 3.5): 2 * 5 + 1


def _check_pair(pred, target) -> None:
    check_tensor("pred", pred, ndim=4)
    check_tensor("target", target, ndim=4)
    if not pred.is_floating_point():
        raise TypeError(f"pred must be a floating-point tensor, got {pred.dtype}")
    if not target.is_floating_point():
        raise TypeError(f"target must be a floating-point tensor, got {target.dtype}")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, "
                         f"got {tuple(pred.shape)} and {tuple(target.shape)}")


def _check_data_range(data_range) -> None:
    if isinstance(data_range, bool) or not isinstance(data_range, (int, float)) or data_range <= 0:
        raise ValueError(f"data_range must be a positive number, got {data_range!r}")


def rgb_to_y(img: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """BT.601 luma of RGB images ``[N, 3, H, W]`` in ``[0, data_range]``, as
    ``[N, 1, H, W]`` float64 in the same range (16/255 .. 235/255 of it)."""
    check_tensor("img", img, ndim=4)
    if img.shape[1] != 3:
        raise ValueError(f"img must be RGB ([N, 3, H, W]) for the Y channel, got shape "
                         f"{tuple(img.shape)}")
    _check_data_range(data_range)
    from skimage.color import rgb2ycbcr  # imported on use: skimage pulls in SciPy (seconds)

    rgb = img.detach().double().cpu().permute(0, 2, 3, 1).numpy() / data_range
    y = rgb2ycbcr(rgb, channel_axis=-1)[..., 0] / 255.0  # skimage: Y in [16, 235]
    return torch.from_numpy(np.ascontiguousarray(y)).unsqueeze(1) * data_range


def _prepare(pred, target, data_range, y_channel: bool, crop_border: int):
    """Checked float64 numpy arrays [N, C, H, W]: Y channel and border crop applied."""
    _check_pair(pred, target)
    _check_data_range(data_range)
    check_int("crop_border", crop_border, 0)
    h, w = pred.shape[-2:]
    if 2 * crop_border >= min(h, w):
        raise ValueError(f"crop_border must leave pixels: {crop_border} on each side of an "
                         f"image of {h}x{w}")
    if y_channel:
        pred, target = rgb_to_y(pred, data_range), rgb_to_y(target, data_range)
    b = crop_border
    pred, target = (t[..., b:h - b, b:w - b].detach().double().cpu().numpy() for t in (pred, target))
    return pred, target


@torch.no_grad()
def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, *,
         y_channel: bool = False, crop_border: int = 0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, ``[N]`` float64 (see the module)."""
    from skimage.metrics import peak_signal_noise_ratio

    p, t = _prepare(pred, target, data_range, y_channel, crop_border)
    with np.errstate(divide="ignore"):  # identical images: inf, as documented
        values = [peak_signal_noise_ratio(ti, pi, data_range=data_range) for pi, ti in zip(p, t)]
    return torch.tensor(values, dtype=torch.float64)


@torch.no_grad()
def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, *,
         y_channel: bool = False, crop_border: int = 0) -> torch.Tensor:
    """Structural similarity per image, ``[N]`` float64; 1 means identical (see the module).

    The images (after ``crop_border``) must be at least 11x11, the Gaussian window.
    """
    from skimage.metrics import structural_similarity

    p, t = _prepare(pred, target, data_range, y_channel, crop_border)
    if min(p.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"pred must be at least {SSIM_WINDOW}x{SSIM_WINDOW} for SSIM (after "
                         f"crop_border), got shape {tuple(pred.shape)}")
    values = [structural_similarity(ti, pi, data_range=data_range, gaussian_weights=True,
                                    sigma=1.5, use_sample_covariance=False, channel_axis=0)
              for pi, ti in zip(p, t)]
    return torch.tensor(values, dtype=torch.float64)
