"""DDS-Net (Jiang et al., 2021): a dynamic slimmable denoiser -- a light gate
picks, per noisy image, how many channels the network runs with.

*No public code*: the backbone below is our design, built from the paper's
three ingredients (a weight-shared slimmable supernet, several sub-networks,
a per-image gate).

Backbone: a DnCNN-sized residual denoiser whose every hidden width is sliceable::

    f   = ReLU(conv3x3_{k<-3}(x))                      head
    f   = f + conv3x3_{k<-k}(ReLU(conv3x3_{k<-k}(f)))   x depth residual blocks
    out = x + conv3x3_{3<-k}(f)                        tail predicts -noise

Why this design: DnCNN-style residual learning is the standard denoising
backbone the paper's family slims; residual blocks instead of DnCNN's plain
conv+BN stack because BatchNorm does not mix with per-sample widths (its batch
statistics would blend sub-networks; slimmable nets need a BN per width) and
residual blocks train stably without it. Default depth 8 gives 18 convs and
about 0.6 M parameters at width 64, close to DnCNN-17. Everything runs at full
resolution with stride 1, so any H, W works.

Widths. A sub-network of width k uses the *first* k channels of every sliced
layer, ``weight[:k_out, :k_in]`` (slimmable-net convention). The choices are
``round8(width * i / num_choices)`` for i = 1..num_choices, e.g. 16/32/48/64.
One k is used by every hidden layer of a sub-network; the paper's stage 2
(progressive per-layer trimming) is a training procedure and is not modelled.

Every sliced conv goes through :func:`restorenet.ops.slim_conv2d.slim_conv2d`,
which runs each sample at its own width and leaves channels ``>= k`` exactly
zero. The element-wise ops between convs (ReLU, residual add, the gate's
straight-through mask) all keep zeros at zero, so each image of a mixed batch
gets exactly what it would get alone at its width.

Gate: ``logits = conv1x1(ReLU(conv1x1(avgpool(g))))``, one logit per choice,
where ``g = ReLU(conv3x3(x))`` is the head's first ``min(choices)`` channels --
features every sub-network computes. (The nonlinearity before the pooling is
what makes noise visible: the mean of a linear filter of the image ignores
zero-mean noise.) Training: hard Gumbel-softmax with a straight-through
gradient -- the one-hot choice ``z`` (value exactly one-hot, gradient of the
softmax) turns into a channel mask ``m[c] = sum_i z_i [c < k_i]`` that
multiplies the head and every block output; its value is the 0/1 mask of the
chosen width, so the forward is unchanged while the loss's gradient reaches
the gate. Eval: argmax.

Gate objective (the paper's stage 3: "identify easy and hard samples in an
online way and train a dynamic gate"; the abstract gives no formula, so this
is our reading). With the backbone fixed, every sub-network denoises the batch
(:meth:`DDSNet.all_widths`, one mixed-width forward) and each image's target is
the *narrowest* choice whose quality is within ``tau`` dB of the best::

    t[n] = min{ i : PSNR_i[n] >= max_j PSNR_j[n] - tau }            (gate_targets)
    L    = CE(logits[n], t[n]) + lambda * sum_i p_i[n] * c_i        (gate_loss)

with ``p = softmax(logits)`` and ``c_i = FLOPs_i / FLOPs_max`` the relative
backbone cost, a complexity penalty that pushes ambiguous images to narrower
sub-networks (``lambda = 0``: plain classification of easy/hard images).

Width checks: a forward validates its widths once (one host read for a forced
width tensor, none for an int or the gate's picks, which are choices by
construction) and hands :class:`restorenet.ops.slim_conv2d.SlimWidths` to every
layer, which then range-check on the host without reading the device.

FLOPs (:meth:`DDSNet.flops`): 2 x multiply-adds of every convolution (bias
adds, ReLU, pooling, residual adds and the mask are not counted -- the same
rule as ``torch.utils.flop_counter``). The gate's FLOPs are its stem conv
(the head's first min-width filters, recomputed over the whole image) plus
its two 1x1 convs on the pooled vector.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from restorenet._checks import check_image, check_int, check_positive_float, is_int
from restorenet.ops.slim_conv2d import SlimWidths, check_widths, slim_conv2d, widths_from_choices
from restorenet.registry import register_model

Width = Union[int, Tensor, SlimWidths]


def width_choices(width: int, num_choices: int) -> list[int]:
    """``round8(width * i / num_choices)`` for i = 1..num_choices (strictly increasing)."""
    if not is_int(width) or width < 8 or width % 8:
        raise ValueError(f"width must be a positive multiple of 8, got {width!r}")
    check_int("num_choices", num_choices, 1)
    choices = [max(8, 8 * round(width * i / num_choices / 8)) for i in range(1, num_choices + 1)]
    if len(set(choices)) != num_choices:
        raise ValueError(f"width={width} is too small for num_choices={num_choices} distinct "
                         f"multiples of 8 (got {choices}); use width >= {8 * num_choices}")
    return choices


# ------------------------------------------------------------------ sliced layers
class SlimConv2d(nn.Conv2d):
    """A conv whose leading channels form the sub-network's conv:
    ``weight[:out_width, :in_width]``, per sample (see ``slim_conv2d``)."""

    def forward(self, x: Tensor, in_width: Width, out_width: Width) -> Tensor:
        return slim_conv2d(x, self.weight, self.bias, in_width, out_width,
                           self.stride[0], self.padding[0])

    def flops(self, in_width: int, out_width: int, height: int, width: int) -> int:
        """2 x multiply-adds over an output of ``height`` x ``width`` pixels."""
        kh, kw = self.kernel_size
        return 2 * in_width * out_width * kh * kw * height * width


class SlimResBlock(nn.Module):
    """``f + conv(ReLU(conv(f)))`` at width k (per sample)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = SlimConv2d(channels, channels, 3, padding=1)
        self.conv2 = SlimConv2d(channels, channels, 3, padding=1)

    def forward(self, f: Tensor, width: Width) -> Tensor:
        return f + self.conv2(F.relu(self.conv1(f, width, width)), width, width)

    def flops(self, k: int, height: int, width: int) -> int:
        return self.conv1.flops(k, k, height, width) + self.conv2.flops(k, k, height, width)


