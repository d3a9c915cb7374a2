"""hyper_conv2d: every backend against the float64 spec, forward and every gradient.

On a CPU machine the fast backend is Triton under TRITON_INTERPRET=1; on a GPU
machine Triton and CUDA run on the device and bf16 is added.
"""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from restorenet.ops import available_backends, hyper_conv2d, hyper_conv2d_reference, use_backend
from restorenet.testing import assert_within_baseline_error

from _host_reads import count_host_reads

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FAST_BACKENDS = [b for b in available_backends(DEVICE, "hyper_conv2d_forward") if b != "reference"]
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
INPUT_NAMES = ("x", "level", "weight", "weight_base", "bias", "bias_base")


def make_inputs(n=3, c_in=5, c_out=7, h=9, w=11, k=3, bias=True, channels_last=False,
                scalar_level=False, device=DEVICE):
    x = torch.randn(n, c_in, h, w, dtype=torch.float64, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    # Levels as HyperRes uses them (sigma/255), all different in one batch.
    level = 0.6 if scalar_level else torch.rand(n, dtype=torch.float64, device=device)
    weight = 0.2 * torch.randn(c_out, c_in, k, k, dtype=torch.float64, device=device)
    weight_base = 0.2 * torch.randn_like(weight)
    b = torch.randn(c_out, dtype=torch.float64, device=device) if bias else None
    bb = torch.randn(c_out, dtype=torch.float64, device=device) if bias else None
    return [x, level, weight, weight_base, b, bb]


def cast(inputs, dtype):
    """Tensors to ``dtype`` (level stays float: the op computes it in fp32), as leaves."""
    out = []
    for name, t in zip(INPUT_NAMES, inputs):
        if isinstance(t, torch.Tensor):
            t = t.detach().to(torch.float32 if (name == "level" and dtype != torch.float64) else dtype)
            t = t.requires_grad_()
        out.append(t)
    return out


def run(inputs, grad_out, stride, padding, backend):
    y = hyper_conv2d(*inputs, stride=stride, padding=padding, backend=backend)
    y.backward(grad_out.to(y.dtype))
    grads = [t.grad if isinstance(t, torch.Tensor) else None for t in inputs]
    return y, grads


# Cases chosen to cover each axis at least once without a full cross product
# (the interpreter is slow): (k, stride, padding, channels_last, batch, scalar level, bias)
CASES = [
    (3, 1, 1, False, 3, False, True),
    (3, 2, 0, True, 3, False, True),
    (1, 1, 0, False, 2, True, False),
    (3, 2, 1, True, 1, False, True),
    (1, 2, 1, False, 1, True, True),
]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,stride,padding,channels_last,n,scalar_level,bias", CASES)
def test_matches_float64_truth(backend, dtype, k, stride, padding, channels_last, n, scalar_level, bias):
    inputs = make_inputs(n=n, k=k, bias=bias, channels_last=channels_last, scalar_level=scalar_level)
    _assert_matches_float64_truth(inputs, n, stride, padding, channels_last, dtype, backend)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_wide_layer_spans_several_tiles(backend):
    """HyperRes-like widths (C >= 64): every kernel reduces over several channel
    blocks (64 input, 80 output channels against reduction tiles of at most 32 under
    the interpreter, 64 on a GPU; 80 = 64 + a partial 16) and writes several
    output-channel blocks, and the weight gradient several (tap, channel) row blocks."""
    inputs = make_inputs(n=2, c_in=64, c_out=80, h=8, w=8, channels_last=True)
    _assert_matches_float64_truth(inputs, 2, 1, 1, True, torch.float32, backend)


def _assert_matches_float64_truth(inputs, n, stride, padding, channels_last, dtype, backend):
    """Forward and every gradient of ``backend`` at ``dtype`` held to the float64 truth
    by the baseline-error rule (plain PyTorch at ``dtype`` sets the bar)."""
    truth_in = cast(inputs, torch.float64)
    y_true = hyper_conv2d_reference(truth_in[0], _level_vector(truth_in[1], n), *truth_in[2:],
                                    stride=stride, padding=padding)
    grad_out = torch.randn_like(y_true)
    y_true.backward(grad_out)

    base_in = cast(inputs, dtype)
    y_base, g_base = run(base_in, grad_out, stride, padding, "reference")
    fast_in = cast(inputs, dtype)
    y_fast, g_fast = run(fast_in, grad_out, stride, padding, backend)

    assert y_fast.dtype == dtype
    assert y_fast.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_within_baseline_error("y", y_fast, y_true, y_base, dtype)
    for name, t_true, gb, gf in zip(INPUT_NAMES, truth_in, g_base, g_fast):
        if not isinstance(t_true, torch.Tensor):
            assert gf is None, f"{name} is not a tensor and must get no gradient"
            continue
        assert gf is not None, f"no gradient for {name}"
        assert gf.dtype == gb.dtype
        assert_within_baseline_error(f"d{name}", gf, t_true.grad, gb, dtype)


def _level_vector(level, n):
    if isinstance(level, torch.Tensor):
        return level
    return torch.full((n,), level, dtype=torch.float64, device=DEVICE)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_only_requested_gradients(backend):
    x, level, weight, weight_base, b, bb = cast(make_inputs(n=2), torch.float32)
    weight.requires_grad_(False)
    y = hyper_conv2d(x, level.detach(), weight, weight_base, None, bb, padding=1, backend=backend)
    y.sum().backward()
    assert x.grad is not None and weight_base.grad is not None and bb.grad is not None
    # Not asked for: a frozen weight, a detached level, a bias that was not passed.
    assert weight.grad is None and level.grad is None and b.grad is None


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
def test_empty_batch(backend):
    x, level, weight, weight_base, b, bb = cast(make_inputs(n=0), torch.float32)
    y = hyper_conv2d(x, level, weight, weight_base, b, bb, padding=1, backend=backend)
    assert y.shape == (0, 7, 9, 11)
    y.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and level.grad.shape == (0,)


def test_reference_gradcheck_float64():
    inputs = cast(make_inputs(n=2, c_in=3, c_out=4, h=6, w=5), torch.float64)
    for stride, padding in ((1, 1), (2, 0)):
        assert torch.autograd.gradcheck(
            lambda *a: hyper_conv2d_reference(*a, stride=stride, padding=padding), tuple(inputs))
        # The reference backend of the registered op has its own closed-form backward.
        assert torch.autograd.gradcheck(
            lambda *a: hyper_conv2d(*a, stride=stride, padding=padding, backend="reference"), tuple(inputs))


def test_reference_is_conv2d_for_shared_kernel():
    """Sanity of the spec: equal levels reduce to one F.conv2d with c*W + B."""
    x, _, weight, weight_base, b, bb = make_inputs(n=2)
    y = hyper_conv2d_reference(x, torch.full((2,), 0.3, dtype=torch.float64), weight, weight_base, b, bb, 1, 1)
    torch.testing.assert_close(y, F.conv2d(x, 0.3 * weight + weight_base, 0.3 * b + bb, 1, 1))


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(backend, channels_last):
    x, level, weight, weight_base, b, bb = cast(
        make_inputs(n=2, c_in=3, c_out=4, h=5, w=7, channels_last=channels_last), torch.float32)
    torch.library.opcheck(torch.ops.restorenet.hyper_conv2d.default,
                          (x, level, weight, weight_base, b, None, 2, 1, backend))


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS[:1])
def test_torch_compile_fullgraph(backend):
    x, level, weight, weight_base, b, bb = cast(make_inputs(n=2, c_in=3, c_out=4, h=6, w=6), torch.float32)

    def layer(x, level):
        return F.relu(hyper_conv2d(x, level, weight, weight_base, b, bb, padding=1, backend=backend))

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x, level)
    y.sum().backward()
    x2, lv2 = x.detach().clone().requires_grad_(), level.detach().clone().requires_grad_()
    layer(x2, lv2).sum().backward()
    torch.testing.assert_close(y, layer(x2, lv2))
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(level.grad, lv2.grad)


