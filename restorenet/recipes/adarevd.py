"""AdaRevD recipe: decoder columns on a frozen encoder, the patch-exit classifier, exits.

    python -m restorenet.recipes adarevd [--quick] [--out DIR] [--encoder-weights PATH]

Stages (motion deblurring: ``restorenet.data`` task "deblur", random-walk kernels of
7, 11, 15 and 19 px on random crops of the training photos):

0. **Encoder.** A NAFNet of the model's encoder size (its own small decoder as the
   temporary head) trained with L1, then its encoder is copied into AdaRevD and frozen,
   as the paper inherits a trained encoder (``AdaRevD.inherit_encoder``).
   ``--encoder-weights PATH`` skips the training: a restorenet NAFNet model file, or a
   released NAFNet checkpoint (``restorenet.weights.adarevd.load_encoder``).
1. **Decoder columns.** The K reversible columns, their heads and the feature scales
   on the frozen encoder with deep supervision (``AdaRevDAdapter``: the mean over
   columns of L1 + 0.01 FFT-L1); AdamW with the released betas (0.9, 0.9).
2. **Patch classifier.** Only ``model.classifier`` trains (decoder frozen), with
   cross-entropy on the PSNR class of each blurred crop against its sharp crop
   (``psnr_class``: cut at 20/25/30/35/40 dB), crops of the inference tile's size --
   as the released ``Dataset_PairedHardSimpleImage`` + ``ClassifyLoss`` do on 384 px
   crops (the inference tile is 384 there).
3. **Evaluation.** ``AdaRevD.restore`` on the whole held-out photos (chelsea, coffee),
   motion-blurred at every kernel size with a fixed seed (``EvalSet``, seed 1234),
   for every fixed depth 1..K (``exit_idx = (k,) * 6``) and for the exits the
   classifier picks under two class->depth maps: the paper's GoPro map (K = 4:
   (4, 4, 3, 3, 2, 1)) and a map calibrated here (below). Measured per setting: PSNR
   of the 8-bit output, the mean number of columns each tile ran, and the wall time
   of ``restore``. The settings run interleaved, image by image, so machine load
   falls on all of them alike. Also: the classifier's accuracy on crops of the
   held-out photos, and the stage-0 NAFNet (its own decoder) as a reference.

Where this differs from the paper (named choices, not silent ones):

* Encoder: NAFNet, not UFPNet. Every released AdaRevD config uses UFPNet, whose
  encoder needs a trained flow-based kernel prior and kernel estimator (a separate
  training of its own) and runs a 19x19 per-pixel kernel map -- too slow for a CPU
  recipe; the plain NAFNet encoder is the released code's other option.
  ``--model-kwarg encoder=ufpnet`` works only with ``--encoder-weights``.
* Size: width 8, one block per encoder level, K = 4 columns (AdaRevD-B's K), 64 px
  training crops, tiles of 96 px overlapping by 16 (the paper: width 64, 28 blocks at
  the bottom, 256 px crops, 384 px tiles overlapping by 32). ``--paper-config``: the
  released sizes (with the NAFNet encoder).
* Encoder pooling: the released evaluation encoders average each SCA over a window
  of 1.5x the training crop (384 px for 256 px crops, NAFNet's TLC). Here the SCA
  takes the global mean by default (``--pool-window PX`` sets a window, e.g. 96 =
  1.5x our crop). Why: when this recipe was written, ``LocalChannelAttention`` pooled
  with a stride-1 ``avg_pool2d``, O(window^2) per pixel -- measured: encoding the
  400x600 coffee photo (width 8, one thread, loaded 2-core machine) took 48 s with a
  96 px window against 0.6 s with the global mean. It now uses a summed-area table
  (``box_mean``, as the released code does), O(1) per pixel, so a window costs about
  what the global mean does; the committed run still used the global mean.
  ``--paper-config`` keeps the released 384 px window.
* Training: the reversible columns train with ``memory_efficient=False`` (plain
  autograd: identical gradients to rounding and faster on a CPU; memory is no issue
  at this size). Steps are a few hundred, not hundreds of thousands; no EMA; the
  classifier trains at the same lr and weight decay as the columns (released: 3e-4).
* Calibrated map (ours): for each PSNR class, the fewest columns whose mean PSNR on
  fixed training crops of that class is within ``--calibration-tol`` dB (0.1) of the
  best depth's; a class without crops gets K. The paper picks its map per dataset
  by hand; this is our rule for picking one on the training photos.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from restorenet.data import (HELDOUT_PHOTOS, TRAIN_PHOTOS, RandomCropSampler, center_crop, get_task,
                             load_photo)
from restorenet.metrics import psnr
from restorenet.models.adarevd import (DEFAULT_EXIT_IDX, NUM_CLASSES, PSNR_CUTS, AdaRevD,
                                       psnr_class, use_local_pooling)
from restorenet.models.nafnet import NAFNet
from restorenet.ops.tiles import tile_starts
from restorenet.recipes.common import Report, Settings, fit
from restorenet.training.adapters import AdaRevDAdapter, ModelAdapter, quantize
from restorenet.training.checkpoint import is_restorenet_file, model_from_file, read_file
from restorenet.training.evaluation import EvalSet

TASK = "deblur"
SMALL_MODEL = dict(width=8, enc_blocks=(1, 1, 1, 1), middle_blocks=1, num_decoders=4)
PAPER_MODEL = dict(width=64, enc_blocks=(1, 1, 1, 28), middle_blocks=1, num_decoders=4)
DEC_BLOCKS = (1, 1, 1, 1)  # the temporary NAFNet head of stage 0 (NAFNet's own decoder)
BETAS = (0.9, 0.9)  # released AdaRevD optimiser
CALIBRATION_TOL_DB = 0.1
# Which blurred photo the exit-map picture shows: (photo index, kernel size).
MAP_PHOTO, MAP_LEVEL = 1, 15


# ----------------------------------------------------------------------------- options


def add_arguments(group) -> None:
    group.add_argument("--encoder-weights", metavar="PATH",
                       help="skip stage 0: a NAFNet (restorenet model file or released "
                            "checkpoint) whose encoder is inherited")
    group.add_argument("--encoder-steps", type=int, help="stage 0 steps (default 2x --steps)")
    group.add_argument("--classifier-steps", type=int, help="stage 2 steps (default --steps)")
    group.add_argument("--tile", type=int, help="restore() tile and classifier crop size (default 96)")
    group.add_argument("--overlap", type=int, help="restore() tile overlap (default 16)")
    group.add_argument("--pool-window", type=int,
                       help="encoder SCA window in px at level 0 (default: global mean; "
                            "--paper-config: 384, as released)")
    group.add_argument("--calibration-tol", type=float, default=CALIBRATION_TOL_DB,
                       help="dB below the best depth a class may exit at (calibrated map)")


def _plan(s: Settings) -> dict:
    """Every size of the run: the quick, CPU and paper defaults, then the flags."""
    extra = s.extra
    if s.paper_config:
        base = dict(model=PAPER_MODEL, steps=2000, batch=8, crop=256, tile=384, overlap=32,
                    eval_size=None, calib=256, heldout=256, levels=None, pool_window=384)
    else:
        base = dict(model=SMALL_MODEL, steps=s.choose(500, 3),
                    batch=s.choose(8, 2), crop=s.choose(64, 32), tile=s.choose(96, 32),
                    overlap=16, eval_size=s.choose(None, 64), calib=s.choose(192, 8),
                    heldout=s.choose(256, 8), levels=s.choose(None, (7, 19)), pool_window=0)
    steps = s.given("steps", base["steps"])
    crop = s.given("crop", base["crop"])
    plan = dict(
        model={**base["model"], **s.model_kwargs},
        steps=steps,
        encoder_steps=extra.get("encoder_steps") or s.choose(2 * steps, 4),
        classifier_steps=extra.get("classifier_steps") or s.choose(steps, 4),
        batch=s.given("batch", base["batch"]), crop=crop,
        lr=s.given("lr", 1e-3), weight_decay=s.given("weight_decay", 1e-3),
        tile=extra.get("tile") or base["tile"],
        overlap=extra.get("overlap") if extra.get("overlap") is not None else base["overlap"],
        pool_window=extra.get("pool_window") if extra.get("pool_window") is not None
        else base["pool_window"],
        eval_size=s.given("eval_size", base["eval_size"]), levels=base["levels"],
        calibration_crops=base["calib"], heldout_crops=base["heldout"],
        calibration_tol=extra.get("calibration_tol", CALIBRATION_TOL_DB))
    return plan


# ----------------------------------------------------------------------------- stages


def _crops(crop: int, seed: int, names: Sequence[str] = TRAIN_PHOTOS) -> RandomCropSampler:
    return RandomCropSampler(crop=crop, names=names, seed=seed)


def _fit_logged(name: str, params, step_loss, steps: int, plan: dict, s: Settings) -> list[float]:
    def log(step, loss):
        print(f"  [{name}] step {step}/{steps}: loss {loss:.4f}", flush=True)

    return fit(params, step_loss, steps, plan["lr"], weight_decay=plan["weight_decay"],
               betas=BETAS, grad_clip=s.grad_clip, amp=s.amp, device=s.device, log=log)


def _deblur_loss(model: nn.Module, adapter: ModelAdapter, sampler: RandomCropSampler,
                 batch: int, generator: torch.Generator, device):
    task = get_task(TASK)

    def step_loss(step: int) -> torch.Tensor:
        data = adapter.make_batch(task, sampler.sample(batch), generator).to(device)
        return adapter.batch_loss(model, data)

    return step_loss


def build_model(plan: dict, device) -> AdaRevD:
    cfg = dict(plan["model"])
    cfg.setdefault("encoder", "nafnet")
    cfg.setdefault("encoder_pooling", "global")
    model = AdaRevD(memory_efficient=cfg.pop("memory_efficient", False), **cfg)
    if plan["pool_window"] and cfg["encoder_pooling"] == "global":
        use_local_pooling(model.encoder, plan["pool_window"])
    return model.to(device)


def stage_encoder(model: AdaRevD, plan: dict, s: Settings, report: Report) -> NAFNet | None:
    """Stage 0: a trained NAFNet's encoder into ``model`` (frozen). Returns the NAFNet
    when it was trained here (the reference), else None."""
    path = s.extra.get("encoder_weights")
    if path:
        contents = read_file(path)
        if is_restorenet_file(contents):
            model.inherit_encoder(model_from_file(contents, path))
        else:
            from restorenet.weights.adarevd import load_encoder
            load_encoder(model, path)
        report.results["encoder"] = {"source": str(path)}
        report.text(f"## Stage 0: encoder\n\nInherited from `{path}` (no training).")
        return None
    if model.encoder_name != "nafnet":
        raise ValueError("encoder_weights: an encoder other than NAFNet's is not trained by this "
                         "recipe; give --encoder-weights with a trained checkpoint")
    cfg = plan["model"]
    nafnet = NAFNet(width=cfg["width"], enc_blocks=cfg["enc_blocks"],
                    middle_blocks=cfg.get("middle_blocks", 1), dec_blocks=DEC_BLOCKS).to(s.device)
    generator = torch.Generator().manual_seed(s.seed)
    losses = _fit_logged("encoder", nafnet.parameters(),
                         _deblur_loss(nafnet, ModelAdapter(), _crops(plan["crop"], s.seed),
                                      plan["batch"], generator, s.device),
                         plan["encoder_steps"], plan, s)
    nafnet.eval()
    model.inherit_encoder(nafnet)
    if plan["pool_window"]:  # the reference NAFNet evaluated with the same SCA window
        use_local_pooling(nafnet.encoder, plan["pool_window"])
    report.results["encoder"] = {"source": "trained (NAFNet, its decoder as the temporary head)",
                                 "steps": plan["encoder_steps"], "losses": losses}
    return nafnet


def stage_decoder(model: AdaRevD, plan: dict, s: Settings) -> list[float]:
    """Stage 1: columns, heads and feature scales on the frozen encoder, deep supervision."""
    params = [p for name, p in model.named_parameters()
              if p.requires_grad and not name.startswith("classifier.")]
    generator = torch.Generator().manual_seed(s.seed + 1)
    model.train()
    losses = _fit_logged("decoder", params,
                         _deblur_loss(model, AdaRevDAdapter(), _crops(plan["crop"], s.seed + 1),
                                      plan["batch"], generator, s.device),
                         plan["steps"], plan, s)
    model.eval()
    return losses


def blurred_crops(crop: int, n: int, seed: int, names: Sequence[str] = TRAIN_PHOTOS):
    """``n`` crops blurred at random task levels, their sharp crops and PSNR classes
    (the released rule: PSNR of the blurry crop against the sharp one, whole crop)."""
    task = get_task(TASK)
    generator = torch.Generator().manual_seed(seed)
    batch = ModelAdapter().make_batch(task, _crops(crop, seed, names).sample(n), generator)
    labels = psnr_class(psnr(batch.inputs.clamp(0, 1), batch.target))
    return batch.inputs, batch.target, labels


def stage_classifier(model: AdaRevD, plan: dict, s: Settings, report: Report) -> list[float]:
    """Stage 2: the classifier alone, cross-entropy on PSNR classes of blurred crops."""
    sampler = _crops(plan["tile"], s.seed + 2)
    task, generator = get_task(TASK), torch.Generator().manual_seed(s.seed + 2)
    adapter = ModelAdapter()
    counts = torch.zeros(NUM_CLASSES, dtype=torch.long)

    def step_loss(step: int) -> torch.Tensor:
        batch = adapter.make_batch(task, sampler.sample(plan["batch"]), generator)
        labels = psnr_class(psnr(batch.inputs.clamp(0, 1), batch.target))
        counts.add_(torch.bincount(labels, minlength=NUM_CLASSES))
        return F.cross_entropy(model.classify(batch.inputs.to(s.device)), labels.to(s.device))

    model.eval()  # decoder frozen; the classifier has no dropout or batch statistics
    losses = _fit_logged("classifier", model.classifier.parameters(), step_loss,
                         plan["classifier_steps"], plan, s)
    report.results["classifier"] = {"steps": plan["classifier_steps"], "losses": losses,
                                    "train_class_counts": counts.tolist()}
    return losses


@torch.no_grad()
def classifier_accuracy(model: AdaRevD, plan: dict, s: Settings, names: Sequence[str],
                        seed: int) -> dict:
    """Accuracy on ``heldout_crops`` blurred tile-sized crops of ``names`` (fixed seed)."""
    inputs, _, labels = blurred_crops(plan["tile"], plan["heldout_crops"], seed, names)
    predicted = torch.cat([model.classify(x.to(s.device)).argmax(1).cpu() for x in inputs.split(64)])
    confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.long)
    confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    return {"crops": len(labels), "accuracy": float((predicted == labels).float().mean()),
            "within_one_class": float(((predicted - labels).abs() <= 1).float().mean()),
            "confusion": confusion.tolist()}


def exit_map_from_scores(scores: torch.Tensor, labels: torch.Tensor, tol: float
                         ) -> tuple[tuple[int, ...], list]:
    """The calibrated class -> columns map from per-crop PSNR ``scores [K, n]`` (one row
    per depth) and the crops' PSNR classes ``labels [n]``: per class, the fewest columns
    whose mean PSNR is within ``tol`` dB of the best depth's; K for a class without
    crops. Also returns each class's mean PSNR per depth (None without crops)."""
    k = scores.shape[0]
    exit_map, per_class = [], []
    for c in range(NUM_CLASSES):
        members = labels == c
        if not members.any():
            exit_map.append(k)
            per_class.append(None)
            continue
        means = scores[:, members].mean(1)
        exit_map.append(int((means >= means.max() - tol).nonzero()[0]) + 1)
        per_class.append([round(float(m), 3) for m in means])
    return tuple(exit_map), per_class