class WidthGate(nn.Module):
    """avgpool -> conv1x1 -> ReLU -> conv1x1: one logit per width choice."""

    def __init__(self, in_channels: int, num_choices: int, hidden: int = 16):
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, hidden, 1)
        self.to_logits = nn.Conv2d(hidden, num_choices, 1)

    def forward(self, features: Tensor) -> Tensor:
        pooled = F.adaptive_avg_pool2d(features, 1)
        return self.to_logits(F.relu(self.reduce(pooled))).flatten(1)

    def flops(self) -> int:
        return 2 * (self.reduce.in_channels * self.reduce.out_channels
                    + self.to_logits.in_channels * self.to_logits.out_channels)


def hard_gumbel_straight_through(logits: Tensor, tau: float = 1.0) -> Tensor:
    """One-hot sample of ``softmax((logits + Gumbel) / tau)``.

    The value is *exactly* one-hot (``hard + (soft - soft.detach())`` adds an
    exact zero), the gradient is the soft sample's -- so masks built from it
    leave the forward bit-identical to the hard choice.
    """
    gumbels = -torch.empty_like(logits).exponential_().log()
    scores = (logits + gumbels) / tau
    # scatter, not F.one_hot: one_hot checks its indices' range on the host (two syncs).
    hard = torch.zeros_like(scores).scatter_(-1, scores.argmax(-1, keepdim=True), 1.0)
    soft = scores.softmax(-1)
    return hard + (soft - soft.detach())


