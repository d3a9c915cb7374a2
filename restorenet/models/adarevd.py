"""AdaRevD: Adaptive Patch Exiting Reversible Decoder for image deblurring.

    img -> frozen encoder (UFPNet's, or NAFNet's) -> e0..e4 (each times a learnable per-channel scale)
        -> K reversible decoder columns, each with its own head: out_k = conv3x3(c3_k) + img
    train: returns [out_1, ..., out_K] (the loss averages over every column)
    eval:  returns out_K;  ``restore()``: tiled inference where a classifier on e3
           decides per tile after how many columns it exits -- by default the whole
           batch (images of any sizes) in one ragged pass: tiles sorted by exit depth,
           so column k runs on a prefix of them (``restorenet.ops.tiles``).

Default config = AdaRevD-B as released: UFPNet encoder width 64, blocks [1,1,1,28] +
1 middle block, K = ``num_decoders`` = 4 (the S/B/L variants use K = 2/4/8).

One column maps states (c0, c1, c2, c3) = (e3, e2, e1, e0) -- 8w, 4w, 2w, w channels
at H/8 ... H -- with x = e4 (16w, H/16) fixed for all columns::

    c0' = a0*c0 + L0(x,   c1)
    c1' = a1*c1 + L1(c0', c2)
    c2' = a2*c2 + L2(c1', c3)
    c3' = a3*c3 + L3(c2')
    L(a, b) = FCNAFBlock( PS2(conv1x1(a)) + LN(conv2x2_s2(b)) )    (L3 has no b; LN eps 1e-5)

The alphas are clamped to |a| >= 1e-3 (sign kept) in place on the parameters before
each forward, as released (``DecoderColumn.clamp_alphas_``). As the released evaluation
code: images are reflect-padded to a multiple of 16, and the encoder's SCA means are
local, over 384 / 2**level pixels (``encoder_pooling="local"``: NAFNet's TLC; global for
inputs up to 384 px, so training crops see the released training encoder).

Each update is invertible given the already-updated coarser state:
``c = (c' - L(...)) / a``, so training does not need to keep activations: with
``memory_efficient=True`` backward rebuilds the states column by column: the loop
and its backward are the generic op ``restorenet.ops.reversible_columns``, which
``ReversibleColumns`` calls with the ``DecoderColumn`` objects. Inversion errors
grow about (1 + Lip L)/|a| per column, so by default (``rev_anchor_every="auto"``)
the forward also keeps the states entering every 2nd column when L_i runs in half
precision, and every 4th in fp32 when K > 4: backward restarts from them.
"""
from __future__ import annotations

import operator
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from restorenet._checks import check_image, check_int, check_int_sequence
from restorenet.models.blocks import (LayerNorm2d, NAFBlock, SimplifiedChannelAttention, scaled_residual_add,
                                      downsample, upsample)
from restorenet.models.nafnet import NAFNet, NAFNetEncoder
from restorenet.models.ufpnet import UFPNetEncoder
from restorenet.ops._common import autocast_dtype
from restorenet.ops.naf_elementwise import simple_gate
from restorenet.ops.rev_columns import column_forward, reversible_columns
from restorenet.ops.tiles import RAMPS, axis_ramps, tile_blend, tile_gather, tile_plan, tile_schedule
from restorenet.registry import register_model

NUM_LEVELS = 4  # decoder states c0..c3; the encoder must have exactly 4 down steps
NUM_CLASSES = 6  # degradation classes of the patch-exit classifier
PSNR_CUTS = (20.0, 25.0, 30.0, 35.0, 40.0)  # dB of blurry vs sharp crop -> class 0..5
ALPHA_MIN = 1e-3  # |a| is kept above this so the coupling stays invertible
DOWN_NORM_EPS = 1e-5  # the LayerNorm after each level's 2x2 down conv (released: 1e-5)
CLASSIFIER_NORM_EPS = 1e-6  # the classifier's LayerNorm (released: 1e-6)
ENCODERS = ("ufpnet", "nafnet")
ENCODER_POOLINGS = ("local", "global")
# The released evaluation encoders (UFPNetLocal / NAFNetLocal, NAFNet's "TLC"): each SCA
# averages over a window of 1.5x the 256-pixel training size, 384 / 2**level pixels.
LOCAL_POOL_WINDOW = 384
# rev_anchor_every="auto" (measured: restorenet.ops.rev_columns's anchor table):
# L_i in half precision (autocast or a half model): a state set every 2 columns;
# fp32: every 4 columns, only when K > 4 (pure reversible is fine up to K = 4);
# fp64: pure reversible.
HALF_PRECISION_ANCHOR_EVERY = 2
FP32_ANCHOR_EVERY = 4

# Paper's per-class exit depth (class 0 = most blurred -> most columns), GoPro maps.
DEFAULT_EXIT_IDX = {4: (4, 4, 3, 3, 2, 1), 8: (7, 6, 5, 2, 2, 2)}


# --------------------------------------------------------------------------- blocks