@torch.no_grad()
def calibrate_exit_map(model: AdaRevD, plan: dict, s: Settings) -> tuple[tuple[int, ...], list]:
    """``exit_map_from_scores`` on fixed blurred training crops of the tile's size."""
    inputs, target, labels = blurred_crops(plan["tile"], plan["calibration_crops"], 1111)
    model.train()  # train mode returns every column's output (the encoder stays in eval)
    try:
        outs = torch.cat([torch.stack(model(x.to(s.device))) for x in inputs.split(16)], dim=1)
    finally:
        model.eval()
    scores = torch.stack([psnr(quantize(o.cpu()), target) for o in outs])  # [K, n]
    return exit_map_from_scores(scores, labels, plan["calibration_tol"])


# ----------------------------------------------------------------------------- evaluation


def _eval_pairs(plan: dict) -> EvalSet:
    """The held-out photos, whole (or centre-cropped to ``eval_size``), blurred at every
    kernel size with the fixed evaluation seed."""
    photos = [load_photo(n) for n in HELDOUT_PHOTOS]
    if plan["eval_size"]:
        photos = [center_crop(p, plan["eval_size"]) for p in photos]
    evalset = EvalSet.degraded(get_task(TASK), [p[None] for p in photos])
    if plan["levels"] is not None:  # --quick: the mildest and the strongest blur only
        evalset.groups = {k: v for k, v in evalset.groups.items() if v[0] in plan["levels"]}
    return evalset


