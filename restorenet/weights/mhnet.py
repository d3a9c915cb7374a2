"""MHNet's released checkpoint (github.com/Tombs98/MHNet, top-level ``MHNet.py``;
the deblurring weights ``model_best.pth``, saved as ``{"state_dict": ..., "epoch": ...}``)
into :class:`restorenet.models.mhnet.MHNet`.

Beyond renaming:

* fold: the attention's four mixing scalars ``attn1..attn4`` (shape [1] each) are our
  ``stage1.middle.mix_weights`` (shape [4]);
* duplicate: with ``decoder_tap_convs="per_level"`` the one conv the released forward
  uses for every decoder tap (``conv_dnc1``) is copied into each level's ``proj_dec``;
* drop: the parameters the released forward never uses (``UNUSED``).
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from restorenet.weights._load import drop, rename
from restorenet.weights.nafnet import naf_block_rules, nafnet_rules


def unused(levels: int) -> list[str]:
    """Released keys whose values never reach the output: ``intro`` (its output is
    discarded), stage 1's ``ending`` (computed, discarded) and ``conv_dnc2..L``
    (the forward uses ``conv_dnc1`` for every level)."""
    return ["intro.weight", "stage1.ending.weight", "stage1.ending.bias",
            *(f"stage2.conv_dnc{n}.weight" for n in range(2, levels + 1))]


def _stage2_rules(levels: int) -> list[tuple[str, str]]:
    rules = [(r"intro2\.", "stage2.intro."), (r"concat12\.", "stage2.fuse_stage1."),
             (r"stage2\.conv_dnc1\.", "stage2.proj_dec.0.")]
    for i in range(levels):
        n = i + 1  # the released names count levels from 1
        rules += [
            *naf_block_rules(rf"stage2\.CABG{n}\.(\d+)\.", rf"stage2.cabgs.{i}.\1."),
            (rf"stage2\.norm{n}\.", f"stage2.norms.{i}."),
            (rf"stage2\.conv_enc{n}\.", f"stage2.proj_enc.{i}."),
            (rf"stage2\.skff{n}\.conv_du\.0\.", f"stage2.affms.{i}.squeeze.0."),
            (rf"stage2\.skff{n}\.fcs\.", f"stage2.affms.{i}.weights."),
        ]
    for tap in ("enc", "dec"):
        # up_{tap}{i} brings level i to full resolution: one UpDSample for i = 1,
        # a Sequential of i of them above; ours is always a Sequential.
        rules.append((rf"stage2\.up_{tap}1\.up\.0\.", f"stage2.up_{tap}.1.0.0."))
        rules += [(rf"stage2\.up_{tap}{i}\.(\d+)\.up\.0\.", rf"stage2.up_{tap}.{i}.\1.0.")
                  for i in range(2, levels)]
    return rules


def _fold_mix_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = [f"stage1.middle.attn{j}" for j in range(1, 5)]
    if all(n in state for n in names) and all(state[n].shape == (1,) for n in names):
        state["stage1.middle.mix_weights"] = torch.cat([state.pop(n) for n in names])
    return state  # otherwise left as they are, so the mismatch names them


def convert(released: Mapping[str, torch.Tensor], model: nn.Module, **cfg) -> dict[str, torch.Tensor]:
    levels = len(model.stage2.norms)
    state = drop(dict(released), unused(levels))
    state = rename(state, [
        (r"stage1\.middle_blks\.0\.", "stage1.middle."),
        *nafnet_rules("stage1.", "stage1."),
        *_stage2_rules(levels),
    ])
    state = _fold_mix_weights(state)
    shared = state.get("stage2.proj_dec.0.weight")
    if shared is not None and len(model.stage2.proj_dec) > 1:
        for i in range(1, len(model.stage2.proj_dec)):
            state[f"stage2.proj_dec.{i}.weight"] = shared
    return state