class FourierUnit(nn.Module):
    """FFT(t) = irfft2( conv1x1_{2c<-4c}( GELU( conv1x1_{4c<-2c}( [Re, Im](rfft2(t)) ))))

    A global (whole-image) mixer: each 1x1 conv on the spectrum touches every pixel.
    ``norm="backward"`` (unnormalised rfft2, 1/HW in irfft2), as torch's default.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.expand = nn.Conv2d(2 * channels, 4 * channels, 1)
        self.act = nn.GELU()
        self.project = nn.Conv2d(4 * channels, 2 * channels, 1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        h, w = t.shape[-2:]
        # FFTs in half precision need power-of-two sizes on CUDA: run them in fp32.
        low = t.dtype in (torch.float16, torch.bfloat16)
        spec = torch.fft.rfft2(t.float() if low else t)
        # The 1x1 convs run in their weights' dtype (autocast, if on, still applies).
        parts = torch.cat([spec.real, spec.imag], dim=1).to(self.expand.weight.dtype)
        z = self.project(self.act(self.expand(parts)))
        re, im = z.to(spec.real.dtype).chunk(2, dim=1)
        return torch.fft.irfft2(torch.complex(re, im), s=(h, w)).to(t.dtype)


class FCNAFBlock(NAFBlock):
    """NAFBlock with a Fourier branch in each half.

    The branch reads the same normalised input as the half it joins and is added to
    that half's output *before* the beta/gamma scaling (and dropout)::

        u   = LN1(inp)
        y   = inp + beta  * drop( project(SCA(SG(dw3x3(expand(u))))) + FFT1(u) )
        v   = LN2(y)
        out = y   + gamma * drop( ffn_project(SG(ffn_expand(v)))      + FFT2(v) )

    So, like NAFBlock, a fresh block (beta = gamma = 0) is the identity.
    """

    def __init__(self, channels: int, dropout: float = 0.0):
        super().__init__(channels, dropout=dropout)
        self.fourier1 = FourierUnit(channels)
        self.fourier2 = FourierUnit(channels)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        # The same fused ops as NAFBlock: SCA(SG(.)) in one op (SG's output never
        # stored) and the scaled residuals ``inp + beta * z`` in one pass each.
        u = self.norm1(inp)
        mixed = self.project(self.sca.gated(self.dwconv(self.expand(u))))
        y = scaled_residual_add(inp, self.beta, self.drop1(mixed + self.fourier1(u)))
        v = self.norm2(y)
        mlp = self.ffn_project(self.gate(self.ffn_expand(v)))
        return scaled_residual_add(y, self.gamma, self.drop2(mlp + self.fourier2(v)))


class LevelFunction(nn.Module):
    """L(a, b) = FCNAFBlock( PS2(conv1x1_{no bias}(a)) + LN(conv2x2_s2(b)) ).

    ``a`` is the coarser neighbour (2c channels, half size): upsampled to c.
    ``b`` is the finer neighbour (c/2 channels, double size): downsampled to c.
    The finest level has no finer neighbour (``has_finer=False``).
    """

    def __init__(self, channels: int, has_finer: bool, dropout: float = 0.0):
        super().__init__()
        self.up = upsample(2 * channels)
        self.has_finer = has_finer
        if has_finer:
            self.down = downsample(channels // 2)
            self.down_norm = LayerNorm2d(channels, eps=DOWN_NORM_EPS)
        self.block = FCNAFBlock(channels, dropout=dropout)

    def forward(self, coarse: torch.Tensor, finer: torch.Tensor | None = None) -> torch.Tensor:
        t = self.up(coarse)
        if self.has_finer:
            t = t + self.down_norm(self.down(finer))
        return self.block(t)


def signed_clamp(a: torch.Tensor, eps: float = ALPHA_MIN) -> torch.Tensor:
    """a with |a| >= eps and its sign kept (sign(0) counts as +: the released rule
    would keep an exact 0, which makes the coupling singular)."""
    sign = torch.where(a < 0, -torch.ones_like(a), torch.ones_like(a))
    return sign * a.abs().clamp_min(eps)


# ------------------------------------------------------------ encoder pooling


class LocalChannelAttention(SimplifiedChannelAttention):
    """SCA with the mean over a ``window`` x ``window`` neighbourhood instead of the whole
    image, as the released evaluation encoders compute it (NAFNet's test-time local
    converter, ``AvgPool2d`` of ``local_arch.py``)::

        t * conv1x1( replicate_pad( avgpool_{kh x kw, stride 1}(t) ) )   (box_mean)
        kh = min(H, window), kw = min(W, window); the pad centres the map back to H x W
        (an odd pad puts its extra row/column at the end)

    Where the window covers the whole feature (H, W <= window) it is the global mean:
    the fused op of :class:`SimplifiedChannelAttention`, unchanged. Same parameters
    (``proj``) and state dict."""

    def __init__(self, channels: int, window: int):
        super().__init__(channels)
        self.window = check_int("window", window, 1)

    def _attend(self, x: torch.Tensor, gated: bool) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h <= self.window and w <= self.window:
            return super()._attend(x, gated)
        t = simple_gate(x) if gated else x
        pooled = box_mean(t, min(h, self.window), min(w, self.window))
        ph, pw = h - pooled.shape[-2], w - pooled.shape[-1]
        pooled = F.pad(pooled, (pw // 2, (pw + 1) // 2, ph // 2, (ph + 1) // 2), mode="replicate")
        return t * self.proj(pooled.to(self.proj.weight.dtype)).to(t.dtype)


def box_mean(t: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """``avg_pool2d(t, (kh, kw), stride=1)`` by a summed-area table, as the released
    ``AvgPool2d`` computes it: O(H W) whatever the window (a direct pool costs
    O(H W kh kw): ~80x more at the released 384 px window on a 720p image's level 0).
    Sums run in float32 (float64 for float64 input)."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    table = F.pad(t.to(acc).cumsum(-1).cumsum(-2), (1, 0, 1, 0))
    box = (table[..., kh:, kw:] + table[..., :-kh, :-kw]
           - table[..., :-kh, kw:] - table[..., kh:, :-kw])
    return (box / (kh * kw)).to(t.dtype)


def reflect_pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad H and W on the bottom/right up to a multiple by reflection, as the released
    evaluation (``check_image_size``, mode "reflect") and UFPNet's encoder do. An image
    too small to reflect that far (pad >= its size) is zero-padded instead."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if not (ph or pw):
        return x
    return F.pad(x, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "constant")


def use_local_pooling(encoder: nn.Module, window: int = LOCAL_POOL_WINDOW) -> None:
    """Give every SCA of a NAFNet/UFPNet encoder's level l a ``window >> l`` local mean
    (parameters kept), as the released ``NAFNetLocal`` / ``UFPNetLocal`` do."""
    for level, stage in enumerate([*encoder.stages, encoder.middle]):
        for block in stage:
            local = LocalChannelAttention(block.sca.proj.in_channels, max(window >> level, 1))
            local.proj = block.sca.proj
            block.sca = local


# ------------------------------------------------------------------ one column


class DecoderColumn(nn.Module):
    """One reversible sub-decoder: four coupled level updates (coarse to fine).
    Follows ``restorenet.ops.ReversibleColumn``."""

    num_levels = NUM_LEVELS

    def __init__(self, width: int, dropout: float = 0.0):
        super().__init__()
        channels = [width * 2 ** (NUM_LEVELS - 1 - i) for i in range(NUM_LEVELS)]  # 8w..w
        self.levels = nn.ModuleList(
            LevelFunction(c, has_finer=i < NUM_LEVELS - 1, dropout=dropout)
            for i, c in enumerate(channels)
        )
        self.alphas = nn.ParameterList(
            nn.Parameter(torch.full((1, c, 1, 1), 0.5)) for c in channels
        )

    @property
    def state_channels(self) -> list[int]:
        """Channels of c0..c3 (8w, 4w, 2w, w): ``reversible_columns`` checks the states."""
        return [a.shape[1] for a in self.alphas]

    def may_draw_random(self) -> bool:
        """Whether an update can draw random numbers now (dropout in training mode):
        if not, ``reversible_columns`` keeps no RNG states for the replay."""
        return self.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.modules())

    @torch.no_grad()
    def clamp_alphas_(self) -> None:
        """|a_i| >= ``ALPHA_MIN`` (sign kept), written into the parameters themselves before
        every forward, as the released code does: the forward then uses the parameter
        as it is, so an alpha at the bound still gets its full gradient (a clamp inside
        the forward would give it exactly zero from then on). Written through ``.data``,
        as released, so autograd does not see it: a graph built by an earlier forward
        (two forwards, one backward) stays valid."""
        for a in self.alphas:
            a.data.copy_(signed_clamp(a.data))

    def coupling_alpha(self, i: int, state_dtype: torch.dtype) -> torch.Tensor:
        """a_i as the fused coupling ops take it: [C], fp32 (fp64 for fp64 states),
        differentiable back to ``alphas[i]`` (already clamped by ``clamp_alphas_``)."""
        dtype = torch.float64 if state_dtype == torch.float64 else torch.float32
        return self.alphas[i].reshape(-1).to(dtype)

    def update_term(self, i: int, coarse: torch.Tensor, finer: torch.Tensor | None,
                    state_dtype: torch.dtype) -> torch.Tensor:
        """f_i = L_i(coarse, finer) in the state dtype. L_i itself runs in its
        weights' dtype (or autocast's): the fp32 states are cast on the way in."""
        level = self.levels[i]
        weight_dtype = next(level.parameters()).dtype
        finer = finer.to(weight_dtype) if finer is not None else None
        return level(coarse.to(weight_dtype), finer).to(state_dtype)

    def level_parameters(self, i: int) -> list[nn.Parameter]:
        """Everything level i's update depends on: its alpha, then L_i's weights."""
        return [self.alphas[i], *self.levels[i].parameters()]

    def level_buffers(self, i: int) -> list[torch.Tensor]:
        """Buffers L_i may update (none: LayerNorm2d keeps no running statistics)."""
        return list(self.levels[i].buffers())

    def forward(self, x: torch.Tensor, states: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(c0..c3) -> (c0'..c3'), c_i' = a_i*c_i + L_i(coarser new state, finer old state):
        ``restorenet.ops.column_forward`` (fp32 coupling states for half inputs)."""
        self.clamp_alphas_()
        return column_forward(self, x, states)


# ------------------------------------------------------------- K columns


class ReversibleColumns(nn.Module):
    """K decoder columns run one after another; returns each column's finest state c3'.

    The column/level loop, its memory-efficient backward (states rebuilt by inverting
    the couplings, RNG/autocast replay, fp32 coupling states for half inputs) and
    their measured precision live in ``restorenet.ops.reversible_columns``;
    ``memory_efficient=False`` is plain autograd through the same loop.
    """

    def __init__(self, width: int, num_columns: int, dropout: float = 0.0):
        super().__init__()
        self.columns = nn.ModuleList(DecoderColumn(width, dropout) for _ in range(num_columns))

    def __len__(self) -> int:
        return len(self.columns)

    def forward(self, x: torch.Tensor, states: Sequence[torch.Tensor], memory_efficient: bool = True,
                anchor_every: Union[int, None, str] = "auto",
                heads: Optional[Sequence[nn.Module]] = None) -> list[torch.Tensor]:
        """``anchor_every``: as ``reversible_columns``'s, or "auto" (see
        ``resolve_anchor_every``). ``heads``: one module per column applied to its
        c3' inside the op (so their inputs are not kept for backward either)."""
        if anchor_every == "auto":
            anchor_every = self.resolve_anchor_every(x)
        for column in self.columns:  # outside the op: it takes the alphas as they are
            column.clamp_alphas_()
        return reversible_columns(list(self.columns), x, states, heads=heads, memory_efficient=memory_efficient,
                                  anchor_every=anchor_every)

    def resolve_anchor_every(self, x: torch.Tensor) -> Optional[int]:
        """The "auto" choice, decided per call (one model serves fp32 and autocast).
        Gradient error vs plain autograd (relative, AdaRevD-like init, see
        ``restorenet.ops.rev_columns``):

        * L_i in half precision (autocast on for ``x``'s device, or fp16/bf16
          weights): ``HALF_PRECISION_ANCHOR_EVERY`` = 2. Pure inversion is off by
          4.5e-2 (bf16) at K = 4 and 0.3-0.4 at K = 8; anchored every 2 columns
          4.6e-3 / 7.2e-3, the bf16 floor of the path (2.8e-3 at K = 2).
        * fp32 weights, no autocast: pure reversible up to K = 4 (1.3e-5), else
          ``FP32_ANCHOR_EVERY`` = 4 (K = 8: 3.6e-3 pure -> 3.3e-6).
        * fp64: pure reversible (exact to ~1e-9).
        """
        weight_dtype = next(self.parameters()).dtype
        if autocast_dtype(x.device) is not None or weight_dtype in (torch.float16, torch.bfloat16):
            return HALF_PRECISION_ANCHOR_EVERY
        if weight_dtype == torch.float32 and len(self.columns) > FP32_ANCHOR_EVERY:
            return FP32_ANCHOR_EVERY
        return None