@torch.no_grad()
def evaluate_exits(model: AdaRevD, evalset: EvalSet, maps: dict[str, tuple[int, ...]],
                   plan: dict, s: Settings, nafnet: NAFNet | None):
    """Every setting on every blurred photo: PSNR, columns per tile, time. Returns
    (per-level results, per-setting totals, the exit map drawn: the first classifier
    map on photo ``MAP_PHOTO`` at kernel ``MAP_LEVEL``, or the last evaluated level)."""
    per_level, picture = {}, None
    drawn = next(name for name in maps if name.startswith("classifier"))
    draw_level = MAP_LEVEL if MAP_LEVEL in [v[0] for v in evalset.groups.values()] else \
        list(evalset.groups.values())[-1][0]
    totals = {name: {"psnr": [], "columns": [], "time_s": 0.0} for name in maps}
    for key, (level, pairs) in evalset.groups.items():
        row = {"input": {"psnr": []}}
        if nafnet is not None:
            row["nafnet (stage 0)"] = {"psnr": []}
        row.update({name: {"psnr": [], "columns": [], "time_s": 0.0} for name in maps})
        for index, (degraded, clean) in enumerate(pairs):
            degraded = degraded.to(s.device)
            row["input"]["psnr"].append(float(psnr(quantize(degraded.cpu()), clean)[0]))
            if nafnet is not None:
                restored = quantize(nafnet(degraded).cpu())
                row["nafnet (stage 0)"]["psnr"].append(float(psnr(restored, clean)[0]))
            for name, exit_idx in maps.items():  # interleaved: load hits every setting alike
                start = time.perf_counter()
                out, exits = model.restore(degraded, tile=plan["tile"], overlap=plan["overlap"],
                                           exit_idx=exit_idx, return_exits=True)
                elapsed = time.perf_counter() - start
                value = float(psnr(quantize(out.cpu()), clean)[0])
                for acc in (row[name], totals[name]):
                    acc["psnr"].append(value)
                    acc["columns"].extend(exits.flatten().tolist())
                    acc["time_s"] += elapsed
                if name == drawn and level == draw_level and index == min(MAP_PHOTO, len(pairs) - 1):
                    picture = dict(setting=name, level=level, photo=HELDOUT_PHOTOS[index],
                                   degraded=degraded[0].cpu(), exits=exits[0].cpu())
        per_level[key] = {name: _summary(v) for name, v in row.items()}
    return per_level, {name: _summary(v) for name, v in totals.items()}, picture


