"""Ragged tile batching for patch-exit models: plan, gather, schedule, blend.

A patch-exit model (AdaRevD) cuts every image into overlapping tiles and lets each
tile leave after its own number of stages ("exit depth", 1..K). Done one image at a
time, each stage gathers the tiles still running and asks the host how many remain.
These four pieces run a whole batch -- images of any sizes -- in one pass, with one
device-to-host copy::

    plan  = tile_plan(images, tile, overlap)       # host only: where the tiles are
    cls   = classifier(tile_gather(e3, plan, scale=8))   # tiles in plan order
    sched = tile_schedule(depth, K)                # deepest first; the ONE host copy
    t     = tile_gather(feat, plan, sched.order, scale=s)  # straight into sorted order
    for k in range(K):                             # the tiles that run stage k are
        t = stage_k(t[:sched.active[k]])           # a prefix: no gather, no sync
        out[sched.exiting(k)] = head_k(t[sched.exiting(k)])
    img_out = tile_blend(out, plan, sched.order)   # back into the images

Geometry, per image and axis, at full resolution (level 0). A tile of size T steps
by T - O; the last one is shifted inward to end at the border, so every tile has
full size::

    starts = [0, T - O, 2 (T - O), ...  (while < L - T),  L - T]      ([0] if L == T)

An image smaller than the tile is an error: pad it, or pass a smaller tile
(``AdaRevD.restore`` clamps the tile to the image, as the authors' code does).
Feature level l of a U-Net at scale s = 2^l is cut at starts/s with tile T/s, so
``multiple`` (e.g. 16) must divide the tile, the overlap and every image size.
Plan order: image by image, then tile rows, then tile columns.

Blend weights. Along one axis a tile's ramp rises linearly (at pixel centres
p + 1/2) over its actual overlap with the previous tile and falls over its actual
overlap with the next one, 1 elsewhere::

    ramp(p) = min(1, (p + 1/2) / ov_prev) * min(1, (T - p - 1/2) / ov_next)

(a factor is left out where there is no neighbour). A tile's weight is
``w(i, j) = ramp_y(i) * ramp_x(j)`` and every output pixel is the normalised sum
``sum_t w_t tile_t / sum_t w_t`` over the tiles covering it -- so two neighbours
cross-fade, and a constant tile set blends to that constant exactly.

``ramp="released"`` is AdaRevD's released blend instead (``released_ramp``):
``linspace`` ramps over the overlaps, and the plain sum ``sum_t w_t tile_t``, not
normalised (neighbouring ramps sum to 1, except along an axis with one tile, whose
first ``overlap`` pixels are faded in from 0 -- the released code's quirk).

Ops: ``torch.ops.restorenet.tile_gather`` and ``tile_blend`` (forward only, no
autograd) with backends ``reference`` (the spec below: vectorised PyTorch, no host
reads), ``triton`` (``restorenet_kernels.tiles``) and ``cuda`` (``restorenet._C``,
csrc/tiles.cu; the automatic choice skips it where the extension was built without
these kernels, and asking for it there raises). ``tile_plan`` is host-side
Python and ``tile_schedule`` a few PyTorch ops, inside an NVTX/profiler range.

Checks and host reads. Every argument is checked in this module, before any kernel
runs, so every backend raises the same error (naming the argument). An ``order`` is
checked value by value (a wrong one would make a kernel read out of bounds); that
costs nothing for None, a list of ints or an order from ``tile_schedule`` (marked as a
known permutation), and ONE device-to-host read for any other tensor. So the pipeline
above reads the host once, in ``tile_schedule``.

torch.compile. ``tile_plan``, ``tile_gather`` and ``tile_blend`` trace into one graph
(fullgraph=True works; the kernels are opaque custom ops). ``tile_schedule`` is the one
declared graph break (``torch.compiler.disable``: it runs eagerly, see the comment on
it); a user's tensor ``order`` adds one more, for its check.
"""
from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from restorenet._checks import check_tensor
from restorenet.ops._backend import cuda_extension, resolve_backend
from restorenet.ops._nvtx import nvtx_range

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

# Columns of ``TilePlan.layout``: one row per tile, in plan order, all int64.
# (y, x): top-left at level 0; (row, col): place in its image's tile grid; grid_w:
# tiles per row of that image; (cell_h, cell_w): size of the tile's *cell*, the part
# of the image from its start to the next tile's start -- the cells partition each
# image, which lets the fast blend give every output pixel to exactly one program;
# pix_base: pixels of all earlier images; row_id, col_id: index into the weight tables.
LAYOUT_COLUMNS = ("image", "y", "x", "row", "col", "grid_w", "cell_h", "cell_w",
                  "pix_base", "height", "width", "row_id", "col_id")
_COLUMN = {name: i for i, name in enumerate(LAYOUT_COLUMNS)}

Pair = Union[int, Sequence[int]]
Images = Union[Tensor, Sequence[Tensor]]
Indices = Union[Tensor, Sequence[int]]  # an integer tensor [n] or a list of ints