def test_autocast_runs_in_low_precision():
    if DEVICE.type != "cuda":
        dtype = torch.bfloat16
        x, level, weight, weight_base, b, bb = cast(make_inputs(n=2), torch.float32)
        with torch.autocast("cpu", dtype=dtype):
            y = hyper_conv2d(x, level, weight, weight_base, b, bb, padding=1, backend="reference")
        assert y.dtype == dtype
        y.float().sum().backward()
        assert weight.grad.dtype == torch.float32 and level.grad.dtype == torch.float32
    else:
        x, level, weight, weight_base, b, bb = cast(make_inputs(n=2), torch.float32)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = hyper_conv2d(x, level, weight, weight_base, b, bb, padding=1)
        assert y.dtype == torch.bfloat16


# ----------------------------------------------------------------- backend choice
@pytest.mark.skipif(not FAST_BACKENDS, reason="no fast backend on this machine")
def test_use_backend_switches_the_op(monkeypatch):
    calls = []
    op = importlib.import_module("restorenet.ops.hyper_conv2d")  # the module, not the function

    monkeypatch.setitem(op._FORWARD, FAST_BACKENDS[0],
                        lambda *a: calls.append(1) or op._reference_forward(*a))
    x, level, weight, weight_base, b, bb = make_inputs(n=1, device=DEVICE)
    x, weight, weight_base = x.float(), weight.float(), weight_base.float()
    with use_backend(FAST_BACKENDS[0]):
        hyper_conv2d(x, 0.5, weight, weight_base, padding=1)
    assert calls == [1]


