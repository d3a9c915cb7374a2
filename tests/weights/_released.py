"""The authors' released layouts, written out for the weight tests.

Each ``*_keys`` function is the table ``released key -> shape`` of a released
architecture (read from the authors' public code, written here by hand), and each
``*_forward`` applies such a state dict with plain PyTorch formulas, independently of
restorenet's modules, so a converted checkpoint can be checked output against output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def random_state(table: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values for every key (none zero-initialised: a zero beta would hide a block)."""
    g = torch.Generator().manual_seed(seed)
    return {k: 0.5 * torch.randn(shape, generator=g) for k, shape in table.items()}


def conv(sd, name, x, **kw):
    return F.conv2d(x, sd[name + ".weight"], sd.get(name + ".bias"), **kw)


# --- NAFNet (megvii-research/NAFNet, basicsr/models/archs/NAFNet_arch.py) -------------

def nafblock_keys(p: str, c: int) -> dict[str, tuple]:
    return {
        p + "conv1.weight": (2 * c, c, 1, 1), p + "conv1.bias": (2 * c,),
        p + "conv2.weight": (2 * c, 1, 3, 3), p + "conv2.bias": (2 * c,),
        p + "conv3.weight": (c, c, 1, 1), p + "conv3.bias": (c,),
        p + "sca.1.weight": (c, c, 1, 1), p + "sca.1.bias": (c,),
        p + "conv4.weight": (2 * c, c, 1, 1), p + "conv4.bias": (2 * c,),
        p + "conv5.weight": (c, c, 1, 1), p + "conv5.bias": (c,),
        p + "norm1.weight": (c,), p + "norm1.bias": (c,),
        p + "norm2.weight": (c,), p + "norm2.bias": (c,),
        p + "beta": (1, c, 1, 1), p + "gamma": (1, c, 1, 1),
    }


def nafnet_keys(p: str = "", img: int = 3, width: int = 8, enc=(1, 1), middle: int = 1,
                dec=(1, 1)) -> dict[str, tuple]:
    t = {p + "intro.weight": (width, img, 3, 3), p + "intro.bias": (width,),
         p + "ending.weight": (img, width, 3, 3), p + "ending.bias": (img,)}
    c = width
    for i, n in enumerate(enc):
        for j in range(n):
            t |= nafblock_keys(f"{p}encoders.{i}.{j}.", c)
        t |= {f"{p}downs.{i}.weight": (2 * c, c, 2, 2), f"{p}downs.{i}.bias": (2 * c,)}
        c *= 2
    for j in range(middle):
        t |= nafblock_keys(f"{p}middle_blks.{j}.", c)
    for i, n in enumerate(dec):
        t[f"{p}ups.{i}.0.weight"] = (2 * c, c, 1, 1)
        c //= 2
        for j in range(n):
            t |= nafblock_keys(f"{p}decoders.{i}.{j}.", c)
    return t


def layer_norm2d(x, w, b, eps=1e-6):
    mu = x.mean(1, keepdim=True)
    var = (x - mu).pow(2).mean(1, keepdim=True)
    return w.view(1, -1, 1, 1) * (x - mu) / (var + eps).sqrt() + b.view(1, -1, 1, 1)


def gate(x):
    a, b = x.chunk(2, dim=1)
    return a * b


def nafblock_forward(sd, p, inp):
    x = layer_norm2d(inp, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
    x = conv(sd, p + "conv2", conv(sd, p + "conv1", x), padding=1, groups=x.shape[1] * 2)
    x = gate(x)
    x = x * conv(sd, p + "sca.1", x.mean((2, 3), keepdim=True))
    y = inp + conv(sd, p + "conv3", x) * sd[p + "beta"]
    x = conv(sd, p + "conv4", layer_norm2d(y, sd[p + "norm2.weight"], sd[p + "norm2.bias"]))
    return y + conv(sd, p + "conv5", gate(x)) * sd[p + "gamma"]


def _blocks(sd, p, x):
    j = 0
    while f"{p}{j}.beta" in sd:
        x = nafblock_forward(sd, f"{p}{j}.", x)
        j += 1
    return x


def nafnet_forward(sd, inp, p: str = ""):
    """Released NAFNet.forward (H, W already multiples of 2**levels)."""
    x, skips, i = conv(sd, p + "intro", inp, padding=1), [], 0
    while f"{p}downs.{i}.weight" in sd:
        x = _blocks(sd, f"{p}encoders.{i}.", x)
        skips.append(x)
        x = conv(sd, f"{p}downs.{i}", x, stride=2)
        i += 1
    x = _blocks(sd, f"{p}middle_blks.", x)
    for i, skip in enumerate(reversed(skips)):
        x = F.pixel_shuffle(conv(sd, f"{p}ups.{i}.0", x), 2) + skip
        x = _blocks(sd, f"{p}decoders.{i}.", x)
    return conv(sd, p + "ending", x, padding=1) + inp