# ------------------------------------------------------------------------ geometry
def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile starts along one axis: step tile - overlap, the last shifted inward."""
    if length <= tile:
        return [0]
    return list(range(0, length - tile, tile - overlap)) + [length - tile]


def tile_ramp(starts: Sequence[int], j: int, tile: int, dtype=torch.float32) -> Tensor:
    """Blend weight of tile ``j`` along one axis (see the module docstring), [tile]."""
    pos = torch.arange(tile, dtype=dtype) + 0.5
    ramp = torch.ones_like(pos)
    if j > 0:
        ramp = ramp * (pos / (starts[j - 1] + tile - starts[j])).clamp(max=1)
    if j + 1 < len(starts):
        ramp = ramp * ((tile - pos) / (starts[j] + tile - starts[j + 1])).clamp(max=1)
    return ramp


def released_ramp(starts: Sequence[int], j: int, tile: int, length: int, overlap: int,
                  dtype=torch.float32) -> Tensor:
    """Blend weight [tile] of tile ``j`` along one axis as AdaRevD's released code makes
    it (``grids_inverse``; the weights are summed, not normalised).

    With ``n`` tiles stepping by ``s = tile - overlap`` over ``length`` pixels, the last
    one shifted inward, the last two overlap by ``e = n * s + 2 * overlap - length``. A
    tile starting at ``i`` is multiplied by ``linspace(0, 1, overlap)`` over its first
    ``overlap`` pixels if it is neither the first nor the last; by ``linspace(1, 0,
    overlap)`` over its last ``overlap`` pixels if the next tile is not the last; by
    ``linspace(0, 1, e)`` over its first ``e`` pixels if it is the last; by
    ``linspace(1, 0, e)`` over its last ``e`` pixels if the next tile is the last. A
    one-tile axis (``length == tile``; the released code clamps the tile to a smaller
    image) counts as "the last", with ``e = overlap``: its first ``overlap`` pixels fade
    in from 0. Where the released code fails -- a ramp longer than the tile (a side
    shorter than the overlap) -- the ramp is cut at the tile's edge.
    """
    n, i = len(starts), starts[j]
    overlap_last = n * (tile - overlap) + 2 * overlap - length
    ramp = torch.ones(tile, dtype=dtype)

    def fade_in(m: int) -> None:  # the first m pixels rise 0 -> 1
        k = min(m, tile)
        ramp[:k] *= torch.linspace(0.0, 1.0, m, dtype=dtype)[:k]

    def fade_out(m: int) -> None:  # the last m pixels fall 1 -> 0
        k = min(m, tile)
        ramp[tile - k:] *= torch.linspace(1.0, 0.0, m, dtype=dtype)[m - k:]

    if i != 0 and i + tile != length:
        fade_in(overlap)
    if i + 2 * tile - overlap_last < length:
        fade_out(overlap)
    if i + tile == length:
        fade_in(overlap_last)
    if i + 2 * tile - overlap_last == length:
        fade_out(overlap_last)
    return ramp


RAMPS = ("normalized", "released")


def axis_ramps(starts: Sequence[int], tile: int, length: int, ramp: str = "normalized",
               overlap: int = 0, dtype=torch.float32) -> list[Tensor]:
    """Every tile's weight along one axis: ``tile_ramp`` or ``released_ramp``."""
    if ramp == "released":
        return [released_ramp(starts, j, tile, length, overlap, dtype) for j in range(len(starts))]
    return [tile_ramp(starts, j, tile, dtype) for j in range(len(starts))]


def _max_cover(starts: Sequence[int], tile: int) -> int:
    """Most tiles covering one pixel: at the start of cell r, the tiles r' <= r reaching it."""
    return max(sum(1 for s in starts[:r + 1] if s + tile > starts[r]) for r in range(len(starts)))