def _summary(acc: dict) -> dict:
    out = {"psnr": sum(acc["psnr"]) / len(acc["psnr"])}
    if "columns" in acc:
        out["mean_columns"] = sum(acc["columns"]) / len(acc["columns"])
        out["tiles"] = len(acc["columns"])
        out["time_s"] = round(acc["time_s"], 3)
    return out


# ----------------------------------------------------------------------------- report


def _fixed_curve(totals: dict, k: int) -> tuple[list[float], list[float]]:
    xs = [totals[f"depth {d}"]["mean_columns"] for d in range(1, k + 1)]
    ys = [totals[f"depth {d}"]["psnr"] for d in range(1, k + 1)]
    return xs, ys


def _interpolate(xs: list[float], ys: list[float], x: float) -> float:
    """PSNR of the fixed-depth curve at ``x`` columns (linear between depths)."""
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[0] if x < xs[0] else ys[-1]


def plot_tradeoff(report: Report, totals: dict, per_level: dict, k: int) -> None:
    with report.figure("psnr_vs_columns.png", "Held-out PSNR vs mean columns run per tile: "
                       "fixed depths 1..K (line) and the classifier's exits (markers); left: "
                       "all photos and kernel sizes, right: per kernel size",
                       ncols=2, figsize=(10, 4)) as (fig, (ax_all, ax_level)):
        markers = {"classifier, paper map": "*", "classifier, calibrated map": "D"}
        for ax, groups in ((ax_all, {"all": totals}), (ax_level, per_level)):
            for i, (label, res) in enumerate(groups.items()):
                color = f"C{i}"
                xs, ys = _fixed_curve(res, k)
                ax.plot(xs, ys, "o-", color=color, label=f"fixed depth ({label})" if ax is ax_all
                        else f"kernel {label} px")
                for name, marker in markers.items():
                    if name in res:
                        ax.plot(res[name]["mean_columns"], res[name]["psnr"], marker, color=color,
                                ms=11 if marker == "*" else 7, mec="k",
                                label=name if ax is ax_all else None)
            ax.set_xlabel("mean columns run per tile")
            ax.set_ylabel("PSNR (dB)")
            ax.set_xticks(range(1, k + 1))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)


