"""Bad input, swept: every public op and every registered model, on every backend.

A seeded random sweep (``SEED``) of a few hundred cases. Each case is a valid call with
ONE property mutated -- a dtype, the device ('meta'), the ndim, a size or channel
count, a zero-size dimension, an out-of-range int, a bool for an int, a list for a
tensor, a NaN / inf / negative scalar, a non-contiguous layout -- and says what the
documented behaviour is:

* valid: the call succeeds on every backend and matches the spec: the reference
  computed in float64, held to the repo's rule (``assert_within_baseline_error``: a
  multiple of plain PyTorch's own error at that dtype -- never a fixed bound, which
  would depend on the machine's floating-point units); on meta tensors, the spec's
  shape and dtype;
* rejected: it raises TypeError, ValueError or IndexError whose message names the
  mutated argument (as a whole word).

Every backend must give the same outcome: a matching result, or the same exception
type and message. A RuntimeError (or anything else) from inside torch fails the case.
"""
from __future__ import annotations

import copy
import math
import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

import pytest
import torch

import restorenet
from restorenet.models.adarevd import DecoderColumn
from restorenet.ops import (available_backends, channel_attention, channel_attention_reference, hyper_conv2d,
                            hyper_conv2d_reference, layer_norm2d, layer_norm2d_reference, reversible_columns,
                            rev_coupling_forward, rev_coupling_forward_reference, rev_coupling_invert,
                            rev_coupling_invert_reference, scaled_residual, scaled_residual_reference,
                            simple_gate, simple_gate_reference, slim_conv2d, slim_conv2d_reference,
                            tile_blend, tile_gather, tile_plan, tile_schedule, use_backend)
from restorenet.ops.slim_conv2d import SlimWidths, check_widths, widths_from_choices
from restorenet.testing import assert_within_baseline_error

SEED = 20250611
CPU = torch.device("cpu")
BACKENDS = [b for b in ("reference", "triton") if b in available_backends(CPU)]
REJECTIONS = (TypeError, ValueError, IndexError)
GEN = torch.Generator().manual_seed(SEED)  # tensor values
RNG = random.Random(SEED)                  # which argument, which dim, which bad value


def randn(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN, dtype=dtype)


def rand(*shape) -> torch.Tensor:
    return torch.rand(*shape, generator=GEN)


# ------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One mutated call. ``rejects``: the argument the error must name, or None
    for a valid call, then checked against ``spec`` (its float64 truth) or, on
    meta tensors, against ``meta_spec`` (a CPU call of the same shapes)."""

    id: str
    call: Callable[[], Any]
    rejects: Optional[str]
    spec: Optional[Callable[[], Any]] = None
    meta_spec: Optional[Callable[[], Any]] = None


def outcome(case: Case, backend: str):
    """(result, None) or (None, exception) of the call on ``backend``."""
    with use_backend(backend), torch.no_grad():
        try:
            return case.call(), None
        except Exception as error:  # noqa: BLE001 -- judged by the caller
            return None, error


def names(message: str, arg: str) -> bool:
    """``arg`` appears as a whole name: ``weight`` is not found in ``weight_base``."""
    return re.search(rf"(?<![\w.]){re.escape(arg)}(?!\w)", message) is not None


def as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def float64(value):
    """Floating tensors (in containers too) as float64 leaves; everything else as is."""
    if isinstance(value, torch.Tensor):
        return value.detach().double() if value.is_floating_point() else value
    if isinstance(value, SlimWidths):
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(float64(v) for v in value)
    if isinstance(value, dict):
        return {k: float64(v) for k, v in value.items()}
    return value


def to_meta(value):
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    if isinstance(value, dict):
        return {k: to_meta(v) for k, v in value.items()}
    return value


# ----------------------------------------------------------- the ops' valid calls
@dataclass
class Op:
    """What the sweep needs of an op: a valid call of given sizes, its spec, and
    which arguments take which mutations.

    ``make(n, c, h, w, dtype)`` -> kwargs; ``size_rule(n, c, h, w)`` -> the argument a
    size is rejected for (None: valid); ``strict``: the tensor arguments that must
    share the primary's dtype and device, with the dims whose size is constrained."""

    name: str
    fn: Callable
    spec: Callable
    make: Callable[..., dict]
    size_rule: Callable[[int, int, int, int], Optional[str]]
    primary: str
    strict: dict
    sizes: tuple = (2, 4, 5, 6)


