"""Your own images: a folder of clean images, or pairs of degraded/clean folders.

    FolderCropSampler("photos/", crop=64, seed=0).sample(8)          # [8, 3, 64, 64]
    PairedCropSampler("blur/", "sharp/", crop=64, seed=0).sample(8)  # (lq, gt), same windows
    folder_images("val/")                     # [(name, [1, 3, H, W]), ...] whole images
    paired_images("val/blur", "val/sharp")    # [(name, lq, gt), ...]

Pairs are matched by file name (``blur/0001.png`` with ``sharp/0001.png``; the
extension may differ). Every file is checked when the sampler is built, from
its header (nothing is decoded): an unreadable file, a pair without a partner,
two images of a pair with different sizes, or an image smaller than the crop
raise ``ValueError`` naming the file. Crops are drawn exactly as the bundled
photos' (``CropWindow``); images are decoded when first cropped and the last
``cache`` of them are kept (float32: 12 bytes per pixel).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch

from restorenet._checks import check_int
from restorenet.data.images import image_size, list_images, read_image
from restorenet.data.photos import CropWindow, RandomCropSampler

__all__ = ["FolderCropSampler", "PairedCropSampler", "folder_images", "paired_images",
           "match_pairs"]


def match_pairs(lq_dir: str | os.PathLike, gt_dir: str | os.PathLike) -> list[tuple[Path, Path]]:
    """``(lq, gt)`` file pairs with the same name stem, sorted; every file needs a partner."""
    lq = {p.stem: p for p in list_images(lq_dir, "lq_dir")}
    gt = {p.stem: p for p in list_images(gt_dir, "gt_dir")}
    for name in sorted(set(lq) ^ set(gt)):
        lonely, other = (lq[name], gt_dir) if name in lq else (gt[name], lq_dir)
        raise ValueError(f"{lonely}: no image named {name}.* in {other} to pair it with")
    return [(lq[name], gt[name]) for name in sorted(lq)]


def _checked_size(path: Path, crop: int | None) -> tuple[int, int]:
    h, w = image_size(path)
    if crop is not None and crop > min(h, w):
        raise ValueError(f"{path}: {h}x{w} is smaller than the training crop {crop}")
    return h, w


class _ImageCache:
    """The last ``size`` decoded images, by path (least recently used dropped)."""

    def __init__(self, size: int):
        self.size, self.images = size, OrderedDict()

    def get(self, path: Path) -> torch.Tensor:
        if path in self.images:
            self.images.move_to_end(path)
        else:
            self.images[path] = read_image(path)[0]
            if len(self.images) > self.size:
                self.images.popitem(last=False)
        return self.images[path]


class FolderCropSampler(RandomCropSampler):
    """Random ``crop x crop`` windows (with flips) of the images in ``folder``."""

    def __init__(self, folder: str | os.PathLike, crop: int = 64, seed: int = 0, cache: int = 64):
        check_int("crop", crop, 1)
        self.files = list_images(folder, "data")
        self.sizes = [_checked_size(p, crop) for p in self.files]
        self.crop, self.cache = crop, _ImageCache(cache)
        self.generator = torch.Generator().manual_seed(seed)

    def sample_one(self) -> torch.Tensor:
        window = CropWindow.draw(self.generator, self.sizes, self.crop)
        return window.cut(self.cache.get(self.files[window.index]))


class PairedCropSampler(RandomCropSampler):
    """The same random window of both images of each (degraded, clean) pair."""

    def __init__(self, lq_dir: str | os.PathLike, gt_dir: str | os.PathLike, crop: int = 64,
                 seed: int = 0, cache: int = 64):
        check_int("crop", crop, 1)
        self.pairs = match_pairs(lq_dir, gt_dir)
        self.sizes = [_pair_size(lq, gt, crop) for lq, gt in self.pairs]
        self.crop, self.cache = crop, _ImageCache(2 * cache)
        self.generator = torch.Generator().manual_seed(seed)

    def sample_one(self) -> tuple[torch.Tensor, torch.Tensor]:
        window = CropWindow.draw(self.generator, self.sizes, self.crop)
        lq, gt = self.pairs[window.index]
        return window.cut(self.cache.get(lq)), window.cut(self.cache.get(gt))

    def sample(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lq, gt)``, each ``[batch, 3, crop, crop]``."""
        check_int("batch", batch, 1)
        lq, gt = zip(*(self.sample_one() for _ in range(batch)))
        return torch.stack(lq), torch.stack(gt)


def _pair_size(lq: Path, gt: Path, crop: int | None) -> tuple[int, int]:
    lq_size, gt_size = _checked_size(lq, crop), _checked_size(gt, crop)
    if lq_size != gt_size:
        raise ValueError(f"{lq}: size {lq_size[0]}x{lq_size[1]} differs from its pair {gt} "
                         f"({gt_size[0]}x{gt_size[1]}); pairs must be the same size (for "
                         f"super-resolution, upscale the low-res images first)")
    return lq_size


def folder_images(folder: str | os.PathLike) -> list[tuple[str, torch.Tensor]]:
    """Every image of ``folder``, whole: ``[(name, [1, 3, H, W])]``, sorted by name."""
    return [(p.name, read_image(p)[0].unsqueeze(0)) for p in list_images(folder, "val")]


def paired_images(lq_dir: str | os.PathLike, gt_dir: str | os.PathLike
                  ) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Every pair, whole: ``[(name, lq [1, 3, H, W], gt [1, 3, H, W])]``, sorted by name."""
    out = []
    for lq, gt in match_pairs(lq_dir, gt_dir):
        _pair_size(lq, gt, None)
        out.append((gt.name, read_image(lq)[0].unsqueeze(0), read_image(gt)[0].unsqueeze(0)))
    return out
