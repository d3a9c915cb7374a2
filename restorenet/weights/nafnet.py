"""NAFNet's released checkpoints (megvii-research/NAFNet, BasicSR ``{"params": ...}``),
e.g. ``NAFNet-GoPro-width64.pth``, into :class:`restorenet.models.nafnet.NAFNet`.

The layouts are the same module for module; only names differ:
``encoders.i.j`` / ``middle_blks.j`` / ``decoders.i.j`` hold NAFBlocks whose
``conv1..conv5`` and ``sca.1`` are our ``expand, dwconv, project, ffn_expand,
ffn_project`` and ``sca.proj``.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch
import torch.nn as nn

from restorenet.weights._load import rename

# A released NAFBlock's sub-module names -> ours (norm1, norm2, beta, gamma agree).
_NAF_BLOCK_PARTS = {
    "conv1": "expand",
    "conv2": "dwconv",
    "conv3": "project",
    r"sca\.1": "sca.proj",
    "conv4": "ffn_expand",
    "conv5": "ffn_project",
}


def naf_block_rules(released: str, ours: str) -> list[tuple[str, str]]:
    """``rename`` rules for the NAFBlocks under the released prefix pattern ``released``
    (a regex ending in a dot, groups allowed) and our prefix ``ours`` (may use them)."""
    rules = [(released + part + r"\.", ours + mine + ".") for part, mine in _NAF_BLOCK_PARTS.items()]
    return rules + [(released, ours)]


def nafnet_rules(released: str = "", ours: str = "") -> list[tuple[str, str]]:
    """Rules for a whole released ``NAFNet`` under a prefix (MHNet's stage 1 is one)."""
    released = re.escape(released)
    return [
        *naf_block_rules(released + r"encoders\.(\d+)\.(\d+)\.", ours + r"encoder.stages.\1.\2."),
        *naf_block_rules(released + r"middle_blks\.(\d+)\.", ours + r"encoder.middle.\1."),
        *naf_block_rules(released + r"decoders\.(\d+)\.(\d+)\.", ours + r"decoder.stages.\1.\2."),
        (released + r"intro\.", ours + "encoder.intro."),
        (released + r"downs\.", ours + "encoder.downs."),
        (released + r"ups\.", ours + "decoder.ups."),
        (released + r"ending\.", ours + "ending."),
    ]


def convert(released: Mapping[str, torch.Tensor], model: nn.Module, **cfg) -> dict[str, torch.Tensor]:
    return rename(released, nafnet_rules())
