"""Real photographs shipped with scikit-image, as training and held-out images.

Only natural RGB photos are used (no microscopy, astronomy or synthetic
charts). The split is fixed so every run evaluates on the same pictures:

    train:    astronaut (512x512), rocket (427x640), motorcycle (500x741)
    held out: chelsea (300x451, a cat), coffee (400x600)

(``skimage.data.cat`` is the same picture as ``chelsea``, so it is not used.)
Grayscale photos (``camera``, ``grass``, ``gravel``, ``brick``, ``coins``,
``moon``, ``clock``) can be named too; they are stacked to three channels.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from restorenet._checks import check_int, check_tensor

__all__ = [
    "TRAIN_PHOTOS",
    "HELDOUT_PHOTOS",
    "available_photos",
    "load_photo",
    "RandomCropSampler",
    "heldout_images",
    "center_crop",
    "CropWindow",
]

TRAIN_PHOTOS: tuple[str, ...] = ("astronaut", "rocket", "motorcycle")
HELDOUT_PHOTOS: tuple[str, ...] = ("chelsea", "coffee")
_GRAY_PHOTOS = ("camera", "grass", "gravel", "brick", "coins", "moon", "clock")


def _load_array(name: str) -> np.ndarray:
    import skimage.data as sk

    if name == "motorcycle":
        return sk.stereo_motorcycle()[0]  # left view of the stereo pair
    return getattr(sk, name)()


def available_photos() -> tuple[str, ...]:
    """Every name :func:`load_photo` accepts."""
    return TRAIN_PHOTOS + HELDOUT_PHOTOS + _GRAY_PHOTOS


@functools.lru_cache(maxsize=None)
def _load_cached(name: str) -> torch.Tensor:
    array = _load_array(name)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    tensor = torch.from_numpy(np.ascontiguousarray(array[..., :3])).permute(2, 0, 1)
    return tensor.float() / 255.0


def load_photo(name: str) -> torch.Tensor:
    """Photo ``name`` as a float ``[3, H, W]`` tensor in [0, 1] (a fresh copy)."""
    if name not in available_photos():
        raise ValueError(f"name must be one of {available_photos()}, got {name!r}")
    return _load_cached(name).clone()


def center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size x size`` window of a ``[C, H, W]`` image."""
    check_tensor("img", img, ndim=3)
    h, w = img.shape[-2:]
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if size > min(h, w):
        raise ValueError(f"size {size} is larger than the image ({h}x{w})")
    top, left = (h - size) // 2, (w - size) // 2
    return img[:, top:top + size, left:left + size]


def heldout_images(size: int = 128, names: Sequence[str] = HELDOUT_PHOTOS) -> torch.Tensor:
    """Centre crops of the held-out photos, ``[len(names), 3, size, size]``.

    A fixed small crop keeps CPU evaluation fast and every evaluation
    comparable; the crops show the cat's face and the coffee cup.
    """
    return torch.stack([center_crop(load_photo(n), size) for n in names])


@dataclass(frozen=True)
class CropWindow:
    """One random training crop: which image, where, and its flips.

    ``draw`` takes five integers from ``generator``, in this order: the image
    (uniform), the top and left corner (uniform), a horizontal and a vertical
    flip (probability 1/2 each). Every sampler draws its crops this way, and a
    paired sampler cuts the same window from both images of a pair.
    """

    index: int
    top: int
    left: int
    hflip: bool
    vflip: bool
    crop: int

    @classmethod
    def draw(cls, generator: torch.Generator, sizes: Sequence[tuple[int, int]], crop: int
             ) -> "CropWindow":
        def randint(high: int) -> int:
            return int(torch.randint(high, (1,), generator=generator))

        index = randint(len(sizes))
        h, w = sizes[index]
        top, left = randint(h - crop + 1), randint(w - crop + 1)
        return cls(index, top, left, bool(randint(2)), bool(randint(2)), crop)

    def cut(self, img: torch.Tensor) -> torch.Tensor:
        """The window of a ``[C, H, W]`` image, flipped, as a contiguous tensor."""
        patch = img[:, self.top:self.top + self.crop, self.left:self.left + self.crop]
        if self.hflip:
            patch = patch.flip(-1)
        if self.vflip:
            patch = patch.flip(-2)
        return patch.contiguous()


class RandomCropSampler:
    """Draws batches of random ``crop x crop`` patches from the training photos.

    Each patch comes from a photo chosen uniformly, at a uniform position, and
    is flipped horizontally and/or vertically with probability 1/2 each. All
    draws use the sampler's own generator, so a seed fixes the sequence.

    >>> sampler = RandomCropSampler(crop=64, seed=0)
    >>> sampler.sample(8).shape
    torch.Size([8, 3, 64, 64])
    """

    def __init__(self, crop: int = 64, names: Sequence[str] = TRAIN_PHOTOS, seed: int = 0):
        check_int("crop", crop, 1)
        if len(names) == 0:
            raise ValueError("names must list at least one photo")
        self.photos = [load_photo(n) for n in names]
        smallest = min(min(p.shape[-2:]) for p in self.photos)
        if crop > smallest:
            raise ValueError(f"crop {crop} is larger than the smallest photo side ({smallest})")
        self.crop = crop
        self.names = tuple(names)
        self.generator = torch.Generator().manual_seed(seed)

    def sample_one(self) -> torch.Tensor:
        window = CropWindow.draw(self.generator, [p.shape[-2:] for p in self.photos], self.crop)
        return window.cut(self.photos[window.index])

    def sample(self, batch: int) -> torch.Tensor:
        """A ``[batch, 3, crop, crop]`` float tensor in [0, 1]."""
        check_int("batch", batch, 1)
        return torch.stack([self.sample_one() for _ in range(batch)])
