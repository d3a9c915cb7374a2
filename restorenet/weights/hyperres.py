"""HyperRes's released checkpoints (github.com/ifryed/HyperRes, ``train_main.py``:
``{"state_dict": ..., "sigmas": [...], "epoch": ..., "optimizer": ...}``) into
:class:`restorenet.models.hyperres.HyperRes`.

The layouts agree tensor for tensor: a released ``HyperConv.fc`` is a ``Linear(1, P)``
whose output is the kernel (Cout, Cin, k, k) flattened, then the Cout biases --
exactly our ``HyperConv2d.meta``. Only names differ: the plain convs sit in a
``ModuleParallel`` (``conv1.module``), and ``res_blocks_meta.0`` is an identity, so
the meta blocks count from 1.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from restorenet.weights._load import rename

RULES = [
    (r"conv1\.module\.", "head."),
    (r"conv2\.module\.", "body_end."),
    (r"conv3\.module\.", "tail.expand."),
    (r"conv4\.module\.", "tail.refine."),
    (r"conv5\.module\.", "tail.to_image."),
    (r"res_blocks_meta\.(\d+)\.hy_conv([12])\.fc\.",
     lambda m: f"blocks.{int(m[1]) - 1}.conv{m[2]}.meta."),
]


def convert(released: Mapping[str, torch.Tensor], model: nn.Module, **cfg) -> dict[str, torch.Tensor]:
    return rename(released, RULES)
