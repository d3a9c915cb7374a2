"""Building blocks shared by several models (NAFNet family).

Notation follows ``shared/design/architectures.md``: LN2d is LayerNorm over
channels at each pixel, SG is SimpleGate, SCA is simplified channel attention.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dim of an NCHW tensor, per pixel."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        y = (x - mu) * torch.rsqrt(var + self.eps)
        return y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class SimpleGate(nn.Module):
    """SG(t): split the channels in two halves and multiply them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b


class SimplifiedChannelAttention(nn.Module):
    """SCA(t) = t * conv1x1(avgpool(t))."""

    def __init__(self, channels: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.proj(F.adaptive_avg_pool2d(x, 1))


class NAFBlock(nn.Module):
    """NAFNet's block: a gated spatial mixer then a gated channel MLP.

    y   = inp + beta  * conv1x1(SCA(SG(dw3x3(conv1x1(LN(inp))))))
    out = y   + gamma * conv1x1(SG(conv1x1(LN(y))))
    beta and gamma start at zero, so a fresh block is the identity.
    """

    def __init__(self, channels: int, dw_expand: int = 2, ffn_expand: int = 2, dropout: float = 0.0):
        super().__init__()
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
        t = self.gate(self.dwconv(self.expand(self.norm1(x))))
        return self.drop1(self.project(self.sca(t)))

    def channel_mlp(self, y: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.ffn_project(self.gate(self.ffn_expand(self.norm2(y)))))

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        y = inp + self.beta * self.spatial_mixer(inp)
        return y + self.gamma * self.channel_mlp(y)


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
