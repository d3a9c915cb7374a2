"""Building blocks shared by several models (NAFNet family).

Notation follows ``shared/design/architectures.md``: LN2d is LayerNorm over
channels at each pixel, SG is SimpleGate, SCA is simplified channel attention.

The element-wise stages run through the fused ops of ``restorenet.ops``
(``layer_norm2d``, ``simple_gate``, ``channel_attention``, ``scaled_residual``),
so the backend follows ``use_backend`` / ``RESTORENET_BACKEND`` like every op
(CPU default: ``reference``, plain PyTorch, the same numbers as the textbook
formulas up to float rounding). Parameter names and shapes are those of the
plain modules: state_dicts do not change.

Dtypes: the ops compute in fp32 and return the activation's dtype. fp32
parameters with a float16/bfloat16 activation (fp32 master weights, autocast)
are used as they are and do *not* promote the activation to fp32, unlike the
plain formulas; any other mix is promoted as PyTorch would (``_fused_dtypes``).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from restorenet._checks import check_int
from restorenet.ops.channel_attention import channel_attention, scaled_residual
from restorenet.ops.naf_elementwise import layer_norm2d, simple_gate

_HALF = (torch.float16, torch.bfloat16)


def _fused_dtypes(activations: tuple, params: tuple) -> tuple[tuple, tuple]:
    """Activations and parameters cast (only where needed) to what the fused ops
    take: one activation dtype, parameters of that dtype or fp32 master copies
    (fp64 activations need fp64 parameters). The activation dtype is PyTorch's
    promotion of all of them, except that an fp32 parameter does not promote a
    half-precision activation."""
    dtype = activations[0].dtype
    for t in activations[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    for p in params:
        if p is not None and not (p.dtype == torch.float32 and dtype in _HALF):
            dtype = torch.promote_types(dtype, p.dtype)

    def param(p):
        keep = p is None or p.dtype == dtype or (p.dtype == torch.float32 and dtype != torch.float64)
        return p if keep else p.to(dtype)

    return tuple(t.to(dtype) for t in activations), tuple(param(p) for p in params)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dim of an NCHW tensor, per pixel (fused op
    ``layer_norm2d``: one pass over memory each way, fp32 statistics)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        check_int("channels", channels, 1)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (x,), (w, b) = _fused_dtypes((x,), (self.weight, self.bias))
        return layer_norm2d(x, w, b, self.eps)


class SimpleGate(nn.Module):
    """SG(t): split the channels in two halves and multiply them (fused op ``simple_gate``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return simple_gate(x)


class SimplifiedChannelAttention(nn.Module):
    """SCA(t) = t * conv1x1(avgpool(t)) (fused op ``channel_attention``: the
    pool and the product are two passes over memory each way; the 1x1 conv on
    the pooled [N, C] vector runs inside the op)."""

    def __init__(self, channels: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._attend(x, gated=False)

    def gated(self, x: torch.Tensor) -> torch.Tensor:
        """SCA(SG(x)) in the same two passes: SG(x) is recomputed, never stored."""
        return self._attend(x, gated=True)

    def _attend(self, x: torch.Tensor, gated: bool) -> torch.Tensor:
        (x,), (w, b) = _fused_dtypes((x,), (self.proj.weight, self.proj.bias))
        return channel_attention(x, w, b, gated=gated)


def scaled_residual_add(inp: torch.Tensor, scale: nn.Parameter, z: torch.Tensor) -> torch.Tensor:
    """inp + scale * z (scale [1, C, 1, 1], e.g. NAFBlock's beta) through the fused op,
    with fp32 master parameters matched to low-precision activations."""
    (inp, z), (scale,) = _fused_dtypes((inp, z), (scale,))
    return scaled_residual(inp, scale, z)


class NAFBlock(nn.Module):
    """NAFNet's block: a gated spatial mixer then a gated channel MLP.

    y   = inp + beta  * conv1x1(SCA(SG(dw3x3(conv1x1(LN(inp))))))
    out = y   + gamma * conv1x1(SG(conv1x1(LN(y))))
    beta and gamma start at zero, so a fresh block is the identity.
    """

    def __init__(self, channels: int, dw_expand: int = 2, ffn_expand: int = 2, dropout: float = 0.0):
        super().__init__()
        check_int("channels", channels, 1)
        for name, expand in (("dw_expand", dw_expand), ("ffn_expand", ffn_expand)):
            if check_int(name, expand, 1) * channels % 2:
                raise ValueError(f"{name} * channels must be even (SimpleGate halves the expanded "
                                 f"channels), got {name}={expand}, channels={channels}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        c, dw_c, ffn_c = channels, channels * dw_expand, channels * ffn_expand
        self.norm1 = LayerNorm2d(c)
        self.expand = nn.Conv2d(c, dw_c, 1)
        self.dwconv = nn.Conv2d(dw_c, dw_c, 3, padding=1, groups=dw_c)
        self.gate = SimpleGate()
        self.sca = SimplifiedChannelAttention(dw_c // 2)
        self.project = nn.Conv2d(dw_c // 2, c, 1)
        self.norm2 = LayerNorm2d(c)
        self.ffn_expand = nn.Conv2d(c, ffn_c, 1)
        self.ffn_project = nn.Conv2d(ffn_c // 2, c, 1)
        self.drop1 = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.drop2 = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

    def spatial_mixer(self, x: torch.Tensor) -> torch.Tensor:
        # SG and SCA fused: SCA(SG(t)) is one op, SG(t) is never stored.
        t = self.dwconv(self.expand(self.norm1(x)))
        return self.drop1(self.project(self.sca.gated(t)))

    def channel_mlp(self, y: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.ffn_project(self.gate(self.ffn_expand(self.norm2(y)))))

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        y = scaled_residual_add(inp, self.beta, self.spatial_mixer(inp))
        return scaled_residual_add(y, self.gamma, self.channel_mlp(y))


def downsample(channels: int) -> nn.Module:
    """NAFNet's down step: conv2x2 stride 2, channels doubled."""
    return nn.Conv2d(channels, 2 * channels, 2, stride=2)


def upsample(channels: int) -> nn.Module:
    """NAFNet's up step: conv1x1 (no bias) to 2c then PixelShuffle(2), channels halved."""
    return nn.Sequential(nn.Conv2d(channels, 2 * channels, 1, bias=False), nn.PixelShuffle(2))


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad H and W on the bottom/right up to a multiple (U-Nets need it)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return F.pad(x, (0, pw, 0, ph)) if (ph or pw) else x
