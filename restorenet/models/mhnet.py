"""MHNet: Mixed Hierarchy Network for image restoration (deblurring, deraining).

Two stages, as in the paper's figure::

    stage 1 (context):  img -> conv3x3 -> [NAFBlocks -> down] x 4
                            -> top-k masked channel attention (middle block)
                            -> [up -> + enc skip -> NAFBlocks] x 4
        taps: encoder features e_0..e_3 (w*2^i @ H/2^i)
              decoder features d_3..d_0 (the same shapes, coarsest first)

    stage 2 (full resolution detail):
        x = conv1x1_{w<-2w}( concat(conv3x3(img), d_0) )
        for level i = 0..3:
            x = LN_i(x)
            x = CABG_i(x) + x                          # CABG = 8 NAFBlocks
            x = AFFM_i(x, conv1x1_i(up^i(e_i)), conv1x1(up^i(d_i)))   # one shared d conv
        out = conv3x3_{3<-w}(x) + img

    up^i = i times (conv1x1_{c->2c} + PixelShuffle(2)): brings a level-i tap
           (w*2^i channels at H/2^i) to w channels at full resolution.

Top-k masked channel attention (the middle block, 8 heads)::

    q, k, v = split(dw3x3(conv1x1_{3C<-C}(x)))          # per head: (C/h) x HW
    q, k    = q / |q|, k / |k|                          # L2 over pixels
    A       = q k^T * temperature_head                  # (C/h) x (C/h)
    A_j     = A where among the top k_j of its row, else -inf,
              k_j = floor(C/h * r_j), r = (1/2, 2/3, 3/4, 4/5)
    out     = conv1x1( sum_j w_j softmax(A_j) v ),        w_j init 0.2

AFFM (adaptive feature fusion)::

    U = f + f_e + f_d
    z = SG(conv1x1_{8<-w}(avgpool(U)))                  # 4 channels
    a, a_e, a_d = softmax_C(conv1x1_{w<-4}(z)) (three convs)
    out = a*f + a_e*f_e + a_d*f_d

Faithful to the authors' released code (github.com/Tombs98/MHNet, top-level
``MHNet.py``; its deblurring checkpoint ``model_best.pth`` loads with
``restorenet.weights.from_released("mhnet", ...)``). What that code computes, and
where restorenet differs:

* Stage 1 is NAFNet-width64 (encoder [1,1,1,28], decoder [1,1,1,1]) with its
  middle NAFBlock replaced by one *bare* attention block: no norm, no residual.
* Stage 2, level i: ``x = LN_i(x); x = CABG_i(x) + x`` -- the residual adds the
  *normalised* x, as released (``stage2_residual="normalized"``, the default).
  ``stage2_residual="input"`` adds the un-normalised x (a pre-norm residual, the
  reading of the paper's figure restorenet used before; not the released model).
* The decoder taps: the released forward projects all four with one conv
  (``conv_dnc1``; ``conv_dnc2..4`` exist but are never used). That is the default,
  ``decoder_tap_convs="shared"``: one ``proj_dec`` conv. ``"per_level"`` gives every
  level its own conv (the paper's figure); converted released weights then copy
  ``conv_dnc1`` into all four, which computes the released output.
* Parameters the released model holds but its forward never uses, so restorenet
  does not build them (the converter drops them by name): ``intro`` (a conv3x3
  whose output is discarded: 1,728), stage 1's ``ending`` (computed, discarded:
  1,731) and ``conv_dnc2..4`` (3 x 4,096). Released total 67,543,311; ours
  67,527,564 = released - 15,747 (``per_level``: 67,539,852).
* The released forward neither pads nor crops (sizes must be multiples of 16 there);
  restorenet zero-pads to a multiple of 16 and crops back, identical on such sizes.
* The top-k counts are ``int(C/h * r)`` as released, but at least 1 (the released
  code would softmax an all ``-inf`` row at C/h = 1; never at the paper's sizes).
* Convs outside the NAFBlocks have no bias (as released); stage 1's intro conv and
  the NAFBlocks keep theirs (NAFNet). LayerNorm2d eps 1e-6 (NAFNet's).
* The four softmax-weighted outputs are summed *before* multiplying by v
  (``(sum_j w_j P_j) v`` = ``sum_j w_j (P_j v)``): one matmul instead of four. The
  released ``attn1..attn4`` scalars are our ``mix_weights`` vector.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from restorenet._checks import check_choice, check_image, check_int, check_int_sequence
from restorenet.models.blocks import LayerNorm2d, SimpleGate, pad_to_multiple, upsample
from restorenet.models.nafnet import NAFNetDecoder, NAFNetEncoder, naf_stage
from restorenet.registry import register_model

TOPK_RATIOS = (Fraction(1, 2), Fraction(2, 3), Fraction(3, 4), Fraction(4, 5))


class TopKChannelAttention(nn.Module):
    """Multi-head "transposed" attention over channels with top-k row masks.

    The attention map is (C/heads x C/heads) per head, so the cost is linear in
    the number of pixels. Each of the ``len(topk_ratios)`` masked copies keeps
    only the strongest ``floor(C/heads * r)`` entries of every row; their
    softmaxes are mixed with learnable weights (init 0.2) so the network can
    choose how sparse the channel mixing should be.
    """

    def __init__(self, channels: int, heads: int = 8,
                 topk_ratios: Sequence[float | Fraction] = TOPK_RATIOS, bias: bool = False):
        super().__init__()
        check_int("channels", channels, 1)
        if check_int("heads", heads, 1) > channels or channels % heads:
            raise ValueError(f"heads must divide channels, got heads={heads}, channels={channels}")
        self.heads = heads
        head_dim = channels // heads
        # Fractions so that e.g. 30 * 2/3 is exactly 20, not 19.999... -> 19.
        self.topk = [max(1, math.floor(head_dim * Fraction(r).limit_denominator(1000)))
                     for r in topk_ratios]
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(channels, 3 * channels, 1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(3 * channels, 3 * channels, 3, padding=1,
                                    groups=3 * channels, bias=bias)
        self.mix_weights = nn.Parameter(torch.full((len(self.topk),), 0.2))
        self.project_out = nn.Conv2d(channels, channels, 1, bias=bias)

    def topk_masks(self, attn: torch.Tensor) -> list[torch.Tensor]:
        """Boolean masks, one per ratio: True at the top ``k_j`` entries of each row.

        One ``topk`` with the largest k gives every mask: its indices come sorted
        by value, so the first ``k_j`` of them are the top ``k_j``.
        """
        order = attn.topk(max(self.topk), dim=-1).indices
        masks = []
        for k in self.topk:
            mask = torch.zeros_like(attn, dtype=torch.bool)
            masks.append(mask.scatter_(-1, order[..., :k], True))
        return masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        q, k, v = (t.reshape(n, self.heads, c // self.heads, h * w) for t in (q, k, v))
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.temperature
        probs = sum(wj * attn.masked_fill(~mask, float("-inf")).softmax(dim=-1)
                    for wj, mask in zip(self.mix_weights, self.topk_masks(attn)))
        out = (probs @ v).reshape(n, c, h, w)
        return self.project_out(out)


class AFFM(nn.Module):
    """Adaptive feature fusion: per-channel softmax weights over three inputs.

    U = f + f_e + f_d;  z = SG(conv1x1(avgpool U));
    a_* = softmax over channels of conv1x1_*(z);  out = sum a_* f_*.
    """

    def __init__(self, channels: int, reduction: int = 8, bias: bool = False):
        super().__init__()
        check_int("channels", channels, 1)
        check_int("reduction", reduction, 1)
        # Even, for the SimpleGate that halves it: channels // reduction rounded down to
        # even (the same value wherever that is already even, e.g. 8 at width 64; an odd
        # one, e.g. width 40 -> 5, could only fail in forward).
        squeeze = max(2 * (channels // (2 * reduction)), 4)
        self.squeeze = nn.Sequential(nn.Conv2d(channels, squeeze, 1, bias=bias), SimpleGate())
        self.weights = nn.ModuleList(
            [nn.Conv2d(squeeze // 2, channels, 1, bias=bias) for _ in range(3)])

    def forward(self, f: torch.Tensor, f_enc: torch.Tensor, f_dec: torch.Tensor) -> torch.Tensor:
        z = self.squeeze(F.adaptive_avg_pool2d(f + f_enc + f_dec, 1))
        a, a_enc, a_dec = (conv(z).softmax(dim=1) for conv in self.weights)
        return a * f + a_enc * f_enc + a_dec * f_dec


def tap_upsampler(channels: int, times: int) -> nn.Module:
    """``times`` steps of (conv1x1 c->2c + PS2): w*2^times channels -> w, x2^times size."""
    steps = [upsample(channels // 2**i) for i in range(times)]
    return nn.Sequential(*steps) if steps else nn.Identity()


class ContextUNet(nn.Module):
    """Stage 1: NAFNet U-Net with the top-k attention as its middle block.

    ``forward`` returns ``(encoder_taps, decoder_taps)``: both lists are indexed
    by level (0 = full resolution), level i has ``width * 2**i`` channels.
    """

    def __init__(self, in_channels: int, width: int, enc_blocks: Sequence[int],
                 dec_blocks: Sequence[int], heads: int):
        super().__init__()
        # NAFNet's halves, with the middle NAFBlocks replaced by the attention.
        self.encoder = NAFNetEncoder(in_channels, width, enc_blocks, middle_blocks=0)
        self.middle = TopKChannelAttention(width * 2 ** len(enc_blocks), heads)
        self.decoder = NAFNetDecoder(width, dec_blocks)

    def forward(self, img: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        feats = self.encoder(img)
        enc = feats[:-1]
        dec = self.decoder.levels(enc + [self.middle(feats[-1])])
        return enc, dec


STAGE2_RESIDUALS = ("normalized", "input")
DECODER_TAP_CONVS = ("shared", "per_level")


class DetailStage(nn.Module):
    """Stage 2: full-resolution CABG groups, each followed by an AFFM with taps.

    ``residual``: what each group's residual adds, the normalised x (released) or
    the group's input; ``decoder_tap_convs``: one decoder-tap projection for all
    levels (released) or one per level (see the module docstring)."""

    def __init__(self, in_channels: int, width: int, levels: int, cabg_blocks: int,
                 residual: str = "normalized", decoder_tap_convs: str = "shared"):
        super().__init__()
        self.residual = check_choice("stage2_residual", residual, STAGE2_RESIDUALS)
        check_choice("decoder_tap_convs", decoder_tap_convs, DECODER_TAP_CONVS)
        dec_convs = levels if decoder_tap_convs == "per_level" else 1
        self.intro = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.fuse_stage1 = nn.Conv2d(2 * width, width, 1, bias=False)
        self.norms = nn.ModuleList([LayerNorm2d(width) for _ in range(levels)])
        self.cabgs = nn.ModuleList([naf_stage(width, cabg_blocks) for _ in range(levels)])
        self.up_enc = nn.ModuleList([tap_upsampler(width * 2**i, i) for i in range(levels)])
        self.up_dec = nn.ModuleList([tap_upsampler(width * 2**i, i) for i in range(levels)])
        self.proj_enc = nn.ModuleList([nn.Conv2d(width, width, 1, bias=False) for _ in range(levels)])
        self.proj_dec = nn.ModuleList([nn.Conv2d(width, width, 1, bias=False) for _ in range(dec_convs)])
        self.affms = nn.ModuleList([AFFM(width) for _ in range(levels)])

    def forward(self, img: torch.Tensor, enc: list[torch.Tensor],
                dec: list[torch.Tensor]) -> torch.Tensor:
        x = self.fuse_stage1(torch.cat([self.intro(img), dec[0]], dim=1))
        for i, (norm, cabg, affm) in enumerate(zip(self.norms, self.cabgs, self.affms)):
            normed = norm(x)
            x = cabg(normed) + (normed if self.residual == "normalized" else x)
            f_enc = self.proj_enc[i](self.up_enc[i](enc[i]))
            f_dec = self.proj_dec[min(i, len(self.proj_dec) - 1)](self.up_dec[i](dec[i]))
            x = affm(x, f_enc, f_dec)
        return x


class MHNet(nn.Module):
    """Mixed hierarchy network: context U-Net (stage 1) + full-res detail stage 2."""

    def __init__(self, in_channels: int = 3, width: int = 64,
                 enc_blocks: Sequence[int] = (1, 1, 1, 28),
                 dec_blocks: Sequence[int] = (1, 1, 1, 1),
                 heads: int = 8, cabg_blocks: int = 8, stage2_residual: str = "normalized",
                 decoder_tap_convs: str = "shared"):
        super().__init__()
        check_int("in_channels", in_channels, 1)
        check_int("width", width, 1)
        # At least one level: stage 2 fuses the finest decoder tap.
        enc_blocks = check_int_sequence("enc_blocks", enc_blocks, 0, min_length=1)
        dec_blocks = check_int_sequence("dec_blocks", dec_blocks, 0)
        if len(enc_blocks) != len(dec_blocks):
            raise ValueError(f"enc_blocks and dec_blocks must have the same length, "
                             f"got {len(enc_blocks)} and {len(dec_blocks)}")
        check_int("cabg_blocks", cabg_blocks, 0)
        bottom = width * 2 ** len(enc_blocks)
        if check_int("heads", heads, 1) > bottom or bottom % heads:
            raise ValueError(f"heads must divide the attention's channels width * 2**len(enc_blocks) "
                             f"= {bottom}, got {heads}")
        self.in_channels = in_channels
        self.size_multiple = 2 ** len(enc_blocks)
        self.stage1 = ContextUNet(in_channels, width, enc_blocks, dec_blocks, heads)
        self.stage2 = DetailStage(in_channels, width, len(enc_blocks), cabg_blocks,
                                  stage2_residual, decoder_tap_convs)
        self.ending = nn.Conv2d(width, in_channels, 3, padding=1, bias=False)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        check_image("img", img, self.in_channels)
        h, w = img.shape[-2:]
        x = pad_to_multiple(img, self.size_multiple)
        enc, dec = self.stage1(x)
        out = self.ending(self.stage2(x, enc, dec)) + x
        return out[..., :h, :w]


@register_model("mhnet")
def mhnet(**cfg) -> MHNet:
    """MHNet at paper size: width 64, encoder [1,1,1,28], 8-head top-k attention,
    4 CABGs of 8 NAFBlocks: 67,527,564 parameters (the released 67,543,311 less the
    15,747 its forward never uses; see the module docstring)."""
    return MHNet(**cfg)
