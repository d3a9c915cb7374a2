"""Fused ops for adaptive restoration networks.

Every op has a ``reference`` (plain PyTorch, the spec), a ``triton`` and a
``cuda`` backend, and is registered as ``torch.ops.restorenet.<op>``.
``use_backend(name)`` or ``RESTORENET_BACKEND`` switch every op at once.
"""
from restorenet.ops._backend import BACKENDS, available_backends, use_backend
from restorenet.ops.channel_attention import (channel_attention, channel_attention_reference, scaled_residual,
                                             scaled_residual_reference)
from restorenet.ops.hyper_conv2d import hyper_conv2d, hyper_conv2d_reference
from restorenet.ops.naf_elementwise import layer_norm2d, layer_norm2d_reference, simple_gate, simple_gate_reference
from restorenet.ops.rev_columns import ReversibleColumn, column_forward, reversible_columns
from restorenet.ops.reversible import (rev_coupling_forward, rev_coupling_forward_reference, rev_coupling_invert,
                                       rev_coupling_invert_reference)
from restorenet.ops.slim_conv2d import slim_conv2d, slim_conv2d_reference
from restorenet.ops.tiles import (TilePlan, TileSchedule, tile_blend, tile_blend_reference, tile_gather,
                                  tile_gather_reference, tile_plan, tile_schedule)

__all__ = [
    "BACKENDS", "available_backends", "use_backend",
    "hyper_conv2d", "hyper_conv2d_reference",
    "slim_conv2d", "slim_conv2d_reference",
    "layer_norm2d", "layer_norm2d_reference", "simple_gate", "simple_gate_reference",
    "channel_attention", "channel_attention_reference", "scaled_residual", "scaled_residual_reference",
    "rev_coupling_forward", "rev_coupling_forward_reference",
    "rev_coupling_invert", "rev_coupling_invert_reference",
    "reversible_columns", "column_forward", "ReversibleColumn",
    "TilePlan", "TileSchedule", "tile_plan", "tile_schedule",
    "tile_gather", "tile_gather_reference", "tile_blend", "tile_blend_reference",
]
