"""Reading a released checkpoint and loading it strictly.

The authors' scripts write their weights in a few layouts; ``unwrap`` reduces each to
the flat ``{key: tensor}`` state dict the network itself wrote, and ``load_strict``
loads a converted one with ``strict=True`` after comparing keys *and* shapes, so a
checkpoint that does not fit fails with every difference named, never half-loaded.
"""
from __future__ import annotations

import os
import re
from typing import Callable, Iterable, Mapping, Union

import torch
import torch.nn as nn

# Where the authors' scripts put the network's weights, most preferred first:
# BasicSR (NAFNet, ConStyle) writes {"params": ...} and, with an EMA model,
# {"params_ema": ...} as well (the EMA weights are the ones the papers evaluate);
# MPRNet-style scripts (MHNet, HyperRes) write {"state_dict": ..., "epoch": ...}.
CHECKPOINT_KEYS = ("params_ema", "params", "state_dict")


class CheckpointMismatch(ValueError):
    """A checkpoint does not fit the model: names every missing, unexpected and
    wrongly shaped key (after conversion to restorenet's names)."""

    def __init__(self, name: str, missing: list[str], unexpected: list[str],
                 wrong_shape: list[tuple[str, tuple, tuple]]):
        self.missing, self.unexpected, self.wrong_shape = missing, unexpected, wrong_shape
        lines = [f"checkpoint does not fit model {name!r}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if wrong_shape:
            shapes = ", ".join(f"{k} (checkpoint {list(got)}, model {list(want)})"
                               for k, got, want in wrong_shape)
            lines.append(f"  wrongly shaped keys ({len(wrong_shape)}): {shapes}")
        super().__init__("\n".join(lines))


def read_checkpoint(checkpoint) -> Mapping:
    """A path (str or os.PathLike) is read with ``torch.load(weights_only=True)`` on
    the CPU: a checkpoint can never run code. A mapping is taken as it is."""
    if isinstance(checkpoint, (str, os.PathLike)):
        return torch.load(checkpoint, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, Mapping):
        return checkpoint
    raise TypeError(f"checkpoint must be a path or a mapping (a loaded checkpoint), "
                    f"got {type(checkpoint).__name__}")


def unwrap(obj: Mapping, checkpoint_key: str | None = None) -> dict[str, torch.Tensor]:
    """The network's state dict inside a loaded checkpoint.

    ``checkpoint_key=None`` takes the first of ``CHECKPOINT_KEYS`` present (so
    ``params_ema`` wins over ``params``), or the mapping itself when it holds tensors
    (a raw state dict); a name picks that entry (``"params"``: the non-EMA weights).
    A ``module.`` prefix on every key (a DataParallel model's state dict) is removed.
    """
    if checkpoint_key is not None:
        if checkpoint_key not in obj:
            raise ValueError(f"checkpoint_key={checkpoint_key!r} is not in the checkpoint "
                             f"(its top-level keys: {sorted(map(str, obj))[:10]})")
        state = obj[checkpoint_key]
    else:
        state = next((obj[k] for k in CHECKPOINT_KEYS if k in obj), obj)
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint: the state dict must be a mapping, got {type(state).__name__}")
    bad = [k for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise ValueError(f"checkpoint: not a state dict of tensors (entries {bad[:5]} are not "
                         f"str -> Tensor); pass checkpoint_key= to pick the weights")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


Replacement = Union[str, Callable[["re.Match"], str]]


def rename(state: Mapping[str, torch.Tensor], rules: Iterable[tuple[str, Replacement]]) -> dict[str, torch.Tensor]:
    """Apply the first matching ``(pattern, replacement)`` rule (``re.sub``, anchored
    at the key's start; the replacement may be a function of the match, e.g. to
    shift an index) to every key. A key no rule matches keeps its name, so a key
    of another layout surfaces as *unexpected* when loaded."""
    compiled = [(re.compile(f"^(?:{pattern})"), repl) for pattern, repl in rules]
    out = {}
    for key, value in state.items():
        for pattern, repl in compiled:
            new, hit = pattern.subn(repl, key, count=1)
            if hit:
                key = new
                break
        out[key] = value
    return out


def drop(state: dict[str, torch.Tensor], unused: Iterable[str]) -> dict[str, torch.Tensor]:
    """Remove the listed keys (parameters the released forward never uses) when present."""
    unused = set(unused)
    return {k: v for k, v in state.items() if k not in unused}


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], name: str) -> None:
    """Load ``state`` into ``model`` with ``strict=True``, first checking every key
    and shape so that nothing is copied unless everything fits."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    wrong = sorted((k, tuple(state[k].shape), tuple(own[k].shape)) for k in own
                   if k in state and state[k].shape != own[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointMismatch(name, missing, unexpected, wrong)
    model.load_state_dict(state, strict=True)
