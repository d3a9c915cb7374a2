"""HyperRes (Aharon & Ben-Artzi, 2022): one restoration network whose residual
kernels are generated from the degradation level.

A hyper network of *meta blocks* makes every kernel of the main network's
residual blocks from one scalar, the condition ``c``::

    k = c * w + b          (paper Eq. 2; w, b are a meta block's Linear(1, P))

Main network (paper Sec. 3.2, shared head and tail, generated body)::

    f0  = conv3x3_stride2(img)                      3 -> 64, H/2
    f   = ResBlockMeta^16(f0)                       f + HConv(ReLU(HConv(f)))
    f   = conv3x3(f) + f0                           skip over the residual blocks
    out = conv3x3(ReLU(conv3x3(ReLU(PS2(conv3x3_{256<-64}(f))))))   64 -> 3, H

Only the residual-block convolutions (``HConv``) are generated; they run
through :func:`restorenet.ops.hyper_conv2d`, which applies each sample's own
kernel, so one batch may mix levels (training runs the k levels of the paper's
Fig. 1 as one batch instead of k main networks).

Condition. ``model(x, level)`` takes the degradation level -- noise sigma in
0-255 units, JPEG quality, or SR scale -- and converts it with
:func:`level_to_condition`. As released (github.com/ifryed/HyperRes,
``models/HyperRes.py``; ``level_rule="released"``, the default) the levels are
divided by 255 only when the smallest level of the batch is >= 1: levels below 1
are taken as already normalised (so ``[0.5, 25]`` is used as it is, not divided).
``level_rule="divide"`` always divides by 255 (the paper's ``c = level / 255``; a
sample's condition then never depends on the other levels of its batch). (The
released ``setLevel``, used by its blind test, tests the *largest* level instead;
both rules agree on one level per batch and on every training level.)

For super-resolution the input is the low-res image already upscaled back to the
target size (bicubic); this model does not resize. Every such level is finite and >= 0, so a NaN, infinite
or negative level is rejected (it would silently give a NaN or meaningless
image): on the host for a number or a sequence, in exactly one host read per
forward for a tensor (``allow_nonfinite=True`` skips the check).

Initialisation (``init="released"``, the default): the released training script's
``weights_init_kaiming(scale=0.1)`` on every conv and Linear -- Kaiming-normal over
the layer's own fan-in times 0.1, zero bias. For a meta block's ``Linear(1, P)`` that
fan-in is 1, so every slope entry has std 0.1*sqrt(2) and every base is 0.
``init="conv_fan_in"`` (restorenet's earlier choice) scales the kernel slopes by the
*generated conv's* fan-in (Cin*k*k) instead and leaves the plain convs at PyTorch's
default. The released forward neither pads nor crops; restorenet zero-pads odd sizes
for the stride-2 head and crops back (identical on even sizes, where the released
code runs).

The blind setting (Sec. 4.4) estimates the noise level with the released
:class:`NoiseNet` (``create_model("hyperres_level_estimator")``; restorenet's earlier
5-conv design :class:`BlindLevelEstimator` is ``architecture="five_conv"``).

Parameters: 2,588,483 with 16 blocks, 372,803 with one (the paper's 0.37 M), equal
to the released model.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from restorenet._checks import check_choice, check_image, check_int
from restorenet.models.blocks import pad_to_multiple
from restorenet.ops import hyper_conv2d
from restorenet.ops._common import can_read_values
from restorenet.ops.hyper_conv2d import check_level_value, check_levels, level_from_sequence
from restorenet.registry import register_model

LEVEL_SCALE = 255.0
LEVEL_RULES = ("released", "divide")
INITS = ("released", "conv_fan_in")


def level_to_condition(level, rule: str = "released"):
    """The hyper network's input ``c`` from the levels of a batch.

    ``level`` is a float or a tensor [N] (noise sigma, JPEG quality or SR scale).
    ``rule="released"``: ``level / 255`` if the batch's smallest level is >= 1, else
    ``level`` unchanged (taken as already normalised), as the released code does;
    decided on the device for a tensor (no host read). ``rule="divide"``: always
    ``level / 255``.
    """
    check_choice("level_rule", rule, LEVEL_RULES)
    if rule == "divide":
        return level / LEVEL_SCALE
    if isinstance(level, Tensor):
        return torch.where(level.amin() >= 1, level / LEVEL_SCALE, level)
    return level / LEVEL_SCALE if level >= 1 else level


def released_init_(module: nn.Module, scale: float) -> None:
    """The released ``weights_init_kaiming``: every Conv2d and Linear weight
    Kaiming-normal (fan-in, gain sqrt 2) times ``scale``, every bias zero."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            with torch.no_grad():
                nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
                m.weight.mul_(scale)
                if m.bias is not None:
                    m.bias.zero_()


