"""Synthetic degradations for training and evaluating restoration models.

Every function takes float images in [0, 1], either one image ``[C, H, W]`` or a
batch ``[N, C, H, W]``, and returns a new tensor of the same shape. Randomness
comes only from the ``generator`` argument, so a seeded ``torch.Generator``
reproduces the same degraded images.

    add_gaussian_noise   y = x + (sigma / 255) * n,  n ~ N(0, 1)      (not clipped)
    jpeg_compress        y = decode(encode_jpeg(round(255 x), quality)) / 255
    bicubic_down_up      y = up_bicubic(down_bicubic(x, 1/scale), to H x W)
    motion_blur          y = x (*) k per channel, reflect padding
    random_motion_kernel k = rasterised random-walk camera trajectory, sum(k) = 1
"""
from __future__ import annotations

import io
import math
import numbers
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from restorenet._checks import check_tensor

__all__ = [
    "add_gaussian_noise",
    "jpeg_compress",
    "bicubic_down_up",
    "random_motion_kernel",
    "motion_blur",
    "random_motion_blur",
]


# ----------------------------------------------------------------------------- checks


def _check_images(name: str, img) -> None:
    check_tensor(name, img)
    if img.dim() not in (3, 4):
        raise ValueError(f"{name} must be [C, H, W] or [N, C, H, W], got shape {tuple(img.shape)}")
    if not img.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor in [0, 1], got {img.dtype}")


def _check_number(name: str, value, *, minimum: float, maximum: float | None = None,
                  integer: bool = False) -> None:
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        what = "an integer" if integer else "a real number"
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    if not math.isfinite(value) or value < minimum or (maximum is not None and value > maximum):
        bounds = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{name} must be {bounds}, got {value}")


def _check_kernel_size(name: str, size) -> None:
    _check_number(name, size, minimum=3, integer=True)
    if size % 2 == 0:
        raise ValueError(f"{name} must be odd so the kernel has a centre, got {size}")