# ------------------------------------------------------------------ classifier


class PatchExitClassifier(nn.Module):
    """Degradation class of a patch from its e3 feature (8w channels, H/8):
    conv2x2_s2 (8w->16w) -> NAFBlock -> avgpool -> LayerNorm (eps 1e-6) -> Linear -> GELU
    -> Linear(6), times a learnable per-class scale (init 1/sqrt(6))."""

    def __init__(self, width: int, num_classes: int = NUM_CLASSES):
        super().__init__()
        c = 8 * width
        self.down = downsample(c)
        self.block = NAFBlock(2 * c)
        self.norm = nn.LayerNorm(2 * c, eps=CLASSIFIER_NORM_EPS)
        self.fc1 = nn.Linear(2 * c, c)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(c, num_classes)
        self.logit_scale = nn.Parameter(torch.full((1, num_classes), num_classes ** -0.5))

    def forward(self, e3: torch.Tensor) -> torch.Tensor:
        t = self.block(self.down(e3)).mean(dim=(2, 3))
        return self.fc2(self.act(self.fc1(self.norm(t)))) * self.logit_scale


def psnr_class(psnr: torch.Tensor) -> torch.Tensor:
    """Classifier label of a crop from PSNR(blurry, sharp): cut at 20/25/30/35/40 dB.

    Class 0 (<= 20 dB, most blurred) ... class 5 (> 40 dB): the number of cuts the
    PSNR lies strictly above, as the released dataset counts them (``psnr > cut``),
    so a PSNR exactly on a cut goes to the lower class."""
    cuts = torch.tensor(PSNR_CUTS, dtype=psnr.dtype, device=psnr.device)
    return torch.bucketize(psnr, cuts, right=False)


