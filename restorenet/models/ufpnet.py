"""UFPNet's encoder (Fang et al. 2023, "Self-supervised Non-uniform Kernel Estimation with
Flow-based Motion Prior"): the encoder of every released AdaRevD configuration.

    img -> kernel code estimator -> per-pixel code u (k*k) and its uncertainty sigma
        u' = norm(u) * sqrt(1 - sigma^2) + N(0, 1) * sigma        (norm: zero mean, unit std per pixel)
        kernel map K = KernelPrior(u')  [N, k*k, H, W]              (a 19x19 blur kernel per pixel)
    img -> conv3x3 -> [KernelNAFBlock(., K_l) -> down] x 3 -> [NAFBlocks -> down] -> middle NAFBlocks
        K_0 = K, K_1 = conv2x2_s2(K_0), K_2 = conv2x2_s2(K_1)

A NAFNet encoder whose first three levels hold one kernel-attention block each::

    KernelAttention(x, K) = x + a * sigmoid(conv3x3([a, e]))
        a = GELU(conv3x3(x)),  e = GELU(conv3x3(GELU(conv3x3_{c<-k*k}(K))))
    KernelNAFBlock(x, K):  t = KernelAttention(x, K)
        y   = x + beta  * conv1x1(SCA(SG(dw3x3(conv1x1(LN(t))))))     (the residual is x, not t)
        out = y + gamma * conv1x1(SG(conv1x1(LN(y))))

The estimator and the prior are trained before UFPNet and frozen; inside AdaRevD the
whole encoder is frozen and run without grad. The estimator's width (64) and the
kernel size (19) are fixed in the released code; here they are arguments so that
tests can build a small one.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from restorenet._checks import check_int
from restorenet.models.blocks import NAFBlock, scaled_residual_add
from restorenet.models.kernel_prior import KernelPrior
from restorenet.models.nafnet import NAFNetEncoder

KERNEL_LEVELS = 3  # encoder levels with a kernel-attention block (the kernel map is halved twice)


# ------------------------------------------------------------ kernel code estimator


class ResidualConvBlock(nn.Module):
    """x + conv3x3(ReLU(conv3x3(ReLU(x))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.conv1(self.act(x))))


