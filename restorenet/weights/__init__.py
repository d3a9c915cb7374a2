"""Load the authors' released checkpoints into restorenet's models.

    model = restorenet.weights.from_released("nafnet", "NAFNet-GoPro-width64.pth")
    model = restorenet.create_model("nafnet", weights="NAFNet-GoPro-width64.pth")  # the same

``from_released(name, checkpoint, **cfg)`` builds ``create_model(name, **cfg)``, reads
the checkpoint (a path, read with ``torch.load(weights_only=True)``, or an already
loaded object) in any layout the authors' scripts write (BasicSR ``{"params"}`` /
``{"params_ema"}``, ``{"state_dict", "epoch", ...}``, a DataParallel ``module.``
prefix, a raw state dict), converts the released key names and layouts to ours
(``restorenet/weights/<name>.py``: one ``convert`` per model) and loads them with
``strict=True``. A checkpoint that does not fit raises :class:`CheckpointMismatch`
naming every missing, unexpected and wrongly shaped key; nothing is loaded then.
"""
from __future__ import annotations

import importlib

import torch.nn as nn

from restorenet.weights._load import CheckpointMismatch, load_strict, read_checkpoint, unwrap

__all__ = ["CheckpointMismatch", "from_released", "CONVERTERS"]

# Model name -> the module (in this package) whose ``convert(released, model, **cfg)``
# maps a released state dict to the model's. One line per model.
CONVERTERS: dict[str, str] = {
    "nafnet": "restorenet.weights.nafnet",
    "mhnet": "restorenet.weights.mhnet",
    "hyperres": "restorenet.weights.hyperres",
    "hyperres_level_estimator": "restorenet.weights.hyperres_level_estimator",
    "constyle_nafnet": "restorenet.weights.constyle_nafnet",
    "adarevd": "restorenet.weights.adarevd",
}


def from_released(name: str, checkpoint, *, checkpoint_key: str | None = None, **cfg) -> nn.Module:
    """``create_model(name, **cfg)`` with the released ``checkpoint`` loaded, in eval mode.

    ``checkpoint_key`` picks the entry of a wrapped checkpoint (``"params"`` for the
    non-EMA weights of a BasicSR checkpoint); by default ``params_ema`` is preferred
    to ``params``, then ``state_dict``, else the object is the state dict itself.
    """
    from restorenet.registry import create_model

    if name not in CONVERTERS:
        raise ValueError(f"name={name!r} has no released-checkpoint converter; "
                         f"choose one of {sorted(CONVERTERS)}")
    released = unwrap(read_checkpoint(checkpoint), checkpoint_key)
    model = create_model(name, **cfg)
    convert = importlib.import_module(CONVERTERS[name]).convert
    load_strict(model, convert(released, model, **cfg), name)
    return model.eval()