def _to_device(values, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Host values to ``device`` without waiting for the device: a pageable host-to-device
    copy with ``non_blocking=True`` is staged at once and does not synchronise."""
    t = torch.tensor(values, dtype=dtype)
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


# ---------------------------------------------------------------------------- plan
@dataclass(frozen=True, eq=False)
class TilePlan:
    """Where the tiles of a batch of images are (host-side; see ``tile_plan``).

    Attributes:
        tile, overlap: (h, w) at level 0.
        multiple: divides the tile, the overlap and every image size.
        batch_sizes, tensor_sizes: images per tensor the plan was made from, and
            their (H, W).
        image_sizes: (H, W) of every image, in order.
        row_starts, col_starts: tile starts of every image.
        from_list: made from a list of tensors (``tile_blend`` then returns a list).
    """

    tile: tuple[int, int]
    overlap: tuple[int, int]
    multiple: int
    batch_sizes: tuple[int, ...]
    tensor_sizes: tuple[tuple[int, int], ...]
    image_sizes: tuple[tuple[int, int], ...]
    row_starts: tuple[tuple[int, ...], ...]
    col_starts: tuple[tuple[int, ...], ...]
    from_list: bool
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_images(self) -> int:
        return len(self.image_sizes)

    def grid(self, image: int) -> tuple[int, int]:
        """(tile rows, tile columns) of one image."""
        return len(self.row_starts[image]), len(self.col_starts[image])

    @property
    def tiles_per_image(self) -> tuple[int, ...]:
        return tuple(len(r) * len(c) for r, c in zip(self.row_starts, self.col_starts))

    @property
    def num_tiles(self) -> int:
        return sum(self.tiles_per_image)

    @property
    def num_pixels(self) -> int:
        return sum(h * w for h, w in self.image_sizes)

    @property
    def max_cover(self) -> tuple[int, int]:
        """Most tiles covering one pixel, per axis (2 while overlap <= tile / 2)."""
        th, tw = self.tile
        return (max([_max_cover(s, th) for s in self.row_starts], default=1),
                max([_max_cover(s, tw) for s in self.col_starts], default=1))

    def cover_counts(self, channels: int, dtype: torch.dtype, device) -> Tensor:
        """How many tiles cover each output element, flat like ``tile_blend``'s output
        (the images one after another, each [channels, H, W]); cached."""
        device = torch.device(device)
        key = ("cover", channels, dtype, device)
        if key not in self._cache:
            th, tw = self.tile
            planes = []
            for (h, w), ys, xs in zip(self.image_sizes, self.row_starts, self.col_starts):
                per_row = torch.zeros(h, dtype=dtype)
                per_col = torch.zeros(w, dtype=dtype)
                for y in ys:
                    per_row[y:y + th] += 1
                for x in xs:
                    per_col[x:x + tw] += 1
                planes.append((per_row[:, None] * per_col[None, :]).expand(channels, h, w).flatten())
            flat = torch.cat(planes) if planes else torch.zeros(0, dtype=dtype)
            self._cache[key] = flat if device.type == "cpu" else flat.to(device, non_blocking=True)
        return self._cache[key]

    def layout(self, device) -> Tensor:
        """[num_tiles, len(LAYOUT_COLUMNS)] int64 on ``device`` (cached)."""
        device = torch.device(device)
        key = ("layout", device)
        if key not in self._cache:
            rows, row_id, col_id, pix_base = [], 0, 0, 0
            for b, (h, w) in enumerate(self.image_sizes):
                ys, xs = self.row_starts[b], self.col_starts[b]
                ends_y, ends_x = list(ys[1:]) + [h], list(xs[1:]) + [w]
                for r, y in enumerate(ys):
                    for c, x in enumerate(xs):
                        rows.append((b, y, x, r, c, len(xs), ends_y[r] - y, ends_x[c] - x,
                                     pix_base, h, w, row_id + r, col_id + c))
                row_id, col_id, pix_base = row_id + len(ys), col_id + len(xs), pix_base + h * w
            table = _to_device(rows, torch.int64, device)
            self._cache[key] = table.view(len(rows), len(LAYOUT_COLUMNS))
        return self._cache[key]

    def weights(self, dtype: torch.dtype, device, ramp: str = "normalized",
                overlap: Optional[tuple[int, int]] = None) -> tuple[Tensor, Tensor]:
        """Ramp tables ``(row_weight [tile rows of all images, th], col_weight [.., tw])``
        indexed by the layout's row_id / col_id; float32 (float64 for float64 tiles).
        ``ramp="released"`` takes the (h, w) ``overlap`` the released code was given
        (default: the plan's)."""
        device = torch.device(device)
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        overlap = self.overlap if overlap is None else overlap
        key = ("weights", dtype, device, ramp, overlap if ramp == "released" else None)
        if key not in self._cache:
            th, tw = self.tile
            tables = []
            for axis, starts_of, size in ((0, self.row_starts, th), (1, self.col_starts, tw)):
                ramps = [r for starts, hw in zip(starts_of, self.image_sizes)
                         for r in axis_ramps(starts, size, hw[axis], ramp, overlap[axis], dtype)]
                table = torch.stack(ramps) if ramps else torch.ones(0, size, dtype=dtype)
                tables.append(table if device.type == "cpu" else table.to(device, non_blocking=True))
            self._cache[key] = tuple(tables)
        return self._cache[key]

    def unflatten(self, values: Tensor) -> Union[Tensor, list[Tensor]]:
        """Per-tile values [num_tiles, ...] in plan order -> the plan's layout:
        [N, rows, cols, ...] (made from a tensor) or a list of [n_e, rows_e, cols_e, ...]."""
        out, first = [], 0
        for n, (h, w) in zip(self.batch_sizes, self.tensor_sizes):
            rows = len(tile_starts(h, self.tile[0], self.overlap[0]))
            cols = len(tile_starts(w, self.tile[1], self.overlap[1]))
            out.append(values[first:first + n * rows * cols].view(n, rows, cols, *values.shape[1:]))
            first += n * rows * cols
        return out if self.from_list else out[0]


def tile_plan(images: Images, tile: Pair, overlap: Pair, *, multiple: int = 1) -> TilePlan:
    """The tiles of a batch: images of any sizes, one grid each.

    Args:
        images: a tensor [N, C, H, W] (N images of one size), or a non-empty list of
            tensors [n_e, C, H_e, W_e]; only the shapes are read (meta tensors do).
        tile: tile size at level 0, an int or (h, w).
        overlap: overlap of neighbours at level 0, an int or (h, w); less than the tile.
        multiple: must divide tile, overlap and every image size (16 lets a 4-level
            U-Net's features be cut at every level).
    Raises ValueError if an image is smaller than the tile (pad it, or pass a smaller
    tile: this op does not pad).
    """
    from_list = not isinstance(images, Tensor)
    if from_list:
        if not isinstance(images, (list, tuple)) or not images:
            raise TypeError("images must be a 4-D tensor or a non-empty list of 4-D tensors, "
                            f"got {type(images).__name__}")
        tensors = list(images)
    else:
        tensors = [images]
    for i, t in enumerate(tensors):
        check_tensor(f"images[{i}]" if from_list else "images", t, ndim=4)
    m = _positive_int("multiple", multiple)
    tile = _pair("tile", tile, minimum=1)
    overlap = _pair("overlap", overlap, minimum=0)
    for name, pair in (("tile", tile), ("overlap", overlap)):
        if pair[0] % m or pair[1] % m:
            raise ValueError(f"{name} must be a multiple of multiple={m}, got {pair}")
    if tile[0] <= overlap[0] or tile[1] <= overlap[1]:
        raise ValueError(f"tile must be larger than overlap, got tile={tile}, overlap={overlap}")

    image_sizes, rows, cols = [], [], []
    for i, t in enumerate(tensors):
        name = f"images[{i}]" if from_list else "images"
        h, w = t.shape[-2:]
        if h % m or w % m:
            raise ValueError(f"{name} has size ({h}, {w}), not a multiple of multiple={m}: pad it")
        if h < tile[0] or w < tile[1]:
            raise ValueError(f"{name} has size ({h}, {w}), smaller than the tile {tile}: pad it "
                             "to at least the tile, or pass a smaller tile")
        for _ in range(t.shape[0]):
            image_sizes.append((h, w))
            rows.append(tuple(tile_starts(h, tile[0], overlap[0])))
            cols.append(tuple(tile_starts(w, tile[1], overlap[1])))
    return TilePlan(tile, overlap, m, tuple(t.shape[0] for t in tensors),
                    tuple(tuple(t.shape[-2:]) for t in tensors), tuple(image_sizes),
                    tuple(rows), tuple(cols), from_list)


def _positive_int(name: str, v) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    return v


def _pair(name: str, v, minimum: int) -> tuple[int, int]:
    pair = (v, v) if isinstance(v, int) and not isinstance(v, bool) else v
    try:
        if any(isinstance(p, bool) for p in pair):  # True is an int to Python, not a size
            raise TypeError
        pair = tuple(operator.index(p) for p in pair)
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}") from None
    if len(pair) != 2 or min(pair) < minimum:
        raise ValueError(f"{name} must be an int or a pair of ints >= {minimum}, got {v!r}")
    return pair


# ------------------------------------------------------------------------ schedule
@dataclass(frozen=True)
class TileSchedule:
    """Tiles sorted by exit depth, deepest first (ties keep plan order).

    Attributes:
        order: int64 [T] on the device: the plan tile at each sorted position; marked
            as a known permutation, so ``tile_gather`` / ``tile_blend`` take it without
            reading its values (an in-place edit clears that, in eager).
        active: K host ints, ``active[k]`` tiles run stage k (0-based): the positions
            ``[0, active[k])``, a prefix of the sorted order, non-increasing in k.
    """

    order: Tensor
    active: tuple[int, ...]

    @property
    def num_columns(self) -> int:
        return len(self.active)

    def exiting(self, k: int) -> slice:
        """Sorted positions of the tiles whose last stage is k (0-based)."""
        after = self.active[k + 1] if k + 1 < len(self.active) else 0
        return slice(after, self.active[k])


# A declared graph break: under torch.compile this op runs eagerly. It is the op's one
# device-to-host read -- the counts decide how many tiles each column runs, so what
# follows has data-dependent shapes that no graph can carry. Left to itself, Dynamo
# meets the .tolist() as a data-dependent operator inside the profiler range, a
# context manager it cannot break in: an accident whose outcome depends on the torch
# version (reported failing; 2.13 falls back to skipping the frame). The whole op is
# disabled, not just the read: Dynamo (2.13, no nested graph breaks by default) also
# splits the caller at the call of a function that breaks inside, so a narrower
# region costs two breaks; the argument checks and one sort of T ints lose nothing
# eagerly. The caller's graph ends here; the rest is traced with ``active`` as ints.
@torch.compiler.disable
def tile_schedule(depth: Union[Indices, Sequence[Indices]], num_columns: int):
    """Sort tiles by exit depth, deepest first, and count the tiles of every stage.

    Args:
        depth: exit depths in 1..K (plan order): an integer tensor [T] or a list of
            ints; or a non-empty list of those (e.g. one per tile plan), every entry
            scheduled separately. Lists of ints go to the device of the first tensor
            entry (the CPU if there is none).
        num_columns: K.
    Returns a ``TileSchedule`` (a list of them for a list of depths). All the counts --
    and the range check of ``depth`` -- come to the host in ONE device-to-host copy.
    Each ``order`` is marked as a known permutation, so ``tile_gather`` and
    ``tile_blend`` take it without checking its values (no further host read).
    Under ``torch.compile`` this op is one graph break (it runs eagerly).
    """
    depths, as_list = _check_depths(depth)
    k = _positive_int("num_columns", num_columns)
    device = depths[0].device
    with nvtx_range("tile_schedule", "fwd", device):
        stages = torch.arange(k, device=device)
        orders, parts = [], []
        for d in depths:
            d = d.long()
            # stable: ties keep plan order, so the result does not depend on the sort.
            order = torch.sort(d, descending=True, stable=True).indices
            _mark_known_permutation(order)  # a sort's indices: whatever the depths
            orders.append(order)
            parts.append((d[None, :] > stages[:, None]).sum(dim=1))  # tiles running stage k
            if d.numel():  # the range check rides along in the same copy
                parts.append(torch.stack([d.min(), d.max()]))
        host = torch.cat(parts).tolist()  # the one device-to-host copy

    schedules, at = [], 0
    for i, (d, order) in enumerate(zip(depths, orders)):
        active = tuple(host[at:at + k])
        at += k
        if d.numel():
            lo, hi = host[at:at + 2]
            at += 2
            if lo < 1 or hi > k:
                name = f"depth[{i}]" if as_list else "depth"
                raise ValueError(f"{name} must hold exit depths in 1..{k} (num_columns), "
                                 f"got values from {lo} to {hi}")
        schedules.append(TileSchedule(order, active))
    return schedules if as_list else schedules[0]


def _check_depths(depth) -> tuple[list[Tensor], bool]:
    """(the depths as integer tensors [T] on one device, whether a list of them came in)."""
    rule = ("depth must be an integer tensor [T] or a list of ints (exit depths), or a "
            "non-empty list of those (one per tile group)")
    if isinstance(depth, Tensor) or _is_int_list(depth):
        entries, as_list = [depth], False
    elif isinstance(depth, (list, tuple)) and depth:
        entries, as_list = list(depth), True
    else:
        raise TypeError(f"{rule}, got {_describe(depth)}")
    tensors = [d for d in entries if isinstance(d, Tensor)]
    device = tensors[0].device if tensors else torch.device("cpu")
    out = []
    for i, d in enumerate(entries):
        name = f"depth[{i}]" if as_list else "depth"
        if _is_int_list(d) or (isinstance(d, (list, tuple)) and not d):
            d = _to_device(list(d), torch.int64, device)
        elif not isinstance(d, Tensor):
            raise TypeError(f"{name} must be an integer tensor [T] or a list of ints, "
                            f"got {_describe(d)}")
        check_tensor(name, d, ndim=1, dtypes=INT_DTYPES, device=device)
        if d.device.type == "meta":  # the range check reads the values
            raise ValueError(f"{name} must hold values (a meta tensor has none), got {d.device}")
        out.append(d)
    return out, as_list


def _is_int(v) -> bool:
    # bool is an int to Python, never a tile index or a depth here.
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, Tensor))