def plot_exit_map(report: Report, picture: dict, plan: dict, multiple: int, k: int) -> None:
    """The blurred photo (grey, so the overlay reads; and small as a PNG) with each
    tile's cell coloured by its number of columns."""
    import matplotlib.pyplot as plt

    img = picture["degraded"].clamp(0, 1)
    h, w = img.shape[-2:]
    hp, wp = -(-h // multiple) * multiple, -(-w // multiple) * multiple
    th, tw = min(plan["tile"], hp), min(plan["tile"], wp)
    ys = tile_starts(hp, th, plan["overlap"] if th == plan["tile"] else 0)
    xs = tile_starts(wp, tw, plan["overlap"] if tw == plan["tile"] else 0)
    y_edges = [min(v, h) for v in ys] + [h]  # cells: from a tile's start to the next one's
    x_edges = [min(v, w) for v in xs] + [w]
    grey = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]).numpy()
    exits = picture["exits"].numpy()
    caption = (f"Exit map of {picture['photo']} blurred with a {picture['level']} px kernel "
               f"({picture['setting']}): columns each {plan['tile']} px tile ran, drawn over "
               f"its cell (from its start to the next tile's start)")
    with report.figure("exit_map.png", caption, figsize=(6.4, 4.2)) as (fig, ax_map):
        ax_map.imshow(grey, cmap="gray", vmin=0, vmax=1, extent=(0, w, h, 0))
        mesh = ax_map.pcolormesh(x_edges, y_edges, exits, cmap=plt.get_cmap("viridis", k),
                                 vmin=0.5, vmax=k + 0.5, alpha=0.45, edgecolors="w", linewidth=0.3)
        for r in range(len(ys)):
            for c in range(len(xs)):
                ax_map.text((x_edges[c] + x_edges[c + 1]) / 2, (y_edges[r] + y_edges[r + 1]) / 2,
                            str(int(exits[r, c])), ha="center", va="center", fontsize=7, color="w")
        fig.colorbar(mesh, ax=ax_map, ticks=range(1, k + 1), label="columns run")
        ax_map.set_xlim(0, w)
        ax_map.set_ylim(h, 0)
        ax_map.set_axis_off()