# -------------------------------------------------------------------- bad input
def _good():
    x, level, weight, weight_base, b, bb = make_inputs(n=2)
    return dict(x=x.float(), level=level.float(), weight=weight.float(), weight_base=weight_base.float(),
                bias=b.float(), bias_base=bb.float(), stride=1, padding=1)


@pytest.mark.parametrize("change,match", [
    (dict(x=torch.randn(5, 9, 11)), "x must be 4-D"),
    (dict(x=torch.randint(0, 3, (2, 5, 9, 11))), "x must have dtype"),
    (dict(level=torch.rand(3)), "level must be .* shape \\[N\\] = \\[2\\]"),
    (dict(level=torch.rand(2, 1)), "level must be"),
    (dict(level=torch.tensor([1, 2])), "level must be a floating-point"),
    (dict(level="high"), "level must be a number"),
    (dict(weight=torch.randn(7, 4, 3, 3)), "weight must have Cin"),
    (dict(weight_base=torch.randn(7, 5, 1, 1)), "weight_base must have the shape"),
    (dict(weight=torch.randn(7, 5, 3, 3, dtype=torch.float64)), "weight must have dtype"),
    (dict(bias=torch.randn(6)), "bias must have shape \\[Cout\\]"),
    (dict(bias_base=torch.randn(7, 1)), "bias_base must be 1-D"),
    (dict(stride=0), "stride must be an int >= 1"),
    (dict(padding=-1), "padding must be an int >= 0"),
    (dict(x=torch.randn(2, 5, 2, 2), padding=0), "x is too small"),
])
def test_bad_input_names_the_argument(change, match):
    args = {**_good(), **change}
    with pytest.raises((ValueError, TypeError), match=match):
        hyper_conv2d(**args, backend="reference")


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
@pytest.mark.parametrize("change,name", [
    (dict(x=torch.randn(2, 0, 9, 11), weight=torch.randn(7, 0, 3, 3), weight_base=torch.randn(7, 0, 3, 3)), "x"),
    (dict(x=torch.randn(2, 5, 0, 11)), "x"),  # padding 1 would leave a padding-only output
    (dict(x=torch.randn(2, 5, 9, 0)), "x"),
    (dict(weight=torch.randn(7, 5, 0, 3), weight_base=torch.randn(7, 5, 0, 3)), "weight"),
    (dict(weight=torch.randn(0, 5, 3, 3), weight_base=torch.randn(0, 5, 3, 3), bias=None, bias_base=None),
     "weight"),
])
def test_zero_sized_dims_are_rejected_alike_on_every_backend(backend, change, name):
    """A conv over no input channels (or no pixels) would be the bias alone: F.conv2d
    returns no output channels for it, so the op rejects it before any backend runs."""
    with pytest.raises(ValueError, match=f"^{name} must have") as error:
        hyper_conv2d(**{**_good(), **change}, backend=backend)
    with pytest.raises(ValueError, match=f"^{name} must have") as reference_error:
        hyper_conv2d(**{**_good(), **change}, backend="reference")
    assert str(error.value) == str(reference_error.value)


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
def test_meta_tensors_propagate_shapes(backend):
    args = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in _good().items()}
    y = hyper_conv2d(**{**args, "stride": 2}, backend=backend)
    assert y.device.type == "meta" and y.shape == (2, 7, 5, 6)


@pytest.mark.parametrize("level", [float("nan"), float("inf"), -1.0, -1e-9, 10 ** 400,
                                   [0.5, float("nan")], torch.tensor([0.5, float("nan")]),
                                   torch.tensor([0.5, -0.5]), torch.tensor(float("inf"))])
def test_level_must_be_finite_and_non_negative(level):
    with pytest.raises(ValueError, match="^level must be finite and >= 0"):
        hyper_conv2d(**{**_good(), "level": level}, backend="reference")


