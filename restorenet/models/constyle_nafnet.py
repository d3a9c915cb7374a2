"""ConStyle-NAFNet (IRConStyle): a NAFNet U-Net steered by a contrastive style encoder.

ConStyle encoder (no conv bias, LeakyReLU 0.1)::

    img -> [conv3x3 16, conv3x3 16, conv3x3/2 32]   -> f1: 32 @ H/2
        -> [conv3x3 32, conv3x3/2 64]               -> f2: 64 @ H/4
        -> [conv3x3 128, conv3x3/2 128]             -> f3: 128 @ H/8
        -> [conv3x3 256, conv3x3/2 256]             -> f4: 256 @ H/16
        -> avgpool -> Linear 256->128 + BN + GELU -> Linear 128->128 + BN + GELU = q

Restoration U-Net, width w = 48 (levels carry w, 2w, 3w channels, the bottom 4w)::

    x_1 = NAF^7( conv3x3_{w<-3}(img) )                                   w   @ H
    x_2 = NAF^8( [down(x_1), inject_1(f1)] )        down: w -> w,   + w = 2w  @ H/2
    x_3 = NAF^9( [down(x_2), inject_2(f2)] )        2w -> 2w,  + w = 3w  @ H/4
    b   = NAF^9( [down(x_3), inject_3(f3)] )        3w -> 3w,  + w = 4w  @ H/8
    b'  = conv1x1_{3w<-8w}( [b, b * Linear_{4w<-128}(q)] )   multiplicative modulation
    y_3 = NAF^9( up(b',  x_3) )   3w up, + 3w skip, conv1x1 -> 4w
    y_2 = NAF^8( up(y_3, x_2) )   4w up, + 2w skip, conv1x1 -> 3w
    y_1 = NAF^7( up(y_2, x_1) )   3w up, + w  skip, conv1x1 -> 2w
    out = conv3x3_{3<-2w}(y_1) + img

    down(c):    conv3x3_{c/4<-c} + PixelUnshuffle(2)  (c/4 * 4 = c channels, half size)
    up(c, s):   conv3x3_{4c<-c} + PixelShuffle(2), concat the skip (s channels), conv1x1
    inject_i:   conv1x1_{w<-C_i} + LeakyReLU(0.1)  (no bias)

How the channel counts work: PixelUnshuffle keeps the channel count of the
level it leaves (the conv first divides by 4), and the concatenated style
feature adds w, so the encoder grows by w per level (w, 2w, 3w, 4w) instead of
doubling. The decoder mirrors the concat: the up-sampled map keeps its width,
the skip is concatenated and a conv1x1 picks the next width (4w, 3w, 2w), so
each decoder level is one w wider than its encoder partner. With w = 48 this is
12.74 M parameters including the ConStyle (query) encoder, the paper's 12.7 M.
Convs outside the NAFBlocks have no bias; the latent Linear has one.

Training (two phases, as in the paper):

1. Train the whole model plus :class:`ConStyleMoCoLoss` (InfoNCE + content +
   style on the style encoder), added to the restoration loss::

       restored, style = model(lq, return_style=True)
       parts = moco(clean=gt, query=style)
       (l1(restored, gt) + parts["loss"]).backward()

2. ``model.freeze_style_encoder()`` and train on the restoration loss alone. As
   released, the frozen encoder's BatchNorm layers still follow the model's
   train/eval mode (in training they normalise with batch statistics and keep
   updating their running statistics: the released phase 2 only stops the
   gradients); ``freeze_style_encoder(batch_norm="frozen")`` keeps them in eval
   mode instead (restorenet's earlier choice; it also lets batch 1 train).

Faithful to the released code (github.com/Dongqi-Fan/IRConStyle:
``archs/ConStyle_NAFNet_arch.py``, ``archs/ConStyle_arch.py``,
``models/ConStyle_model.py``, ``losses/basic_loss.py``; the weights load with
``restorenet.weights.from_released("constyle_nafnet", ...)``). The released forward
does not pad (sizes must be multiples of 8); restorenet zero-pads to a multiple of 8
and crops back, identical on such sizes. Parameters 12,739,872 = the released
inference model (the training-only key encoder and queue live in the loss here).

``ConStyleMoCoLoss`` follows the released training code by default
(``variant="released"``). The momentum (key) encoder is a copy of the style encoder
updated by EMA (m = 0.999) before each step and never gets gradients; it sees the
clean image while the query encoder sees the degraded one. With ``q``, ``h`` the
query encoder's latent and first-MLP output (raw: no L2 normalisation), ``k`` the
key latent and ``Q`` the queue (65,760 entries, initialised N(0, 1))::

    infonce = CE([q.k, q Q^T] / T, label 0)
    content = MSE(q, k)
    style   = -MSE(h h^T / n, A A^T / n) - MSE(q q^T / n, B B^T / n),   n = N * D
    then q (the *query* latents) replaces the B rows of the queue

where B are the batch-size queue rows at the pointer (the ones overwritten) and A
the rows right after them: the style term pushes the batch's similarity structure
*away* from that of queued latents. The released code requires the queue size to
be a multiple of the batch size; here the pointer wraps, which is the same
whenever it is.

``variant="normalized"`` is restorenet's earlier MoCo-style reading of the paper:
InfoNCE on L2-normalised latents (with raw BN+GELU latents a temperature of 0.07
gives logits in the hundreds), a queue of normalised *keys*, and a style term
matching Gram matrices (C x C, normalised by H*W) of the query encoder's four
feature maps to the key encoder's on the clean image,
sum_l MSE(G(f_l(lq)), G(f_l^key(gt))). Not the released objective.
"""
from __future__ import annotations