# ----------------------------------------------------------------- meta block
class HyperConv2d(nn.Module):
    """A conv whose kernel and bias are made by a meta block from ``c``.

    The meta block is ``nn.Linear(1, P)``, P = Cout*Cin*k*k + Cout; its weight
    column W holds the slope and its bias B the base of the generated
    parameters: ``kernel, bias = c*W + B`` (the first Cout*Cin*k*k entries are
    the kernel, the last Cout the conv bias). The views below alias the
    Linear's storage, so the op reads the meta block's parameters in place and
    gradients land on ``meta.weight`` / ``meta.bias`` directly.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, padding: int = 1, init: str = "released"):
        super().__init__()
        self.init = check_choice("init", init, INITS)
        check_int("in_channels", in_channels, 1)
        check_int("out_channels", out_channels, 1)
        check_int("kernel_size", kernel_size, 1)
        check_int("stride", stride, 1)
        check_int("padding", padding, 0)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.kernel_numel = out_channels * in_channels * kernel_size * kernel_size
        self.meta = nn.Linear(1, self.kernel_numel + out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.init == "released":
            # The Linear(1, P)'s own fan-in is 1: W ~ N(0, 2) * 0.1, B = 0.
            released_init_(self.meta, 0.1)
            return
        # "conv_fan_in": B = 0, so at c = 0 the generated conv is zero and each
        # ResBlockMeta starts as the identity. W: Kaiming over the *conv's* fan-in
        # (Cin*k*k), not the Linear's fan-in of 1, scaled by 0.1. The conv-bias slope
        # follows PyTorch's conv bias rule U(+-1/sqrt(fan_in)), also times 0.1.
        with torch.no_grad():
            nn.init.zeros_(self.meta.bias)
            nn.init.kaiming_normal_(self.kernel_slope, nonlinearity="relu")
            self.kernel_slope.mul_(0.1)
            bound = 0.1 / math.sqrt(self.in_channels * self.kernel_size ** 2)
            nn.init.uniform_(self.bias_slope, -bound, bound)

    @property
    def _kernel_shape(self) -> tuple[int, int, int, int]:
        k = self.kernel_size
        return self.out_channels, self.in_channels, k, k

    @property
    def kernel_slope(self) -> Tensor:
        """W's kernel part, [Cout, Cin, k, k] (a view of ``meta.weight``)."""
        return self.meta.weight[:self.kernel_numel].view(self._kernel_shape)

    @property
    def kernel_base(self) -> Tensor:
        """B's kernel part, [Cout, Cin, k, k] (a view of ``meta.bias``)."""
        return self.meta.bias[:self.kernel_numel].view(self._kernel_shape)

    @property
    def bias_slope(self) -> Tensor:
        return self.meta.weight[self.kernel_numel:].view(self.out_channels)

    @property
    def bias_base(self) -> Tensor:
        return self.meta.bias[self.kernel_numel:]

    def generate(self, condition: float) -> tuple[Tensor, Tensor]:
        """The static (kernel, bias) for one condition: what the paper's
        runtime generates once before running a plain network."""
        return (condition * self.kernel_slope + self.kernel_base,
                condition * self.bias_slope + self.bias_base)

    def forward(self, x: Tensor, condition, *, allow_nonfinite: bool = False) -> Tensor:
        """``condition``: a float or a tensor [N] (one c per sample), finite and >= 0
        (``allow_nonfinite=True`` skips that check, see ``hyper_conv2d``)."""
        return hyper_conv2d(x, condition, self.kernel_slope, self.kernel_base,
                            self.bias_slope, self.bias_base,
                            stride=self.stride, padding=self.padding, allow_nonfinite=allow_nonfinite)