class EstimatorDown(nn.Module):
    """skip = ReLU(res(res(conv3x3(x)))); returns (conv3x3_s2(skip), skip)."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.head = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.res1 = ResidualConvBlock(channels)
        self.res2 = ResidualConvBlock(channels)
        self.down = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = torch.relu(self.res2(self.res1(self.head(x))))
        return self.down(skip), skip


class EstimatorUp(nn.Module):
    """ReLU(res(res(conv3x3([convT3x3_s2(x) at skip's size, skip]))))."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, channels, 3, stride=2, padding=1)
        self.head = nn.Conv2d(2 * channels, channels, 3, padding=1)
        self.res1 = ResidualConvBlock(channels)
        self.res2 = ResidualConvBlock(channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.up(x, output_size=skip.shape[-2:])
        return torch.relu(self.res2(self.res1(self.head(torch.cat([up, skip], dim=1)))))


class KernelCodeEstimator(nn.Module):
    """A small U-Net (widths w, 2w, 4w) giving every pixel a kernel code and its uncertainty.

    Returns ``code`` [N, H*W, k*k] (a softmax over the k*k entries) and ``sigma``
    [N, H*W, 1] in (0, 1) (the mean over the k*k entries of a sigmoid map).
    """

    def __init__(self, in_channels: int = 3, width: int = 64, kernel_size: int = 19):
        super().__init__()
        w, kk = width, kernel_size * kernel_size
        self.down1 = EstimatorDown(in_channels, w)
        self.down2 = EstimatorDown(w, 2 * w)
        mid = [nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU()]
        for _ in range(4):
            mid += [nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.ReLU()]
        self.middle = nn.Sequential(*mid)
        self.up1 = EstimatorUp(4 * w, 2 * w)
        self.up2 = EstimatorUp(2 * w, w)
        self.code_head = nn.Sequential(nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, kk, 3, padding=1))
        self.sigma_head = nn.Sequential(nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, kk, 3, padding=1),
                                        nn.Sigmoid())

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, skip1 = self.down1(img)
        x, skip2 = self.down2(x)
        t = self.up2(self.up1(self.middle(x), skip2), skip1)
        code = torch.softmax(self.code_head(t), dim=1).flatten(2).transpose(1, 2)
        sigma = self.sigma_head(t).mean(dim=1).flatten(1).unsqueeze(-1)
        return code, sigma


# ------------------------------------------------------------ kernel attention


class KernelAttention(nn.Module):
    """x + a * sigmoid(conv3x3([a, e])): a from the features, e from the kernel map."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        c = channels
        self.feature = nn.Conv2d(c, c, 3, padding=1)
        self.kernel_embed = nn.Sequential(nn.Conv2d(kernel_size * kernel_size, c, 3, padding=1), nn.GELU(),
                                          nn.Conv2d(c, c, 3, padding=1), nn.GELU())
        self.gate = nn.Conv2d(2 * c, c, 3, padding=1)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor, kernel_map: torch.Tensor) -> torch.Tensor:
        a = self.act(self.feature(x))
        e = self.kernel_embed(kernel_map)
        return x + a * torch.sigmoid(self.gate(torch.cat([a, e], dim=1)))


class KernelNAFBlock(NAFBlock):
    """NAFBlock whose spatial mixer reads KernelAttention(x, K); its residuals stay on x."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__(channels)
        self.kernel_attention = KernelAttention(channels, kernel_size)

    def forward(self, inp: torch.Tensor, kernel_map: torch.Tensor) -> torch.Tensor:
        y = scaled_residual_add(inp, self.beta, self.spatial_mixer(self.kernel_attention(inp, kernel_map)))
        return scaled_residual_add(y, self.gamma, self.channel_mlp(y))


# ------------------------------------------------------------ the encoder


class UFPNetEncoder(NAFNetEncoder):
    """UFPNet's contracting half, returning ``[e0, ..., e4]`` like :class:`NAFNetEncoder`.

    Args:
        enc_blocks: blocks per level; the first three levels must hold exactly one
            block each (a KernelNAFBlock), as in every released configuration.
        kernel_size: k of the per-pixel blur kernels (released: 19).
        estimator_width: width w of the kernel code estimator (released: 64).
        kernel_noise: True (released): the code gets Gaussian noise scaled by its
            uncertainty at every forward, in training and evaluation alike, so the
            output is random. False: the noise's mean is used instead,
            ``u' = norm(u) * sqrt(1 - sigma^2)`` (deterministic; not the released behaviour).
    """

    def __init__(self, in_channels: int = 3, width: int = 64,
                 enc_blocks: Sequence[int] = (1, 1, 1, 28), middle_blocks: int = 1,
                 kernel_size: int = 19, estimator_width: int = 64, kernel_noise: bool = True):
        super().__init__(in_channels, width, enc_blocks, middle_blocks)
        check_int("kernel_size", kernel_size, 1)
        check_int("estimator_width", estimator_width, 1)
        if len(self.stages) < KERNEL_LEVELS or any(len(s) != 1 for s in self.stages[:KERNEL_LEVELS]):
            raise ValueError(f"enc_blocks must start with {KERNEL_LEVELS} levels of exactly one block (the "
                             f"kernel-attention blocks of the UFPNet encoder), got {list(map(len, self.stages))}")
        if not isinstance(kernel_noise, bool):
            raise TypeError(f"kernel_noise must be a bool, got {kernel_noise!r}")
        self.kernel_size = kernel_size
        self.kernel_noise = kernel_noise
        self.kernel_estimator = KernelCodeEstimator(in_channels, estimator_width, kernel_size)
        self.kernel_prior = KernelPrior(kernel_size)
        kk = kernel_size * kernel_size
        for i in range(KERNEL_LEVELS):  # replaces the plain NAFBlock the parent put there
            self.stages[i] = nn.ModuleList([KernelNAFBlock(self.channels[i], kernel_size)])
        self.kernel_downs = nn.ModuleList(nn.Conv2d(kk, kk, 2, stride=2) for _ in range(KERNEL_LEVELS - 1))

    def kernel_map(self, img: torch.Tensor) -> torch.Tensor:
        """The per-pixel blur kernels [N, k*k, H, W] (channel ``i*k + j`` = kernel entry (i, j))."""
        n, _, h, w = img.shape
        code, sigma = self.kernel_estimator(img)
        code = (code - code.mean(dim=-1, keepdim=True)) / code.std(dim=-1, keepdim=True)
        code = code * torch.sqrt(1 - sigma.square())
        if self.kernel_noise:
            code = code + torch.randn_like(code) * sigma
        kernels = self.kernel_prior(code.reshape(n * h * w, -1))
        return kernels.reshape(n, h * w, -1).transpose(1, 2).reshape(n, -1, h, w)

    def forward(self, img: torch.Tensor) -> list[torch.Tensor]:
        kernel_map = self.kernel_map(img)
        feats = []
        x = self.intro(img)
        for i, (stage, down) in enumerate(zip(self.stages, self.downs)):
            if i < KERNEL_LEVELS:
                x = stage[0](x, kernel_map)
                if i < KERNEL_LEVELS - 1:
                    kernel_map = self.kernel_downs[i](kernel_map)
            else:
                x = stage(x)
            feats.append(x)
            x = down(x)
        feats.append(self.middle(x))
        return feats