def plot_losses(report: Report) -> None:
    curves = [(name, report.results[key]["losses"]) for name, key in
              (("stage 0: NAFNet L1", "encoder"), ("stage 1: columns, L1 + 0.01 FFT-L1", "decoder"),
               ("stage 2: classifier cross-entropy", "classifier"))
              if "losses" in report.results.get(key, {})]
    with report.figure("losses.png", "Training loss of each stage (mean of 10-step windows)",
                       ncols=len(curves), figsize=(4 * len(curves), 3)) as (fig, axes):
        for ax, (name, losses) in zip(axes if len(curves) > 1 else [axes], curves):
            t = torch.tensor(losses)
            window = min(10, len(losses))
            smooth = t.unfold(0, window, 1).mean(1)
            ax.plot(range(window, len(losses) + 1), smooth.tolist())
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)


def _db(value: float) -> str:
    """A signed dB difference with 2 decimals, never "-0.00"."""
    return f"{round(value, 2) + 0.0:+.2f}"


def _conclusion(totals: dict, classifier: dict, k: int, timing_note: str) -> str:
    xs, ys = _fixed_curve(totals, k)
    full, gain = totals[f"depth {k}"], ys[-1] - ys[0]
    lines = [f"Fixed depth 1 gives {ys[0]:.2f} dB and depth {k} {ys[-1]:.2f} dB: the {k - 1} "
             f"extra columns per tile add {_db(gain)} dB."]
    if abs(gain) < 0.1:
        lines.append("That is almost nothing at this size (width 8, a few hundred steps), so exiting "
                     "early costs little PSNR whatever the classifier picks: the run cannot show "
                     "the classifier choosing well, only that skipped columns save time.")
    for name in ("classifier, paper map", "classifier, calibrated map"):
        if name not in totals:
            continue
        res = totals[name]
        on_curve = _interpolate(xs, ys, res["mean_columns"])
        lines.append(
            f"With the {name.split(', ')[1]} the tiles run {res['mean_columns']:.2f} columns on "
            f"average ({100 * (1 - res['mean_columns'] / k):.0f}% fewer than full depth) at "
            f"{res['psnr']:.2f} dB: {_db(res['psnr'] - full['psnr'])} dB against full depth, "
            f"{_db(res['psnr'] - on_curve)} dB against the fixed-depth line at the same mean "
            f"columns (positive would mean the per-tile choice beats spending the same columns "
            f"uniformly); restore() took {res['time_s']:.1f} s against {full['time_s']:.1f} s "
            f"at full depth.")
    seen, heldout = classifier["train_photos"], classifier["heldout"]
    lines.append(f"The classifier is right on {100 * seen['accuracy']:.0f}% of fresh crops of the "
                 f"training photos and {100 * heldout['accuracy']:.0f}% of crops of the held-out "
                 f"photos (chance with 6 classes: 17%), so its exit map is only as good as that.")
    lines.append(timing_note)
    return " ".join(lines)