class ResBlockMeta(nn.Module):
    """``x + HConv(ReLU(HConv(x)))`` with both kernels generated from ``c``."""

    def __init__(self, channels: int, init: str = "released"):
        super().__init__()
        self.conv1 = HyperConv2d(channels, channels, 3, padding=1, init=init)
        self.conv2 = HyperConv2d(channels, channels, 3, padding=1, init=init)

    def forward(self, x: Tensor, condition, *, allow_nonfinite: bool = False) -> Tensor:
        h = F.relu(self.conv1(x, condition, allow_nonfinite=allow_nonfinite))
        return x + self.conv2(h, condition, allow_nonfinite=allow_nonfinite)


# ---------------------------------------------------------------- main network
def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)


class PixelShuffleTail(nn.Module):
    """conv3x3 (c -> 4c) -> PS2 -> ReLU -> conv3x3 -> ReLU -> conv3x3 (c -> out)."""

    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.expand = conv3x3(channels, 4 * channels)
        self.shuffle = nn.PixelShuffle(2)
        self.refine = conv3x3(channels, channels)
        self.to_image = conv3x3(channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.shuffle(self.expand(x)))
        return self.to_image(F.relu(self.refine(x)))


class HyperRes(nn.Module):
    """The main network with its hyper network (see the module docstring).

    ``forward(x, level, *, allow_nonfinite=False)``: ``x`` [N, in_channels, H, W]
    (N >= 1, any H, W: padded to even sizes for the stride-2 head and cropped back),
    ``level`` the raw degradation level, finite and >= 0: a number, a sequence of N
    numbers or a real tensor [] or [N] on the device of ``x``. A tensor level is
    checked in exactly one host read per forward (not one per layer; none under
    torch.compile or on meta tensors); ``allow_nonfinite=True`` skips the check.
    Returns the restored image, same shape as ``x``. ``level_rule`` and ``init``: see
    the module docstring.
    """

    def __init__(self, in_channels: int = 3, width: int = 64, num_blocks: int = 16,
                 level_rule: str = "released", init: str = "released"):
        super().__init__()
        check_int("in_channels", in_channels, 1)
        check_int("width", width, 1)
        check_int("num_blocks", num_blocks, 0)  # 0: head, body end and tail only
        self.level_rule = check_choice("level_rule", level_rule, LEVEL_RULES)
        check_choice("init", init, INITS)
        self.in_channels = in_channels
        self.head = conv3x3(in_channels, width, stride=2)
        self.blocks = nn.ModuleList([ResBlockMeta(width, init) for _ in range(num_blocks)])
        self.body_end = conv3x3(width, width)
        self.tail = PixelShuffleTail(width, in_channels)
        if init == "released":
            for plain in (self.head, self.body_end, self.tail):
                released_init_(plain, 0.1)

    def forward(self, x: Tensor, level, *, allow_nonfinite: bool = False) -> Tensor:
        check_image("x", x, self.in_channels)
        condition = level_to_condition(_level_as(level, x, check_values=not allow_nonfinite),
                                       self.level_rule)
        h, w = x.shape[-2:]
        f0 = self.head(pad_to_multiple(x, 2))
        f = f0
        for block in self.blocks:
            # Checked once above: the layers must not read the levels again.
            f = block(f, condition, allow_nonfinite=True)
        f = self.body_end(f) + f0
        return self.tail(f)[..., :h, :w]