def _is_int_list(v) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(_is_int(x) for x in v)


def _describe(v) -> str:
    if isinstance(v, (list, tuple)):
        kinds = sorted({type(x).__name__ for x in v})
        return f"{type(v).__name__} of {', '.join(kinds)}" if v else f"empty {type(v).__name__}"
    return type(v).__name__


# ------------------------------------------------------------------------- order
# An ``order`` says which plan tile each row holds. A wrong one would make the blend
# read slots nobody wrote (the Triton interpreter then crashes the process) and the
# gather index past the layout, so every value is checked before any kernel runs --
# here, in Python, so that every backend raises the same error. What that costs:
#   None, or a list of ints:           nothing on the device (checked on the host)
#   an order from tile_schedule:       nothing: marked as a known permutation
#   any other tensor:                  ONE device-to-host read (_check_order_values)
# AdaRevD.restore passes only tile_schedule's orders: its one host read stays one.
_KNOWN_PERMUTATION = "_restorenet_known_permutation"


def _mark_known_permutation(order: Tensor) -> None:
    """Mark ``order``, a permutation of 0..len-1, as such (with its current version)."""
    setattr(order, _KNOWN_PERMUTATION, order._version)


def _is_known_permutation(order: Tensor) -> bool:
    version = getattr(order, _KNOWN_PERMUTATION, None)
    if version is None:
        return False
    # In eager an in-place edit since tile_schedule shows as a new _version: check the
    # values again then. Dynamo cannot trace _version (a data-dependent symbol), so a
    # compiled caller trusts the mark alone (it guards on the mark being there).
    return torch.compiler.is_compiling() or version == order._version