def hyper_spec(x, level, weight, weight_base, bias=None, bias_base=None, stride=1, padding=0):
    vector = torch.as_tensor(level, dtype=torch.float64).expand(x.shape[0])
    return hyper_conv2d_reference(x, vector, weight, weight_base, bias, bias_base, stride, padding)


def make_hyper(n, c, h, w, dtype=torch.float32):
    return dict(x=randn(n, c, h, w, dtype=dtype), level=rand(n), weight=0.3 * randn(4, c, 3, 3, dtype=dtype),
                weight_base=0.3 * randn(4, c, 3, 3, dtype=dtype), bias=randn(4, dtype=dtype),
                bias_base=randn(4, dtype=dtype), stride=1, padding=1)


def make_slim(n, c, h, w, dtype=torch.float32):
    in_width = torch.tensor([RNG.randint(1, c) for _ in range(n)] if c else [0] * n, dtype=torch.long)
    return dict(x=randn(n, c, h, w, dtype=dtype), weight=randn(5, c, 3, 3, dtype=dtype), bias=randn(5, dtype=dtype),
                in_width=in_width, out_width=RNG.randint(1, 5), stride=1, padding=1)


def make_layer_norm(n, c, h, w, dtype=torch.float32):
    return dict(x=randn(n, c, h, w, dtype=dtype), weight=randn(c, dtype=dtype), bias=randn(c, dtype=dtype), eps=1e-6)


def make_attention(n, c, h, w, dtype=torch.float32):
    return dict(x=randn(n, c, h, w, dtype=dtype), weight=randn(c, c, dtype=dtype), bias=randn(c, dtype=dtype))


def make_residual(n, c, h, w, dtype=torch.float32):
    return dict(inp=randn(n, c, h, w, dtype=dtype), beta=randn(c, dtype=dtype), z=randn(n, c, h, w, dtype=dtype))


def make_coupling(n, c, h, w, dtype=torch.float32):
    alpha = (0.5 + rand(c)).to(torch.float64 if dtype == torch.float64 else torch.float32)
    return dict(c=randn(n, c, h, w, dtype=dtype), f=randn(n, c, h, w, dtype=dtype), alpha=alpha)


def make_invert(n, c, h, w, dtype=torch.float32):
    kw = make_coupling(n, c, h, w, dtype)
    return dict(c_new=kw["c"], f=kw["f"], alpha=kw["alpha"], grad_c_new=randn(n, c, h, w, dtype=dtype))


def conv_rule(n, c, h, w):
    return "x" if min(c, h, w) < 1 else None


OPS = [
    Op("hyper_conv2d", hyper_conv2d, hyper_spec, make_hyper, conv_rule, "x",
       dict(weight=(1,), weight_base=(0, 1, 2, 3), bias=(0,), bias_base=(0,))),
    Op("slim_conv2d", slim_conv2d, slim_conv2d_reference, make_slim, conv_rule, "x",
       dict(weight=(1,), bias=(0,))),
    Op("layer_norm2d", layer_norm2d, layer_norm2d_reference, make_layer_norm,
       lambda n, c, h, w: "x" if c < 1 else None, "x", dict(weight=(0,), bias=(0,))),
    Op("simple_gate", simple_gate, simple_gate_reference, lambda n, c, h, w, dtype=torch.float32:
       dict(x=randn(n, c, h, w, dtype=dtype)), lambda n, c, h, w: "x" if c < 2 or c % 2 else None, "x", {}),
    Op("channel_attention", channel_attention, channel_attention_reference, make_attention,
       lambda n, c, h, w: "x" if min(c, h, w) < 1 else None, "x", dict(weight=(0, 1), bias=(0,))),
    Op("scaled_residual", scaled_residual, scaled_residual_reference, make_residual,
       lambda n, c, h, w: None, "inp", dict(beta=(0,), z=(0, 1, 2, 3))),
    Op("rev_coupling_forward", rev_coupling_forward, rev_coupling_forward_reference, make_coupling,
       lambda n, c, h, w: None, "c", dict(f=(0, 1, 2, 3), alpha=(0,))),
    Op("rev_coupling_invert", rev_coupling_invert, rev_coupling_invert_reference, make_invert,
       lambda n, c, h, w: None, "c_new", dict(f=(0, 1, 2, 3), alpha=(0,), grad_c_new=(0, 1, 2, 3))),
]


def op_case(op: Op, what: str, kwargs: dict, rejects: Optional[str]) -> Case:
    call = lambda: op.fn(**kwargs)  # noqa: E731
    return Case(f"{op.name}-{what}", call, rejects, spec=lambda: op.spec(**float64(kwargs)))


