"""The flow-based blur-kernel prior of UFPNet (after FKP: a RealNVP-style normalising flow
over k x k kernels), used in its generative direction only.

A latent code u (one per pixel, k*k numbers) becomes a kernel by running the flow's
steps backwards, last step first, and squashing the result into (0, 1)::

    z = u;  for step in reversed(steps): z = step.inverse(z)
    kernel = (sigmoid(z) - alpha) / (1 - 2*alpha) * normalization      (k x k)

The steps alternate an affine coupling (which half of the entries is rewritten flips
from one coupling to the next) and a batch norm with fixed running statistics::

    coupling^-1(u) = m*u + (1 - m) * (u * exp(s(m*u)) + t(m*u))
        s = Linear -> Tanh -> [Linear -> Tanh] * n_hidden -> Linear    (scale net)
        t = the same with ReLU                                         (shift net)
    batchnorm^-1(y) = (y - beta) * exp(-log_gamma) * sqrt(running_var + eps) + running_mean

The prior is trained separately (on kernels) and frozen inside UFPNet, so only the
inverse in evaluation mode exists here: the batch norms always use their running
statistics (the released code puts the flow in eval mode before every use).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from restorenet._checks import check_int

BATCHNORM_EPS = 1e-5


class MaskedAffineCoupling(nn.Module):
    """One affine coupling: the entries where ``mask`` is 1 pass through and condition
    the scale and shift of the others."""

    def __init__(self, size: int, hidden: int, n_hidden: int, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

        def mlp(act):
            layers = [nn.Linear(size, hidden)]
            for _ in range(n_hidden):
                layers += [act(), nn.Linear(hidden, hidden)]
            return nn.Sequential(*layers, act(), nn.Linear(hidden, size))

        self.scale_net = mlp(nn.Tanh)
        self.shift_net = mlp(nn.ReLU)

    def inverse(self, u: torch.Tensor) -> torch.Tensor:
        kept = u * self.mask
        log_scale, shift = self.scale_net(kept), self.shift_net(kept)
        return kept + (1 - self.mask) * (u * log_scale.exp() + shift)


class FlowBatchNorm(nn.Module):
    """The flow's batch norm (learned log-scale and shift), inverted with its running statistics."""

    def __init__(self, size: int, eps: float = BATCHNORM_EPS):
        super().__init__()
        self.eps = eps
        self.log_gamma = nn.Parameter(torch.zeros(size))
        self.beta = nn.Parameter(torch.zeros(size))
        self.register_buffer("running_mean", torch.zeros(size))
        self.register_buffer("running_var", torch.ones(size))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        x_hat = (y - self.beta) * torch.exp(-self.log_gamma)
        return x_hat * torch.sqrt(self.running_var + self.eps) + self.running_mean


class KernelPrior(nn.Module):
    """Latent codes [N, k*k] -> blur kernels [N, k, k] (see the module docstring).

    Args:
        kernel_size: k (UFPNet: 19).
        num_blocks: coupling + batch-norm pairs (UFPNet: 5).
        hidden: width of the scale/shift nets (UFPNet: 25), with ``n_hidden`` hidden layers (1).
    """

    def __init__(self, kernel_size: int = 19, num_blocks: int = 5, hidden: int = 25, n_hidden: int = 1,
                 alpha: float = 1e-6, normalization: float = 1.0):
        super().__init__()
        check_int("kernel_size", kernel_size, 1)
        check_int("num_blocks", num_blocks, 1)
        check_int("hidden", hidden, 1)
        check_int("n_hidden", n_hidden, 0)
        self.kernel_size = kernel_size
        size = kernel_size * kernel_size
        self.register_buffer("alpha", torch.full((1,), float(alpha)))
        self.register_buffer("normalization", torch.full((1,), float(normalization)))
        mask = torch.arange(size) % 2  # the first coupling rewrites the even entries
        steps = []
        for _ in range(num_blocks):
            steps += [MaskedAffineCoupling(size, hidden, n_hidden, mask.float()), FlowBatchNorm(size)]
            mask = 1 - mask
        self.steps = nn.ModuleList(steps)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        z = code
        for step in reversed(self.steps):
            z = step.inverse(z)
        k = self.kernel_size
        kernel = (torch.sigmoid(z) - self.alpha) / (1 - 2 * self.alpha) * self.normalization
        return kernel.view(-1, k, k)