def _level_as(level, x: Tensor, check_values: bool):
    """``level`` as a Python float or a tensor [N] in x's float precision, checked
    finite and >= 0 when ``check_values`` (a tensor: the forward's one host read)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if isinstance(level, (int, float)) and not isinstance(level, bool):
        if check_values:
            check_level_value("level", level)
        return float(level)
    if isinstance(level, (list, tuple)):
        return level_from_sequence(level, x, dtype, check_values)
    if not isinstance(level, Tensor) or level.dtype == torch.bool or level.is_complex():
        raise TypeError(f"level must be a number, a sequence of numbers or a real tensor [N], got "
                        f"{level.dtype if isinstance(level, Tensor) else type(level).__name__}")
    if level.dim() > 1 or (level.dim() == 1 and level.shape[0] != x.shape[0]):
        raise ValueError(f"level must be a number or a tensor of shape [N] = [{x.shape[0]}] "
                         f"(one level per sample of x), got shape {tuple(level.shape)}")
    if level.device != x.device:
        raise ValueError(f"level must be on the device of x ({x.device}), got {level.device}")
    level = level.to(dtype).expand(x.shape[0])
    if check_values and can_read_values(level):
        check_levels(level)  # the forward's one host read
    return level


# ------------------------------------------------------------- blind estimator
def _check_estimator_sizes(in_channels: int, width: int, crop_size: int) -> None:
    check_int("in_channels", in_channels, 1)
    check_int("width", width, 1)
    if check_int("crop_size", crop_size, 32) % 32:
        raise ValueError(f"crop_size must be a multiple of 32 (the features reach crop/32), "
                         f"got {crop_size}")


def _check_crop_input(x: Tensor, in_channels: int, crop_size: int) -> None:
    check_image("x", x, in_channels)
    if min(x.shape[-2:]) < crop_size:
        raise ValueError(f"x must be at least {crop_size}x{crop_size}, "
                         f"got spatial size {tuple(x.shape[-2:])}")


def level_regressor(width: int, crop_size: int) -> nn.Sequential:
    """The estimators' head: flatten the (crop/32)^2 map, FC 32 -> ReLU -> FC 16 -> ReLU -> FC 1."""
    side = crop_size // 32
    return nn.Sequential(nn.Flatten(), nn.Linear(width * side * side, 32), nn.ReLU(),
                         nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 1))


class NoiseResBlock(nn.Module):
    """NoiseNet's residual block: ``x + conv3x3(ReLU(conv3x3(x)))`` (no ReLU after the sum)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = conv3x3(channels, channels)
        self.conv2 = conv3x3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


ESTIMATOR_CROPS = ("random", "center")


class NoiseNet(nn.Module):
    """The released blind noise-level estimator (``models/NoiseNet.py``, weights
    ``pre_trained/noise_detect.pth``): 330,561 parameters at the default size::

        conv3x3_s2(3->64) -> 4 x [NoiseResBlock(64) -> maxpool2]
        -> flatten 64*(crop/32)^2 -> FC 32 -> ReLU -> FC 16 -> ReLU -> FC 1

    It sees one ``crop_size`` crop of each image. ``crop="random"`` (as released in
    eval mode): a uniformly drawn position, the same for the whole batch, from
    torch's generator (the released code draws from numpy's, in ``[0, H - crop)``,
    and fails on an input of exactly the crop size, where this one takes the whole
    input); ``crop="center"``: the deterministic center crop. Returns the estimated
    level (sigma in 0-255 units), shape [N] (the released [N, 1], squeezed so it
    feeds ``HyperRes(x, level=...)``). The raw regression output is returned, as
    released; ``clamp_negative=True`` clamps it at 0 in eval mode (HyperRes
    rejects a negative level). Initialised as its released training script does:
    Kaiming-normal times 0.001, zero bias.
    """

    def __init__(self, in_channels: int = 3, width: int = 64, crop_size: int = 128,
                 crop: str = "random", clamp_negative: bool = False):
        super().__init__()
        _check_estimator_sizes(in_channels, width, crop_size)
        self.crop = check_choice("crop", crop, ESTIMATOR_CROPS)
        if not isinstance(clamp_negative, bool):
            raise ValueError(f"clamp_negative must be a bool, got {clamp_negative!r}")
        self.in_channels, self.crop_size, self.clamp_negative = in_channels, crop_size, clamp_negative
        self.head = nn.Conv2d(in_channels, width, 3, stride=2, padding=1)
        stages = []
        for _ in range(4):
            stages += [NoiseResBlock(width), nn.MaxPool2d(2)]
        self.stages = nn.Sequential(*stages)
        self.regressor = level_regressor(width, crop_size)
        released_init_(self, 0.001)

    def crop_position(self, h: int, w: int) -> tuple[int, int]:
        if self.crop == "center":
            return (h - self.crop_size) // 2, (w - self.crop_size) // 2
        top, left = (int(torch.randint(0, extent - self.crop_size, ())) if extent > self.crop_size else 0
                     for extent in (h, w))
        return top, left

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [N, C, H, W] with H, W >= crop_size; returns the levels [N]."""
        _check_crop_input(x, self.in_channels, self.crop_size)
        top, left = self.crop_position(*x.shape[-2:])
        x = x[..., top:top + self.crop_size, left:left + self.crop_size]
        level = self.regressor(self.stages(self.head(x))).squeeze(1)
        return level.clamp_min(0) if self.clamp_negative and not self.training else level