def _order_rule(n_tiles: int, device: torch.device, permutation: bool) -> str:
    """The one rule an ``order`` must follow (every message about it starts with it)."""
    tiles = f"0..{n_tiles - 1}" if n_tiles else "no indices (the plan has no tiles)"
    if permutation:
        return (f"order must be a permutation of {tiles} (each of the plan's {n_tiles} tiles "
                f"once): a list of ints, or an int64 tensor [{n_tiles}] on {device}")
    return (f"order must hold plan tile indices in {tiles}: a list of ints, or a 1-D int64 "
            f"tensor on {device}")


def _check_order(order, n_tiles: int, device: torch.device, *,
                 permutation: bool) -> Optional[Tensor]:
    """``order`` as an int64 tensor on ``device`` (None stays None), every value checked:
    indices of the plan's tiles, and with ``permutation`` each tile exactly once."""
    if order is None:
        return None
    rule = _order_rule(n_tiles, device, permutation)
    if isinstance(order, (list, tuple)):
        _check_order_list(order, n_tiles, rule, permutation)
        return _to_device(list(order), torch.int64, device)
    if not isinstance(order, Tensor):
        raise TypeError(f"{rule}; got {_describe(order)}")
    if order.dtype != torch.int64:
        raise TypeError(f"{rule}; got dtype {order.dtype}")
    if order.dim() != 1 or (permutation and order.shape[0] != n_tiles):
        raise ValueError(f"{rule}; got shape {tuple(order.shape)}")
    if order.device != device:
        raise ValueError(f"{rule}; got a tensor on {order.device}")
    if order.device.type == "meta":
        raise ValueError(f"{rule}; got a meta tensor (it has no values to check)")
    if not (_is_known_permutation(order) and order.shape[0] <= n_tiles):
        _check_order_values(order, n_tiles, rule, permutation)
    return order


def _check_order_list(order, n_tiles: int, rule: str, permutation: bool) -> None:
    if not all(_is_int(v) for v in order):
        raise TypeError(f"{rule}; got {_describe(order)}")
    if permutation and len(order) != n_tiles:
        raise ValueError(f"{rule}; got {len(order)} values")
    if order:
        ascending = sorted(order)
        ok = ascending == list(range(n_tiles)) if permutation else True
        _raise_if_invalid(ok, ascending[0], ascending[-1], n_tiles, rule)