def _per_batch(img: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply ``fn`` (which expects [N, C, H, W]) to a single image or a batch."""
    if img.dim() == 3:
        return fn(img.unsqueeze(0)).squeeze(0)
    return fn(img)


# ----------------------------------------------------------------------------- noise


def add_gaussian_noise(img: torch.Tensor, sigma: float,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Additive white Gaussian noise with standard deviation ``sigma`` in 0-255 units.

    The result is *not* clipped to [0, 1]: the denoising benchmarks (CBSD68 at
    sigma 15..75) use unclipped AWGN, and clipping would bias the noise mean
    near black and white.
    """
    _check_images("img", img)
    _check_number("sigma", sigma, minimum=0.0)
    noise = torch.randn(img.shape, generator=generator, dtype=img.dtype,
                        device=generator.device if generator is not None else img.device)
    return img + noise.to(img.device) * (sigma / 255.0)


# ----------------------------------------------------------------------------- JPEG


def _jpeg_one(img: torch.Tensor, quality: int) -> torch.Tensor:
    """Round-trip one [C, H, W] image (C = 1 or 3) through PIL's JPEG codec."""
    array = (img.detach().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu()
    array = array.permute(1, 2, 0).numpy()
    pil = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    buffer = io.BytesIO()
    # PIL's default chroma subsampling (4:2:0), like libjpeg/OpenCV writers.
    pil.save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    decoded = np.asarray(Image.open(buffer).convert(pil.mode), dtype=np.uint8)
    if decoded.ndim == 2:
        decoded = decoded[..., None]
    out = torch.from_numpy(decoded.copy()).permute(2, 0, 1)
    return out.to(device=img.device, dtype=img.dtype) / 255.0


def jpeg_compress(img: torch.Tensor, quality: int) -> torch.Tensor:
    """Encode with JPEG at ``quality`` (1-100) and decode again, with PIL.

    The image is quantised to 8 bits first (as any JPEG file is); ``img`` must
    have 1 or 3 channels.
    """
    _check_images("img", img)
    _check_number("quality", quality, minimum=1, maximum=100, integer=True)
    channels = img.shape[-3]
    if channels not in (1, 3):
        raise ValueError(f"img must have 1 or 3 channels for JPEG, got shape {tuple(img.shape)}")
    return _per_batch(img, lambda x: torch.stack([_jpeg_one(im, quality) for im in x]))


# ----------------------------------------------------------------------------- super-resolution


def bicubic_down_up(img: torch.Tensor, scale: float) -> torch.Tensor:
    """Bicubic downscale by ``scale`` then bicubic upscale back to the input size.

    The low-res size is ``floor(H / scale) x floor(W / scale)``. Downscaling
    uses an anti-aliased bicubic kernel (as MATLAB's ``imresize`` does, which
    made the standard SR benchmarks); the output is clamped to [0, 1]. This is
    the input the SR models see: the low-res image back at full size.
    """
    _check_images("img", img)
    _check_number("scale", scale, minimum=1.0)
    h, w = img.shape[-2:]
    low = (max(1, int(h // scale)), max(1, int(w // scale)))

    def resize(x: torch.Tensor) -> torch.Tensor:
        small = F.interpolate(x, size=low, mode="bicubic", align_corners=False, antialias=True)
        return F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)

    return _per_batch(img, resize)


# ----------------------------------------------------------------------------- motion blur


def random_motion_kernel(size: int, generator: torch.Generator | None = None,
                         steps: int | None = None, jitter: float = 0.6) -> torch.Tensor:
    """A ``[size, size]`` blur kernel from a random camera-shake trajectory.

    The trajectory is a random walk with momentum: a unit step whose heading
    turns by ``jitter * N(0, 1)`` radians each step (small jitter gives nearly
    straight streaks, large jitter curly ones). It is centred, scaled so its
    longest extent spans the kernel, rasterised with bilinear splatting (so
    sub-pixel positions leave no holes) and normalised to sum to 1.
    """
    _check_kernel_size("size", size)
    _check_number("jitter", jitter, minimum=0.0)
    steps = 4 * size if steps is None else steps
    _check_number("steps", steps, minimum=2, integer=True)

    draws = torch.randn(steps + 1, generator=generator, dtype=torch.float64)
    heading = 2 * math.pi * torch.rand(1, generator=generator, dtype=torch.float64)
    angles = heading + jitter * torch.cumsum(draws[:steps], 0)
    path = torch.cumsum(torch.stack([torch.cos(angles), torch.sin(angles)], 1), 0)
    path = torch.cat([torch.zeros(1, 2, dtype=torch.float64), path])
    path = path - (path.max(0).values + path.min(0).values) / 2
    # The streak spans the kernel but keeps one pixel from the border for splatting.
    extent = (path.max(0).values - path.min(0).values).max().clamp_min(1e-6)
    path = path * ((size - 2) / extent) + (size - 1) / 2

    kernel = torch.zeros(size, size, dtype=torch.float64)
    x, y = path[:, 0], path[:, 1]
    x0, y0 = x.floor().long(), y.floor().long()
    fx, fy = x - x0, y - y0
    for dx, dy, weight in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                           (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        kernel.index_put_(((y0 + dy).clamp(0, size - 1), (x0 + dx).clamp(0, size - 1)),
                          weight, accumulate=True)
    return (kernel / kernel.sum()).float()


def motion_blur(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve each channel with ``kernel`` (``[k, k]``, or ``[N, k, k]`` one per image).

    True convolution (the kernel is flipped), reflect padding so borders are not
    darkened; the output keeps the input size.
    """
    _check_images("img", img)
    check_tensor("kernel", kernel)
    if kernel.dim() not in (2, 3) or kernel.shape[-1] != kernel.shape[-2]:
        raise ValueError(f"kernel must be [k, k] or [N, k, k], got shape {tuple(kernel.shape)}")
    _check_kernel_size("kernel size", kernel.shape[-1])
    k = kernel.shape[-1]
    h, w = img.shape[-2:]
    if k // 2 >= min(h, w):
        raise ValueError(f"kernel size {k} is too large for an image of size {h}x{w}")

    def blur(x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        kern = kernel if kernel.dim() == 3 else kernel.expand(n, k, k)
        if kern.shape[0] != n:
            raise ValueError(f"kernel has {kern.shape[0]} kernels for a batch of {n} images")
        # One depthwise conv over all N*C planes: plane (i, ch) uses kernel i.
        weight = kern.flip(-1, -2).to(x).repeat_interleave(c, 0).unsqueeze(1)
        padded = F.pad(x.reshape(1, n * c, h, w), [k // 2] * 4, mode="reflect")
        return F.conv2d(padded, weight, groups=n * c).reshape(n, c, h, w)

    return _per_batch(img, blur)


def random_motion_blur(img: torch.Tensor, size: int,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Blur every image with its own :func:`random_motion_kernel` of ``size``."""
    _check_images("img", img)
    _check_kernel_size("size", size)
    n = 1 if img.dim() == 3 else img.shape[0]
    kernels = torch.stack([random_motion_kernel(size, generator) for _ in range(n)])
    return motion_blur(img, kernels if img.dim() == 4 else kernels[0])