class BlindLevelEstimator(nn.Module):
    """restorenet's earlier level estimator, not the released one (that is
    :class:`NoiseNet`): 5 convs + 3 FC layers, 182,849 parameters at the default size
    (``create_model("hyperres_level_estimator", architecture="five_conv")``).

    Predicts the raw level (noise sigma, trained on 0-100) of each image from
    one ``crop_size`` x ``crop_size`` crop. In eval mode the estimate is clamped at
    0 (a level is >= 0, and HyperRes rejects a negative one), so its output feeds
    ``HyperRes(x, level=estimator(x))`` directly; in train mode it is the raw
    regression output, so a loss still has a gradient below 0::

        conv3x3_s2(3->64) -> 4 x [conv3x3(64->64) -> ReLU -> maxpool2]
        -> flatten 64*(crop/32)^2 -> FC 32 -> ReLU -> FC 16 -> ReLU -> FC 1

    Inputs larger than the crop are *center*-cropped (deterministic, unlike a
    random crop), so a 128x128 training patch passes unchanged; smaller inputs
    are rejected because the FC layers need the fixed 4x4 map.
    """

    def __init__(self, in_channels: int = 3, width: int = 64, crop_size: int = 128):
        super().__init__()
        _check_estimator_sizes(in_channels, width, crop_size)
        self.in_channels, self.crop_size = in_channels, crop_size
        convs = [nn.Conv2d(in_channels, width, 3, stride=2, padding=1), nn.ReLU()]
        for _ in range(4):
            convs += [conv3x3(width, width), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*convs)
        self.regressor = level_regressor(width, crop_size)

    def center_crop(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        top, left = (h - self.crop_size) // 2, (w - self.crop_size) // 2
        return x[..., top:top + self.crop_size, left:left + self.crop_size]

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [N, C, H, W] with H, W >= crop_size; returns the levels [N]."""
        _check_crop_input(x, self.in_channels, self.crop_size)
        level = self.regressor(self.features(self.center_crop(x))).squeeze(1)
        return level if self.training else level.clamp_min(0)


@register_model("hyperres")
def hyperres(**cfg) -> HyperRes:
    """HyperRes with 16 meta residual blocks, width 64 (2,588,483 parameters)."""
    return HyperRes(**cfg)


ESTIMATORS = {"noisenet": NoiseNet, "five_conv": BlindLevelEstimator}


@register_model("hyperres_level_estimator")
def hyperres_level_estimator(architecture: str = "noisenet", **cfg) -> nn.Module:
    """HyperRes's blind noise-level estimator: the released NoiseNet (330,561
    parameters, 128x128 crop); ``architecture="five_conv"``: restorenet's earlier design."""
    return ESTIMATORS[check_choice("architecture", architecture, list(ESTIMATORS))](**cfg)