# ------------------------------------------------------------------------ model
class DDSNet(nn.Module):
    """Dynamic slimmable denoiser (see the module docstring).

    ``forward(x, width=None, *, return_widths=False)``:
        ``width=None`` lets the gate pick one width per image (sampled with
        hard Gumbel-softmax in train mode, argmax in eval); an int from
        :attr:`choices`, a sequence of N of them or an integer tensor [N] of
        choices forces the widths.
        Returns the denoised image (and the widths used, [N] int64, with
        ``return_widths=True``).
    """

    def __init__(self, in_channels: int = 3, width: int = 64, depth: int = 8,
                 num_choices: int = 4, gate_hidden: int = 16, gate_tau: float = 1.0):
        super().__init__()
        check_int("in_channels", in_channels, 1)
        check_int("depth", depth, 0)
        check_int("gate_hidden", gate_hidden, 1)
        check_positive_float("gate_tau", gate_tau)
        self.in_channels, self.width, self.gate_tau = in_channels, width, gate_tau
        self.choices = width_choices(width, num_choices)
        # The choices on the model's device, so no forward copies them from the host.
        self.register_buffer("choice_table", torch.tensor(self.choices, dtype=torch.int32), persistent=False)
        self.head = SlimConv2d(in_channels, width, 3, padding=1)
        self.blocks = nn.ModuleList([SlimResBlock(width) for _ in range(depth)])
        self.tail = SlimConv2d(width, in_channels, 3, padding=1)
        self.gate = WidthGate(self.choices[0], num_choices, gate_hidden)

    # -- gate ---------------------------------------------------------------
    def gate_features(self, x: Tensor) -> Tensor:
        """ReLU of the head's first ``min(choices)`` channels (shared by every width)."""
        k = self.choices[0]
        return F.relu(F.conv2d(x, self.head.weight[:k], self.head.bias[:k], padding=1))

    def gate_logits(self, x: Tensor) -> Tensor:
        """[N, num_choices] logits (e.g. for the paper's stage-3 gate loss)."""
        check_image("x", x, self.in_channels)
        return self.gate(self.gate_features(x))

    def _choose(self, x: Tensor) -> tuple[SlimWidths, Optional[Tensor]]:
        logits = self.gate_logits(x)
        if self.training:
            onehot = hard_gumbel_straight_through(logits, self.gate_tau)
            index = onehot.detach().argmax(-1)
        else:
            onehot, index = None, logits.argmax(-1)
        # Picks are choices by construction: their range is known without a host read.
        return widths_from_choices(self.choices, index, table=self.choice_table), onehot

    def _channel_mask(self, onehot: Tensor) -> Tensor:
        """m[n, c] = sum_i onehot[n, i] * [c < choices[i]], as [N, C, 1, 1]."""
        c = torch.arange(self.width, device=onehot.device)
        prefix = c[None, :] < self.choice_table[:, None]
        return (onehot @ prefix.to(onehot.dtype))[:, :, None, None]

    def _forced_widths(self, width, n: int, device: torch.device) -> SlimWidths:
        """The forced widths, validated here once per forward (at most one host read:
        none for an int or a sequence, which are checked on the host)."""
        if is_int(width):
            if width not in self.choices:
                raise ValueError(f"width must be one of {self.choices}, got {width}")
            return check_widths(width, n, device, self.width)
        if isinstance(width, (list, tuple)):
            return self._widths_from_sequence(width, n, device)
        if not isinstance(width, Tensor) or width.is_floating_point() or width.is_complex() \
                or width.dtype == torch.bool:
            raise TypeError(f"width must be None, an int or an integer tensor [N], got "
                            f"{width.dtype if isinstance(width, Tensor) else type(width).__name__}")
        if width.dim() > 1 or (width.dim() == 1 and width.shape[0] != n):
            raise ValueError(f"width must be an int or a tensor of shape [N] = [{n}], "
                             f"got shape {tuple(width.shape)}")
        if width.device != device:
            raise ValueError(f"width must be on the device of x ({device}), got {width.device}")
        valid = torch.isin(width, self.choice_table.to(width.dtype))
        if not bool(valid.all()):  # the forward's one host sync
            raise ValueError(f"width must hold values from {self.choices}, got "
                             f"{sorted(set(width.tolist()))}")
        values = width.to(torch.int32).expand(n).contiguous()
        return SlimWidths(values, min(self.choices), max(self.choices))

    def _widths_from_sequence(self, width, n: int, device: torch.device) -> SlimWidths:
        widths = check_widths(width, n, device, self.width)  # ints, one per image: on the host
        if not set(width) <= set(self.choices):
            raise ValueError(f"width must hold values from {self.choices}, got {sorted(set(width))}")
        return widths

    # -- network ------------------------------------------------------------
    def _backbone(self, x: Tensor, widths: SlimWidths, mask: Optional[Tensor]) -> Tensor:
        # Multiplying by the straight-through mask changes no value (it is the
        # 0/1 mask of each sample's width) but routes gradients to the gate.
        def masked(f: Tensor) -> Tensor:
            return f if mask is None else f * mask

        f = masked(F.relu(self.head(x, self.in_channels, widths)))
        for block in self.blocks:
            f = masked(block(f, widths))
        return x + self.tail(f, widths, self.in_channels)

    def forward(self, x: Tensor, width: Optional[Width] = None, *, return_widths: bool = False):
        check_image("x", x, self.in_channels)
        if width is None:
            widths, onehot = self._choose(x)
        else:
            widths, onehot = self._forced_widths(width, x.shape[0], x.device), None
        mask = self._channel_mask(onehot) if onehot is not None else None
        out = self._backbone(x, widths, mask)
        return (out, widths.values.to(torch.int64)) if return_widths else out

    # -- gate training (stage 3) --------------------------------------------
    def all_widths(self, x: Tensor) -> Tensor:
        """Every sub-network on every image, [num_choices, N, C, H, W], in one
        mixed-width forward (the batch repeated once per choice)."""
        check_image("x", x, self.in_channels)
        n, k = x.shape[0], len(self.choices)
        index = torch.arange(k, device=x.device).repeat_interleave(n)
        widths = widths_from_choices(self.choices, index, table=self.choice_table)
        return self._backbone(x.repeat(k, 1, 1, 1), widths, None).view(k, *x.shape)

    @torch.no_grad()
    def gate_targets(self, noisy: Tensor, clean: Tensor, tau_db: float = 0.1) -> Tensor:
        """[N] int64 choice indices: the narrowest sub-network within ``tau_db``
        dB PSNR (data range 1) of the best one on each image (see the module
        docstring). Runs :meth:`all_widths` without gradient."""
        check_image("clean", clean, self.in_channels)
        if clean.shape != noisy.shape:
            raise ValueError(f"clean must have the shape of noisy {tuple(noisy.shape)}, "
                             f"got {tuple(clean.shape)}")
        if not (isinstance(tau_db, (int, float)) and tau_db >= 0):
            raise ValueError(f"tau_db must be a number >= 0, got {tau_db!r}")
        outs = self.all_widths(noisy).clamp(0, 1).float()
        mse = (outs - clean.float()).square().flatten(2).mean(2)          # [K, N]
        quality = -10 * torch.log10(mse.clamp_min(1e-12))                 # PSNR, dB
        good = quality >= quality.amax(0, keepdim=True) - tau_db
        # First True along the choices (there is always one: the best itself).
        return good.to(torch.int8).argmax(0)

    def relative_costs(self) -> Tensor:
        """c_i = FLOPs_i / FLOPs_max of the backbone (any image size: every
        conv runs at full resolution, so the ratio does not depend on it)."""
        flops = self.flops((1, 1), include_gate=False)
        return torch.tensor([flops[k] / flops[self.choices[-1]] for k in self.choices])

    def gate_loss(self, logits: Tensor, targets: Tensor, cost_weight: float = 0.0) -> Tensor:
        """``mean_n CE(logits[n], t[n]) + cost_weight * mean_n sum_i p_i[n] c_i``."""
        if logits.dim() != 2 or logits.shape[1] != len(self.choices):
            raise ValueError(f"logits must have shape [N, {len(self.choices)}], "
                             f"got {tuple(logits.shape)}")
        if targets.shape != logits.shape[:1] or targets.is_floating_point():
            raise ValueError(f"targets must be integer choice indices of shape "
                             f"[{logits.shape[0]}], got {targets.dtype} {tuple(targets.shape)}")
        costs = self.relative_costs().to(device=logits.device, dtype=logits.dtype)
        expected_cost = (logits.softmax(-1) * costs).sum(-1).mean()
        return F.cross_entropy(logits, targets.long()) + cost_weight * expected_cost

    # -- cost ---------------------------------------------------------------
    def gate_flops(self, image_size) -> int:
        """FLOPs of choosing a width for one image of ``image_size`` (H, W)."""
        h, w = _hw(image_size)
        return self.head.flops(self.in_channels, self.choices[0], h, w) + self.gate.flops()

    def flops(self, image_size, width: Optional[int] = None, include_gate: bool = True):
        """FLOPs (2 x multiply-adds of the convs) for one image of ``image_size``.

        With ``width`` (one of :attr:`choices`) returns an int; without it a
        dict ``{choice: flops}``. ``include_gate`` adds :meth:`gate_flops`
        (what ``model(x)`` spends; ``model(x, width=k)`` skips the gate).
        """
        if width is None:
            return {k: self.flops(image_size, k, include_gate) for k in self.choices}
        if width not in self.choices:
            raise ValueError(f"width must be one of {self.choices}, got {width!r}")
        h, w = _hw(image_size)
        total = self.head.flops(self.in_channels, width, h, w)
        total += sum(block.flops(width, h, w) for block in self.blocks)
        total += self.tail.flops(width, self.in_channels, h, w)
        return total + (self.gate_flops((h, w)) if include_gate else 0)


def _hw(image_size) -> tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if (not isinstance(image_size, Sequence) or len(image_size) != 2
            or not all(isinstance(s, int) and s > 0 for s in image_size)):
        raise ValueError(f"image_size must be an int or a pair (H, W) of positive ints, "
                         f"got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


@register_model("ddsnet")
def ddsnet(**cfg) -> DDSNet:
    """DDS-Net: width 64 (choices 16/32/48/64), 8 residual blocks, 4-way gate."""
    return DDSNet(**cfg)