# --------------------------------------------------- mutations shared by all ops
def size_cases(op: Op) -> list[Case]:
    """The whole call at other sizes, dtype, device or layout: valid or rejected by
    the op's documented size rule."""
    n, c, h, w = op.sizes
    cases = []
    for what, sizes in (("empty-batch", (0, c, h, w)), ("zero-channels", (n, 0, h, w)),
                        ("zero-height", (n, c, 0, w)), ("zero-width", (n, c, h, 0)),
                        ("odd-channels", (n, RNG.choice((1, 3, 5)), h, w)), ("batch-1", (1, c, h, w))):
        cases.append(op_case(op, what, op.make(*sizes), op.size_rule(*sizes)))
    cases.append(op_case(op, "float64", op.make(n, c, h, w, dtype=torch.float64), None))
    cases.append(meta_case(op, op.make(n, c, h, w)))
    cases.append(op_case(op, "non-contiguous", non_contiguous_call(op.make(n, c, h, w), op.primary), None))
    cases.append(op_case(op, "channels-last", channels_last_call(op.make(n, c, h, w)), None))
    return cases


def meta_case(op: Op, kwargs: dict) -> Case:
    """Every tensor on meta: shape propagation, no values."""
    meta = to_meta(kwargs)
    return Case(f"{op.name}-meta", lambda: op.fn(**meta), None,
                meta_spec=lambda: op.fn(**kwargs, backend="reference"))


def non_contiguous_call(kwargs: dict, name: str) -> dict:
    """``name`` as a strided view (every other column of a wider tensor), same values."""
    t = kwargs[name]
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    return {**kwargs, name: wide[..., ::2]}


def channels_last_call(kwargs: dict) -> dict:
    return {k: v.contiguous(memory_format=torch.channels_last) if isinstance(v, torch.Tensor) and v.dim() == 4
            else v for k, v in kwargs.items()}


def tensor_cases(op: Op, count: int) -> list[Case]:
    """``count`` random mutations of one tensor argument each."""
    kinds = [wrong_ndim, wrong_size, integer_dtype, other_float_dtype, on_meta, as_list, strided]
    cases = []
    for i in range(count):
        kwargs = op.make(*op.sizes)
        kind = kinds[i] if i < len(kinds) else RNG.choice(kinds)  # each kind once, then at random
        arg = RNG.choice([op.primary, *op.strict])
        case = kind(op, kwargs, arg)
        if case is not None:
            cases.append(case)
    return cases


def wrong_ndim(op, kwargs, arg):
    t = kwargs[arg]
    bad = t.unsqueeze(0) if RNG.random() < 0.5 or t.dim() == 1 else t[0]
    return op_case(op, f"{arg}-ndim-{bad.dim()}", {**kwargs, arg: bad}, arg)


def wrong_size(op, kwargs, arg):
    if arg not in op.strict:  # the primary's sizes are swept by size_cases
        return None
    dim = RNG.choice(op.strict[arg])
    t = kwargs[arg]
    shape = list(t.shape)
    shape[dim] += RNG.choice((1, 2))
    return op_case(op, f"{arg}-size-dim{dim}", {**kwargs, arg: randn(*shape, dtype=t.dtype)}, arg)


def integer_dtype(op, kwargs, arg):
    dtype = RNG.choice((torch.int64, torch.int32, torch.bool))
    return op_case(op, f"{arg}-{str(dtype)[6:]}", {**kwargs, arg: kwargs[arg].to(dtype)}, arg)


def other_float_dtype(op, kwargs, arg):
    if arg not in op.strict:  # the whole call in float64 is size_cases' "float64"
        return None
    dtype = RNG.choice((torch.float64, torch.float16))
    return op_case(op, f"{arg}-{str(dtype)[6:]}-alone", {**kwargs, arg: kwargs[arg].to(dtype)}, arg)


def on_meta(op, kwargs, arg):
    if arg not in op.strict:  # all on meta is size_cases' "meta"
        return None
    return op_case(op, f"{arg}-meta-alone", {**kwargs, arg: kwargs[arg].to("meta")}, arg)


def as_list(op, kwargs, arg):
    """A float tensor as a nested list: no float tensor argument takes one."""
    return op_case(op, f"{arg}-list", {**kwargs, arg: kwargs[arg].tolist()}, arg)


def strided(op, kwargs, arg):
    return op_case(op, f"{arg}-non-contiguous", non_contiguous_call(kwargs, arg), None)