import copy
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from restorenet._checks import (check_choice, check_image, check_int, check_int_sequence,
                                check_positive_float)
from restorenet.models.blocks import pad_to_multiple
from restorenet.models.nafnet import naf_stage
from restorenet.registry import register_model

STYLE_CHANNELS = (32, 64, 128, 256)  # ConStyle encoder features at H/2 .. H/16
# Inputs are zero-padded to a multiple of 8 (the U-Net's three downsamples; the
# released code takes such sizes as they are, its style encoder rounds H/16 up),
# by the model and by the loss alike, so both see the same image for a given input.
SIZE_MULTIPLE = 8
MOCO_VARIANTS = ("released", "normalized")
FROZEN_BATCH_NORM = ("follow", "frozen")


class StyleCode(NamedTuple):
    """ConStyle encoder output: the latent ``q`` [N, D], feature maps f1..f4 and the
    first MLP layer's output [N, D] (the released style loss uses it)."""

    latent: torch.Tensor
    features: list[torch.Tensor]
    hidden: torch.Tensor


def conv_lrelu(in_channels: int, out_channels: int, kernel_size: int = 3,
               stride: int = 1) -> nn.Sequential:
    """conv (no bias) + LeakyReLU(0.1): the ConStyle encoder's unit."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                  padding=kernel_size // 2, bias=False),
        nn.LeakyReLU(0.1))


def linear_bn_gelu(in_features: int, out_features: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, out_features),
                         nn.BatchNorm1d(out_features), nn.GELU())


class ConStyleEncoder(nn.Module):
    """Small CNN giving the degradation "style" latent q and four feature maps."""

    def __init__(self, in_channels: int = 3, latent_dim: int = 128):
        super().__init__()
        check_int("in_channels", in_channels, 1)
        check_int("latent_dim", latent_dim, 1)
        self.in_channels = in_channels
        self.latent_dim = latent_dim
        c1, c2, c3, c4 = STYLE_CHANNELS
        self.stages = nn.ModuleList([
            nn.Sequential(conv_lrelu(in_channels, 16), conv_lrelu(16, 16), conv_lrelu(16, c1, stride=2)),
            nn.Sequential(conv_lrelu(c1, c1), conv_lrelu(c1, c2, stride=2)),
            nn.Sequential(conv_lrelu(c2, c3), conv_lrelu(c3, c3, stride=2)),
            nn.Sequential(conv_lrelu(c3, c4), conv_lrelu(c4, c4, stride=2)),
        ])
        self.mlp = nn.Sequential(linear_bn_gelu(c4, latent_dim),
                                 linear_bn_gelu(latent_dim, latent_dim))

    def forward(self, img: torch.Tensor) -> StyleCode:
        check_image("img", img, self.in_channels)
        if self.training and img.shape[0] < 2:
            # BatchNorm1d cannot take batch statistics of a single sample.
            raise ValueError(f"img must hold at least 2 images while the ConStyle encoder "
                             f"trains (BatchNorm1d), got shape {tuple(img.shape)}; use "
                             f"eval() or freeze_style_encoder() for batch 1")
        feats = []
        x = img
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        hidden = self.mlp[0](x.mean(dim=(2, 3)))
        return StyleCode(self.mlp[1](hidden), feats, hidden)


class UnshuffleDown(nn.Module):
    """conv3x3 c -> c/4 then PixelUnshuffle(2): half the size, same channels."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels // 4, 3, padding=1, bias=False),
                                  nn.PixelUnshuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ShuffleUpFuse(nn.Module):
    """conv3x3 c -> 4c + PixelShuffle(2), concat the skip, conv1x1 to ``out_channels``."""

    def __init__(self, channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.Sequential(nn.Conv2d(channels, 4 * channels, 3, padding=1, bias=False),
                                nn.PixelShuffle(2))
        self.fuse = nn.Conv2d(channels + skip_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([self.up(x), skip], dim=1))


class StyleModulation(nn.Module):
    """b' = conv1x1(concat(b, b * Linear(q))): the latent rescales every channel."""

    def __init__(self, channels: int, out_channels: int, latent_dim: int):
        super().__init__()
        self.to_scale = nn.Linear(latent_dim, channels)
        self.fuse = nn.Conv2d(2 * channels, out_channels, 1, bias=False)

    def forward(self, b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        scale = self.to_scale(q)[:, :, None, None]
        return self.fuse(torch.cat([b, b * scale], dim=1))


class ConStyleNAFNet(nn.Module):
    """NAFNet U-Net (3 levels + bottom) with ConStyle features and latent injected."""

    def __init__(self, in_channels: int = 3, width: int = 48,
                 enc_blocks: Sequence[int] = (7, 8, 9), middle_blocks: int = 9,
                 dec_blocks: Sequence[int] = (9, 8, 7), latent_dim: int = 128):
        super().__init__()
        if check_int("width", width, 4) % 4:
            raise ValueError(f"width must be a positive multiple of 4 "
                             f"(PixelUnshuffle after a conv c -> c/4), got {width}")
        levels = len(STYLE_CHANNELS) - 1  # one injected style feature per downsample
        enc_blocks = check_int_sequence("enc_blocks", enc_blocks, 0, length=levels)
        dec_blocks = check_int_sequence("dec_blocks", dec_blocks, 0, length=levels)
        check_int("middle_blocks", middle_blocks, 0)
        self.in_channels = in_channels
        self.style_frozen = self.style_bn_frozen = False
        self.style_encoder = ConStyleEncoder(in_channels, latent_dim)

        w = width
        enc_ch = [w * (i + 1) for i in range(levels)]          # w, 2w, 3w
        bottom_ch = w * (levels + 1)                             # 4w
        self.intro = nn.Conv2d(in_channels, w, 3, padding=1, bias=False)
        self.enc_stages = nn.ModuleList([naf_stage(c, n) for c, n in zip(enc_ch, enc_blocks)])
        self.downs = nn.ModuleList([UnshuffleDown(c) for c in enc_ch])
        self.injects = nn.ModuleList([conv_lrelu(c, w, kernel_size=1) for c in STYLE_CHANNELS[:levels]])
        self.middle = naf_stage(bottom_ch, middle_blocks)
        self.modulation = StyleModulation(bottom_ch, enc_ch[-1], latent_dim)

        self.ups = nn.ModuleList()
        self.dec_stages = nn.ModuleList()
        c = enc_ch[-1]
        for skip, n in zip(reversed(enc_ch), dec_blocks):
            out = skip + w                                        # 4w, 3w, 2w
            self.ups.append(ShuffleUpFuse(c, skip, out))
            self.dec_stages.append(naf_stage(out, n))
            c = out
        self.ending = nn.Conv2d(c, in_channels, 3, padding=1, bias=False)
        self.size_multiple = SIZE_MULTIPLE

    # ---- two-phase training -------------------------------------------------------------
    def freeze_style_encoder(self, frozen: bool = True, batch_norm: str = "follow") -> "ConStyleNAFNet":
        """Phase 2: stop training the style encoder (no grads). ``batch_norm="follow"``
        (released): its BatchNorm keeps following the model's train/eval mode;
        ``"frozen"``: it stays in eval mode (running statistics, frozen)."""
        check_choice("batch_norm", batch_norm, FROZEN_BATCH_NORM)
        self.style_frozen = frozen
        self.style_bn_frozen = frozen and batch_norm == "frozen"
        for p in self.style_encoder.parameters():
            p.requires_grad_(not frozen)
        self.style_encoder.train(self.training and not self.style_bn_frozen)
        return self

    def train(self, mode: bool = True) -> "ConStyleNAFNet":
        super().train(mode)
        if self.style_bn_frozen:
            self.style_encoder.eval()  # frozen BatchNorm statistics stay frozen
        return self

    # ---- forward ----------------------------------------------------------------------
    def encode_style(self, img: torch.Tensor) -> StyleCode:
        if self.style_frozen:
            with torch.no_grad():
                return self.style_encoder(img)
        return self.style_encoder(img)

    def forward(self, img: torch.Tensor, return_style: bool = False):
        """Restore ``img`` [N, C, H, W]; with ``return_style`` also return the StyleCode
        (computed on the padded image) for :class:`ConStyleMoCoLoss`."""
        check_image("img", img, self.in_channels)
        h, w = img.shape[-2:]
        x = pad_to_multiple(img, self.size_multiple)
        style = self.encode_style(x)

        skips = []
        t = self.intro(x)
        for stage, down, inject, f in zip(self.enc_stages, self.downs, self.injects, style.features):
            t = stage(t)
            skips.append(t)
            t = torch.cat([down(t), inject(f)], dim=1)
        t = self.modulation(self.middle(t), style.latent)
        for up, stage, skip in zip(self.ups, self.dec_stages, reversed(skips)):
            t = stage(up(t, skip))
        out = (self.ending(t) + x)[..., :h, :w]
        return (out, style) if return_style else out


def gram_matrix(feat: torch.Tensor) -> torch.Tensor:
    """G = F F^T / (H W) for F = feat as [N, C, HW]: channel co-activations per pixel.

    Dividing by the pixel count only (not also by C, as Gatys et al. do) keeps
    each entry a mean product, so the MSE between Gram matrices has the same
    scale at every encoder level.
    """
    n, c, h, w = feat.shape
    f = feat.reshape(n, c, h * w)
    return f @ f.transpose(1, 2) / (h * w)


class ConStyleMoCoLoss(nn.Module):
    """MoCo objective for the ConStyle encoder: InfoNCE + content + style
    (``variant``: ``"released"`` or ``"normalized"``, see the module docstring).

    ``forward(clean, degraded=None, query=None)``: the query encoder's output on
    the degraded image (``query``, e.g. from ``model(lq, return_style=True)``,
    or computed here from ``degraded``) against the momentum encoder on the
    clean image. Returns a dict with ``loss`` (weighted total), ``infonce``,
    ``content`` and ``style``. Each call first moves the key encoder toward the
    query encoder (EMA), then enqueues this batch's query latents (``"released"``)
    or normalised keys (``"normalized"``).
    """

    def __init__(self, encoder: ConStyleEncoder, queue_size: int = 65760,
                 momentum: float = 0.999, temperature: float = 0.07,
                 infonce_weight: float = 1.0, content_weight: float = 1.0,
                 style_weight: float = 1.0, variant: str = "released"):
        super().__init__()
        self.variant = check_choice("variant", variant, MOCO_VARIANTS)
        if not isinstance(encoder, ConStyleEncoder):
            raise TypeError(f"encoder must be a ConStyleEncoder, got {type(encoder).__name__}")
        check_int("queue_size", queue_size, 1)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
        check_positive_float("temperature", temperature)
        # Held in a tuple so it is not registered as a submodule: the query
        # encoder belongs to the model, and must not appear twice in optimisers
        # or state dicts.
        self._query = (encoder,)
        self.key_encoder = copy.deepcopy(encoder)
        for p in self.key_encoder.parameters():
            p.requires_grad_(False)
        self.momentum = momentum
        self.temperature = temperature
        self.weights = {"infonce": infonce_weight, "content": content_weight, "style": style_weight}
        dim = encoder.latent_dim
        queue = torch.randn(queue_size, dim)  # one latent per row (the released: per column)
        self.register_buffer("queue", queue if variant == "released" else F.normalize(queue, dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @property
    def query_encoder(self) -> ConStyleEncoder:
        return self._query[0]

    @torch.no_grad()
    def momentum_update(self) -> None:
        """key <- m * key + (1 - m) * query, parameter by parameter."""
        for pk, pq in zip(self.key_encoder.parameters(), self.query_encoder.parameters()):
            pk.lerp_(pq.detach(), 1.0 - self.momentum)

    def queue_rows(self, offset: int, count: int) -> torch.Tensor:
        """Indices of ``count`` queue rows from ``pointer + offset`` on, wrapping."""
        start = self.queue_ptr + offset
        return (start + torch.arange(count, device=self.queue.device)) % self.queue.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Overwrite the oldest queue rows with ``keys`` and advance the pointer."""
        size = self.queue.shape[0]
        keys = keys[-size:]
        self.queue[self.queue_rows(0, keys.shape[0])] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)

    def forward(self, clean: torch.Tensor, degraded: torch.Tensor | None = None,
                query: StyleCode | None = None) -> dict[str, torch.Tensor]:
        check_image("clean", clean, self.query_encoder.in_channels)
        if query is None:
            if degraded is None:
                raise ValueError("degraded must be given when query is None")
            check_image("degraded", degraded, self.query_encoder.in_channels)
            query = self.query_encoder(pad_to_multiple(degraded, SIZE_MULTIPLE))
        q_lat = query.latent
        if q_lat.shape[0] != clean.shape[0]:
            raise ValueError(f"clean must have the query's batch size {q_lat.shape[0]}, "
                             f"got shape {tuple(clean.shape)}")

        self.momentum_update()
        with torch.no_grad():
            key = self.key_encoder(pad_to_multiple(clean, SIZE_MULTIPLE))
        parts = self._released(query, key) if self.variant == "released" else self._normalized(query, key)
        parts["loss"] = sum(self.weights[name] * value for name, value in parts.items())
        return parts

    def _infonce(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        l_pos = (q * k).sum(dim=1, keepdim=True)
        l_neg = q @ self.queue.clone().T
        logits = torch.cat([l_pos, l_neg], dim=1) / self.temperature
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, labels)

    def _released(self, query: StyleCode, key: StyleCode) -> dict[str, torch.Tensor]:
        q, h, n = query.latent, query.hidden, query.hidden.numel()
        batch = q.shape[0]
        overwritten = self.queue[self.queue_rows(0, batch)].clone()
        following = self.queue[self.queue_rows(batch, batch)].clone()

        def similarity(t: torch.Tensor) -> torch.Tensor:
            return t @ t.T / n

        parts = {
            "infonce": self._infonce(q, key.latent),
            "content": F.mse_loss(q, key.latent),
            "style": -(F.mse_loss(similarity(h), similarity(following))
                       + F.mse_loss(similarity(q), similarity(overwritten))),
        }
        self.enqueue(q.detach())
        return parts

    def _normalized(self, query: StyleCode, key: StyleCode) -> dict[str, torch.Tensor]:
        k = F.normalize(key.latent, dim=1)
        parts = {
            "infonce": self._infonce(F.normalize(query.latent, dim=1), k),
            "content": F.mse_loss(query.latent, key.latent),
            "style": sum(F.mse_loss(gram_matrix(fq), gram_matrix(fk))
                         for fq, fk in zip(query.features, key.features)),
        }
        self.enqueue(k)
        return parts


@register_model("constyle_nafnet")
def constyle_nafnet(**cfg) -> ConStyleNAFNet:
    """ConStyle-NAFNet, width 48, NAF blocks 7/8/9 down, 9 bottom, 9/8/7 up (12.74 M)."""
    return ConStyleNAFNet(**cfg)