# ------------------------------------------------------------------ the model


class AdaRevD(nn.Module):
    """AdaRevD. See the module docstring for the equations.

    Args:
        width: encoder width w (features w, 2w, 4w, 8w, 16w).
        enc_blocks: blocks per encoder level (exactly 4 levels; with the UFPNet encoder
            the first three must be 1).
        middle_blocks: NAFBlocks at the bottom of the encoder.
        encoder: "ufpnet" (default; every released AdaRevD config: a NAFNet whose first
            three levels are kernel-attention blocks fed by per-pixel blur kernels,
            ``restorenet.models.ufpnet``) or "nafnet" (a plain NAFNet encoder, the
            other option of the released code; ``inherit_encoder`` takes a NAFNet).
        kernel_size, estimator_width, kernel_noise: the UFPNet encoder's (see
            ``UFPNetEncoder``; released: 19, 64, True -- the released encoder draws
            Gaussian noise at every forward, so outputs are random unless
            ``kernel_noise=False``). Ignored with ``encoder="nafnet"``.
        encoder_pooling: "local" (default, released: the evaluation encoders are
            ``UFPNetLocal`` / ``NAFNetLocal``, whose SCA averages over a 384 / 2**l
            window at level l, see ``LocalChannelAttention``; the same as "global" for
            inputs up to 384 px, e.g. the training crops) or "global" (the whole-image
            mean at any size).
        num_decoders: K, the number of reversible columns (S/B/L: 2/4/8).
        memory_efficient: rebuild states in backward instead of storing activations.
        rev_anchor_every: with ``memory_efficient``, keep the states entering every
            ``rev_anchor_every``-th column so backward's inversion errors compound
            over at most that many columns (``restorenet.ops.reversible_columns``).
            Memory: ceil(K / a) extra sets of decoder states (each set = the four
            states, 15w channels over H/8..H: 8w*(H/8)^2 + 4w*(H/4)^2 + 2w*(H/2)^2 +
            w*H^2 floats, fp32) on top of x and the last states; activations of one
            column are not kept either way. None: pure reversible (nothing that grows
            with K). "auto" (default): every 2 columns when L_i runs in half
            precision (autocast or a half model: K = 4 -> 2 sets, K = 8 -> 4);
            in fp32 none up to K = 4 and every 4 columns beyond (K = 8 -> 2 sets);
            none in fp64 -- see ``ReversibleColumns.resolve_anchor_every`` for the
            measured errors.
        dropout: dropout rate inside the decoder's FCNAFBlocks (paper: 0).
        exit_idx: default class -> number of columns map for ``restore`` (6 ints in
            1..K); None picks the paper's GoPro map for K = 4 or 8, else all K.
    """

    def __init__(self, in_channels: int = 3, width: int = 64,
                 enc_blocks: Sequence[int] = (1, 1, 1, 28), middle_blocks: int = 1,
                 num_decoders: int = 4, memory_efficient: bool = True,
                 dropout: float = 0.0, exit_idx: Sequence[int] | None = None,
                 rev_anchor_every: Union[int, None, str] = "auto", encoder: str = "ufpnet",
                 kernel_size: int = 19, estimator_width: int = 64, kernel_noise: bool = True,
                 encoder_pooling: str = "local"):
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
        if encoder_pooling not in ENCODER_POOLINGS:
            raise ValueError(f"encoder_pooling must be one of {ENCODER_POOLINGS}, got {encoder_pooling!r}")
        enc_blocks = check_int_sequence("enc_blocks", enc_blocks, 0, length=NUM_LEVELS)  # one per decoder level
        check_int("num_decoders", num_decoders, 1)  # in_channels, width: NAFNetEncoder's; dropout: NAFBlock's
        self.in_channels = in_channels
        self.num_decoders = num_decoders
        self.memory_efficient = memory_efficient
        if rev_anchor_every != "auto" and rev_anchor_every is not None and (
                isinstance(rev_anchor_every, bool) or not isinstance(rev_anchor_every, int)
                or rev_anchor_every < 1):
            raise ValueError(f"rev_anchor_every must be 'auto', None or an int >= 1, got {rev_anchor_every!r}")
        self.rev_anchor_every = rev_anchor_every
        self.encoder_name = encoder
        if encoder == "ufpnet":
            self.encoder = UFPNetEncoder(in_channels, width, enc_blocks, middle_blocks, kernel_size=kernel_size,
                                         estimator_width=estimator_width, kernel_noise=kernel_noise)
        else:
            self.encoder = NAFNetEncoder(in_channels, width, enc_blocks, middle_blocks)
        if encoder_pooling == "local":
            use_local_pooling(self.encoder)
        self.encoder.requires_grad_(False)  # inherited from a trained UFPNet/NAFNet, kept fixed
        self.feature_scales = nn.ParameterList(
            nn.Parameter(torch.ones(1, c, 1, 1)) for c in self.encoder.channels)
        self.decoder = ReversibleColumns(width, num_decoders, dropout)
        self.heads = nn.ModuleList(
            nn.Conv2d(width, in_channels, 3, padding=1) for _ in range(num_decoders))
        self.classifier = PatchExitClassifier(width)
        self.exit_idx = self._check_exit_idx(exit_idx)

    @property
    def size_multiple(self) -> int:
        return self.encoder.size_multiple

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: never in training mode
        return self

    def inherit_encoder(self, nafnet: NAFNet) -> None:
        """Copy a trained NAFNet's encoder weights (the paper inherits them); for a
        model built with ``encoder="nafnet"``. A released checkpoint (NAFNet or UFPNet,
        whole network or encoder only): ``restorenet.weights.adarevd.load_encoder``."""
        if self.encoder_name != "nafnet":
            raise ValueError(f"nafnet: inherit_encoder copies a NAFNet's encoder, but this model's "
                             f"encoder is {self.encoder_name!r} (build it with encoder='nafnet')")
        self.encoder.load_state_dict(nafnet.encoder.state_dict())

    # -- pieces

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Scaled features [s_l * e_l] of an image already padded to ``size_multiple``."""
        with torch.no_grad():
            feats = self.encoder(x)
        return [f * s for f, s in zip(feats, self.feature_scales)]

    def classify(self, img: torch.Tensor) -> torch.Tensor:
        """Patch-exit logits [N, 6] of image crops (for training the classifier)."""
        check_image("img", img, self.in_channels)
        feats = self.encode(reflect_pad_to_multiple(img, self.size_multiple))
        return self.classifier(feats[3])

    # -- training / plain inference

    def forward(self, img: torch.Tensor):
        """Train: list of K restored images (one per column). Eval: the last one."""
        check_image("img", img, self.in_channels)
        h, w = img.shape[-2:]
        x = reflect_pad_to_multiple(img, self.size_multiple)
        e0, e1, e2, e3, e4 = self.encode(x)
        states = (e3, e2, e1, e0)
        if not self.training:
            finest = self.decoder(e4, states, memory_efficient=self.memory_efficient,
                                  anchor_every=self.rev_anchor_every)
            return (self.heads[-1](finest[-1]) + x)[..., :h, :w]
        # The heads run inside the reversible op: their full-resolution inputs c3' of
        # every column are then not kept for backward (memory flat in K).
        residuals = self.decoder(e4, states, memory_efficient=self.memory_efficient,
                                 anchor_every=self.rev_anchor_every, heads=self.heads)
        return [(r + x)[..., :h, :w] for r in residuals]

    # -- adaptive tiled inference

    @torch.no_grad()
    def restore(self, img, tile: int = 384, overlap: int = 32,
                exit_idx: Sequence[int] | None = None, return_exits: bool = False,
                batched: bool = True, blend: str = "released"):
        """Tiled inference where each tile exits after ``exit_idx[class]`` columns.

        The encoder sees the whole image (reflect-padded to a multiple of 16). Feature level l
        is cut into tiles of ``tile / 2**l`` overlapping by ``overlap / 2**l``; border
        tiles are shifted inward so every tile has full size. Where the padded image is
        smaller than ``tile`` in a dimension, the tile is clamped to the image there
        (one tile across). Each tile's head output (without the image) is blended back,
        then the image is added. ``blend``:

        - ``"released"`` (default): the released code's weights
          (``restorenet.ops.tiles.released_ramp``):
          ``linspace`` ramps over each overlap, summed without normalising. Its quirk is
          kept: along a side that fits in one tile, the first ``overlap`` rows (columns)
          of the residual are ramped from 0 (there is no neighbour to fade into).
        - ``"normalized"``: our variant, ``restorenet.ops.tiles.tile_ramp`` ramps at
          pixel centres, normalised by their sum; no damping along one-tile sides.

        Args:
            img: [N, 3, H, W], or a list of [3, H, W] / [n, 3, H, W] tensors of any sizes.
            batched: True (default): the whole batch in one ragged pass with the
                ``restorenet.ops`` tile ops -- the tiles of all images sorted by exit
                depth, so column k runs on a prefix of them; one device-to-host copy.
                False: the plain path (the authors' way: each column gathers the tiles
                left and syncs with the host), kept as the reference.
        Returns:
            The restored images -- for list input a list, each shaped like its input --
            and with ``return_exits`` the number of columns each tile ran: LongTensor
            [N, tiles_h, tiles_w] (for list input a list of [n, tiles_h, tiles_w], or
            [tiles_h, tiles_w] for a [3, H, W] entry).
        """
        entries, as_list = self._restore_inputs(img)
        if self.training:
            raise RuntimeError("restore() is inference only: call model.eval() first")
        self._check_tiling(tile, overlap)
        if blend not in RAMPS:
            raise ValueError(f"blend must be one of {RAMPS}, got {blend!r}")
        values = self.exit_idx if exit_idx is None else self._check_exit_idx(exit_idx)
        # non_blocking: a host-to-device copy that does not wait for queued work.
        depth_of_class = torch.tensor(values).to(entries[0].device, non_blocking=True)
        run = self._restore_batched if batched else self._restore_plain
        outs, exits = run(entries, tile, overlap, depth_of_class, blend)
        if not as_list:
            return (outs[0], exits[0]) if return_exits else outs[0]
        squeeze = [t.dim() == 3 for t in img]
        outs = [o[0] if sq else o for o, sq in zip(outs, squeeze)]
        if return_exits:
            return outs, [e[0] if sq else e for e, sq in zip(exits, squeeze)]
        return outs

    def _restore_inputs(self, img) -> tuple[list[torch.Tensor], bool]:
        """The input tensors as a list of 4-D tensors, and whether a list came in."""
        if isinstance(img, torch.Tensor):
            check_image("img", img, self.in_channels)
            return [img], False
        if not isinstance(img, (list, tuple)) or not img:
            raise TypeError("img must be a tensor [N, C, H, W] or a non-empty list of "
                            f"[C, H, W] / [n, C, H, W] tensors, got {type(img).__name__}")
        entries = []
        for i, t in enumerate(img):
            t = t.unsqueeze(0) if isinstance(t, torch.Tensor) and t.dim() == 3 else t
            check_image(f"img[{i}]", t, self.in_channels)
            if entries and t.device != entries[0].device:
                raise ValueError(f"img[{i}] must be on device {entries[0].device} (that of "
                                 f"img[0]), got {t.device}")
            entries.append(t)
        return entries, True

    def _restore_batched(self, entries, tile, overlap, depth_of_class, blend):
        """One ragged pass over all images: see ``restorenet.ops.tiles``."""
        xs = [reflect_pad_to_multiple(e, self.size_multiple) for e in entries]
        # Tiles run as one batch only if they share a shape: group the tensors by the
        # tile they get (clamped on small images). Usually there is one group.
        groups: dict[tuple, list[int]] = {}
        for i, x in enumerate(xs):
            groups.setdefault(_tile_shape(x, tile, overlap), []).append(i)
        groups = list(groups.items())
        plans = [tile_plan([xs[i] for i in members], th_tw, ov, multiple=self.size_multiple)
                 for (th_tw, ov), members in groups]
        feats = [self.encode(x) for x in xs]

        depths = []
        for plan, (_, members) in zip(plans, groups):
            e3_tiles = tile_gather([feats[i][3] for i in members], plan, scale=2 ** 3)
            depths.append(depth_of_class[self.classifier(e3_tiles).argmax(dim=1)])
        schedules = tile_schedule(depths, self.num_decoders)  # the one device-to-host copy

        outs, exits = [None] * len(xs), [None] * len(xs)
        for plan, schedule, depth, (_, members) in zip(plans, schedules, depths, groups):
            residual = self._run_columns([feats[i] for i in members], plan, schedule)
            blended = tile_blend(residual, plan, schedule.order, ramp=blend, overlap=overlap)
            for i, out, exit_depth in zip(members, blended, plan.unflatten(depth)):
                h, w = entries[i].shape[-2:]
                outs[i], exits[i] = (out + xs[i])[..., :h, :w], exit_depth
        return outs, exits

    def _run_columns(self, feats, plan, schedule) -> torch.Tensor:
        """Head outputs [T, 3, th, tw] in depth-sorted order; column k runs exactly on the
        ``schedule.active[k]`` tiles still in, the first ones: slices, no gathers."""
        levels = [tile_gather([f[lvl] for f in feats], plan, schedule.order, scale=2 ** lvl)
                  for lvl in range(NUM_LEVELS + 1)]
        x_t, states = levels[4], (levels[3], levels[2], levels[1], levels[0])
        residual = x_t.new_empty(plan.num_tiles, self.in_channels, *plan.tile)
        for k, (column, head) in enumerate(zip(self.decoder.columns, self.heads)):
            active = schedule.active[k]
            if active == 0:
                break
            states = column(x_t[:active], [s[:active] for s in states])
            leaving = schedule.exiting(k)  # the last of the active ones
            if leaving.start < leaving.stop:
                residual[leaving] = head(states[-1][leaving])
        return residual

    def _restore_plain(self, entries, tile, overlap, depth_of_class, blend):
        results = [self._restore_plain_one(x, tile, overlap, depth_of_class, blend) for x in entries]
        return [r[0] for r in results], [r[1] for r in results]

    def _restore_plain_one(self, img, tile, overlap, depth_of_class, blend):
        """The authors' way, one batch of same-size images: gather the tiles still in
        at every column (a host sync each time)."""
        n, (h, w) = img.shape[0], img.shape[-2:]
        x = reflect_pad_to_multiple(img, self.size_multiple)
        hp, wp = x.shape[-2:]
        th, tw = min(tile, hp), min(tile, wp)
        ys, xs = _tile_starts(hp, th, overlap), _tile_starts(wp, tw, overlap)
        feats = self.encode(x)
        tiles = [_cut_tiles(f, 2**lvl, ys, xs, th, tw) for lvl, f in enumerate(feats)]
        x_t, states = tiles[4], [tiles[3], tiles[2], tiles[1], tiles[0]]

        depth = depth_of_class[self.classifier(tiles[3]).argmax(dim=1)]
        residual = x.new_zeros(depth.numel(), self.in_channels, th, tw)
        alive = torch.arange(depth.numel(), device=img.device)
        for k in range(int(depth.max())):
            keep = depth[alive] > k  # tiles that still run column k
            alive, x_t, states = alive[keep], x_t[keep], [s[keep] for s in states]
            states = self.decoder.columns[k](x_t, states)
            done = depth[alive] == k + 1
            residual[alive[done]] = self.heads[k](states[-1][done])

        out = _blend_tiles(residual.view(n, len(ys) * len(xs), -1, th, tw), ys, xs, hp, wp, blend, overlap)
        return (out + x)[..., :h, :w], depth.view(n, len(ys), len(xs))

    # -- argument checks

    def _check_tiling(self, tile, overlap) -> None:
        m = self.size_multiple
        for name, v in (("tile", tile), ("overlap", overlap)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v % m:
                raise ValueError(f"{name} must be a non-negative multiple of {m}, got {v!r}")
        if tile <= overlap:
            raise ValueError(f"tile must be larger than overlap, got tile={tile}, "
                             f"overlap={overlap}")

    def _check_exit_idx(self, exit_idx) -> tuple[int, ...]:
        k = self.num_decoders
        if exit_idx is None:
            return DEFAULT_EXIT_IDX.get(k, (k,) * NUM_CLASSES)
        try:
            values = tuple(operator.index(v) for v in exit_idx)
        except TypeError:
            raise TypeError(f"exit_idx must be a sequence of {NUM_CLASSES} ints, "
                            f"got {exit_idx!r}") from None
        if len(values) != NUM_CLASSES or any(not 1 <= v <= k for v in values):
            raise ValueError(f"exit_idx must hold {NUM_CLASSES} ints in 1..{k} (columns "
                             f"run per class), got {exit_idx!r}")
        return values


# ------------------------------------------------------------------ tiling helpers


def _tile_shape(x: torch.Tensor, tile: int, overlap: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(tile, overlap) per dimension for a padded image: the tile clamped to the image.
    A clamped dimension holds one tile, so its overlap means nothing: 0 (it could be
    larger than the clamped tile). Images with the same tile share one plan."""
    th, tw = min(tile, x.shape[-2]), min(tile, x.shape[-1])
    return (th, tw), (overlap if th == tile else 0, overlap if tw == tile else 0)


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles stepping by tile - overlap; the last one shifted inward to end at length."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile - overlap))
    return starts + [length - tile]


