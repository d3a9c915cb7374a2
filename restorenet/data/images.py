"""Image files in and out: PNG, JPEG (and BMP, TIFF), 8- or 16-bit, as float tensors.

    img, bits = read_image("photo.png")     # [3, H, W] float32 in [0, 1], bits = 8 or 16
    write_image("out.png", img, bits)       # rounded to the bit depth; JPEG is 8-bit only

Grayscale files become three equal channels and an alpha channel is dropped
(the models restore RGB). 16-bit PNG goes through ``pypng`` (Pillow reads
16-bit RGB PNG as 8-bit and cannot write it), TIFF through ``tifffile``; the
rest is read with scikit-image's ``imread`` (imageio) and written with Pillow. A file
that cannot be read raises ``ValueError`` naming it.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["IMAGE_EXTENSIONS", "read_image", "write_image", "list_images", "image_size"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_bit_depth(path: Path) -> int | None:
    """The bit depth in a PNG's header (byte 24 of the IHDR chunk), None if not a PNG."""
    with open(path, "rb") as f:
        head = f.read(26)
    return head[24] if head[:8] == _PNG_SIGNATURE and len(head) >= 25 else None


def _read_png16(path: Path) -> np.ndarray:
    import png  # pypng: pure Python, reads every PNG bit depth

    width, height, rows, info = png.Reader(filename=str(path)).asDirect()
    planes = info["planes"]
    return np.vstack([np.asarray(r, dtype=np.uint16) for r in rows]).reshape(height, width, planes)


def _to_rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"shape {array.shape} is not a grayscale or RGB(A) image")
    if array.shape[-1] in (1, 2):  # gray (+ alpha)
        return np.repeat(array[..., :1], 3, axis=-1)
    return array[..., :3]


def read_image(path: str | os.PathLike) -> tuple[torch.Tensor, int]:
    """``([3, H, W] float32 in [0, 1], bits)`` of an 8- or 16-bit image file."""
    path = Path(path)
    try:
        if _png_bit_depth(path) == 16:
            array = _read_png16(path)
        else:
            from skimage.io import imread

            array = imread(path)
        array = _to_rgb(np.asarray(array))
    except Exception as error:  # any decoder's failure: say which file
        raise ValueError(f"{path}: cannot read this image file ({error})") from error
    if array.dtype == np.uint8:
        bits = 8
    elif array.dtype == np.uint16:
        bits = 16
    else:
        raise ValueError(f"{path}: only 8- and 16-bit images are supported, got {array.dtype}")
    tensor = torch.from_numpy(np.ascontiguousarray(array).astype(np.float32)).permute(2, 0, 1)
    return tensor / float(2**bits - 1), bits


def write_image(path: str | os.PathLike, img: torch.Tensor, bits: int = 8) -> None:
    """Write ``[3, H, W]`` floats in [0, 1] (clamped, rounded) as an 8- or 16-bit file
    (its folder is created if needed)."""
    path = Path(path)
    if not isinstance(img, torch.Tensor) or img.dim() != 3 or img.shape[0] != 3:
        raise ValueError(f"img must be a [3, H, W] tensor, got "
                         f"{tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__}")
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits!r}")
    suffix = path.suffix.lower()
    if bits == 16 and suffix in (".jpg", ".jpeg", ".bmp"):
        raise ValueError(f"path: {suffix} files are 8-bit; write a 16-bit image as .png or "
                         f".tif, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    scale = float(2**bits - 1)
    array = (img.detach().float().cpu().clamp(0, 1) * scale).round().permute(1, 2, 0).numpy()
    array = array.astype(np.uint8 if bits == 8 else np.uint16)
    if bits == 16 and suffix == ".png":
        import png

        png.from_array(array.reshape(array.shape[0], -1), "RGB;16").save(str(path))
    elif suffix in (".tif", ".tiff"):
        import tifffile

        tifffile.imwrite(path, array, photometric="rgb")
    else:
        from PIL import Image

        Image.fromarray(array).save(path, **({"quality": 95} if suffix in (".jpg", ".jpeg") else {}))


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(H, W)`` from the file header only (fast: nothing is decoded)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception as error:
        raise ValueError(f"{path}: cannot read this image file ({error})") from error
    return h, w


def list_images(folder: str | os.PathLike, what: str = "folder") -> list[Path]:
    """The image files directly in ``folder``, sorted by name; ``what`` names the
    argument in errors (a missing or empty folder is one)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{what}: {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"{what}: {folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return files
