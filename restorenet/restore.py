"""Restore image files with a trained model.

    python -m restorenet.restore --weights runs/hyperres-denoise/model.pt \\
        --input noisy/ --output restored/ --level 25
    python -m restorenet.restore --weights model.pt --input photo.png --output out/ \\
        --reference clean/ --device cuda --backend triton

``--input`` is an image file or a folder of them (PNG, JPEG, BMP, TIFF; any size;
8- or 16-bit); each result is written to ``--output`` as ``<name>.png`` at the
input's bit depth. ``--weights`` is a trainer's ``model.pt`` or checkpoint (the
model name and config come from the file), or an authors' released checkpoint
with ``--model NAME`` (converted by ``restorenet.weights.from_released``).

Large images are cut into ``--tile`` x ``--tile`` tiles overlapping by
``--overlap`` pixels, restored ``--tile-batch`` at a time and blended back with
linear ramps across the overlaps (``restorenet.ops.tile_plan / tile_gather /
tile_blend``), so memory follows the tile, not the image; images no larger than a
tile run whole, and ``--tile 0`` runs every image whole. Each tile is restored on
its own (a per-image decision -- DDS-Net's width gate, ConStyle's style code -- is
then made per tile). AdaRevD restores through ``model.restore``: its patch-exit
classifier sends each tile out after its own number of decoder columns.

Models that take the degradation level (HyperRes) need ``--level`` (noise sigma,
JPEG quality or SR scale, as in training). With ``--reference DIR`` each result is
compared with the image of the same name in DIR and its PSNR/SSIM (RGB and Y,
``--crop-border``) are printed, with the means.
"""
from __future__ import annotations

import argparse
import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from restorenet.data import IMAGE_EXTENSIONS, list_images, read_image, write_image
from restorenet.models.adarevd import _tile_shape  # the tile clamped to small images, as AdaRevD.restore
from restorenet.ops import BACKENDS, tile_blend, tile_gather, tile_plan, use_backend
from restorenet.registry import list_models
from restorenet.training.adapters import LevelEstimatorAdapter, ModelAdapter, get_adapter
from restorenet.training.checkpoint import is_restorenet_file, model_from_file, read_file
from restorenet.training.distributed import default_threads

__all__ = ["load_weights", "restore_image", "restore_files", "main"]


def load_weights(path: str | os.PathLike, device: torch.device | str = "cpu",
                 model_name: str | None = None) -> tuple[str, nn.Module]:
    """``(model name, model in eval mode on device)`` from a weights file.

    Reads restorenet model files and training checkpoints (name and config inside);
    any other file is taken as the authors' released checkpoint of ``model_name``
    (paper configuration) and converted by ``restorenet.weights.from_released``."""
    contents = read_file(path)
    if is_restorenet_file(contents):
        model = model_from_file(contents, path)
        name = contents["model"] if "model_kwargs" in contents else contents["config"]["model"]
    elif model_name is None:
        raise ValueError(f"weights: {path} is not a restorenet model file or checkpoint; for "
                         f"an authors' released checkpoint name its model (--model)")
    else:
        name, model = model_name, _from_released(model_name, contents, path)
    return name, model.to(device)


def _from_released(name: str, contents, path) -> nn.Module:
    from restorenet.weights import from_released  # on use: the converters import every model

    return from_released(name, contents)


@torch.no_grad()
def restore_image(model: nn.Module, adapter: ModelAdapter, x: torch.Tensor, level=None, *,
                  tile: int = 384, overlap: int = 32, tile_batch: int = 4) -> torch.Tensor:
    """Restore ``x`` [1, 3, H, W]; tiled when larger than ``tile`` (0: never)."""
    if hasattr(model, "restore"):  # patch-exit model (AdaRevD): its own tiled inference
        return model.restore(x, tile=tile or max(x.shape[-2:]), overlap=overlap if tile else 0)
    if tile == 0 or (x.shape[-2] <= tile and x.shape[-1] <= tile):
        return adapter.restore(model, x, level)
    size, ov = _tile_shape(x, tile, overlap)
    plan = tile_plan(x, size, ov)
    tiles = tile_gather(x, plan)
    restored = torch.cat([adapter.restore(model, tiles[i:i + tile_batch], level)
                          for i in range(0, tiles.shape[0], tile_batch)])
    return tile_blend(restored.to(x.dtype), plan)


def _reference_for(path: Path, reference_dir: Path) -> Path:
    for candidate in sorted(reference_dir.glob(path.stem + ".*")):
        if candidate.suffix.lower() in IMAGE_EXTENSIONS:
            return candidate
    raise ValueError(f"{path}: no reference image named {path.stem}.* in {reference_dir}")