# ------------------------------------------------------- op-specific arguments
def conv_geometry_cases(op: Op) -> list[Case]:
    cases = []
    for arg, bad, good in (("stride", (0, -1, True, 2.0, None), 2), ("padding", (-1, True, 1.0, None), 0)):
        for value in RNG.sample(bad, 3):
            cases.append(op_case(op, f"{arg}-{value!r}", {**op.make(*op.sizes), arg: value}, arg))
        cases.append(op_case(op, f"{arg}-{good}", {**op.make(*op.sizes), arg: good}, None))
    return cases


def level_cases() -> list[Case]:
    op = OPS[0]
    n = op.sizes[0]
    bad_numbers = [math.nan, math.inf, -math.inf, -1.0, -1e-3, 10 ** 400]
    bad = [RNG.choice(bad_numbers) for _ in range(3)] + [True, "high", None]
    good = [0.0, 3, RNG.uniform(0, 1), [RNG.uniform(0, 1) for _ in range(n)],
            torch.tensor(0.25), rand(n).double()]
    nan_at = RNG.randrange(n)
    bad_tensors = [torch.tensor([math.nan if i == nan_at else 0.5 for i in range(n)]),
                   torch.tensor([-1.0 if i == nan_at else 0.5 for i in range(n)]),
                   torch.full((n,), math.inf), torch.ones(n, dtype=torch.int64), rand(n + 1), rand(n, 1),
                   [0.5] * (n - 1), [math.nan] + [0.5] * (n - 1), [True] * n]
    cases = [op_case(op, f"level-{_describe(v)}", {**op.make(*op.sizes), "level": v}, "level")
             for v in bad + bad_tensors]
    cases += [op_case(op, f"level-ok-{_describe(v)}", {**op.make(*op.sizes), "level": v}, None) for v in good]
    return cases


