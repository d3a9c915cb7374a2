"""AdaRevD's released checkpoints (INVOKERer/AdaRevD, ``AdaRevID`` in
``basicsr/models/archs/AdaRevID_arch.py``, BasicSR ``{"params"}`` / ``{"params_ema"}``),
with the UFPNet encoder (every released config) or the NAFNet one, into
:class:`restorenet.models.adarevd.AdaRevD`::

    model = from_released("adarevd", "AdaRevD-B-GoPro.pth")                 # UFPNet encoder
    model = from_released("adarevd", ckpt, encoder="nafnet", num_decoders=8)  # other configs
    model = from_released_parts("net_g_200000.pth", "classifier/GoPro.pth")  # body + classifier files
    load_encoder(model, "NAFNet-GoPro-width64.pth")  # an encoder from a NAFNet/UFPNet checkpoint

The layouts are the same module for module; only names differ:

    encoder.*                      encoder.* (NAFNet names as in ``weights.nafnet``; UFPNet:
                                   kernel_extra -> kernel_estimator, flow.net -> kernel_prior.steps,
                                   kernel_down -> kernel_downs, kernel_atttion -> kernel_attention)
    conv_features.l                feature_scales.l
    subdenets.k.alpha{i}           decoder.columns.k.alphas.i
    subdenets.k.level{i}.fusion    decoder.columns.k.levels.i: up.0 -> up.0, down.0 -> down,
                                   down.1.body -> down_norm (a LayerNorm over channels either way)
    subdenets.k.level{i}.blocks.0  ...levels.i.block (FCNAFBlock: conv1..5, sca.0, fft_block1/2)
    outputs.k.0                    heads.k
    ape.0 / ape.1 / ape.2          classifier.down / classifier.block / classifier.{norm, fc1, fc2,
                                   logit_scale} (``ape.2.classifier.{0,1,3}``, ``ape.2.alpha``)

Dropped (the released forward never reads them): the flow prior's ``kernel_size``,
``base_dist_mean`` and ``base_dist_var`` buffers (used only by its log-likelihood).
A checkpoint written with ``pretrain: true`` (the main body) has no classifier (``ape.*``):
alone it does not load (its classifier keys are reported missing); with the classifier's
own file, as the released test options read them, use ``from_released_parts``.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch
import torch.nn as nn

from restorenet.weights._load import drop, load_strict, read_checkpoint, rename, unwrap
from restorenet.weights.nafnet import naf_block_rules, nafnet_rules

# Buffers of the flow prior that only its log-likelihood uses.
_UNUSED_PRIOR_BUFFERS = ("kernel_size", "base_dist_mean", "base_dist_var")

_FCNAF_BLOCK_PARTS = {
    "conv1": "expand",
    "conv2": "dwconv",
    "conv3": "project",
    r"sca\.0": "sca.proj",  # no pooling module in front here (NAFBlock's is sca.1)
    "conv4": "ffn_expand",
    "conv5": "ffn_project",
    r"fft_block1\.complex_conv1": "fourier1.expand",
    r"fft_block1\.complex_conv2": "fourier1.project",
    r"fft_block2\.complex_conv1": "fourier2.expand",
    r"fft_block2\.complex_conv2": "fourier2.project",
}


def _fcnaf_block_rules(released: str, ours: str) -> list[tuple[str, str]]:
    rules = [(released + part + r"\.", ours + mine + ".") for part, mine in _FCNAF_BLOCK_PARTS.items()]
    return rules + [(released, ours)]


def ufpnet_rules(released: str, ours: str) -> list[tuple[str, str]]:
    """Rules for the UFPNet-only parts of an encoder (the NAFNet parts: ``nafnet_rules``)."""
    est, kp = released + r"kernel_extra\.", ours + "kernel_estimator."
    return [
        (released + r"encoders\.(\d+)\.0\.kernel_atttion\.conv_1\.0\.", ours + r"stages.\1.0.kernel_attention.feature."),
        (released + r"encoders\.(\d+)\.0\.kernel_atttion\.conv_kernel\.", ours + r"stages.\1.0.kernel_attention.kernel_embed."),
        (released + r"encoders\.(\d+)\.0\.kernel_atttion\.conv_2\.0\.", ours + r"stages.\1.0.kernel_attention.gate."),
        (released + r"kernel_down\.", ours + "kernel_downs."),
        (released + r"flow\.net\.(\d+)\.s_net\.", ours + r"kernel_prior.steps.\1.scale_net."),
        (released + r"flow\.net\.(\d+)\.t_net\.", ours + r"kernel_prior.steps.\1.shift_net."),
        (released + r"flow\.net\.", ours + "kernel_prior.steps."),
        (released + r"flow\.", ours + "kernel_prior."),
        (est + r"Encoding_Block(\d)\.Conv_head\.", kp + r"down\1.head."),
        (est + r"Encoding_Block(\d)\.downsample\.", kp + r"down\1.down."),
        (est + r"Decoding_Block(\d)\.Conv_t\.", kp + r"up\1.up."),
        (est + r"Decoding_Block(\d)\.Conv_head\.", kp + r"up\1.head."),
        (est + r"Encoding_Block(\d)\.ResBlock(\d)\.body\.1\.", kp + r"down\1.res\2.conv1."),
        (est + r"Encoding_Block(\d)\.ResBlock(\d)\.body\.3\.", kp + r"down\1.res\2.conv2."),
        (est + r"Decoding_Block(\d)\.ResBlock(\d)\.body\.1\.", kp + r"up\1.res\2.conv1."),
        (est + r"Decoding_Block(\d)\.ResBlock(\d)\.body\.3\.", kp + r"up\1.res\2.conv2."),
        (est + r"Conv_mid\.body\.", kp + "middle."),
        (est + r"Conv_tail\.mean\.", kp + "code_head."),
        (est + r"Conv_tail\.var\.", kp + "sigma_head."),
    ]


def encoder_rules(released: str = "encoder.", ours: str = "encoder.") -> list[tuple[str, str]]:
    """Rules for a released UFPNet or NAFNet encoder under the (literal) prefix ``released``
    (UFPNet's parts first: its kernel-attention keys sit inside the NAFNet block names)."""
    naf = [(pattern, repl.replace("encoder.", ours, 1)) for pattern, repl in nafnet_rules(released, "")]
    return ufpnet_rules(re.escape(released), ours) + naf


def _decoder_rules() -> list[tuple[str, str]]:
    level, col = r"subdenets\.(\d+)\.level(\d)\.", r"decoder.columns.\1.levels.\2."
    return [
        (r"subdenets\.(\d+)\.alpha(\d)$", r"decoder.columns.\1.alphas.\2"),
        (level + r"fusion\.up\.", col + "up."),
        (level + r"fusion\.down\.0\.", col + "down."),
        (level + r"fusion\.down\.1\.body\.", col + "down_norm."),
        *_fcnaf_block_rules(level + r"blocks\.0\.", col + "block."),
        (r"outputs\.(\d+)\.0\.", r"heads.\1."),
        (r"conv_features\.", "feature_scales."),
    ]


def _classifier_rules() -> list[tuple[str, str]]:
    return [
        (r"ape\.0\.", "classifier.down."),
        *naf_block_rules(r"ape\.1\.", "classifier.block."),
        (r"ape\.2\.classifier\.0\.", "classifier.norm."),
        (r"ape\.2\.classifier\.1\.", "classifier.fc1."),
        (r"ape\.2\.classifier\.3\.", "classifier.fc2."),
        (r"ape\.2\.alpha$", "classifier.logit_scale"),
    ]


def _drop_unused_prior_buffers(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return drop(state, [f"{prefix}flow.{name}" for name in _UNUSED_PRIOR_BUFFERS])


def convert(released: Mapping[str, torch.Tensor], model: nn.Module, **cfg) -> dict[str, torch.Tensor]:
    state = _drop_unused_prior_buffers(dict(released), "encoder.")
    return rename(state, [*encoder_rules(), *_decoder_rules(), *_classifier_rules()])


def from_released_parts(checkpoint, classifier, *, checkpoint_key: str | None = None, **cfg) -> nn.Module:
    """AdaRevD from the two files the released test options read: the main body's
    checkpoint (trained with ``pretrain: true``: no ``ape.*`` keys) and the classifier's
    (``save_classifier.py``: a raw dict of the ``ape.*`` keys without ``ape.``), loaded
    strictly together (``from_released``)."""
    from restorenet.weights import from_released

    body = unwrap(read_checkpoint(checkpoint), checkpoint_key)
    if any(k.startswith("ape.") for k in body):
        raise ValueError("checkpoint already holds a classifier (ape.* keys): load it with "
                         "from_released('adarevd', checkpoint) alone")
    head = unwrap(read_checkpoint(classifier))
    return from_released("adarevd", {**body, **{"ape." + k: v for k, v in head.items()}}, **cfg)


# Keys of a whole released NAFNet / UFPNet that its encoder half never reads: the
# decoder half, and UFPNet's kernel downsamplers beyond the two the encoder uses.
_NOT_ENCODER = (r"decoders\.", r"ups\.", r"ending\.", r"kernel_down\.([2-9]|\d\d)\.")


def load_encoder(model: nn.Module, checkpoint, checkpoint_key: str | None = None) -> None:
    """Load a released NAFNet or UFPNet checkpoint -- a whole network (its decoder half is
    dropped, as the released AdaRevD's ``load_pretain_model`` ignores it) or an
    encoder-only one -- into ``model.encoder`` strictly (the encoder the paper inherits;
    ``model`` built with the matching ``encoder=``). Raises ``CheckpointMismatch``."""

    released = unwrap(read_checkpoint(checkpoint), checkpoint_key)
    unused = re.compile(f"^(?:{'|'.join(_NOT_ENCODER)})")
    state = _drop_unused_prior_buffers({k: v for k, v in released.items() if not unused.match(k)}, "")
    load_strict(model.encoder, rename(state, encoder_rules(released="", ours="")), "adarevd encoder")