def restore_files(weights: str | os.PathLike, inputs: str | os.PathLike, output: str | os.PathLike,
                  *, model: str | None = None, level: float | None = None, tile: int = 384, overlap: int = 32,
                  tile_batch: int = 4, device: str = "cpu", backend: str | None = None,
                  reference: str | os.PathLike | None = None, crop_border: int = 0,
                  progress: bool = True) -> dict:
    """Restore every image of ``inputs`` into ``output``; returns per-image scores
    (``{"images": {name: {"psnr": ..}}, "mean": {..}}``, empty without ``reference``)."""
    dev = torch.device(device)
    name, net = load_weights(weights, dev, model)
    adapter = get_adapter(name)
    if isinstance(adapter, LevelEstimatorAdapter):
        raise ValueError(f"weights: {weights} holds {name}, which estimates a level; it does "
                         f"not restore images")
    if adapter.takes_level and level is None:
        raise ValueError(f"level must be given for {name} (the degradation level it was "
                         f"trained with: noise sigma, JPEG quality or SR scale)")
    for arg, value, minimum in (("tile", tile, 0), ("overlap", overlap, 0), ("tile_batch", tile_batch, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{arg} must be an integer >= {minimum}, got {value!r}")
    if tile and overlap >= tile:
        raise ValueError(f"overlap must be smaller than the tile ({tile}), got {overlap}")
    source = Path(inputs)
    files = list_images(source, "input") if source.is_dir() else [source]
    if not source.is_dir() and not source.is_file():
        raise ValueError(f"input: {source} is neither an image file nor a folder")
    reference_dir = Path(reference) if reference is not None else None
    if reference_dir is not None and not reference_dir.is_dir():
        raise ValueError(f"reference: {reference_dir} is not a folder")
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)

    scores = {}
    with use_backend(backend) if backend else nullcontext():
        for path in tqdm(files, disable=not progress, desc="restore", unit="image"):
            img, bits = read_image(path)
            restored = restore_image(net, adapter, img.unsqueeze(0).to(dev), level, tile=tile,
                                     overlap=overlap, tile_batch=tile_batch)[0].float().cpu()
            write_image(out_dir / f"{path.stem}.png", restored, bits)
            if reference_dir is not None:
                ref, ref_bits = read_image(_reference_for(path, reference_dir))
                if ref.shape != restored.shape:
                    raise ValueError(f"{path}: restored size {tuple(restored.shape[1:])} differs "
                                     f"from its reference ({tuple(ref.shape[1:])})")
                scores[path.name] = {k: v[0] for k, v in adapter.score(
                    adapter.output_for_scoring(restored[None], bits), ref[None], level, crop_border).items()}
    mean = ({k: sum(s[k] for s in scores.values()) / len(scores) for k in next(iter(scores.values()))}
            if scores else {})
    return {"images": scores, "mean": mean}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m restorenet.restore", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, metavar="FILE", help="model.pt, a training "
                   "checkpoint, or an authors' released checkpoint (with --model)")
    p.add_argument("--model", choices=list_models(), metavar="NAME", help="the model of a "
                   "released checkpoint (paper configuration): " + ", ".join(list_models()))
    p.add_argument("--input", required=True, metavar="PATH_OR_DIR", help="an image or a folder")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for <name>.png results")
    p.add_argument("--level", type=float, help="degradation level, for models that take one")
    p.add_argument("--tile", type=int, default=384, help="tile size (0: whole images)")
    p.add_argument("--overlap", type=int, default=32, help="overlap of neighbouring tiles")
    p.add_argument("--tile-batch", type=int, default=4, help="tiles restored at once")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--backend", choices=BACKENDS, help="restorenet op backend (default: the "
                   "fastest for the device)")
    p.add_argument("--reference", metavar="DIR", help="clean images of the same names: print PSNR/SSIM")
    p.add_argument("--crop-border", type=int, default=0, help="pixels the metrics leave out per side")
    p.add_argument("--threads", type=int, help="CPU threads (default: the CPUs this process may use)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads or default_threads())
    try:
        result = restore_files(args.weights, args.input, args.output, model=args.model,
                               level=args.level,
                               tile=args.tile, overlap=args.overlap, tile_batch=args.tile_batch,
                               device=args.device, backend=args.backend, reference=args.reference,
                               crop_border=args.crop_border, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    for name, s in result["images"].items():
        print(f"{name}: PSNR {s['psnr']:.2f} dB (Y {s['psnr_y']:.2f}), SSIM {s['ssim']:.4f} "
              f"(Y {s['ssim_y']:.4f})")
    if result["mean"]:
        m = result["mean"]
        print(f"mean over {len(result['images'])}: PSNR {m['psnr']:.2f} dB (Y {m['psnr_y']:.2f}), "
              f"SSIM {m['ssim']:.4f} (Y {m['ssim_y']:.4f})")
        with open(Path(args.output) / "metrics.json", "w") as f:
            json.dump(result, f, indent=1)
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
