"""HyperRes's released blind noise-level estimator, ``pre_trained/noise_detect.pth``
(github.com/ifryed/HyperRes, a raw ``NoiseNet`` state dict) into
:class:`restorenet.models.hyperres.NoiseNet`. Only names differ: ``conv1`` is our
``head``, ``conv_seq`` our ``stages``, and ``fc_seq`` (no Flatten) our ``regressor``
(a Flatten first, so its layers sit one index later).
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from restorenet.weights._load import rename

RULES = [
    (r"conv1\.", "head."),
    (r"conv_seq\.", "stages."),
    (r"fc_seq\.(\d+)\.", lambda m: f"regressor.{int(m[1]) + 1}."),
]


def convert(released: Mapping[str, torch.Tensor], model: nn.Module, **cfg) -> dict[str, torch.Tensor]:
    return rename(released, RULES)