def _cut_tiles(feat: torch.Tensor, scale: int, ys, xs, th: int, tw: int) -> torch.Tensor:
    """[N, C, H/s, W/s] -> [N * n_tiles, C, th/s, tw/s], tiles of one image consecutive."""
    th, tw = th // scale, tw // scale
    crops = [feat[:, :, y // scale:y // scale + th, x // scale:x // scale + tw]
             for y in ys for x in xs]
    return torch.stack(crops, dim=1).flatten(0, 1)


def _blend_tiles(tiles: torch.Tensor, ys, xs, hp: int, wp: int, blend: str = "normalized",
                 overlap: int = 0) -> torch.Tensor:
    """[N, n_tiles, C, th, tw] tiles on the [N, C, hp, wp] canvas: the weighted average
    (``"normalized"``) or the released weighted sum (``"released"``), see ``restore``."""
    n, _, c, th, tw = tiles.shape
    normalized = blend == "normalized"
    acc = tiles.new_zeros(n, c, hp, wp)
    weight_sum = tiles.new_zeros(1, 1, hp, wp) if normalized else None
    ry = axis_ramps(ys, th, hp, blend, overlap, tiles.dtype)
    rx = axis_ramps(xs, tw, wp, blend, overlap, tiles.dtype)
    t = 0
    for y, wy in zip(ys, ry):
        for x, wx in zip(xs, rx):
            wgt = (wy[:, None] * wx[None, :]).to(tiles.device)
            acc[:, :, y:y + th, x:x + tw] += tiles[:, t] * wgt
            if normalized:
                weight_sum[:, :, y:y + th, x:x + tw] += wgt
            t += 1
    return acc / weight_sum if normalized else acc


@register_model("adarevd")
def adarevd(**cfg) -> AdaRevD:
    """AdaRevD-B: UFPNet encoder width 64 ([1,1,1,28] + 1 middle), K = 4 columns:
    152,449,386 parameters (``encoder="nafnet"``: 141,037,848)."""
    return AdaRevD(**cfg)
