"""ConStyle-NAFNet's released checkpoints (github.com/Dongqi-Fan/IRConStyle, BasicSR:
``{"params": ..., "params_ema": ...}``) into
:class:`restorenet.models.constyle_nafnet.ConStyleNAFNet`.

Only names differ (the released ``ConStyle.encoder_q`` is our ``style_encoder``, its
``Process_Module_*``, ``DC*``, ``UC*`` our U-Net stages), and a checkpoint saved
while training (``ConStyle(Train=True)``) also holds the MoCo key encoder and queue,
which the restoration forward never uses: they are dropped by name (``unused``).
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from restorenet.weights._load import drop, rename
from restorenet.weights.nafnet import naf_block_rules

_STYLE = r"ConStyle\.encoder_q\."


def _rules(levels: int) -> list[tuple[str, str]]:
    rules = [
        (_STYLE + r"stage(\d)\.", lambda m: f"style_encoder.stages.{int(m[1]) - 1}."),
        (_STYLE + r"mlp(\d)\.", lambda m: f"style_encoder.mlp.{int(m[1]) - 1}."),
        (r"Preprocess_Module\.0\.", "intro."),
        *naf_block_rules(r"Process_Module_bottom\.(\d+)\.", r"middle.\1."),
        (r"local_fusion\.", "modulation.fuse."),
        (r"mlp\.0\.", "modulation.to_scale."),
        (r"Finetune_Module\.0\.", "ending."),
    ]
    for i in range(levels):
        n, up = i + 1, levels - 1 - i   # released level n (1 = full size); our decoder runs coarsest first
        rules += [
            *naf_block_rules(rf"Process_Module_l{n}\.(\d+)\.", rf"enc_stages.{i}.\1."),
            *naf_block_rules(rf"Process_Module_r{n}\.(\d+)\.", rf"dec_stages.{up}.\1."),
            (rf"DC{n}\.down\.0\.", f"downs.{i}.body.0."),
            (rf"UC{n}\.up\.", f"ups.{up}.up."),
            (rf"UC{n}\.down\.", f"ups.{up}.fuse."),
            (rf"AffineTransform{i}\.", f"injects.{i}."),
        ]
    return rules


def unused(released: Mapping[str, torch.Tensor]) -> list[str]:
    """The training-only MoCo state: the key encoder (one twin per query-encoder key)
    and the queue with its pointer."""
    twins = [k.replace("ConStyle.encoder_q.", "ConStyle.encoder_k.", 1)
             for k in released if k.startswith("ConStyle.encoder_q.")]
    return twins + ["ConStyle.queue", "ConStyle.queue_ptr"]


def convert(released: Mapping[str, torch.Tensor], model: nn.Module, **cfg) -> dict[str, torch.Tensor]:
    return rename(drop(dict(released), unused(released)), _rules(len(model.enc_stages)))