def _describe(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"tensor{list(v.shape)}-{str(v.dtype)[6:]}"
    if isinstance(v, list):
        return f"list{len(v)}"
    return repr(v)[:12]


def width_cases() -> list[Case]:
    """slim_conv2d's widths: ints, sequences, integer tensors, SlimWidths."""
    op = OPS[1]
    n, c = op.sizes[:2]
    cases = []
    for arg, top in (("in_width", c), ("out_width", 5)):
        good = [RNG.randint(1, top), [RNG.randint(1, top) for _ in range(n)],
                tuple(RNG.randint(1, top) for _ in range(n)),
                torch.tensor([RNG.randint(1, top) for _ in range(n)], dtype=torch.int8),
                torch.tensor(top), check_widths(RNG.randint(1, top), n, CPU, top)]
        bad = [0, top + 1, -3, True, 2.5, "2", None,
               [RNG.randint(1, top) for _ in range(n - 1)], [0] * n, [top + 1] * n, [True] * n, [1.0] * n,
               torch.tensor([1, top + 1][:n] + [1] * (n - 2)), torch.zeros(n, dtype=torch.int64),
               torch.ones(n, dtype=torch.bool), torch.ones(n), torch.ones(n, 1, dtype=torch.int64),
               torch.ones(n, dtype=torch.int64, device="meta"), [2 ** 40] * n,
               SlimWidths(torch.full((n,), top + 3, dtype=torch.int32), None, None),
               SlimWidths(torch.ones(n, dtype=torch.int32), 0, 1),
               SlimWidths(torch.ones(n, dtype=torch.int32), 2, 1),
               SlimWidths(torch.ones(n, dtype=torch.int64), 1, 1)]
        for v in RNG.sample(good, 4):
            cases.append(op_case(op, f"{arg}-ok-{_describe(v)}", {**op.make(*op.sizes), arg: v}, None))
        for v in RNG.sample(bad, 12):
            cases.append(op_case(op, f"{arg}-{_describe(v)}", {**op.make(*op.sizes), arg: v}, arg))
    return cases


def choices_cases() -> list[Case]:
    """widths_from_choices: the gate's picks (no host read, so a bad index is named
    by the lookup itself on CPU)."""
    choices = [8, 16, 24]

    def call(choices=choices, index=None):
        return lambda: widths_from_choices(choices, index).values

    def expect(index):
        return lambda: torch.tensor([choices[i] for i in index], dtype=torch.int32)

    cases = []
    for index in ([2, 0, 1], [RNG.randrange(3) for _ in range(4)], torch.tensor([1, 2]),
                  torch.tensor([0, 2], dtype=torch.uint8)):
        cases.append(Case(f"widths_from_choices-ok-{_describe(index)}", call(index=index), None,
                          spec=expect(list(index.tolist() if isinstance(index, torch.Tensor) else index))))
    for index in (torch.tensor([0, 3]), torch.tensor([-1, 0]), [0, 5], [-1], torch.tensor([0.0]),
                  torch.tensor([[0]]), [True], "0"):
        cases.append(Case(f"widths_from_choices-index-{_describe(index)}", call(index=index), "index"))
    for bad in ([], [0, 8], [True, 8], [8.0], 8):
        cases.append(Case(f"widths_from_choices-choices-{_describe(bad)}",
                          call(choices=bad, index=torch.tensor([0])), "choices"))
    return cases


def scalar_cases() -> list[Case]:
    """layer_norm2d's eps and channel_attention's gated: floats and bools."""
    ln, ca = OPS[2], OPS[4]
    cases = []
    for eps in RNG.sample([math.nan, math.inf, -1e-6, True, "1e-6", None], 4):
        cases.append(op_case(ln, f"eps-{eps!r}", {**ln.make(*ln.sizes), "eps": eps}, "eps"))
    cases.append(op_case(ln, "eps-0", {**ln.make(*ln.sizes), "eps": 0.0}, None))
    for gated in (1, 0, "yes", None):
        cases.append(op_case(ca, f"gated-{gated!r}", {**ca.make(*ca.sizes), "gated": gated}, "gated"))
    n, c, h, w = ca.sizes
    cases.append(op_case(ca, "gated-ok", {**ca.make(n, 2 * c, h, w), "weight": randn(c, c),
                                         "bias": randn(c), "gated": True}, None))
    four_d = ca.make(n, c, h, w)
    four_d["weight"] = four_d["weight"][:, :, None, None]  # a 1x1 conv's weight, as documented
    cases.append(op_case(ca, "weight-4d-ok", four_d, None))
    cases.append(op_case(ca, "bias-none-ok", {**ca.make(n, c, h, w), "bias": None}, None))
    sr = OPS[5]
    four_d = sr.make(*sr.sizes)
    four_d["beta"] = four_d["beta"].view(1, -1, 1, 1)  # NAFBlock's parameter shape
    cases.append(op_case(sr, "beta-4d-ok", four_d, None))
    return cases


def backend_name_cases() -> list[Case]:
    """``backend=`` itself: an unknown name is named whatever ``use_backend`` says."""
    return [op_case(op, f"backend-{bad!r}", {**op.make(*op.sizes), "backend": bad}, "backend")
            for op in RNG.sample(OPS, 3) for bad in ("fast",)]


# --------------------------------------------------------------- the other ops
def tile_cases() -> list[Case]:
    """A few cases of the tile ops' public API (their owner is reworking them)."""
    images = randn(1, 3, 32, 48)
    plan = tile_plan(images, 16, 4)
    cases = [Case("tile_plan-ok", lambda: tile_plan(images, 16, 4).num_tiles, None, spec=lambda: plan.num_tiles),
             Case("tile_plan-meta", lambda: tile_plan(images.to("meta"), 16, 4).num_tiles, None,
                  spec=lambda: plan.num_tiles)]
    for arg, bad in (("tile", 0), ("tile", True), ("tile", (16, 0)), ("overlap", -1), ("overlap", 16),
                     ("multiple", 0), ("multiple", True), ("images", randn(3, 32, 48)), ("images", [])):
        kwargs = dict(images=images, tile=16, overlap=4)
        kwargs[arg] = bad
        cases.append(Case(f"tile_plan-{arg}-{_describe(bad)}", lambda kw=kwargs: tile_plan(**kw), arg))

    depth = torch.tensor([RNG.randint(1, 3) for _ in range(plan.num_tiles)])
    cases.append(Case("tile_schedule-ok", lambda: tile_schedule(depth, 3).active, None,
                      spec=lambda: tuple(int((depth > k).sum()) for k in range(3))))
    for arg, kwargs in (("depth", dict(depth=depth.float(), num_columns=3)),
                        ("depth", dict(depth=depth + 3, num_columns=3)),
                        ("depth", dict(depth=depth[None], num_columns=3)),
                        ("num_columns", dict(depth=depth, num_columns=0)),
                        ("num_columns", dict(depth=depth, num_columns=True))):
        cases.append(Case(f"tile_schedule-{arg}-{len(cases)}", lambda kw=kwargs: tile_schedule(**kw), arg))

    feats = randn(1, 5, 32, 48)
    order = torch.randperm(plan.num_tiles, generator=GEN)
    gather = lambda **kw: tile_gather(**{"feats": feats, "plan": plan, **kw})  # noqa: E731
    cases.append(Case("tile_gather-ok", lambda: gather(order=order), None,
                      spec=lambda: tile_gather(feats.double(), plan, order, backend="reference")))
    cases.append(Case("tile_gather-order-list", lambda: gather(order=order.tolist()), None,
                      spec=lambda: tile_gather(feats.double(), plan, order, backend="reference")))
    for arg, kwargs in (("plan", dict(plan="plan")), ("scale", dict(scale=3)), ("scale", dict(scale=0)),
                        ("feats", dict(feats=randn(1, 5, 32, 40))), ("feats", dict(feats=feats.long())),
                        ("order", dict(order=order.float()))):
        cases.append(Case(f"tile_gather-{arg}-{len(cases)}", lambda kw=kwargs: gather(**kw), arg))

    tiles = randn(plan.num_tiles, 5, 16, 16)
    cases.append(Case("tile_blend-ok", lambda: tile_blend(tiles, plan, order), None,
                      spec=lambda: tile_blend(tiles.double(), plan, order, backend="reference")))
    for arg, args in (("tiles", (tiles[1:], plan)), ("tiles", (tiles.long(), plan)), ("plan", (tiles, None)),
                      ("order", (tiles, plan, order[1:])), ("order", (tiles, plan, order.float()))):
        cases.append(Case(f"tile_blend-{arg}-{len(cases)}", lambda a=args: tile_blend(*a), arg))
    return cases


def reversible_columns_cases() -> list[Case]:
    """reversible_columns with AdaRevD's column (width 2): the states must match the
    columns' channel counts, ndim, batch and device (its owner is reworking the op)."""
    column = DecoderColumn(2).eval()
    column64 = copy.deepcopy(column).double()
    x = randn(1, 32, 1, 1)
    states = [randn(1, 2 * 2 ** (3 - i), 2 * 2 ** i, 2 * 2 ** i) for i in range(4)]  # 16..2 ch, 2..16 px

    def run(columns=(column,), x=x, states=states, **kw):
        return lambda: reversible_columns(list(columns), x, states, **kw)

    cases = [Case("reversible_columns-ok", run(), None,
                  spec=lambda: reversible_columns([column64], x.double(), float64(states)))]
    level = RNG.randrange(4)
    s = states[level]
    for what, mutated in (("channels", randn(1, s.shape[1] + 1, *s.shape[2:])),
                          ("ndim", s[0]), ("batch", randn(2, *s.shape[1:])), ("dtype", s.long()),
                          ("meta", s.to("meta")), ("list", s.tolist())):
        bad = [*states[:level], mutated, *states[level + 1:]]
        cases.append(Case(f"reversible_columns-states{level}-{what}", run(states=bad), "states"))
    cases.append(Case("reversible_columns-states-short", run(states=states[:3]), "states"))
    cases.append(Case("reversible_columns-states-tensor", run(states=states[0]), "states"))
    cases.append(Case("reversible_columns-x-dtype", run(x=x.long()), "x"))
    cases.append(Case("reversible_columns-columns-empty", run(columns=()), "columns"))
    for bad in (0, True, 1.5):
        cases.append(Case(f"reversible_columns-anchor_every-{bad!r}", run(anchor_every=bad), "anchor_every"))
    return cases


def op_sweep() -> list[Case]:
    cases = []
    for op in OPS:
        cases += size_cases(op) + tensor_cases(op, 16)
    for op in OPS[:2]:
        cases += conv_geometry_cases(op)
    return (cases + level_cases() + width_cases() + choices_cases() + scalar_cases() + backend_name_cases()
            + tile_cases() + reversible_columns_cases())


# --------------------------------------------------------------------- models
@dataclass
class ModelSpec:
    """A registered model: a small config, its input's name and extra forward
    arguments, and bad constructor values per argument."""

    cfg: dict
    input_name: str = "img"
    extra: tuple = ()
    side: int = 16
    ctor: dict = None


SIZES = (0, -8, 2.5, True, "8")        # a channel count or width: an int >= 1
COUNTS = (-1, 1.5, True, "1")          # a block count: an int >= 0
LEVELS = ((1, -1), (1.5,), "11", 3)    # per-level block counts: a sequence of ints >= 0

MODELS = {
    # The NAFNet encoder: the default UFPNet one draws fresh noise at every call (its float64
    # copy would not see the same), and its kernel estimator does not shrink with width.
    "adarevd": ModelSpec(dict(width=2, enc_blocks=(1, 1, 1, 1), middle_blocks=1, num_decoders=2, encoder="nafnet"),
                         ctor=dict(width=SIZES, in_channels=SIZES, middle_blocks=COUNTS, encoder=("unet", 3, None),
                                   encoder_pooling=("tlc", None),
                                   enc_blocks=LEVELS + ((1, 1, 1), 8), num_decoders=(0, -1, 1.5, True, "2"),
                                   dropout=(-0.1, 1.0, "0", True))),
    "constyle_nafnet": ModelSpec(dict(width=4, enc_blocks=(1, 1, 1), middle_blocks=1, dec_blocks=(1, 1, 1),
                                      latent_dim=4),
                                 ctor=dict(width=SIZES + (6,), in_channels=SIZES, latent_dim=SIZES,
                                           middle_blocks=COUNTS, enc_blocks=LEVELS + ((1, 1),),
                                           dec_blocks=LEVELS)),
    # A forced width: the gate's argmax could flip between float32 and its float64 truth.
    "ddsnet": ModelSpec(dict(width=16, depth=1, num_choices=2), input_name="x", extra=(16,),
                        ctor=dict(width=SIZES + (12,), in_channels=SIZES, depth=COUNTS, num_choices=SIZES + (5,),
                                  gate_hidden=SIZES, gate_tau=(0, -1.0, math.nan, math.inf, "1"))),
    "hyperres": ModelSpec(dict(width=4, num_blocks=1), input_name="x", extra=(25.0,),
                          ctor=dict(width=SIZES, in_channels=SIZES, num_blocks=COUNTS)),
    "hyperres_level_estimator": ModelSpec(dict(width=4, crop_size=32), input_name="x", side=32,
                                          ctor=dict(width=SIZES, in_channels=SIZES, crop_size=SIZES + (48, 16))),
    # heads=8: one channel per head, so the top-k masks select no near-ties.
    "mhnet": ModelSpec(dict(width=4, enc_blocks=(1,), dec_blocks=(1,), heads=8, cabg_blocks=1),
                       ctor=dict(width=SIZES, in_channels=SIZES, heads=SIZES + (3, 64), cabg_blocks=COUNTS,
                                 enc_blocks=LEVELS + ((),), dec_blocks=LEVELS + ((1, 1),))),
    "nafnet": ModelSpec(dict(width=2, enc_blocks=(1,), middle_blocks=1, dec_blocks=(1,)),
                        ctor=dict(width=SIZES, in_channels=SIZES, middle_blocks=COUNTS,
                                  enc_blocks=LEVELS + ((),), dec_blocks=LEVELS + ((1, 1),))),
}


def build(name: str, **overrides):
    torch.manual_seed(0)  # the same weights for every backend and for the float64 copy
    return restorenet.create_model(name, **{**MODELS[name].cfg, **overrides}).eval()


def model_case(name: str, what: str, img, extra=None, rejects: Optional[str] = None) -> Case:
    spec = MODELS[name]
    extra = spec.extra if extra is None else extra
    model = build(name)
    call = lambda: model(img, *extra)  # noqa: E731
    truth = None
    if rejects is None:
        model64 = copy.deepcopy(model).double()
        truth = lambda: model64(float64(img), *float64(extra))  # noqa: E731
    return Case(f"{name}-{what}", call, rejects, spec=truth)


def model_input_cases(name: str) -> list[Case]:
    """Wrong channel count, ndim, dtype, empty batch, no pixels, a list: each named."""
    spec = MODELS[name]
    s, arg = spec.side, spec.input_name
    img = rand(2, 3, s, s)
    cases = [model_case(name, "ok", img)]
    for what, bad in (("channels", rand(2, RNG.choice((1, 4)), s, s)), ("ndim-3", img[0]),
                      ("ndim-5", img[None]), ("int", img.long()), ("bool", img > 0.5),
                      ("empty-batch", rand(0, 3, s, s)), ("zero-height", rand(2, 3, 0, s)), ("list", img.tolist())):
        cases.append(model_case(name, what, bad, rejects=arg))
    return cases


def hyperres_level_cases() -> list[Case]:
    img = rand(2, 3, 16, 16)
    bad = [math.nan, math.inf, -math.inf, -1.0, True, "25", None, torch.tensor([math.nan, 25.0]),
           torch.tensor([25.0, -5.0]), torch.tensor([True, False]), torch.ones(3), [25.0], [25.0, math.nan]]
    good = [0.0, 50, torch.tensor(15.0), torch.tensor([15, 75]), [15.0, 35.0], torch.tensor([5.0, 55.0]).double()]
    cases = [model_case("hyperres", f"level-{_describe(v)}", img, (v,), rejects="level")
             for v in RNG.sample(bad, 10)]
    return cases + [model_case("hyperres", f"level-ok-{_describe(v)}", img, (v,)) for v in RNG.sample(good, 3)]


def ddsnet_width_cases() -> list[Case]:
    img = rand(2, 3, 16, 16)
    bad = [12, 0, True, [8, 12], [8], [8.0, 16.0], torch.tensor([8, 12]), torch.tensor([8.0, 16.0]),
           torch.ones(2, 1, dtype=torch.int64), "8"]
    good = [16, [8, 16], (16, 8), torch.tensor([16, 8])]
    cases = [model_case("ddsnet", f"width-{_describe(v)}", img, (v,), rejects="width") for v in RNG.sample(bad, 7)]
    return cases + [model_case("ddsnet", f"width-ok-{_describe(v)}", img, (v,)) for v in RNG.sample(good, 2)]


def constructor_cases(name: str) -> list[Case]:
    cases = []
    for arg, values in MODELS[name].ctor.items():
        for value in values:
            cases.append(Case(f"{name}-ctor-{arg}-{_describe(value)}",
                              lambda a=arg, v=value: type(build(name, **{a: v})).__name__, arg))
    return cases


def model_sweep() -> list[Case]:
    cases = []
    for name in restorenet.list_models():
        cases += model_input_cases(name) + constructor_cases(name)
    return cases + hyperres_level_cases() + ddsnet_width_cases()


def test_every_model_and_op_is_swept():
    # A newly registered model fails here until it has a small config in MODELS.
    assert sorted(MODELS) == restorenet.list_models()
    swept = {case.id.split("-")[0] for case in CASES}
    assert {op.name for op in OPS} <= swept
    assert {"tile_plan", "tile_schedule", "tile_gather", "tile_blend", "reversible_columns"} <= swept
    assert 300 <= len(CASES) <= 800


# ---------------------------------------------------------------------- the test
def _unique(cases: list[Case]) -> list[Case]:
    seen: dict[str, int] = {}
    out = []
    for case in cases:
        k = seen[case.id] = seen.get(case.id, 0) + 1
        out.append(case if k == 1 else Case(f"{case.id}#{k}", case.call, case.rejects, case.spec, case.meta_spec))
    return out


CASES = _unique(op_sweep() + model_sweep())


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case):
    outcomes = {b: outcome(case, b) for b in BACKENDS}
    for backend, (result, error) in outcomes.items():
        if case.rejects is not None:
            assert_rejected(case, backend, result, error)
        else:
            assert error is None, f"{backend}: a valid call raised {type(error).__name__}: {error}"
            assert_matches_spec(case, backend, result)
    errors = {b: (type(e).__name__, str(e)) for b, (_, e) in outcomes.items() if e is not None}
    assert len(set(errors.values())) <= 1, f"backends disagree: {errors}"


