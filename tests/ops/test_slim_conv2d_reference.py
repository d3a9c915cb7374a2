"""slim_conv2d_reference: the spec of the per-sample channel-width conv."""
import pytest
import torch
import torch.nn.functional as F

from restorenet.ops.slim_conv2d import slim_conv2d, slim_conv2d_reference


def masked_full_conv(x, weight, bias, in_width, out_width, stride, padding):
    """An independent formulation: zero the inactive input channels, run the
    full-width conv, zero the inactive output channels."""
    n, cin = x.shape[:2]
    cout = weight.shape[0]
    in_mask = (torch.arange(cin)[None] < in_width[:, None]).to(x.dtype)[:, :, None, None]
    out_mask = (torch.arange(cout)[None] < out_width[:, None]).to(x.dtype)[:, :, None, None]
    return F.conv2d(x * in_mask, weight, bias, stride, padding) * out_mask


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0), (2, 1)])
def test_matches_masked_full_width_conv(stride, padding):
    torch.manual_seed(0)
    x = torch.randn(4, 6, 9, 8, dtype=torch.float64)
    weight = torch.randn(5, 6, 3, 3, dtype=torch.float64)
    bias = torch.randn(5, dtype=torch.float64)
    in_w = torch.tensor([1, 6, 3, 4])
    out_w = torch.tensor([5, 2, 1, 3])
    got = slim_conv2d_reference(x, weight, bias, in_w, out_w, stride, padding)
    want = masked_full_conv(x, weight, bias, in_w, out_w, stride, padding)
    torch.testing.assert_close(got, want)


def test_inactive_channels_exactly_zero_and_inactive_inputs_ignored():
    torch.manual_seed(1)
    x = torch.randn(3, 8, 6, 6)
    weight, bias = torch.randn(8, 8, 3, 3), torch.randn(8)
    in_w, out_w = torch.tensor([2, 8, 5]), torch.tensor([3, 8, 1])
    out = slim_conv2d_reference(x, weight, bias, in_w, out_w, 1, 1)
    for n in range(3):
        assert torch.all(out[n, out_w[n]:] == 0)
        assert torch.all(out[n, :out_w[n]] != 0)
    # Garbage in inactive input channels must not leak into the output.
    x2 = x.clone()
    x2[0, 2:] = 1e6
    torch.testing.assert_close(slim_conv2d_reference(x2, weight, bias, in_w, out_w, 1, 1), out,
                               rtol=0, atol=0)


def test_int_widths_equal_tensor_widths_and_public_function():
    torch.manual_seed(2)
    x, weight = torch.randn(2, 4, 5, 5), torch.randn(6, 4, 3, 3)
    a = slim_conv2d_reference(x, weight, None, 3, 2, 1, 1)
    b = slim_conv2d_reference(x, weight, None, torch.tensor([3, 3]), torch.tensor([2, 2]), 1, 1)
    c = slim_conv2d(x, weight, None, 3, 2, 1, 1, backend="reference")
    assert torch.equal(a, b) and torch.equal(a, c)
    assert a.shape == (2, 6, 5, 5)


def test_gradcheck_float64():
    torch.manual_seed(3)
    x = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, dtype=torch.float64, requires_grad=True)
    in_w, out_w = torch.tensor([1, 2, 2]), torch.tensor([2, 1, 2])
    for stride, padding in [(1, 1), (2, 0), (2, 1)]:
        assert torch.autograd.gradcheck(
            lambda x, w, b: slim_conv2d_reference(x, w, b, in_w, out_w, stride, padding),
            (x, weight, bias))


def test_weight_rows_beyond_width_get_no_gradient():
    torch.manual_seed(4)
    x = torch.randn(2, 6, 4, 4)
    weight = torch.randn(6, 6, 3, 3, requires_grad=True)
    slim_conv2d_reference(x, weight, None, torch.tensor([2, 3]), torch.tensor([4, 1]), 1, 1).sum().backward()
    assert torch.all(weight.grad[4:] == 0) and torch.all(weight.grad[:, 3:] == 0)
    assert weight.grad[:4, :2].abs().sum() > 0


def test_empty_batch():
    out = slim_conv2d_reference(torch.randn(0, 4, 5, 5), torch.randn(6, 4, 3, 3), None,
                                torch.zeros(0, dtype=torch.int64), 2, 1, 1)
    assert out.shape == (0, 6, 5, 5)


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(in_width=0), ValueError, "in_width"),
    (dict(in_width=5), ValueError, "in_width"),
    (dict(out_width=7), ValueError, "out_width"),
    (dict(out_width=torch.tensor([1, 2, 3])), ValueError, "out_width"),
    (dict(out_width=torch.tensor([1.0, 2.0])), TypeError, "out_width"),
    (dict(in_width=torch.tensor([0, 2])), ValueError, "in_width"),
    (dict(in_width=2.0), TypeError, "in_width"),
    (dict(weight=torch.randn(6, 3, 3, 3)), ValueError, "weight"),
    (dict(weight=torch.randn(6, 4, 3, 3, dtype=torch.float64)), TypeError, "weight"),
    (dict(weight=torch.randn(6, 4, 3, 3, device="meta")), ValueError, "weight"),
    (dict(bias=torch.randn(5)), ValueError, "bias"),
    (dict(x=torch.randn(2, 4, 5)), ValueError, "x"),
    (dict(x=torch.ones(2, 4, 5, 5, dtype=torch.int64)), TypeError, "x"),
    (dict(stride=0), ValueError, "stride"),
    (dict(padding=-1), ValueError, "padding"),
])
def test_errors_name_the_argument(kwargs, exc, name):
    args = dict(x=torch.randn(2, 4, 5, 5), weight=torch.randn(6, 4, 3, 3), bias=torch.randn(6),
                in_width=2, out_width=3, stride=1, padding=1)
    args.update(kwargs)
    with pytest.raises(exc, match=f"^{name}"):
        slim_conv2d_reference(**args)


def test_public_function_validates_backend():
    x, weight = torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3)
    with pytest.raises(ValueError, match="^backend"):
        slim_conv2d(x, weight, None, 2, 2, backend="fast")