# A user's tensor order: its values live on the device, so checking them costs one
# device-to-host read (verdict, min and max in one copy). Under torch.compile that is
# a declared graph break, for the reason tile_schedule is one (the verdict decides
# whether to raise). A list or tile_schedule's order costs neither.
@torch.compiler.disable
def _check_order_values(order: Tensor, n_tiles: int, rule: str, permutation: bool) -> None:
    if order.numel() == 0:
        return
    ascending = torch.sort(order).values
    ok = ((ascending == torch.arange(n_tiles, device=order.device)).all() if permutation
          else torch.ones((), dtype=torch.bool, device=order.device))
    ok, lo, hi = torch.stack([ok.long(), ascending[0], ascending[-1]]).tolist()  # the one read
    _raise_if_invalid(bool(ok), lo, hi, n_tiles, rule)


def _raise_if_invalid(ok: bool, lo: int, hi: int, n_tiles: int, rule: str) -> None:
    """Raise unless ``ok`` and ``lo..hi`` (the smallest and largest value) are in range."""
    if lo < 0 or hi >= n_tiles:
        raise ValueError(f"{rule}; got values from {lo} to {hi}")
    if not ok:  # all in range, the right count, yet not a permutation: a repeat
        raise ValueError(f"{rule}; got a tile twice (so another one is missing)")


# ---------------------------------------------------------------------------- spec
def tile_gather_reference(feats: list[Tensor], boxes: Tensor, tile_h: int, tile_w: int) -> Tensor:
    """``out[p] = image_b[:, y:y + tile_h, x:x + tile_w]`` with ``(b, y, x) = boxes[p]``.

    ``image_b`` is the b-th sample of ``feats`` taken in order (all of feats[0], then
    feats[1], ...). One indexing op over a canvas of all images; no host reads.
    """
    c, device = feats[0].shape[1], feats[0].device
    # [C, pixels]; the pixel count spelled out, as -1 is ambiguous when C = 0
    canvas = torch.cat([f.movedim(1, 0).reshape(c, f.shape[0] * f.shape[2] * f.shape[3])
                        for f in feats], dim=1)
    image_start, image_width, at = [], [], 0  # where each image begins in the canvas
    for f in feats:
        n, _, h, w = f.shape
        image_start += [at + s * h * w for s in range(n)]
        image_width += [w] * n
        at += n * h * w
    b = boxes[:, 0]
    start = _to_device(image_start, torch.int64, device)[b]  # [S]
    width = _to_device(image_width, torch.int64, device)[b]
    rows = boxes[:, 1, None] + torch.arange(tile_h, device=device)  # [S, tile_h]
    cols = boxes[:, 2, None] + torch.arange(tile_w, device=device)  # [S, tile_w]
    pixel = start[:, None, None] + rows[:, :, None] * width[:, None, None] + cols[:, None, :]
    return canvas[:, pixel].movedim(0, 1).contiguous()


def tile_blend_reference(tiles: Tensor, slots: Tensor, layout: Tensor, row_weight: Tensor,
                         col_weight: Tensor, num_pixels: int) -> Tensor:
    """``out = sum_t w_t * place(tile_t) / sum_t w_t`` (module docstring), flat.

    Plan tile t is row ``slots[t]`` of ``tiles``; ``layout``, ``row_weight`` and
    ``col_weight`` are the plan's. The output holds the images one after another,
    each [C, H, W]. Sums run in float32 (float64 for float64) in plan order.
    """
    acc = torch.float64 if tiles.dtype == torch.float64 else torch.float32
    c, th, tw = tiles.shape[1:]
    device = tiles.device
    col = {name: layout[:, i] for i, name in enumerate(LAYOUT_COLUMNS)}
    placed = tiles.index_select(0, slots).to(acc)  # [T, C, th, tw] in plan order
    weight = (row_weight[col["row_id"]].to(acc)[:, :, None]
              * col_weight[col["col_id"]].to(acc)[:, None, :])  # [T, th, tw]
    ys = col["y"][:, None] + torch.arange(th, device=device)
    xs = col["x"][:, None] + torch.arange(tw, device=device)
    in_plane = ys[:, :, None] * col["width"][:, None, None] + xs[:, None, :]  # [T, th, tw]
    plane_size = (col["height"] * col["width"])[:, None, None, None]
    index = (c * col["pix_base"][:, None, None, None]
             + torch.arange(c, device=device)[None, :, None, None] * plane_size
             + in_plane[:, None]).flatten()
    total = torch.zeros(c * num_pixels, dtype=acc, device=device)
    total.index_add_(0, index, (placed * weight[:, None]).flatten())
    norm = torch.zeros(c * num_pixels, dtype=acc, device=device)
    norm.index_add_(0, index, weight[:, None].expand(-1, c, -1, -1).flatten())
    return (total / norm).to(tiles.dtype)


