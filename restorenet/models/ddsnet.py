"""DDS-Net (Jiang et al., 2021): a dynamic slimmable denoiser -- a light gate
picks, per noisy image, how many channels the network runs with.

*No public code*: the backbone below is our design, built from the paper's
three ingredients (a weight-shared slimmable supernet, several sub-networks,
a per-image gate).

Backbone: a DnCNN-sized residual denoiser whose every hidden width is sliceable::

    f   = ReLU(conv3x3_{s<-3}(x))                          head
    f   = f + conv3x3_{s<-i_b}(ReLU(conv3x3_{i_b<-s}(f)))   blocks b = 1..depth
    out = x + conv3x3_{3<-s}(f)                            tail predicts -noise

(s, i_b: the widths of a configuration, below; the supernet has s = i_b = width.)

Why this design: DnCNN-style residual learning is the standard denoising
backbone the paper's family slims; residual blocks instead of DnCNN's plain
conv+BN stack because BatchNorm does not mix with per-sample widths (its batch
statistics would blend sub-networks; slimmable nets need a BN per width) and
residual blocks train stably without it. Default depth 8 gives 18 convs and
about 0.6 M parameters at width 64, close to DnCNN-17. Everything runs at full
resolution with stride 1, so any H, W works.

Widths. A sub-network uses the *first* channels of every sliced layer,
``weight[:k_out, :k_in]`` (slimmable-net convention). Its *configuration* is
one width per layer group, ``depth + 1`` ints::

    config = (s, i_1, ..., i_depth)
    s    the residual stream: head out, every block's conv1 in and conv2 out, tail in
    i_b  block b's inner width: its conv1 out and conv2 in

The stream is one group because the residual adds ``f + block(f)`` must add
like channels: with one s, channels ``>= s`` are zero on both sides and the
sum is exact; the inner widths are free per block. A *uniform* width k is the
configuration ``(k,) * (depth + 1)``; the uniform choices are
``round8(width * i / num_choices)`` for i = 1..num_choices, e.g. 16/32/48/64.
The paper's stage 2 (progressive per-layer tailoring) picks non-uniform
configurations: the model runs any configuration (``model(x, config=...)``,
one per image if wanted, mixed in one batch), and the gate chooses among a list
of them (:meth:`DDSNet.set_gate_configs`); the tailoring itself is a procedure
on a trained supernet, in ``restorenet.recipes.ddsnet``. By default (no
``set_gate_configs``) the gate chooses among the uniform choices, exactly as
before configurations existed.

Every sliced conv goes through :func:`restorenet.ops.slim_conv2d.slim_conv2d`,
which runs each sample at its own width and leaves channels ``>= k`` exactly
zero. The element-wise ops between convs (ReLU, residual add, the gate's
straight-through masks) all keep zeros at zero, so each image of a mixed batch
gets exactly what it would get alone at its configuration: one launch per
layer serves every configuration in the batch.

Gate: ``logits = conv1x1(ReLU(conv1x1(avgpool(g))))``, one logit per choice,
where ``g = ReLU(conv3x3(x))`` is the head's first ``min(choices)`` channels --
features every uniform sub-network computes (the gate keeps this stem when it
is given other configurations, whose FLOPs count it separately anyway). (The nonlinearity before the pooling is
what makes noise visible: the mean of a linear filter of the image ignores
zero-mean noise.) ``gate_pool="mean_sq"`` (our option, not the default) pools
the mean square of ``g`` beside its mean: a second moment that grows with the
noise level. Training: hard Gumbel-softmax with a straight-through
gradient -- the one-hot choice ``z`` (value exactly one-hot, gradient of the
softmax) turns into channel masks ``m_g[c] = sum_i z_i [c < config_i[g]]``,
one per layer group, that multiply the head and every block output (stream)
and every block's inner activation; their values are the 0/1 masks of the
chosen configuration, so the forward is unchanged while the loss's gradient
reaches the gate. Eval: argmax.

Gate objective (the paper's stage 3: "identify easy and hard samples in an
online way and train a dynamic gate"; the abstract gives no formula, so this
is our reading). With the backbone fixed, every candidate sub-network denoises the batch
(:meth:`DDSNet.all_widths`, one mixed-configuration forward) and each image's
target is the *cheapest* candidate (they are kept in increasing FLOPs order)
whose quality is within ``tau`` dB of the best::

    t[n] = min{ i : PSNR_i[n] >= max_j PSNR_j[n] - tau }            (gate_targets)
    L    = CE(logits[n], t[n]) + lambda * sum_i p_i[n] * c_i        (gate_loss)

with ``p = softmax(logits)`` and ``c_i = FLOPs_i / FLOPs_max`` the relative
backbone cost (``FLOPs_max``: the full-width supernet), a complexity penalty that pushes ambiguous images to narrower
sub-networks (``lambda = 0``: plain classification of easy/hard images).
Optional class weights on the CE (:func:`balanced_class_weights` of the target
counts, our addition) keep a majority target (e.g. "the widest") from being
learned as the answer for every image.

Width checks: a forward validates its widths once (one host read for a forced
width or configuration tensor, none for ints, host sequences or the gate's
picks, which are candidates by construction) and hands one
:class:`restorenet.ops.slim_conv2d.SlimWidths` per layer group to its layers,
which then range-check on the host without reading the device.

FLOPs (:meth:`DDSNet.flops`, per uniform width or per configuration): for an
H x W image, ``2 * 9 * H * W * (3 s + sum_b 2 s i_b + 3 s)`` -- 2 x
multiply-adds of every convolution (bias
adds, ReLU, pooling, residual adds and the mask are not counted -- the same
rule as ``torch.utils.flop_counter``). The gate's FLOPs are its stem conv
(the head's first min-width filters, recomputed over the whole image) plus
its two 1x1 convs on the pooled vector.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from restorenet._checks import check_image, check_int, check_positive_float, is_int
from restorenet.ops.slim_conv2d import SlimWidths, check_widths, slim_conv2d, widths_from_choices
from restorenet.registry import register_model

Width = Union[int, Tensor, SlimWidths]
Config = tuple[int, ...]  # (stream, inner_1, ..., inner_depth)


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
    """``f + conv2(ReLU(conv1(f)))``: stream width k, inner width ``inner``
    (default k), per sample; ``inner_mask`` multiplies the inner activation."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = SlimConv2d(channels, channels, 3, padding=1)
        self.conv2 = SlimConv2d(channels, channels, 3, padding=1)

    def forward(self, f: Tensor, width: Width, inner: Optional[Width] = None,
                inner_mask: Optional[Tensor] = None) -> Tensor:
        inner = width if inner is None else inner
        h = F.relu(self.conv1(f, width, inner))
        if inner_mask is not None:
            h = h * inner_mask
        return f + self.conv2(h, inner, width)

    def flops(self, k: int, height: int, width: int, inner: Optional[int] = None) -> int:
        inner = k if inner is None else inner
        return self.conv1.flops(k, inner, height, width) + self.conv2.flops(inner, k, height, width)