def run(settings: Settings, report: Report) -> None:
    s, plan = settings, _plan(settings)
    torch.manual_seed(s.seed)
    model = build_model(plan, s.device)
    k = model.num_decoders
    report.results["plan"] = {key: (list(v) if isinstance(v, tuple) else v) for key, v in plan.items()}
    report.results["parameters"] = {
        "total": sum(p.numel() for p in model.parameters()),
        "encoder (frozen)": sum(p.numel() for p in model.encoder.parameters()),
        "decoder + heads + scales": sum(p.numel() for n, p in model.named_parameters()
                                        if not n.startswith(("encoder.", "classifier."))),
        "classifier": sum(p.numel() for p in model.classifier.parameters())}
    report.text(
        "AdaRevD on motion deblurring (kernels 7/11/15/19 px): stage 0 trains a NAFNet and "
        "freezes its encoder, stage 1 the K decoder columns with deep supervision, stage 2 the "
        "patch-exit classifier on PSNR classes of blurred crops; then `restore()` on the held-out "
        "photos for every fixed depth and for the classifier's exits. See "
        "`restorenet/recipes/adarevd.py` for where this differs from the paper.\n\n"
        f"Model: {plan['model']} (NAFNet encoder unless given), K = {k}; "
        + ", ".join(f"{n} {v:,}" for n, v in report.results["parameters"].items()) + " parameters. "
        f"Crops {plan['crop']} px, batch {plan['batch']}; steps {plan['encoder_steps']} / "
        f"{plan['steps']} / {plan['classifier_steps']} (stages 0/1/2); tiles {plan['tile']} px, "
        f"overlap {plan['overlap']}; encoder SCA window "
        f"{plan['pool_window'] or 'global'} px.")

    with report.stage("stage 0: encoder"):
        nafnet = stage_encoder(model, plan, s, report)
    with report.stage("stage 1: decoder columns"):
        report.results["decoder"] = {"steps": plan["steps"], "losses": stage_decoder(model, plan, s)}
    with report.stage("stage 2: classifier"):
        stage_classifier(model, plan, s, report)
        accuracy = classifier_accuracy(model, plan, s, HELDOUT_PHOTOS, 4321)
        report.results["classifier"]["heldout"] = accuracy
        seen = classifier_accuracy(model, plan, s, TRAIN_PHOTOS, 4322)  # fresh crops, same photos
        report.results["classifier"]["train_photos"] = seen
        calibrated, per_class = calibrate_exit_map(model, plan, s)
        report.results["exit_maps"] = {"calibrated": list(calibrated), "calibration_psnr_per_class": per_class}
    plot_losses(report)

    maps = {f"depth {d}": (d,) * NUM_CLASSES for d in range(1, k + 1)}
    if k in DEFAULT_EXIT_IDX:
        maps["classifier, paper map"] = DEFAULT_EXIT_IDX[k]
        report.results["exit_maps"]["paper"] = list(DEFAULT_EXIT_IDX[k])
    maps["classifier, calibrated map"] = calibrated
    with report.stage("evaluation"):
        evalset = _eval_pairs(plan)
        per_level, totals, picture = evaluate_exits(model, evalset, maps, plan, s, nafnet)
    report.results["evaluation"] = {
        "photos": list(HELDOUT_PHOTOS), "eval_size": plan["eval_size"], "levels": evalset.keys,
        "per_level": per_level, "overall": totals,
        "exit_map_picture": {key: picture[key] for key in ("photo", "level", "setting")}
        | {"exits": picture["exits"].tolist()}}

    counts = report.results["classifier"]["train_class_counts"]
    report.text("## Classifier (stage 2)\n\n"
                f"Classes: PSNR of the blurred crop against the sharp one, cut at "
                f"{', '.join(f'{c:g}' for c in PSNR_CUTS)} dB (class 0 = most blurred). "
                f"Training crops per class: {counts}. Accuracy on {accuracy['crops']} fresh blurred "
                f"crops of the training photos: {100 * seen['accuracy']:.1f}% (within one class "
                f"{100 * seen['within_one_class']:.1f}%); of the held-out photos: "
                f"{100 * accuracy['accuracy']:.1f}% ({100 * accuracy['within_one_class']:.1f}%). "
                f"Held-out confusion (rows: true class, columns: predicted): {accuracy['confusion']}.")
    report.table(["exit map", *[f"class {c}" for c in range(NUM_CLASSES)]],
                 [[name, *map_] for name, map_ in maps.items() if name.startswith("classifier")],
                 caption="Columns run per predicted class (paper: the authors' GoPro map for K = 4; "
                         "calibrated: the fewest columns within "
                         f"{plan['calibration_tol']} dB of the best depth on training crops of "
                         "that class)")

    full = totals[f"depth {k}"]
    report.text("## Exits vs fixed depth (held-out photos)")
    report.table(["setting", "mean columns / tile", "PSNR (dB)", "vs full depth (dB)",
                  "columns saved", "restore() time (s)"],
                 [[name, f"{r['mean_columns']:.2f}", r["psnr"], _db(r["psnr"] - full["psnr"]),
                   f"{100 * (1 - r['mean_columns'] / k):.0f}%", f"{r['time_s']:.2f}"]
                  for name, r in totals.items()],
                 caption=f"{len(HELDOUT_PHOTOS)} photos ({', '.join(HELDOUT_PHOTOS)}, "
                         f"{'whole' if not plan['eval_size'] else str(plan['eval_size']) + ' px crops'}) "
                         f"x {len(evalset.keys)} kernel sizes; PSNR of the 8-bit output, mean over "
                         f"images; columns averaged over all tiles; time summed over all images")
    names = list(next(iter(per_level.values())))
    report.table(["kernel (px)", *names],
                 [[key, *[f"{r[n]['psnr']:.2f}" + (f" / {r[n]['mean_columns']:.2f}"
                                                    if "mean_columns" in r[n] else "")
                          for n in names]] for key, r in per_level.items()],
                 caption="Per kernel size: PSNR (dB) / mean columns per tile")
    plot_tradeoff(report, totals, per_level, k)
    plot_exit_map(report, picture, plan, model.size_multiple, k)
    report.text("## What this shows / what it does not\n\n" + _conclusion(
        totals, report.results["classifier"], k, "Times are wall-clock on a shared, loaded CPU (settings interleaved image by "
        "image); they include the encoder and the classifier, which every setting runs, so "
        "they show whether skipped columns turn into saved time at this size, not GPU speed. "
        "Small model, short training, two held-out photos: the numbers describe this run, "
        "not AdaRevD-B on GoPro."))
