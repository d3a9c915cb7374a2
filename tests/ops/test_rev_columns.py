"""reversible_columns on a tiny generic column type (not AdaRevD): the memory-efficient
backward against plain autograd (float64), dropout replay, running statistics,
autocast, the bytes kept for backward, torch.compile, the Triton coupling, errors,
and the reconstruction-error probe behind the docstring's precision table.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import restorenet.ops.rev_columns as rev_columns
from restorenet.ops import ReversibleColumn, available_backends, reversible_columns, use_backend
from restorenet.ops.rev_columns import reconstruction_error

WIDTHS = (8, 4, 2)  # channels of levels 0..2 (coarse to fine); x has WIDTHS[0] channels
SIZES = (4, 8, 16)  # level i is twice the size of level i-1; x is half of level 0


class TinyLevel(nn.Module):
    """L(a, b) = drop(tanh(norm(conv3x3(up2(conv1x1(a))) + conv1x1(avgpool2(b)))))."""

    def __init__(self, channels, coarse_channels, finer_channels, dropout, batchnorm):
        super().__init__()
        self.from_coarse = nn.Conv2d(coarse_channels, channels, 1)
        self.mix = nn.Conv2d(channels, channels, 3, padding=1)
        self.from_finer = nn.Conv2d(finer_channels, channels, 1) if finer_channels else None
        self.norm = nn.BatchNorm2d(channels) if batchnorm else nn.Identity()
        self.drop = nn.Dropout(dropout)

    def forward(self, coarse, finer=None):
        t = self.mix(F.interpolate(self.from_coarse(coarse), scale_factor=2.0))
        if self.from_finer is not None:
            t = t + self.from_finer(F.avg_pool2d(finer, 2))
        return self.drop(torch.tanh(self.norm(t)))


class TinyColumn(nn.Module):
    """Three levels of different sizes and widths, per-channel alphas of both signs."""

    num_levels = len(WIDTHS)

    def __init__(self, dropout=0.0, batchnorm=False):
        super().__init__()
        n = len(WIDTHS)
        self.levels = nn.ModuleList(
            TinyLevel(WIDTHS[i], WIDTHS[max(i - 1, 0)], WIDTHS[i + 1] if i + 1 < n else 0, dropout, batchnorm)
            for i in range(n))
        self.alphas = nn.ParameterList(
            nn.Parameter((0.5 + 0.5 * torch.rand(c)) * torch.where(torch.rand(c) < 0.3, -1.0, 1.0))
            for c in WIDTHS)

    def update_term(self, i, coarse, finer, state_dtype):
        level = self.levels[i]
        dtype = level.mix.weight.dtype
        return level(coarse.to(dtype), finer.to(dtype) if finer is not None else None).to(state_dtype)

    def coupling_alpha(self, i, state_dtype):
        return self.alphas[i].to(torch.float64 if state_dtype == torch.float64 else torch.float32)

    def level_parameters(self, i):
        return [self.alphas[i], *self.levels[i].parameters()]

    def level_buffers(self, i):
        return list(self.levels[i].buffers())

    def may_draw_random(self):
        return self.training and any(level.drop.p > 0 for level in self.levels)


class Stack(nn.Module):
    """K tiny columns; ``with_heads``: a conv head on every column's output, run
    inside the op."""

    def __init__(self, k, dtype=torch.float64, with_heads=False, column=TinyColumn, **cfg):
        super().__init__()
        self.columns = nn.ModuleList(column(**cfg) for _ in range(k))
        self.heads = nn.ModuleList(nn.Conv2d(WIDTHS[-1], 3, 3, padding=1) for _ in range(k)) if with_heads else None
        self.to(dtype)
        self.memory_efficient = True
        self.anchor_every = None

    def forward(self, x, states):
        return reversible_columns(list(self.columns), x, states, heads=self.heads,
                                  memory_efficient=self.memory_efficient, anchor_every=self.anchor_every)


def inputs(dtype=torch.float64, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, WIDTHS[0], SIZES[0] // 2, SIZES[0] // 2, generator=g, dtype=dtype)
    states = [torch.randn(batch, c, s, s, generator=g, dtype=dtype) for c, s in zip(WIDTHS, SIZES)]
    return x, states


def run(model, x, states, memory_efficient, seed=123, autocast=None, grad_states=True):
    """Outputs and every gradient (parameters, x, states) of sum_k <out_k, w_k>."""
    model.memory_efficient = memory_efficient
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    states = [s.detach().clone().requires_grad_(grad_states) for s in states]
    torch.manual_seed(seed)  # same dropout masks in both paths
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    with ctx:
        outs = model(x, states)
    g = torch.Generator().manual_seed(7)
    weights = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
    sum((o.float() * w.float()).sum() for o, w in zip(outs, weights)).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    grads["x"] = x.grad
    grads.update({f"states[{i}]": s.grad for i, s in enumerate(states)})
    return [o.detach() for o in outs], grads


def assert_same(got, ref, rtol=1e-9, atol=1e-11):
    outs, grads = got
    outs_ref, grads_ref = ref
    for o, r in zip(outs, outs_ref, strict=True):
        torch.testing.assert_close(o, r, rtol=rtol, atol=atol)
    assert grads.keys() == grads_ref.keys()
    for name, r in grads_ref.items():
        if r is None:
            assert grads[name] is None, name
        else:
            torch.testing.assert_close(grads[name], r, rtol=rtol, atol=atol, msg=name)


def flat_gradients(result) -> torch.Tensor:
    """Every gradient ``run`` returned (None ones left out), as one float64 vector."""
    return torch.cat([t.double().flatten() for t in result[1].values() if t is not None])


# ------------------------------------------------------------ vs plain autograd
def test_tiny_column_follows_the_protocol():
    assert isinstance(TinyColumn(), ReversibleColumn)
    assert not isinstance(nn.Conv2d(1, 1, 1), ReversibleColumn)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_matches_plain_autograd_float64(k):
    torch.manual_seed(0)
    model = Stack(k)
    x, states = inputs()
    ref = run(model, x, states, memory_efficient=False)
    got = run(model, x, states, memory_efficient=True)
    assert len(got[0]) == k and all(g is not None for g in got[1].values())
    assert_same(got, ref)


@pytest.mark.parametrize("k, anchor_every", [(1, 1), (5, 1), (5, 2), (5, 3), (4, 8)])
def test_anchored_walk_matches_plain_autograd_float64(k, anchor_every):
    torch.manual_seed(0)
    model = Stack(k, dropout=0.2)  # dropout: the anchored recompute replays the masks too
    model.anchor_every = anchor_every
    x, states = inputs()
    ref = run(model, x, states, memory_efficient=False)
    got = run(model, x, states, memory_efficient=True)
    assert_same(got, ref)


@pytest.mark.parametrize("k, anchor_every, dropout", [(1, None, 0.0), (3, None, 0.2), (4, 2, 0.2), (3, 1, 0.0)])
def test_heads_inside_the_op_match_plain_autograd_float64(k, anchor_every, dropout):
    torch.manual_seed(0)
    model = Stack(k, with_heads=True, dropout=dropout)
    model.anchor_every = anchor_every
    x, states = inputs()
    ref = run(model, x, states, memory_efficient=False)
    got = run(model, x, states, memory_efficient=True)
    assert [o.shape[1] for o in got[0]] == [3] * k  # the heads' outputs
    assert all(got[1][f"heads.{j}.weight"] is not None for j in range(k))
    assert_same(got, ref)


@pytest.mark.parametrize("anchor_every, inverted", [(None, 5), (1, 0), (2, 2), (3, 3)])
def test_anchored_columns_are_recomputed_not_inverted(monkeypatch, anchor_every, inverted):
    # K = 5: anchors at columns 0, a, 2a, ... ; only the other columns invert.
    # (The precision this buys is measured on AdaRevD: tests/models/test_adarevd.py.)
    calls = []
    original = rev_columns.rev_coupling_invert
    monkeypatch.setattr(rev_columns, "rev_coupling_invert",
                        lambda *a, **kw: calls.append(1) or original(*a, **kw))
    torch.manual_seed(0)
    model = Stack(5, dtype=torch.float32)
    model.anchor_every = anchor_every
    x, states = inputs(torch.float32)
    run(model, x, states, memory_efficient=True)
    assert len(calls) == inverted * len(WIDTHS)


def test_only_the_inputs_that_need_gradients_get_them():
    torch.manual_seed(0)
    model = Stack(2)
    model.columns[1].levels[0].requires_grad_(False)  # frozen parameters: no gradient
    x, states = inputs()
    ref = run(model, x, states, memory_efficient=False, grad_states=False)
    got = run(model, x, states, memory_efficient=True, grad_states=False)
    assert got[1]["states[0]"] is None and got[1]["columns.1.levels.0.mix.weight"] is None
    assert got[1]["x"] is not None
    assert_same(got, ref)


def test_no_grad_runs_the_plain_loop():
    torch.manual_seed(0)
    model = Stack(3)
    x, states = inputs()
    with torch.no_grad():
        outs = model(x, states)
    assert all(not o.requires_grad for o in outs)
    assert_same((outs, {}), (run(model, x, states, memory_efficient=False)[0], {}))


# ------------------------------------------------------------ replay guards
def test_dropout_masks_are_replayed():
    torch.manual_seed(0)
    model = Stack(3, dropout=0.3).train()
    x, states = inputs()
    ref = run(model, x, states, memory_efficient=False)
    after_ref = torch.rand(4)  # the RNG after a plain forward + backward
    got = run(model, x, states, memory_efficient=True)
    after = torch.rand(4)
    assert_same(got, ref)
    torch.testing.assert_close(after, after_ref, rtol=0, atol=0)  # backward left the live RNG alone
    other = run(model, x, states, memory_efficient=False, seed=5)
    assert not torch.allclose(other[0][-1], ref[0][-1])  # the masks really depend on the seed


def test_levels_without_randomness_record_no_rng_state(monkeypatch):
    torch.manual_seed(0)
    model = Stack(2, dropout=0.3)
    model.columns[0].levels[1].drop.p = 0.0  # this level draws no random numbers
    tapes = []
    original = rev_columns.column_forward

    def spy(column, x, states, rng_tape=None):
        out = original(column, x, states, rng_tape)
        tapes.append(rng_tape)
        return out

    monkeypatch.setattr(rev_columns, "column_forward", spy)
    x, states = inputs()
    run(model, x, states, memory_efficient=True)
    first = tapes[0]
    assert first[1] is None and first[0] is not None and first[2] is not None


def test_batchnorm_running_statistics_are_updated_once(monkeypatch):
    torch.manual_seed(0)
    plain = Stack(2, batchnorm=True).train()
    reversible = copy.deepcopy(plain)
    x, states = inputs(batch=3)
    ref = run(plain, x, states, memory_efficient=False)
    got = run(reversible, x, states, memory_efficient=True)
    assert_same(got, ref)
    buffers = dict(reversible.named_buffers())
    for name, r in plain.named_buffers():
        torch.testing.assert_close(buffers[name], r, rtol=0, atol=0, msg=name)
    assert all(int(b) == 1 for n, b in buffers.items() if n.endswith("num_batches_tracked"))
    assert not torch.equal(buffers["columns.0.levels.0.norm.running_mean"],
                           torch.zeros_like(buffers["columns.0.levels.0.norm.running_mean"]))

    # Without the guard the recompute updates them a second time.
    monkeypatch.setattr(rev_columns, "_buffers_restored", lambda buffers: contextlib.nullcontext())
    twice = copy.deepcopy(plain)
    for b in twice.buffers():
        b.zero_()
    run(twice, x, states, memory_efficient=True)
    assert all(int(b) == 2 for n, b in twice.named_buffers() if n.endswith("num_batches_tracked"))


def test_matches_plain_autograd_under_bf16_autocast(monkeypatch):
    # fp32 model under CPU bf16 autocast: the convs run in bf16, the states in fp32.
    # Forward: the same loop, the same numbers. Backward recomputes L_i from rebuilt
    # fp32 states, so a few bf16 roundings of L_i's input may flip: its gradients
    # must be as close to the float64 truth as plain autograd's under the same
    # autocast are (the FlashAttention rule: no margin measured on one CPU).
    from restorenet.testing import assert_within_baseline_error

    torch.manual_seed(0)
    model = Stack(4, dtype=torch.float32)
    x, states = inputs(torch.float32)
    ref = run(model, x, states, memory_efficient=False, autocast=torch.bfloat16)
    got = run(model, x, states, memory_efficient=True, autocast=torch.bfloat16)
    for o, r in zip(got[0], ref[0]):
        assert o.dtype == torch.float32
        torch.testing.assert_close(o, r, rtol=0, atol=0)
    truth = run(copy.deepcopy(model).double(), x.double(), [s.double() for s in states], memory_efficient=False)
    flat = [flat_gradients(r) for r in (got, ref, truth)]
    assert_within_baseline_error("gradients", flat[0], flat[2], flat[1], torch.bfloat16)


@pytest.mark.parametrize("replayed", [True, False])
def test_the_recompute_replays_autocast(monkeypatch, replayed):
    # Which dtype the recompute's convs compute in, seen by a hook: bf16 as in the
    # forward when the autocast state is replayed (a forgotten replay: fp32).
    torch.manual_seed(0)
    model = Stack(2, dtype=torch.float32)
    x, states = inputs(torch.float32)
    seen = []
    model.columns[1].levels[0].mix.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    if not replayed:
        monkeypatch.setattr(rev_columns, "_autocast", lambda device_type, dtype: contextlib.nullcontext())
    run(model, x, states, memory_efficient=True, autocast=torch.bfloat16)
    recompute = torch.bfloat16 if replayed else torch.float32
    assert seen == [torch.bfloat16, recompute]  # the forward, then backward's recompute


def test_half_inputs_keep_fp32_states_and_return_their_dtype(monkeypatch):
    seen = []
    original = rev_columns.rev_coupling_invert

    def invert(c_new, f, alpha, grad, **kw):
        seen.append((c_new.dtype, f.dtype, grad.dtype))
        return original(c_new, f, alpha, grad, **kw)

    monkeypatch.setattr(rev_columns, "rev_coupling_invert", invert)
    torch.manual_seed(0)
    model = Stack(2, dtype=torch.bfloat16)
    x, states = inputs(torch.bfloat16)
    outs, grads = run(model, x, states, memory_efficient=True)
    assert all(o.dtype == torch.bfloat16 for o in outs)
    assert grads["states[2]"].dtype == torch.bfloat16 and torch.isfinite(grads["states[2]"].float()).all()
    assert len(seen) == 2 * 3 and all(d == torch.float32 for ds in seen for d in ds)


# ------------------------------------------------------------ memory kept
def saved_bytes(model, x, states):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    x = x.detach().requires_grad_()
    states = [s.detach().requires_grad_() for s in states]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = model(x, states)
    sum(o.sum() for o in outs).backward()  # the saved tensors suffice for backward
    return total[0]


def test_saved_bytes_do_not_grow_with_the_number_of_columns():
    x, states = inputs(torch.float32)
    torch.manual_seed(0)
    kept = {k: saved_bytes(Stack(k, dtype=torch.float32), x, states) for k in (2, 8)}
    # Exactly x and the last column's states: nothing per column, no outputs.
    expected = sum(t.numel() * t.element_size() for t in (x, *states))
    assert kept[2] == kept[8] == expected
    plain = {}
    for k in (2, 8):
        model = Stack(k, dtype=torch.float32)
        model.memory_efficient = False
        plain[k] = saved_bytes(model, x, states)
    assert plain[8] > 3 * plain[2] > 3 * expected


def test_heads_add_nothing_to_the_bytes_kept():
    # A head outside the op would keep its input (the finest state) per column.
    x, states = inputs(torch.float32)
    torch.manual_seed(0)
    kept = {k: saved_bytes(Stack(k, dtype=torch.float32, with_heads=True), x, states) for k in (1, 8)}
    assert kept[1] == kept[8] == sum(t.numel() * t.element_size() for t in (x, *states))


def test_dropout_without_the_probe_is_still_replayed():
    # A column without may_draw_random counts as drawing: RNG states are kept.
    class Unprobed(TinyColumn):
        may_draw_random = None

    torch.manual_seed(0)
    model = Stack(2, column=Unprobed, dropout=0.3).train()
    x, states = inputs()
    assert_same(run(model, x, states, memory_efficient=True), run(model, x, states, memory_efficient=False))
    assert saved_bytes(model, x, states) > sum(t.numel() * t.element_size() for t in (x, *states))


@pytest.mark.parametrize("k, anchor_every", [(8, 1), (8, 2), (8, 3), (8, 4), (8, 8), (2, 4)])
def test_anchors_keep_ceil_k_over_a_state_sets(k, anchor_every):
    x, states = inputs(torch.float32)
    torch.manual_seed(0)
    model = Stack(k, dtype=torch.float32)
    model.anchor_every = anchor_every
    state_set = sum(s.numel() * s.element_size() for s in states)
    reversible = x.numel() * x.element_size() + state_set  # x and the last states
    sets = -(-k // anchor_every)
    assert saved_bytes(model, x, states) == reversible + sets * state_set


# ------------------------------------------------------------ compile, backends
class WithStemAndHeads(Stack):
    """Compiled parts around the op: a conv making x, a conv head on every output."""

    def __init__(self, k, **cfg):
        super().__init__(k, **cfg)
        self.stem = nn.Conv2d(WIDTHS[0], WIDTHS[0], 3, padding=1).to(cfg["dtype"])
        self.head = nn.Conv2d(WIDTHS[-1], 1, 3, padding=1).to(cfg["dtype"])

    def forward(self, x, states):
        outs = super().forward(torch.relu(self.stem(x)), states)
        return outs if self.heads is not None else [self.head(o) for o in outs]


@pytest.mark.parametrize("heads_inside", [False, True])
def test_torch_compile_fullgraph_gives_the_same_gradients(heads_inside):
    # The op is one opaque call in the graph (fullgraph, Inductor on CPU): compiled
    # stem and heads around it (or the heads inside the op), dropout inside; fresh
    # masks on the second call; the gradients of plain eager autograd.
    torch.manual_seed(0)
    model = WithStemAndHeads(2, dtype=torch.float32, dropout=0.2, with_heads=heads_inside)
    eager = copy.deepcopy(model)  # run() sets memory_efficient: keep the compiled one's fixed
    x, states = inputs(torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="inductor")

    def compiled_run(seed):
        outs, grads = run(compiled, x, states, memory_efficient=True, seed=seed)
        return outs, {n.removeprefix("_orig_mod."): g for n, g in grads.items()}

    for seed in (123, 5):
        ref = run(eager, x, states, memory_efficient=False, seed=seed)
        assert_same(compiled_run(seed), ref, rtol=1e-4, atol=1e-5)


def test_torch_compile_fullgraph_under_bf16_autocast():
    # The caller's autocast reaches the op's eager body inside the compiled graph (it
    # is passed to the op, Inductor having applied autocast at trace time): bf16
    # outputs from the heads, gradients within the rule against the float64 truth.
    from restorenet.testing import assert_within_baseline_error

    torch.manual_seed(0)
    model = WithStemAndHeads(2, dtype=torch.float32, with_heads=True)
    eager = copy.deepcopy(model)
    x, states = inputs(torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    got = run(compiled, x, states, memory_efficient=True, autocast=torch.bfloat16)
    plain = run(eager, x, states, memory_efficient=False, autocast=torch.bfloat16)
    truth = run(copy.deepcopy(eager).double(), x.double(), [s.double() for s in states], memory_efficient=False)
    assert [o.dtype for o in got[0]] == [torch.bfloat16] * 2
    assert [n.removeprefix("_orig_mod.") for n in got[1]] == list(plain[1])  # the same order
    flat = [flat_gradients(r) for r in (got, plain, truth)]  # the outside head has none
    assert_within_baseline_error("gradients", flat[0], flat[2], flat[1], torch.bfloat16)


@pytest.mark.skipif("triton" not in available_backends(torch.device("cpu"), "rev_coupling_forward"),
                    reason="needs triton (interpreted on CPU)")
def test_triton_coupling_backend(monkeypatch):
    from restorenet.ops import reversible

    torch.manual_seed(0)
    model = Stack(2, dtype=torch.float32)
    x, states = inputs(torch.float32)
    with use_backend("reference"):
        ref = run(model, x, states, memory_efficient=True)
    calls = []
    for table in (reversible._FORWARD, reversible._INVERT):
        kernel = table["triton"]
        monkeypatch.setitem(table, "triton", lambda *a, _k=kernel: calls.append(1) or _k(*a))
    with use_backend("triton"):
        got = run(model, x, states, memory_efficient=True)
    assert len(calls) == 2 * 2 * 3  # every coupling forward and inversion
    assert_same(got, ref, rtol=1e-5, atol=1e-6)


def test_opcheck():
    # The op's schema, fake impl (shapes of every output, heads included), autograd
    # registration and AOT dispatch, as torch.library checks them.
    torch.manual_seed(0)
    for with_heads, anchor_every, dropout in ((False, 0, 0.0), (True, 2, 0.2)):
        model = Stack(3, with_heads=with_heads, dropout=dropout)
        x, states = inputs()
        x.requires_grad_()
        params = rev_columns._chain_parameters(list(model.columns), model.heads)
        handle = rev_columns._chain_handle(list(model.columns), model.heads)
        args = (handle, x, states, params, anchor_every, torch.float64, None, dropout > 0)
        torch.library.opcheck(torch.ops.restorenet.reversible_columns.default, args)


# ------------------------------------------------------------ errors, probe
def test_invalid_arguments_name_the_argument():
    model = Stack(1)
    x, states = inputs()
    cols = list(model.columns)
    with pytest.raises(TypeError, match="^columns"):
        reversible_columns([], x, states)
    with pytest.raises(TypeError, match=r"^columns\[0\]"):
        reversible_columns([nn.Conv2d(1, 1, 1)], x, states)
    with pytest.raises(ValueError, match="^states"):
        reversible_columns(cols, x, states[:2])
    with pytest.raises(ValueError, match=r"^states\[1\]"):
        reversible_columns(cols, x, [states[0], states[1][0], states[2]])
    with pytest.raises(TypeError, match=r"^states\[2\]"):
        reversible_columns(cols, x, [states[0], states[1], states[2].long()])
    with pytest.raises(TypeError, match="^x"):
        reversible_columns(cols, None, states)
    with pytest.raises(ValueError, match=r"^states\[1\] must have the batch size"):
        reversible_columns(cols, x, [states[0], states[1][:1], states[2]])
    with pytest.raises(ValueError, match="^heads"):
        reversible_columns(cols, x, states, heads=[nn.Conv2d(2, 3, 1)] * 2)
    with pytest.raises(TypeError, match=r"^heads\[0\]"):
        reversible_columns(cols, x, states, heads=[lambda t: t])
    x.requires_grad_()
    with pytest.raises(ValueError, match=r"^heads\[0\] must not draw random numbers"):
        reversible_columns(cols, x, states, heads=[nn.Dropout(0.5).train()])
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="^anchor_every"):
            reversible_columns(cols, x, states, anchor_every=bad)


def test_reconstruction_error_probe():
    torch.manual_seed(0)
    model = Stack(4)
    x, states = inputs()
    assert reconstruction_error(list(model.columns), x, states) < 1e-12
    model32 = Stack(4, dtype=torch.float32)
    x32, states32 = inputs(torch.float32)
    err32 = reconstruction_error(list(model32.columns), x32, states32)
    assert 0 < err32 < 1e-4