class LayerWidths(NamedTuple):
    """Per-sample widths of every layer group for one forward: the stream and
    each block's inner width, each validated once (see the module docstring)."""

    stream: SlimWidths
    inner: tuple[SlimWidths, ...]


GATE_POOLS = ("mean", "mean_sq")


class WidthGate(nn.Module):
    """avgpool -> conv1x1 -> ReLU -> conv1x1: one logit per candidate sub-network.

    ``pool="mean"`` pools each feature's spatial mean; ``"mean_sq"`` (our option)
    also its mean square, a second moment that tracks the noise level, which a
    plain mean of ReLU features hardly sees."""

    def __init__(self, in_channels: int, num_choices: int, hidden: int = 16, pool: str = "mean"):
        super().__init__()
        if pool not in GATE_POOLS:
            raise ValueError(f"pool must be one of {GATE_POOLS}, got {pool!r}")
        self.pool = pool
        moments = 2 if pool == "mean_sq" else 1
        self.reduce = nn.Conv2d(moments * in_channels, hidden, 1)
        self.to_logits = nn.Conv2d(hidden, num_choices, 1)

    def forward(self, features: Tensor) -> Tensor:
        pooled = F.adaptive_avg_pool2d(features, 1)
        if self.pool == "mean_sq":
            pooled = torch.cat([pooled, F.adaptive_avg_pool2d(features.square(), 1)], 1)
        return self.to_logits(F.relu(self.reduce(pooled))).flatten(1)

    def flops(self) -> int:
        return 2 * (self.reduce.in_channels * self.reduce.out_channels
                    + self.to_logits.in_channels * self.to_logits.out_channels)


