"""blocks.py: the NAFNet building blocks on the fused ops.

The modules must keep their parameters (state_dicts of trained models load),
compute the textbook formulas (reference backend, the CPU default), and give
the same results and gradients on the fast backend (``use_backend("triton")``:
the Triton interpreter on CPU, the GPU kernels on a CUDA machine).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from restorenet.models.adarevd import FCNAFBlock
from restorenet.models.blocks import LayerNorm2d, NAFBlock, SimpleGate, SimplifiedChannelAttention
from restorenet.ops import available_backends, use_backend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FAST = [b for b in available_backends(DEVICE, "channel_attention_apply") if b != "reference"]


def textbook_nafblock(block: NAFBlock, inp: torch.Tensor) -> torch.Tensor:
    """NAFBlock written out with plain PyTorch ops (the pre-fusion code)."""
    def ln(norm, x):
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        return (x - mu) * torch.rsqrt(var + norm.eps) * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)

    def sg(x):
        a, b = x.chunk(2, dim=1)
        return a * b

    t = sg(block.dwconv(block.expand(ln(block.norm1, inp))))
    t = t * block.sca.proj(F.adaptive_avg_pool2d(t, 1))
    y = inp + block.beta * block.project(t)
    return y + block.gamma * block.ffn_project(sg(block.ffn_expand(ln(block.norm2, y))))


def randomised(block, dtype=torch.float32):
    block = block.to(device=DEVICE, dtype=dtype)
    with torch.no_grad():
        for p in block.parameters():  # beta = gamma = 0 would hide both halves
            p.normal_(0, 0.5)
    return block


def grads_of(block, x, grad):
    block.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = block(x)
    y.backward(grad)
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in block.named_parameters()}


def test_state_dict_is_unchanged():
    block = NAFBlock(8)
    shapes = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    assert shapes == {
        "norm1.weight": (8,), "norm1.bias": (8,), "expand.weight": (16, 8, 1, 1), "expand.bias": (16,),
        "dwconv.weight": (16, 1, 3, 3), "dwconv.bias": (16,), "sca.proj.weight": (8, 8, 1, 1),
        "sca.proj.bias": (8,), "project.weight": (8, 8, 1, 1), "project.bias": (8,), "norm2.weight": (8,),
        "norm2.bias": (8,), "ffn_expand.weight": (16, 8, 1, 1), "ffn_expand.bias": (16,),
        "ffn_project.weight": (8, 8, 1, 1), "ffn_project.bias": (8,), "beta": (1, 8, 1, 1), "gamma": (1, 8, 1, 1),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_reference_backend_is_the_textbook_block(dtype):
    block = randomised(NAFBlock(6), dtype)
    x = torch.randn(2, 6, 7, 5, dtype=dtype, device=DEVICE)
    grad = torch.randn_like(x)
    with use_backend("reference"):
        y, dx, dp = grads_of(block, x, grad)
    block.zero_grad(set_to_none=True)
    xs = x.clone().requires_grad_()
    y_ref = textbook_nafblock(block, xs)
    y_ref.backward(grad)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(dx, xs.grad, **tol)
    for n, p in block.named_parameters():
        torch.testing.assert_close(dp[n], p.grad, **tol, msg=n)


def assert_fast_matches_reference(block, x, grad, out_tol, dx_tol, param_tol):
    """``grads_of`` the block on the fast backend equals it on the reference
    backend: the output, the input gradient and every parameter gradient."""
    with use_backend("reference"):
        ref = grads_of(block, x, grad)
    with use_backend(FAST[-1]):
        fast = grads_of(block, x, grad)
    torch.testing.assert_close(fast[0], ref[0], **out_tol)
    torch.testing.assert_close(fast[1], ref[1], **dx_tol)
    for n, r in ref[2].items():
        torch.testing.assert_close(fast[2][n], r, **param_tol, msg=n)


@pytest.mark.skipif(not FAST, reason="no fast backend on this machine")
@pytest.mark.parametrize("block_type,channels_last", [(NAFBlock, False), (FCNAFBlock, True)],
                         ids=["NAFBlock-nchw", "FCNAFBlock-nhwc"])
def test_fast_backend_equals_reference(block_type, channels_last):
    """The whole block (and AdaRevD's FCNAFBlock, which reuses its modules) on
    the fast backend: same output and gradients as the reference backend."""
    block = randomised(block_type(6))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 6, 9, 7, device=DEVICE).contiguous(memory_format=fmt)
    assert_fast_matches_reference(block, x, torch.randn_like(x), out_tol=dict(rtol=1e-5, atol=1e-5),
                                  dx_tol=dict(rtol=1e-4, atol=1e-5), param_tol=dict(rtol=1e-4, atol=1e-4))


def test_fast_backend_float64_to_rounding():
    """In float64 the fused kernels and the reference agree to rounding."""
    if not FAST:
        pytest.skip("no fast backend on this machine")
    block = randomised(NAFBlock(4), torch.float64)
    x = torch.randn(1, 4, 5, 6, dtype=torch.float64, device=DEVICE)
    assert_fast_matches_reference(block, x, torch.randn_like(x), out_tol=dict(rtol=1e-12, atol=1e-12),
                                  dx_tol=dict(rtol=1e-11, atol=1e-11), param_tol=dict(rtol=1e-11, atol=1e-11))


def test_fresh_block_is_the_identity():
    block = NAFBlock(4).to(DEVICE)
    x = torch.randn(2, 4, 5, 5, device=DEVICE)
    torch.testing.assert_close(block(x), x, rtol=0, atol=0)


def test_modules_run_the_fused_ops():
    x = torch.randn(2, 8, 4, 3, device=DEVICE)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        LayerNorm2d(8).to(DEVICE)(x)
        SimpleGate()(x)
        sca = SimplifiedChannelAttention(4).to(DEVICE)
        sca(x[:, :4])
        sca.gated(x)
        randomised(NAFBlock(8))(x)
    names = [e.name for e in prof.events()]
    for op in ("layer_norm2d", "simple_gate", "channel_attention", "scaled_residual"):
        assert f"restorenet::{op}::fwd" in names, op


def test_sca_gated_is_sca_of_the_gate():
    sca = randomised(SimplifiedChannelAttention(3), torch.float64)
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64, device=DEVICE)
    torch.testing.assert_close(sca.gated(x), sca(SimpleGate()(x)))
    t = SimpleGate()(x)
    torch.testing.assert_close(sca(t), t * sca.proj(F.adaptive_avg_pool2d(t, 1)))


def test_half_activation_with_fp32_parameters():
    """Under autocast the convs hand the block 16-bit activations while its
    parameters stay fp32: the ops take them as they are (no promotion of the
    activation), and every parameter gets an fp32 gradient."""
    dtype = torch.bfloat16 if DEVICE.type == "cpu" else torch.float16
    block = randomised(NAFBlock(4))
    x = torch.randn(2, 4, 6, 6, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=dtype):
        y = block(x.to(dtype))
    assert y.dtype == dtype
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in block.parameters())
    # The same block in fp32, for scale: autocast moves results by low-precision rounding only.
    with use_backend("reference"):
        ref = block(x)
    assert (y.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_mixed_dtypes_promote_as_pytorch():
    """A float64 block fed float32 computes in float64, as the plain formulas did."""
    block = randomised(NAFBlock(4), torch.float64)
    x = torch.randn(1, 4, 5, 5, device=DEVICE)
    norm = block.norm1
    assert norm(x).dtype == torch.float64
    assert block(x.double()).dtype == torch.float64


@pytest.mark.parametrize("kwargs,name", [
    (dict(channels=0), "channels"), (dict(channels=4.0), "channels"), (dict(channels=3, dw_expand=1), "dw_expand"),
    (dict(channels=4, ffn_expand=0), "ffn_expand"), (dict(channels=4, dropout=-0.1), "dropout"),
    (dict(channels=4, dropout=1.0), "dropout"),
])
def test_nafblock_constructor_arguments_are_checked(kwargs, name):
    """A negative dropout used to build silently (no Dropout at all); an odd expanded
    width failed only in forward, in SimpleGate."""
    with pytest.raises(ValueError, match=f"^{name}"):
        NAFBlock(**kwargs)


@pytest.mark.parametrize("kwargs,name", [(dict(channels=0), "channels"), (dict(channels=4, eps=-1.0), "eps"),
                                         (dict(channels=4, eps=float("nan")), "eps")])
def test_layer_norm_constructor_arguments_are_checked(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        LayerNorm2d(**kwargs)