# ---------------------------------------------------------------- public functions
def tile_gather(feats: Images, plan: TilePlan, order: Optional[Indices] = None, *,
                scale: int = 1, backend: Optional[str] = None) -> Tensor:
    """Cut the plan's tiles out of one feature level, straight into ``order``.

    Args:
        feats: the level's features of the plan's images, laid out as the tensors the
            plan was made from: a tensor [N, C, H/scale, W/scale], or a list with one
            [n_e, C, H_e/scale, W_e/scale] per tensor. One dtype and device.
        plan: from ``tile_plan``.
        order: plan tile indices in [0, num_tiles), an int64 tensor [S] on the feats'
            device or a list of ints: row p of the output is plan tile ``order[p]``.
            None: every tile, in plan order. Checked before the launch; a tensor other
            than ``tile_schedule(...).order`` costs one host read for that (see
            "order" above ``_check_order``).
        scale: the level's downsampling (2^l, a power of two); must divide ``plan.multiple``.
        backend: ``"reference"``, ``"triton"``, ``"cuda"`` or None (automatic).
    Returns:
        [S, C, tile_h/scale, tile_w/scale], contiguous. One kernel launch.
    """
    if not isinstance(plan, TilePlan):
        raise TypeError(f"plan must be a TilePlan (from tile_plan), got {type(plan).__name__}")
    feats = _check_feats(feats, plan, scale)
    device = feats[0].device
    order = _check_order(order, plan.num_tiles, device, permutation=False)
    layout = plan.layout(device)
    if order is not None:
        layout = layout.index_select(0, order)
    boxes = torch.stack([layout[:, _COLUMN["image"]], layout[:, _COLUMN["y"]] // scale,
                         layout[:, _COLUMN["x"]] // scale], dim=1)
    name = _resolve("tile_gather", backend, device)
    th, tw = plan.tile
    return torch.ops.restorenet.tile_gather(feats, boxes, th // scale, tw // scale, name)


def tile_blend(tiles: Tensor, plan: TilePlan, order: Optional[Indices] = None, *,
               ramp: str = "normalized", overlap: Optional[Pair] = None,
               backend: Optional[str] = None) -> Union[Tensor, list[Tensor]]:
    """Write every tile back into its image with the ramp weights, normalised.

    Args:
        tiles: [T, C, tile_h, tile_w] (level-0 tile size), float; row p holds plan tile
            ``order[p]`` (None: plan order). Every plan tile appears once (T = num_tiles).
        plan: from ``tile_plan``.
        order: a permutation of the plan's tiles, an int64 tensor [T] on the tiles' device
            (``tile_schedule(...).order``) or a list of ints. Checked before the launch;
            a tensor other than a schedule's order costs one host read for that.
        ramp: ``"normalized"`` (the ramps above, ``sum_t w_t tile_t / sum_t w_t``) or
            ``"released"`` (AdaRevD's released blend, ``released_ramp``: the plain sum
            ``sum_t w_t tile_t``). The kernels always normalise, so the released sum
            is the normalised blend of the pre-weighted tiles with unit weights times
            the number of tiles covering each pixel (exact for 1, 2 or 4 tiles; one
            rounding under 3): two element-wise passes more, in float32 (float64).
        overlap: with ``"released"``, the overlap (int or (h, w)) the released code was
            given; it sets the fade-in along one-tile axes, where a caller that clamps
            the tile to the image plans with overlap 0. Default: the plan's overlap.
    Returns:
        The images in the layout the plan was made from: [N, C, H, W], or a list of
        [n_e, C, H_e, W_e] (views of one buffer). One kernel launch; with the fast
        backend every output pixel is written once, by one program (no atomics).
    """
    if not isinstance(plan, TilePlan):
        raise TypeError(f"plan must be a TilePlan (from tile_plan), got {type(plan).__name__}")
    check_tensor("tiles", tiles, ndim=4, dtypes=DTYPES)
    n_tiles = plan.num_tiles
    if tiles.shape[0] != n_tiles or tuple(tiles.shape[2:]) != plan.tile:
        raise ValueError(f"tiles must have shape [{n_tiles}, C, {plan.tile[0]}, {plan.tile[1]}] "
                         f"(every plan tile at the plan's tile size), got {tuple(tiles.shape)}")
    device = tiles.device
    order = _check_order(order, n_tiles, device, permutation=True)
    if order is None:
        slots = torch.arange(n_tiles, device=device)
    else:
        # zeros, not empty: should a bad order ever get past the check (one edited in
        # place inside a compiled region), every slot still names a real tile.
        slots = torch.zeros_like(order).scatter_(0, order, torch.arange(n_tiles, device=device))
    if ramp not in RAMPS:
        raise ValueError(f"ramp must be one of {RAMPS}, got {ramp!r}")
    overlap = plan.overlap if overlap is None else _pair("overlap", overlap, minimum=0)
    name = _resolve("tile_blend", backend, device)
    cover_h, cover_w = plan.max_cover
    layout = plan.layout(device)
    if ramp == "normalized":
        row_weight, col_weight = plan.weights(tiles.dtype, device)
        flat = torch.ops.restorenet.tile_blend(tiles, slots, layout, row_weight, col_weight,
                                               plan.num_pixels, cover_h, cover_w, name)
        return _split_images(flat, plan, tiles.shape[1])
    # The released sum: weight the tiles here, blend them with unit weights (whose sum
    # is then the cover count) and multiply the count back.
    acc = torch.float64 if tiles.dtype == torch.float64 else torch.float32
    row_weight, col_weight = plan.weights(acc, device, "released", overlap)
    rows = layout if order is None else layout.index_select(0, order)  # row p: tile order[p]
    w = (row_weight[rows[:, _COLUMN["row_id"]]][:, :, None]
         * col_weight[rows[:, _COLUMN["col_id"]]][:, None, :])
    unit_rows, unit_cols = torch.ones_like(row_weight), torch.ones_like(col_weight)
    flat = torch.ops.restorenet.tile_blend(tiles.to(acc) * w[:, None], slots, layout, unit_rows,
                                           unit_cols, plan.num_pixels, cover_h, cover_w, name)
    flat = flat * plan.cover_counts(tiles.shape[1], acc, device)
    return _split_images(flat.to(tiles.dtype), plan, tiles.shape[1])


def _check_feats(feats, plan: TilePlan, scale: int) -> list[Tensor]:
    scale = _positive_int("scale", scale)
    if scale & (scale - 1):  # a U-Net level halves the size: 2^l, as the plan's multiple assumes
        raise ValueError(f"scale must be a power of two (the level's downsampling 2^l), got {scale}")
    if plan.multiple % scale:
        raise ValueError(f"scale must divide the plan's multiple ({plan.multiple}), got {scale}")
    as_list = not isinstance(feats, Tensor)
    if as_list and not isinstance(feats, (list, tuple)):
        raise TypeError("feats must be a 4-D tensor or a list of 4-D tensors (one per tensor "
                        f"the plan was made from), got {type(feats).__name__}")
    feats = list(feats) if as_list else [feats]
    if len(feats) != len(plan.batch_sizes):
        raise ValueError(f"feats must hold {len(plan.batch_sizes)} tensors, one per tensor the "
                         f"plan was made from, got {len(feats)}")
    first = None
    for i, (f, n, (h, w)) in enumerate(zip(feats, plan.batch_sizes, plan.tensor_sizes)):
        name = f"feats[{i}]" if as_list else "feats"
        check_tensor(name, f, ndim=4, dtypes=DTYPES if first is None else (first.dtype,),
                     device=None if first is None else first.device)
        first = f if first is None else first
        want = (n, first.shape[1], h // scale, w // scale)
        if tuple(f.shape) != want:
            raise ValueError(f"{name} must have shape [{', '.join(map(str, want))}] (the plan's "
                             f"images at scale 1/{scale}), got {tuple(f.shape)}")
    return feats


def _split_images(flat: Tensor, plan: TilePlan, channels: int):
    out, at = [], 0
    for n, (h, w) in zip(plan.batch_sizes, plan.tensor_sizes):
        size = n * channels * h * w
        out.append(flat[at:at + size].view(n, channels, h, w))
        at += size
    return out if plan.from_list else out[0]


# ---------------------------------------------------------------- backend choice
_CUDA_FUNCTIONS = {"tile_gather": "tile_gather_forward", "tile_blend": "tile_blend_forward"}


def _resolve(op: str, backend: Optional[str], device: torch.device) -> str:
    # cuda counts only if restorenet._C has this op's kernel (an extension built
    # before csrc/tiles.cu existed lacks it): the automatic choice then skips cuda,
    # and asking for it explicitly raises.
    return resolve_backend(backend, device, op, cuda_symbol=_CUDA_FUNCTIONS[op])


# ---------------------------------------------------------------------- custom ops
@torch.library.custom_op("restorenet::tile_gather", mutates_args=())
def _tile_gather_op(feats: list[Tensor], boxes: Tensor, tile_h: int, tile_w: int,
                    backend: str) -> Tensor:
    with nvtx_range("tile_gather", "fwd", boxes.device):
        return _GATHER[backend](feats, boxes, tile_h, tile_w)


@_tile_gather_op.register_fake
def _(feats, boxes, tile_h, tile_w, backend):
    return feats[0].new_empty(boxes.shape[0], feats[0].shape[1], tile_h, tile_w)


@torch.library.custom_op("restorenet::tile_blend", mutates_args=())
def _tile_blend_op(tiles: Tensor, slots: Tensor, layout: Tensor, row_weight: Tensor,
                   col_weight: Tensor, num_pixels: int, cover_h: int, cover_w: int,
                   backend: str) -> Tensor:
    with nvtx_range("tile_blend", "fwd", tiles.device):
        return _BLEND[backend](tiles, slots, layout, row_weight, col_weight, num_pixels,
                               cover_h, cover_w)


@_tile_blend_op.register_fake
def _(tiles, slots, layout, row_weight, col_weight, num_pixels, cover_h, cover_w, backend):
    return tiles.new_empty(tiles.shape[1] * num_pixels)


def _reference_blend(tiles, slots, layout, row_weight, col_weight, num_pixels, cover_h, cover_w):
    return tile_blend_reference(tiles, slots, layout, row_weight, col_weight, num_pixels)


def _triton_gather(*args):
    from restorenet_kernels import tiles as kernels

    return kernels.gather(*args)


def _triton_blend(*args):
    from restorenet_kernels import tiles as kernels

    return kernels.blend(*args)


def _cuda_gather(feats, boxes, tile_h, tile_w):
    # csrc/tiles.cu via csrc/binding/tiles.cpp: one launch, sources of any layout.
    return cuda_extension().tile_gather_forward(feats, boxes, tile_h, tile_w)


def _cuda_blend(tiles, slots, layout, row_weight, col_weight, num_pixels, cover_h, cover_w):
    # Output-stationary: each pixel's tiles summed in plan order in fp32 (fp64), no
    # atomics, so runs are bitwise reproducible (the reference's index_add_ is not, on GPU).
    return cuda_extension().tile_blend_forward(tiles, slots, layout, row_weight, col_weight,
                                               num_pixels, cover_h, cover_w)


_GATHER = {"reference": tile_gather_reference, "triton": _triton_gather, "cuda": _cuda_gather}
_BLEND = {"reference": _reference_blend, "triton": _triton_blend, "cuda": _cuda_blend}
