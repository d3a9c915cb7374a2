"""Counting device-to-host value reads in a test (shared by tests/ops/test_slim_conv2d.py
and tests/models/test_ddsnet.py): a read is what would synchronise a CUDA stream."""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode


class HostReads(TorchDispatchMode):
    """Counts device-to-host value reads: ``.item()``/``bool()``/``int()`` (all
    ``aten::_local_scalar_dense``) and ``.tolist()`` (not dispatched: patched)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_host_reads(monkeypatch, fn):
    """(``fn()``, the number of host reads it made)."""
    reads = HostReads()
    tolist = torch.Tensor.tolist

    def counted_tolist(t):
        reads.count += 1
        return tolist(t)

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "tolist", counted_tolist)
        with reads:
            out = fn()
    return out, reads.count


def sync_free_slim_reference(monkeypatch):
    """Route slim_conv2d's reference backend to a masked full-width conv (same
    values, no host read): its per-sample loop reads the widths to slice, so
    with this a count sees the width checks only."""
    op = importlib.import_module("restorenet.ops.slim_conv2d")

    def masked(x, weight, bias, in_width, out_width, stride, padding):
        c_in, c_out = torch.arange(x.shape[1]), torch.arange(weight.shape[0])
        m_in = (c_in[None] < in_width[:, None]).to(x.dtype)[:, :, None, None]
        m_out = (c_out[None] < out_width[:, None]).to(x.dtype)[:, :, None, None]
        return F.conv2d(x * m_in, weight, bias, stride, padding) * m_out

    monkeypatch.setitem(op._FORWARD, "reference", masked)
