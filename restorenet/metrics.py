"""Image-quality metrics on batches: PSNR and SSIM, one value per image.

Both take ``pred`` and ``target`` of shape ``[N, C, H, W]`` and return ``[N]``.
They are computed on all channels as given (RGB here), not on the luminance
(Y) channel that some SR papers report; numbers are therefore comparable
between our models but a little lower than Y-channel figures in papers.

    PSNR = 10 log10(data_range^2 / MSE),  MSE over C, H, W   (inf if pred == target)

    SSIM (Wang et al. 2004), per channel, then averaged over channels and pixels:
        mu_x = G * x,  sigma_x^2 = G * x^2 - mu_x^2,  sigma_xy = G * xy - mu_x mu_y
        S = ((2 mu_x mu_y + C1)(2 sigma_xy + C2)) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))
        C1 = (0.01 L)^2,  C2 = (0.03 L)^2,  G = 11x11 Gaussian window, sigma 1.5
    The window is applied only where it fits inside the image ("valid"), which
    is what ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, channel_axis=0, data_range=L)``
    averages over, so the two agree.
"""
from __future__ import annotations

import torch

from restorenet._checks import check_tensor

__all__ = ["psnr", "ssim"]


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


@torch.no_grad()
def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, ``[N]`` (float64)."""
    _check_pair(pred, target)
    _check_data_range(data_range)
    mse = (pred.double() - target.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)  # mse == 0 gives +inf


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 1-D Gaussian of ``size`` taps (the 2-D window is its outer product)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _valid_filter_matrix(size: int, g: torch.Tensor) -> torch.Tensor:
    """``[size, size - k + 1]`` matrix T with ``(v @ T)[j] = sum_i g[i] v[j + i]``.

    Filtering as a banded matrix product runs on BLAS, which is much faster on
    CPU in float64 than a grouped convolution.
    """
    k = g.numel()
    out = size - k + 1
    t = torch.zeros(size, out, dtype=g.dtype, device=g.device)
    cols = torch.arange(out, device=g.device)
    for i in range(k):
        t[cols + i, cols] = g[i]
    return t


def _filter_valid(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter over H and W of every plane, no padding."""
    h, w = x.shape[-2:]
    return _valid_filter_matrix(h, g).T @ x @ _valid_filter_matrix(w, g)


@torch.no_grad()
def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0,
         window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per image, ``[N]`` (float64); 1 means identical.

    Per-channel SSIM maps with a Gaussian window, averaged over channels and
    valid pixels (see the module docstring). Images must be at least
    ``window_size`` pixels on each side.
    """
    _check_pair(pred, target)
    _check_data_range(data_range)
    if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1 \
            or window_size % 2 == 0:
        raise ValueError(f"window_size must be a positive odd integer, got {window_size!r}")
    if min(pred.shape[-2:]) < window_size:
        raise ValueError(f"pred must be at least {window_size}x{window_size} for SSIM, "
                         f"got shape {tuple(pred.shape)}")
    x, y = pred.double(), target.double()
    g = gaussian_window(window_size, sigma).to(x.device)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    mu_x, mu_y = _filter_valid(x, g), _filter_valid(y, g)
    var_x = _filter_valid(x * x, g) - mu_x**2
    var_y = _filter_valid(y * y, g) - mu_y**2
    cov_xy = _filter_valid(x * y, g) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)