def balanced_class_weights(counts: Tensor) -> Tensor:
    """Class-balanced cross-entropy weights from target counts [K]:
    ``w_k = n / (K_present * n_k)`` for classes seen (scikit-learn's "balanced"),
    0 for classes never seen (no target carries them). A class seen as often as
    the average weighs 1; a rare one weighs more."""
    if counts.dim() != 1 or counts.is_complex() or (counts < 0).any():
        raise ValueError(f"counts must be a 1-D tensor of counts >= 0, got {counts.dtype} {tuple(counts.shape)}")
    counts = counts.double()
    present = counts > 0
    if not present.any():
        raise ValueError("counts must hold at least one seen class")
    weights = counts.sum() / (present.sum() * counts.clamp_min(1))
    return torch.where(present, weights, torch.zeros_like(weights))


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

    ``forward(x, width=None, *, config=None, return_widths=False)``:
        With neither, the gate picks one candidate sub-network per image
        (sampled with hard Gumbel-softmax in train mode, argmax in eval; the
        candidates are the uniform :attr:`choices` unless
        :meth:`set_gate_configs` gave others). ``width`` forces uniform widths:
        an int from :attr:`choices`, a sequence of N of them or an integer
        tensor [N] of choices. ``config`` forces per-layer widths: one
        configuration ``(s, i_1, .., i_depth)`` of ints in 1..width for every
        image, a sequence of N of them, or an integer tensor [depth + 1] or
        [N, depth + 1].
        Returns the denoised image (and the stream widths used, [N] int64 --
        the widths themselves for uniform sub-networks -- with ``return_widths=True``).
    """

    def __init__(self, in_channels: int = 3, width: int = 64, depth: int = 8,
                 num_choices: int = 4, gate_hidden: int = 16, gate_tau: float = 1.0,
                 gate_pool: str = "mean"):
        super().__init__()
        check_int("in_channels", in_channels, 1)
        check_int("depth", depth, 0)
        check_int("gate_hidden", gate_hidden, 1)
        check_positive_float("gate_tau", gate_tau)
        self.in_channels, self.width, self.depth, self.gate_tau = in_channels, width, depth, gate_tau
        self.choices = width_choices(width, num_choices)
        # The choices on the model's device, so no forward copies them from the host.
        self.register_buffer("choice_table", torch.tensor(self.choices, dtype=torch.int32), persistent=False)
        self.head = SlimConv2d(in_channels, width, 3, padding=1)
        self.blocks = nn.ModuleList([SlimResBlock(width) for _ in range(depth)])
        self.tail = SlimConv2d(width, in_channels, 3, padding=1)
        self.gate = WidthGate(self.choices[0], num_choices, gate_hidden, gate_pool)
        self._set_candidates([self.uniform_config(k) for k in self.choices])

    # -- configurations -----------------------------------------------------
    @property
    def num_groups(self) -> int:
        """Layer groups of a configuration: the stream and one inner width per block."""
        return 1 + self.depth

    def uniform_config(self, width: int) -> Config:
        """The configuration of uniform width ``width``: ``(width,) * (depth + 1)``."""
        return self.check_config((width,) * self.num_groups, "width")

    def check_config(self, config, name: str = "config") -> Config:
        """``config`` as a tuple of ``depth + 1`` ints in 1..width, or a ValueError
        (TypeError for non-ints) naming ``name``."""
        if isinstance(config, Tensor):
            config = config.tolist()
        if not isinstance(config, Sequence) or isinstance(config, str):
            raise TypeError(f"{name} must be a sequence of {self.num_groups} ints "
                            f"(stream, inner_1..inner_{self.depth}), got {type(config).__name__}")
        if not all(is_int(k) for k in config):
            raise TypeError(f"{name} must hold ints (channel counts), got {list(config)!r}")
        if len(config) != self.num_groups:
            raise ValueError(f"{name} must have depth + 1 = {self.num_groups} widths "
                             f"(stream, inner_1..inner_{self.depth}), got {len(config)}: {list(config)}")
        if not all(1 <= k <= self.width for k in config):
            raise ValueError(f"{name} must hold widths in 1..{self.width}, got {list(config)}")
        return tuple(int(k) for k in config)

    @property
    def configs(self) -> list[Config]:
        """The gate's candidate sub-networks, in increasing FLOPs order."""
        return list(self._configs)

    def set_gate_configs(self, configs: Sequence[Sequence[int]]) -> None:
        """Let the gate choose among ``configs`` (e.g. the sub-networks stage 2
        keeps), given in strictly increasing FLOPs order. With a different
        count than before, the gate's last layer is replaced by a fresh one
        (its logits meant other sub-networks): train the gate afterwards.
        The candidates are not part of the ``state_dict``: store them beside it."""
        if not isinstance(configs, Sequence) or isinstance(configs, str) or len(configs) < 1:
            raise ValueError(f"configs must be a non-empty sequence of configurations, got {configs!r}")
        checked = [self.check_config(c, f"configs[{i}]") for i, c in enumerate(configs)]
        costs = [self.flops(1, config=c, include_gate=False) for c in checked]
        if any(b <= a for a, b in zip(costs, costs[1:])):
            raise ValueError(f"configs must be in strictly increasing FLOPs order (the gate's "
                             f"targets take the cheapest good one), got relative FLOPs "
                             f"{[round(c / costs[-1], 4) for c in costs]}")
        if len(checked) != self.gate.to_logits.out_channels:
            old = self.gate.to_logits
            self.gate.to_logits = nn.Conv2d(old.in_channels, len(checked), 1).to(
                device=old.weight.device, dtype=old.weight.dtype)
        self._set_candidates(checked)

    def _set_candidates(self, configs: list[Config]) -> None:
        self._configs = list(configs)
        # [groups, candidates] on the model's device: the gate's picks index it with no host copy.
        table = torch.tensor(configs, dtype=torch.int32).t().contiguous()
        device = self.choice_table.device
        self.register_buffer("config_table", table.to(device), persistent=False)

    # -- gate ---------------------------------------------------------------
    def gate_features(self, x: Tensor) -> Tensor:
        """ReLU of the head's first ``min(choices)`` channels (shared by every width)."""
        k = self.choices[0]
        return F.relu(F.conv2d(x, self.head.weight[:k], self.head.bias[:k], padding=1))

    def gate_logits(self, x: Tensor) -> Tensor:
        """[N, len(configs)] logits (e.g. for the paper's stage-3 gate loss)."""
        check_image("x", x, self.in_channels)
        return self.gate(self.gate_features(x))

    @torch.no_grad()
    def gate_pick(self, x: Tensor) -> Tensor:
        """[N] int64: the index into :attr:`configs` the eval-mode gate runs per image."""
        return self.gate_logits(x).argmax(-1)

    def _choose(self, x: Tensor) -> tuple[LayerWidths, Optional[Tensor]]:
        logits = self.gate_logits(x)
        if self.training:
            onehot = hard_gumbel_straight_through(logits, self.gate_tau)
            index = onehot.detach().argmax(-1)
        else:
            onehot, index = None, logits.argmax(-1)
        # Picks are candidates by construction: their range is known without a host read.
        columns = [widths_from_choices([c[g] for c in self._configs], index, table=self.config_table[g])
                   for g in range(self.num_groups)]
        return LayerWidths(columns[0], tuple(columns[1:])), onehot

    def _channel_masks(self, onehot: Tensor) -> Tensor:
        """m[g, n, c] = sum_i onehot[n, i] * [c < configs[i][g]], as [G, N, C, 1, 1]."""
        c = torch.arange(self.width, device=onehot.device)
        prefix = c[None, None, :] < self.config_table[:, :, None]            # [G, K, C]
        return torch.einsum("nk,gkc->gnc", onehot, prefix.to(onehot.dtype))[..., None, None]

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

    def _forced_config(self, config, n: int, device: torch.device) -> LayerWidths:
        """A forced configuration (or one per image), validated once: on the host for
        sequences, with one host read for a tensor."""
        if isinstance(config, Tensor):
            return self._config_from_tensor(config, n, device)
        if isinstance(config, Sequence) and not isinstance(config, str) and config \
                and not any(isinstance(k, (Sequence, Tensor)) for k in config):  # one configuration
            return self._config_plan([self.check_config(config)] * n, device)
        if not isinstance(config, Sequence) or isinstance(config, str):
            raise TypeError(f"config must be a configuration, a sequence of N of them or an "
                            f"integer tensor, got {type(config).__name__}")
        if len(config) != n:
            raise ValueError(f"config must be one configuration or N = {n} of them (one per "
                             f"image), got {len(config)}")
        return self._config_plan([self.check_config(c, f"config[{i}]") for i, c in enumerate(config)],
                                 device)

    def _config_plan(self, configs: list[Config], device: torch.device) -> LayerWidths:
        """Checked host configurations, one per image, as per-group widths (no host read)."""
        columns = [SlimWidths(torch.tensor([c[g] for c in configs], dtype=torch.int32, device=device),
                              min(c[g] for c in configs), max(c[g] for c in configs))
                   for g in range(self.num_groups)]
        return LayerWidths(columns[0], tuple(columns[1:]))

    def _config_from_tensor(self, config: Tensor, n: int, device: torch.device) -> LayerWidths:
        g = self.num_groups
        if config.is_floating_point() or config.is_complex() or config.dtype == torch.bool:
            raise TypeError(f"config must be an integer tensor, got {config.dtype}")
        if config.shape not in ((g,), (n, g)):
            raise ValueError(f"config must have shape [depth + 1] = [{g}] or [N, depth + 1] = "
                             f"[{n}, {g}], got {tuple(config.shape)}")
        if config.device != device:
            raise ValueError(f"config must be on the device of x ({device}), got {config.device}")
        rows = config.to(torch.int32).expand(n, g)
        lo, hi = torch.stack([rows.amin(0), rows.amax(0)]).tolist()  # the forward's one host sync
        if min(lo) < 1 or max(hi) > self.width:
            raise ValueError(f"config must hold widths in 1..{self.width}, got values in "
                             f"{min(lo)}..{max(hi)}")
        columns = [SlimWidths(rows[:, j].contiguous(), lo[j], hi[j]) for j in range(g)]
        return LayerWidths(columns[0], tuple(columns[1:]))

    # -- network ------------------------------------------------------------
    def _backbone(self, x: Tensor, widths: LayerWidths, masks: Optional[Tensor]) -> Tensor:
        # Multiplying by the straight-through masks changes no value (they are the
        # 0/1 masks of each sample's widths) but routes gradients to the gate.
        def masked(f: Tensor, group: int) -> Tensor:
            return f if masks is None else f * masks[group]

        f = masked(F.relu(self.head(x, self.in_channels, widths.stream)), 0)
        for b, block in enumerate(self.blocks):
            inner_mask = None if masks is None else masks[1 + b]
            f = masked(block(f, widths.stream, widths.inner[b], inner_mask), 0)
        return x + self.tail(f, widths.stream, self.in_channels)

    def forward(self, x: Tensor, width: Optional[Width] = None, *, config=None,
                return_widths: bool = False):
        check_image("x", x, self.in_channels)
        if width is not None and config is not None:
            raise ValueError("config must be None when width is given (one or the other)")
        masks = None
        if config is not None:
            widths = self._forced_config(config, x.shape[0], x.device)
        elif width is not None:
            uniform = self._forced_widths(width, x.shape[0], x.device)
            widths = LayerWidths(uniform, (uniform,) * self.depth)
        else:
            widths, onehot = self._choose(x)
            masks = self._channel_masks(onehot) if onehot is not None else None
        out = self._backbone(x, widths, masks)
        return (out, widths.stream.values.to(torch.int64)) if return_widths else out

    # -- gate training (stage 3) --------------------------------------------
    def all_configs(self, x: Tensor, configs: Sequence[Sequence[int]]) -> Tensor:
        """Every configuration of ``configs`` on every image, [len(configs), N, C, H, W],
        in one mixed-configuration forward (the batch repeated once per configuration)."""
        check_image("x", x, self.in_channels)
        if not isinstance(configs, Sequence) or len(configs) < 1:
            raise ValueError(f"configs must be a non-empty sequence of configurations, got {configs!r}")
        checked = [self.check_config(c, f"configs[{i}]") for i, c in enumerate(configs)]
        n, k = x.shape[0], len(checked)
        plan = self._config_plan([c for c in checked for _ in range(n)], x.device)
        return self._backbone(x.repeat(k, 1, 1, 1), plan, None).view(k, *x.shape)

    def all_widths(self, x: Tensor) -> Tensor:
        """Every candidate sub-network of the gate (:attr:`configs`: the uniform
        choices by default) on every image, [len(configs), N, C, H, W], in one
        mixed forward."""
        return self.all_configs(x, self._configs)

    @torch.no_grad()
    def gate_targets(self, noisy: Tensor, clean: Tensor, tau_db: float = 0.1) -> Tensor:
        """[N] int64 candidate indices: the cheapest sub-network within ``tau_db``
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
        # First True along the candidates (there is always one: the best itself).
        return good.to(torch.int8).argmax(0)

    def relative_costs(self) -> Tensor:
        """c_i = FLOPs_i / FLOPs_max of the backbone, per candidate of :attr:`configs`
        (FLOPs_max: the full-width supernet; any image size: every conv runs at full
        resolution, so the ratio does not depend on it)."""
        full = self.flops((1, 1), config=self.uniform_config(self.width), include_gate=False)
        return torch.tensor([self.flops((1, 1), config=c, include_gate=False) / full
                             for c in self._configs])

    def gate_loss(self, logits: Tensor, targets: Tensor, cost_weight: float = 0.0,
                  class_weights: Optional[Tensor] = None) -> Tensor:
        """``mean_n CE(logits[n], t[n]) + cost_weight * mean_n sum_i p_i[n] c_i``.

        ``class_weights`` [K] (e.g. :func:`balanced_class_weights` of the target
        counts) weighs each image's CE by its target's weight, normalised by the
        batch's total weight (``F.cross_entropy``'s ``weight``)."""
        k = len(self._configs)
        if logits.dim() != 2 or logits.shape[1] != k:
            raise ValueError(f"logits must have shape [N, {k}], got {tuple(logits.shape)}")
        if targets.shape != logits.shape[:1] or targets.is_floating_point():
            raise ValueError(f"targets must be integer choice indices of shape "
                             f"[{logits.shape[0]}], got {targets.dtype} {tuple(targets.shape)}")
        costs = self.relative_costs().to(device=logits.device, dtype=logits.dtype)
        expected_cost = (logits.softmax(-1) * costs).sum(-1).mean()
        if class_weights is not None:
            if class_weights.shape != (k,):
                raise ValueError(f"class_weights must have shape [{k}], got {tuple(class_weights.shape)}")
            class_weights = class_weights.to(device=logits.device, dtype=logits.dtype)
        return F.cross_entropy(logits, targets.long(), weight=class_weights) + cost_weight * expected_cost

    # -- cost ---------------------------------------------------------------
    def gate_flops(self, image_size) -> int:
        """FLOPs of choosing a sub-network for one image of ``image_size`` (H, W)."""
        h, w = _hw(image_size)
        return self.head.flops(self.in_channels, self.choices[0], h, w) + self.gate.flops()

    def flops(self, image_size, width: Optional[int] = None, include_gate: bool = True, *,
              config=None):
        """FLOPs (2 x multiply-adds of the convs) for one image of ``image_size``.

        With ``width`` (one of :attr:`choices`) or ``config`` (a configuration)
        returns an int; with neither a dict ``{choice: flops}``. ``include_gate``
        adds :meth:`gate_flops` (what ``model(x)`` spends; a forced width or
        configuration skips the gate).
        """
        if config is not None:
            if width is not None:
                raise ValueError("config must be None when width is given (one or the other)")
            config = self.check_config(config)
        elif width is None:
            return {k: self.flops(image_size, k, include_gate) for k in self.choices}
        elif width not in self.choices:
            raise ValueError(f"width must be one of {self.choices}, got {width!r}")
        else:
            config = self.uniform_config(width)
        h, w = _hw(image_size)
        stream, inner = config[0], config[1:]
        total = self.head.flops(self.in_channels, stream, h, w)
        total += sum(block.flops(stream, h, w, inner=i) for block, i in zip(self.blocks, inner))
        total += self.tail.flops(stream, self.in_channels, h, w)
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