def test_allow_nonfinite_lets_nan_levels_through():
    args = {**_good(), "level": torch.tensor([0.5, float("nan")])}
    y = hyper_conv2d(**args, allow_nonfinite=True, backend="reference")
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).all()


def test_level_sequences_equal_level_tensors():
    args = _good()
    want = hyper_conv2d(**args, backend="reference")
    got = hyper_conv2d(**{**args, "level": args["level"].tolist()}, backend="reference")
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("level,allow_nonfinite,reads", [
    (torch.tensor([0.2, 0.7]), False, 1),  # the one check of a tensor level
    (torch.tensor(0.3), False, 1),
    (torch.tensor([0.2, 0.7]), True, 0),   # checked by the caller (HyperRes, once per forward)
    (0.4, False, 0),                       # host values: checked for free
    ([0.2, 0.7], False, 0),
])
def test_level_check_costs_one_host_read_for_a_tensor(monkeypatch, level, allow_nonfinite, reads):
    args = {**_good(), "level": level}
    _, counted = count_host_reads(monkeypatch, lambda: hyper_conv2d(
        **args, allow_nonfinite=allow_nonfinite, backend="reference"))
    assert counted == reads


def test_level_is_not_read_on_meta_or_for_an_empty_batch(monkeypatch):
    args = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in _good().items()}
    _, reads = count_host_reads(monkeypatch, lambda: hyper_conv2d(**args, backend="reference"))
    assert reads == 0
    x, level, weight, weight_base, b, bb = cast(make_inputs(n=0), torch.float32)
    _, reads = count_host_reads(monkeypatch, lambda: hyper_conv2d(x, level, weight, weight_base, b, bb))
    assert reads == 0


@pytest.mark.gpu
def test_device_mismatch_is_named():
    args = _good()
    args["weight"] = args["weight"].cuda()
    with pytest.raises(ValueError, match="weight must be on device"):
        hyper_conv2d(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_64bit_indexing(backend):
    """An input of more than 2**31 elements: offsets must not wrap around."""
    n, c, h, w = 1, 32, 8200, 8200  # 2.15e9 elements, 4.3 GB in fp16
    x = torch.randn(n, c, h, w, device="cuda", dtype=torch.float16)
    weight = torch.randn(4, c, 1, 1, device="cuda", dtype=torch.float16) * 0.1
    y = hyper_conv2d(x, 0.5, weight, weight, backend=backend)
    tail = x[..., -4:, -4:]
    expect = F.conv2d(tail.float(), 1.5 * weight.float())
    torch.testing.assert_close(y[..., -4:, -4:].float(), expect, atol=2e-2, rtol=2e-2)


def test_profiler_sees_the_named_ranges():
    x, level, weight, weight_base, b, bb = cast(make_inputs(n=2), torch.float32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        hyper_conv2d(x, level, weight, weight_base, b, bb, padding=1, backend="reference").sum().backward()
    names = {e.name for e in prof.events()}
    assert {"restorenet::hyper_conv2d::fwd", "restorenet::hyper_conv2d::bwd"} <= names


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_hyperres_same_loss_and_gradients_with_every_backend(backend):
    """The op inside its model: one mixed-level training step in fp32 with the
    reference and with ``backend``, both held to the float64 truth by the table's rule."""
    import copy

    from restorenet import create_model

    model = create_model("hyperres", width=16, num_blocks=2).to(DEVICE)
    noisy = torch.rand(4, 3, 14, 18, device=DEVICE)
    clean = torch.rand(4, 3, 14, 18, device=DEVICE)
    levels = torch.tensor([15.0, 35.0, 55.0, 75.0], device=DEVICE)

    def step(net, name, dtype):
        net.zero_grad(set_to_none=True)
        with use_backend(name):
            loss = (net(noisy.to(dtype), levels) - clean.to(dtype)).abs().mean()
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in net.named_parameters()}

    loss_true, grads_true = step(copy.deepcopy(model).double(), "reference", torch.float64)
    loss_ref, grads_ref = step(model, "reference", torch.float32)
    loss_fast, grads_fast = step(model, backend, torch.float32)
    assert_within_baseline_error("loss", loss_fast, loss_true, loss_ref, torch.float32)
    assert grads_ref.keys() == grads_fast.keys()
    for name in grads_ref:
        assert_within_baseline_error(name, grads_fast[name], grads_true[name], grads_ref[name], torch.float32)