def assert_rejected(case: Case, backend: str, result, error) -> None:
    assert error is not None, f"{backend}: accepted; must reject {case.rejects} (got {_describe(result)})"
    assert isinstance(error, REJECTIONS), f"{backend}: {type(error).__name__} from inside: {error}"
    assert names(str(error), case.rejects), f"{backend}: the error does not name {case.rejects}: {error}"


def assert_matches_spec(case: Case, backend: str, result) -> None:
    if case.meta_spec is not None:
        with use_backend("reference"):
            want = as_tuple(case.meta_spec())
        got = as_tuple(result)
        assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in want]
        assert all(t.device.type == "meta" for t in got)
        return
    with use_backend("reference"), torch.no_grad():
        truth, baseline = case.spec(), case.call()
    for i, (out, t, base) in enumerate(zip(as_tuple(result), as_tuple(truth), as_tuple(baseline))):
        if not isinstance(out, torch.Tensor):
            assert out == t, f"{backend}: output {i}: {out!r} != spec {t!r}"
            continue
        assert out.dtype == base.dtype, f"{backend}: output {i} dtype {out.dtype} != {base.dtype}"
        if not out.is_floating_point():
            assert torch.equal(out, t.to(out.dtype)), f"{backend}: output {i} differs from the spec"
            continue
        assert_within_baseline_error(f"{backend} output {i}", out, t, base, out.dtype)
