"""reversible_columns: a chain of RevCol-style reversible columns whose backward
keeps no activations.

A column holds ``n`` level states ``c_0..c_{n-1}`` (coarse to fine) and updates
them in order, each from the *new* coarser state and the *old* finer one::

    c_i' = a_i * c_i + L_i(coarse_i, finer_i)
    coarse_i = x (fixed for every column) if i == 0, else c_{i-1}'
    finer_i  = c_{i+1}, none for the finest level (i = n-1)

and emits its finest new state ``c_{n-1}'`` (AdaRevD feeds it to the column's
head). ``K`` columns run one after another, each starting from the last one's
states. Every update can be undone once the coarser state is known again::

    c_i = (c_i' - L_i(coarse_i, finer_i)) / a_i

so with ``memory_efficient=True`` the forward keeps only ``x`` and the last
column's states (nothing that grows with K; the per-column outputs are returned,
not saved: their gradients come back as inputs of backward). Backward walks the
columns and, inside each, the levels in reverse (k = K-1..0, i = n-1..0)::

    f    = L_i(coarse_i, finer_i)     recomputed with grad (c_{i-1}' is still known,
                                      c_{i+1} was just rebuilt)
    c_i, dc_i, da_i = rev_coupling_invert(c_i', f, a_i, dc_i')   one fused pass
    autograd.grad(f -> coarse_i, finer_i, L_i's parameters; a_i -> raw alpha)

The coupling itself is ``restorenet.ops.rev_coupling_forward`` /
``rev_coupling_invert`` (backend chosen by ``restorenet.ops.use_backend``).

Memory. Per-column outputs that feed a module (AdaRevD's conv heads) go through
``heads=``: the op runs ``heads[k](c_{n-1}')`` itself and returns only its (small)
output; backward recomputes the head from the rebuilt state. A head called on the
returned states outside the op would keep its full-resolution input alive for
every column. Measured with saved-tensor hooks (distinct storages, parameters not
counted; AdaRevD width 8, enc_blocks 1/1/1/1, batch 2x3x64x64, fp32, CPU;
``tests/models/test_adarevd.py::test_bytes_kept_for_backward_are_flat_in_k``):
0.97 MiB for K = 1, 2, 4 and 8 with ``anchor_every=None`` (heads outside the op
used to give 0.97 / 1.22 / 1.72 / 2.72 MiB). With anchors the extra is exactly
the anchored state sets, 0.47 MiB each here (n states in fp32): K = 8 with
``anchor_every=2`` keeps 4 sets (2.84 MiB), AdaRevD's fp32 "auto" (every 4) 2
sets (1.91 MiB). With dropout active (``may_draw_random``) K * n RNG records of
~5 KiB each are kept too.

torch.compile. The memory-efficient path is one custom op,
``torch.ops.restorenet.reversible_columns`` (its backward another), so
``torch.compile(model, fullgraph=True)`` traces a whole training step with the op
as one opaque call (tested with Inductor on CPU: the AdaRevD loss, forward and
backward). The op's forward and backward run eager code inside the compiled
graph: see the comment above ``_forward_op`` for why that is the design.

Replay guards. The recompute must compute the same ``f`` as the forward:

* autocast: the autocast state of the forward call is recorded and re-entered
  around the whole backward walk (it cannot change inside one call);
* randomness (dropout, drop-path): the RNG state (CPU, and CUDA for CUDA
  tensors) before every level update that drew random numbers is recorded and
  restored around its recompute; levels that drew none record nothing. The
  live RNG state is restored afterwards, so backward does not disturb it;
* running statistics: the buffers of level i (``column.level_buffers(i)``, e.g.
  BatchNorm's running mean/var/count) are copied before its recompute and copied
  back after, so they are updated exactly once per forward, as in plain
  autograd. The recompute sees the buffers as the forward *left* them: exact for
  BatchNorm in training mode (it normalises with batch statistics) and for any
  module in eval mode (no update); a module whose training-mode output reads a
  buffer it also updates would not replay exactly (none in restorenet).

Precision (the fp32 coupling-state guard). With fp16/bf16 inputs (autocast or a
half-precision model) the states are kept in fp32: ``L_i`` still runs in low
precision, only its output is upcast before the coupling, and the outputs are
returned in the inputs' dtype. Why: backward rebuilds ``c = (c' - f) / a`` from
the rounded ``c'``, so rounding errors compound through every level and column.
Measured with ``precision_table()`` (``python -m restorenet.ops.rev_columns``;
CPU, torch 2.13; AdaRevD decoder, width 4, batch 2, states [2, 32..4, 4..32,
4..32], alphas at their init 0.5, beta/gamma ~ N(0, 0.5) so every L_i is active;
``rebuilt``: max over levels of max|rebuilt c - c| / max|c| after inverting all K
columns; ``grad``: ||g_reversible - g_plain|| / ||g_plain|| over every parameter
and input gradient, plain autograd under the same autocast)::

    L_i runs in    states   rebuilt K=2  K=4      K=8      grad K=2  K=4      K=8
    fp32           fp32     8.5e-06  1.4e-04  4.4e-02    1.3e-06  2.1e-05  3.7e-03
    bf16 autocast  fp32     3.3e-07  4.9e-01  6.4e+00    5.1e-03  4.7e-02  7.0e-01
    fp16 autocast  fp32     1.2e-02  1.1e-01  9.0e+00    1.7e-03  1.0e-02  6.9e-01
    bf16 autocast  bf16     3.1e-01  2.3e+00  7.2e+01    5.5e-02  4.5e-01  2.4e+00
    fp16 autocast  fp16     4.2e-02  8.3e-01  2.5e+01    7.1e-03  1.4e-01  1.2e+00

Read it as: the inversion is ill-conditioned. Each column divides by ``a`` (0.5
here) and feeds the rebuilt states through L_i again, so an error grows by roughly
(1 + Lip L) / |a| per column: in fp32 it stays small up to K = 4 and reaches
4e-3 in the gradients at K = 8. Half-precision states are wrong already at K = 2-4;
fp32 states are the guard (2x memory on the few saved states only). Under autocast
even fp32 states do not save K >= 4: the ~1e-7 rebuild error flips some bf16/fp16
roundings of L_i's input, and those ulp-sized changes of f are then amplified the
same way. fp64 inputs stay fp64 (exact replay in tests, 1e-9 at K = 8).

Anchoring (the guard for long chains, issue #5). ``anchor_every=a`` also keeps the
states entering columns 0, a, 2a, ... (ceil(K/a) state sets, fp32; column 0's are
the op's inputs) and the backward walk recomputes those columns from the kept
states (``_recompute_level``: f and the coupling forward again, one autograd call,
no inversion), so errors compound over at most a columns; a = 1 is per-column
checkpointing. Measured with ``anchor_table()`` (``python -m
restorenet.ops.rev_columns anchors``; same decoder and gradient error as above,
fp32 states; two inits of the blocks' residual scales beta/gamma: N(0, 0.5) as
above, and N(0, 0.05), closer to a trained AdaRevD -- NAF blocks start at zero)::

    beta/gamma     L_i runs in    anchor_every  grad K=2  K=4      K=8      state sets at K=8
    N(0, 0.5)      fp32           None          1.3e-06  2.3e-05  3.9e-03  0
                                  1             2.3e-07  2.8e-07  3.7e-07  8
                                  2             5.6e-07  1.0e-06  8.0e-07  4
                                  4             5.6e-07  1.2e-05  9.2e-06  2
                   bf16 autocast  None          5.1e-03  4.7e-02  7.0e-01  0
                                  1             5.1e-03  6.7e-03  9.0e-03  8
                                  2             5.1e-03  6.7e-03  9.4e-03  4
                                  4             5.1e-03  2.0e-02  1.3e-02  2
                   fp16 autocast  None          1.7e-03  1.0e-02  6.9e-01  0
                                  1             6.5e-04  8.7e-04  1.1e-03  8
                                  2             7.8e-04  8.8e-04  1.1e-03  4
                                  4             7.8e-04  4.3e-03  7.1e-03  2
    N(0, 0.05)     fp32           None          1.1e-06  1.3e-05  3.6e-03  0
                                  1             1.6e-07  2.4e-07  3.3e-07  8
                                  2             3.5e-07  3.8e-07  4.3e-07  4
                                  4             3.5e-07  3.5e-06  3.3e-06  2
                   bf16 autocast  None          2.8e-03  4.5e-02  3.6e-01  0
                                  1             2.8e-03  4.6e-03  7.2e-03  8
                                  2             2.8e-03  4.6e-03  7.2e-03  4
                                  4             2.8e-03  1.2e-02  7.5e-03  2
                   fp16 autocast  None          5.1e-04  3.0e-03  3.3e-01  0
                                  1             3.7e-04  5.7e-04  9.1e-04  8
                                  2             3.8e-04  6.1e-04  9.3e-04  4
                                  4             3.8e-04  9.8e-04  1.1e-03  2

Read it as: the residual scale is not what drives the fp32 K = 8 error (N(0, 0.05)
still gives 3.6e-3): the 1/|a| = 2 per column is. Under autocast the anchored rows
level off at a floor that anchoring cannot remove (bf16: ~3e-3-5e-3 even with
every column anchored, and at K = 2 where column 0 is anchored and column 1's
inputs are the kept outputs): the recompute-and-``autograd.grad`` per level rounds
the half-precision gradient flow differently from one plain graph. That floor is
bf16's own noise, not a loss of accuracy: against the float64 truth (tiny AdaRevD,
bf16 autocast, relative norm of all parameter gradients) plain autograd is off by
3.7e-2 (K = 2) and 2.9e-2 (K = 4), anchored every 1 or 2 columns by 3.8e-2 and
2.9e-2, pure inversion by 6.8e-2 and 4.1e-2 -- the anchored walk is as accurate as
plain autograd, two roundings of it just differ by ~5e-3. Anchoring
every 2 columns keeps bf16 at the floor up to K = 8 (< 1e-2); every 4 does not at
K = 4 (1.2e-2-2e-2). fp32 needs an anchor only beyond K = 4. These are AdaRevD's
"auto" defaults (``restorenet.models.adarevd``). Memory: each state set is the n
states in fp32 (AdaRevD: 1.875 * w * H^2 floats, a fraction of one column's
recompute activations); the time cost is none (an anchored column skips the
inversion pass and runs a coupling forward instead).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import weakref
from typing import NamedTuple, Optional, Protocol, Sequence, runtime_checkable

import torch
import torch.nn as nn
from torch import Tensor

from restorenet._checks import check_tensor
from restorenet.ops._common import autocast_dtype
from restorenet.ops._nvtx import nvtx_range
from restorenet.ops.reversible import DTYPES, rev_coupling_forward, rev_coupling_invert

OP = "reversible_columns"


@runtime_checkable
class ReversibleColumn(Protocol):
    """What ``reversible_columns`` needs of a column (AdaRevD's ``DecoderColumn`` is one).

    ``num_levels``: n, the number of states.
    ``update_term(i, coarse, finer, state_dtype)``: ``f_i = L_i(coarse, finer)`` in
    ``state_dtype`` (``finer`` is None for the finest level); may use dropout,
    BatchNorm, autocast -- the op replays them.
    ``coupling_alpha(i, state_dtype)``: ``a_i`` as the coupling ops take it, [C_i],
    fp32 (fp64 for fp64 states), differentiable to the parameters it comes from;
    ``|a_i| >= 1e-3``.
    ``level_parameters(i)``: every tensor ``update_term(i)`` and ``coupling_alpha(i)``
    depend on and may need gradients for (their gradients are returned through
    autograd as in the plain path).
    ``level_buffers(i)``: the buffers ``update_term(i)`` may update in place
    (running statistics); restored after the recompute. ``()`` if none.

    Optional: ``state_channels``: the channels of c_0..c_{n-1}, checked against the
    given states (a wrong one then names its argument instead of failing in a conv).
    ``may_draw_random() -> bool``: False when no update term can draw
    random numbers now (e.g. dropout 0 or eval mode); the op then keeps no RNG
    states. Without it a column counts as drawing (the safe side: K * n RNG
    states, ~5 KiB each on CPU, are kept for the replay).
    """

    num_levels: int

    def update_term(self, i: int, coarse: Tensor, finer: Optional[Tensor],
                    state_dtype: torch.dtype) -> Tensor: ...

    def coupling_alpha(self, i: int, state_dtype: torch.dtype) -> Tensor: ...

    def level_parameters(self, i: int) -> Sequence[Tensor]: ...

    def level_buffers(self, i: int) -> Sequence[Tensor]: ...


def coupling_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the states are kept in: fp32 for fp16/bf16 inputs (see the module
    docstring's table), else the inputs' own (fp32 or fp64)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# --------------------------------------------------------------- public functions
def reversible_columns(columns: Sequence[ReversibleColumn], x: Tensor, states: Sequence[Tensor], *,
                       heads: Optional[Sequence[nn.Module]] = None, memory_efficient: bool = True,
                       anchor_every: Optional[int] = None) -> list[Tensor]:
    """Run K reversible columns one after another; return each column's output.

    Args:
        columns: K >= 1 objects following ``ReversibleColumn``, all with the same
            ``num_levels`` n.
        x: the input every column's coarsest update reads (``L_0(x, c_1)``).
        states: the n initial states ``c_0..c_{n-1}`` (coarse to fine), each
            [N, C_i, H_i, W_i], float16/bfloat16/float32/float64, on ``x``'s device,
            with the batch size of ``x``.
        heads: None, or K modules: column k's output is then ``heads[k](c_{n-1}')``
            (AdaRevD's per-column conv heads). Run inside the op, so with
            ``memory_efficient`` a head's input is not kept either: backward
            recomputes it from the rebuilt state (see "Memory" in the module
            docstring). The head sees ``c_{n-1}'`` in the states' (promoted) dtype;
            it must not draw random numbers (ValueError: its recompute is not replayed).
        memory_efficient: True: backward rebuilds the states by inverting the
            couplings instead of storing activations (see the module docstring);
            False: plain autograd through the same loop. Without gradients both
            run the plain loop.
        anchor_every: None: pure reversible (keeps x and the last states only).
            An int a >= 1: the forward also keeps the states entering every column
            whose index is a multiple of a (column 0's are the inputs), and the
            backward walk recomputes those columns from the kept states instead of
            the rebuilt ones, so inversion errors compound over at most a columns;
            costs ceil(K / a) extra state sets (see the module docstring). a = 1 is
            per-column checkpointing. Ignored by the plain path.
    Returns:
        ``[c_{n-1}' of column 1, ..., of column K]`` in the states' (promoted)
        dtype, or the heads' outputs. The states are kept in ``coupling_dtype``
        (fp32 for half inputs).
    """
    columns = _check_columns(columns)
    num_levels = columns[0].num_levels
    _check_states(states, num_levels, x, getattr(columns[0], "state_channels", None))
    heads = _check_heads(heads, len(columns))
    _check_anchor_every(anchor_every)
    dtype = functools.reduce(torch.promote_types, (s.dtype for s in states))
    states = [s.to(coupling_dtype(dtype)) for s in states]
    params = _chain_parameters(columns, heads)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *states, *params))
    if memory_efficient and needs_grad:
        handle = _chain_handle(columns, heads)
        amp = autocast_dtype(x.device)
        record_rng = any(_may_draw_random(c) for c in columns)
        out = torch.ops.restorenet.reversible_columns.default(
            handle, x, states, params, anchor_every or 0, dtype, amp, record_rng)
        return list(out[:len(columns)])
    outputs = []
    for k, col in enumerate(columns):
        states = column_forward(col, x, states)
        outputs.append(_column_output(heads, k, states[-1], dtype))
    return outputs


def column_forward(column: ReversibleColumn, x: Tensor, states: Sequence[Tensor],
                   rng_tape: Optional[list] = None) -> tuple[Tensor, ...]:
    """One column, differentiable: ``(c_0..c_{n-1}) -> (c_0'..c_{n-1}')``.

    The coupling runs in ``coupling_dtype`` through ``rev_coupling_forward``; the
    new states come back in the (promoted) dtype of the given ones. ``rng_tape``,
    when given, receives per level the RNG state before its update if the update
    drew random numbers, else None (what backward needs to replay it).
    """
    dtype = functools.reduce(torch.promote_types, (s.dtype for s in states))
    work = coupling_dtype(dtype)
    states = [s.to(work) for s in states]
    new: list[Tensor] = []
    for i in range(column.num_levels):
        coarse = x if i == 0 else new[i - 1]
        finer = states[i + 1] if i + 1 < len(states) else None
        before = _rng_state(x.device) if rng_tape is not None else None
        f = column.update_term(i, coarse, finer, work)
        if rng_tape is not None:
            rng_tape.append(None if _same_rng(before, _rng_state(x.device)) else before)
        new.append(rev_coupling_forward(states[i], f, column.coupling_alpha(i, work)))
    return tuple(s.to(dtype) for s in new)


def _column_output(heads, k: int, last_state: Tensor, dtype: torch.dtype) -> Tensor:
    """Column k's output: its finest new state in the states' dtype, through its head."""
    out = last_state.to(dtype)
    return heads[k](out) if heads is not None else out


def _chain_parameters(columns, heads) -> list[Tensor]:
    """Every tensor the chain may need gradients for, in the order backward returns
    them: each column's level parameters (level by level), then each head's."""
    params = [p for col in columns for i in range(col.num_levels) for p in col.level_parameters(i)]
    return params + [p for head in heads or () for p in head.parameters()]


def _may_draw_random(column) -> bool:
    probe = getattr(column, "may_draw_random", None)
    return True if probe is None else bool(probe())


# ------------------------------------------------------------------- the op
# The memory-efficient path is one custom op (``torch.ops.restorenet.reversible_columns``)
# with a custom op for its backward, both opaque to torch.compile: Dynamo and
# Inductor put them in the graph as calls (fullgraph works) and never trace into
# them, so the forward and its recompute in backward run the same eager code: the
# same dropout masks (the RNG is recorded and replayed around each level) and the
# same roundings. A compiled forward with an eager recompute would instead draw
# Inductor's random numbers in one and eager's in the other -- silently wrong
# gradients.
#
# Columns and heads are Python objects, which an op schema cannot carry: the op
# takes an int handle into a registry of weak references (``_chain_handle``), one
# per distinct chain, and reads the modules' own parameters; the ``params`` list
# links those parameters into autograd (and gives the fake impl their shapes).
_CHAINS: dict[int, tuple] = {}  # handle -> (weakrefs to the columns, to the heads or None)
_HANDLES: dict[tuple, int] = {}  # ids of (columns, heads) -> handle
_NEXT_HANDLE = itertools.count(1)


def _chain_handle(columns, heads) -> int:
    """The registry handle of this chain of columns (and heads), registered on first
    use. Entries hold weak references, so a model is freed as usual; an id reused
    by a new object is told apart by the dead reference."""
    return _chain_handle_of(len(columns), heads is not None, *columns, *(heads or ()))


# Under torch.compile Dynamo calls this at trace time and bakes the handle into the
# graph as a constant (guarded by the modules' identity): a registration traced as
# a side effect would happen only after the graph, too late for the op's fake impl.
# The modules go in as separate arguments: Dynamo turns those into constants, not a list.
@torch._dynamo.assume_constant_result
def _chain_handle_of(num_columns: int, has_heads: bool, *objs) -> int:
    key = (num_columns, *map(id, objs))
    handle = _HANDLES.get(key)
    if handle is not None and all(r() is o for r, o in zip(_chain_refs(handle), objs)):
        return handle
    _forget_freed_chains()
    handle = next(_NEXT_HANDLE)  # never reused: a stale handle fails loudly in _chain
    refs = tuple(weakref.ref(o) for o in objs)
    _CHAINS[handle] = (refs[:num_columns], refs[num_columns:] if has_heads else None)
    _HANDLES[key] = handle
    return handle


def _forget_freed_chains() -> None:
    """Drop the entries of chains with a freed module (a new registration is rare)."""
    dead = {h for h, (cols, heads) in _CHAINS.items() if any(r() is None for r in (*cols, *(heads or ())))}
    for key in [key for key, h in _HANDLES.items() if h in dead]:
        del _HANDLES[key]
    for h in dead:
        del _CHAINS[h]


def _chain_refs(handle: int) -> tuple:
    cols, heads = _CHAINS[handle]
    return (*cols, *(heads or ()))


def _chain(handle: int) -> tuple[list, Optional[list]]:
    """The live columns and heads behind a handle."""
    refs = _CHAINS.get(handle)
    columns = [r() for r in refs[0]] if refs else [None]
    heads = None if not refs or refs[1] is None else [r() for r in refs[1]]
    if any(o is None for o in (*columns, *(heads or ()))):
        raise RuntimeError(f"reversible_columns: chain {handle} was freed before its backward ran")
    return columns, heads


class _Spec(NamedTuple):
    """How the op's outputs are laid out (all known before it runs). Outputs: the K
    column outputs, then the kept state sets -- the last states, then one set per
    anchored column k > 0 (column 0's are the op's inputs) -- then the RNG record.
    An op may not return one tensor twice, so where a column output *is* a state
    (no heads, states already in the output dtype) that state is left out of its
    set and read back from the outputs."""
    num_columns: int
    num_levels: int
    anchor_every: int
    has_heads: bool
    states_are_outputs: bool

    @property
    def anchored(self) -> list[int]:
        a = self.anchor_every
        return [k for k in range(self.num_columns) if a and k % a == 0]

    @property
    def set_size(self) -> int:  # tensors per kept state set among the outputs
        return self.num_levels - (not self.has_heads and self.states_are_outputs)

    @property
    def num_kept_sets(self) -> int:  # the last states + anchors after column 0
        return 1 + sum(1 for k in self.anchored if k > 0)


def _spec_of(columns, heads, states, anchor_every: int, out_dtype: torch.dtype) -> _Spec:
    return _Spec(len(columns), len(states), anchor_every, heads is not None, states[0].dtype == out_dtype)


@torch.library.custom_op("restorenet::reversible_columns", mutates_args=())
def _forward_op(chain: int, x: Tensor, states: list[Tensor], params: list[Tensor], anchor_every: int,
                out_dtype: torch.dtype, autocast_dtype: Optional[torch.dtype], record_rng: bool) -> list[Tensor]:
    columns, heads = _chain(chain)
    spec = _spec_of(columns, heads, states, anchor_every, out_dtype)
    outputs, kept_sets, rng = [], [], []
    with nvtx_range(OP, "fwd", x.device), _dispatch_as_eager(), torch.no_grad(), \
            _autocast(x.device.type, autocast_dtype):
        for k, col in enumerate(columns):
            if k in spec.anchored and k > 0:
                kept_sets.append(states)
            tape: Optional[list] = [] if record_rng else None
            states = column_forward(col, x, states, rng_tape=tape)
            rng.append(tape)
            before = _rng_state(x.device) if heads is not None else None
            outputs.append(_column_output(heads, k, states[-1], out_dtype))
            if before is not None and not _same_rng(before, _rng_state(x.device)):
                # Backward recomputes heads without an RNG replay: a dropout mask
                # drawn again would give silently wrong gradients.
                raise ValueError(f"heads[{k}] must not draw random numbers (e.g. dropout in training "
                                 f"mode): the memory-efficient backward recomputes it")
    kept_sets.insert(0, states)
    kept = [s for kept_set in kept_sets for s in kept_set[:spec.set_size]]
    return outputs + kept + ([_pack_rng(rng, x.device)] if record_rng else [])


@_forward_op.register_fake
def _(chain, x, states, params, anchor_every, out_dtype, autocast_dtype, record_rng):
    columns, heads = _chain(chain)
    spec = _spec_of(columns, heads, states, anchor_every, out_dtype)
    last = states[-1].to(out_dtype)
    if heads is None:
        outputs = [torch.empty_like(last) for _ in columns]
    else:  # shapes and dtypes of the heads' outputs: run them on fakes (the fake parameters)
        head_params = iter(params[len(params) - sum(len(list(h.parameters())) for h in heads):])
        with _autocast(x.device.type, autocast_dtype):
            outputs = [torch.func.functional_call(head, {name: next(head_params) for name, _ in
                                                         head.named_parameters()}, (last,))
                       for head in heads]
    kept = [torch.empty_like(s) for _ in range(spec.num_kept_sets) for s in states[:spec.set_size]]
    rng = [x.new_empty(len(columns), spec.num_levels, _rng_bytes(x.device), dtype=torch.uint8,
                       device="cpu")] if record_rng else []
    return outputs + kept + rng


def _setup_context(ctx, inputs, output):
    chain, x, states, params, anchor_every, out_dtype, autocast_dtype, record_rng = inputs
    spec = _spec_of(*_chain(chain), states, anchor_every, out_dtype)
    k, n = spec.num_columns, spec.num_levels
    kept = list(output[k:k + spec.num_kept_sets * spec.set_size])
    sets = [kept[j * spec.set_size:(j + 1) * spec.set_size] for j in range(spec.num_kept_sets)]
    if spec.set_size < n:  # a column's output is its last state: put it back in its set
        sets[0].append(output[k - 1])
        for j, col in enumerate(a for a in spec.anchored if a > 0):
            sets[j + 1].append(output[col - 1])
    anchors = list(states) if spec.anchored else []  # column 0's anchor: the inputs
    anchors += [s for kept_set in sets[1:] for s in kept_set]
    rng = [output[-1]] if record_rng else []
    ctx.save_for_backward(x, *sets[0], *anchors, *rng)
    ctx.args = (chain, anchor_every, out_dtype, autocast_dtype, record_rng)
    ctx.param_needs_grad = [p.requires_grad for p in params]
    ctx.params = params


def _autograd_backward(ctx, grads):
    chain, anchor_every, out_dtype, autocast_dtype, record_rng = ctx.args
    x, *saved = ctx.saved_tensors
    columns, _ = _chain(chain)
    k = len(columns)
    grad_outputs = [g if g is not None else x.new_zeros(()) for g in grads[:k]]
    out = torch.ops.restorenet.reversible_columns_backward.default(
        chain, x, saved, grad_outputs, ctx.params, anchor_every, out_dtype, autocast_dtype, record_rng)
    n = columns[0].num_levels
    grad_x, grad_states, grad_params = out[0], out[1:1 + n], out[1 + n:]
    need_x, need_states = ctx.needs_input_grad[1:3]
    grad_params = [g if need else None for g, need in zip(grad_params, ctx.param_needs_grad)]
    return (None, grad_x if need_x else None, list(grad_states) if need_states else None, grad_params,
            None, None, None, None)


_forward_op.register_autograd(_autograd_backward, setup_context=_setup_context)


@torch.library.custom_op("restorenet::reversible_columns_backward", mutates_args=())
def _backward_op(chain: int, x: Tensor, saved: list[Tensor], grad_outputs: list[Tensor], params: list[Tensor],
                 anchor_every: int,
                 out_dtype: torch.dtype, autocast_dtype: Optional[torch.dtype], record_rng: bool) -> list[Tensor]:
    """Gradients [x, states (n), every chain parameter] from the saved tensors
    (the last states, the anchors' state sets, the RNG record) and the outputs'
    gradients (a zero-d zero for an output without one)."""
    columns, heads = _chain(chain)
    n = columns[0].num_levels
    spec = _Spec(len(columns), n, anchor_every, heads is not None, True)
    states, saved = list(saved[:n]), saved[n:]
    anchors = {a: saved[j * n:(j + 1) * n] for j, a in enumerate(spec.anchored)}
    rng = _unpack_rng(saved[-1], len(columns), n, x.device) if record_rng else [[None] * n] * len(columns)
    grad_states = [torch.zeros_like(s) for s in states]
    grad_x = torch.zeros_like(x)
    column_grads: list = []
    head_grads: list = []
    with nvtx_range(OP, "bwd", x.device), _dispatch_as_eager(), _autocast(x.device.type, autocast_dtype):
        for k in reversed(range(len(columns))):
            if heads is not None:  # the head's input is this column's last state: recompute the head
                g_last, grads_k = _head_backward(heads[k], states[-1], grad_outputs[k], out_dtype)
                head_grads = grads_k + head_grads
            else:
                g_last = grad_outputs[k].to(states[-1].dtype)
            grad_states[-1] = grad_states[-1] + g_last
            states, grad_states, gx, grads = _column_backward(columns[k], x, states, grad_states, rng[k],
                                                              anchors.get(k))
            if gx is not None:
                grad_x = grad_x + gx
            column_grads = grads + column_grads
    # Zeros where a parameter got no gradient (frozen: autograd drops it, see
    # _setup_context), as an op returns tensors only.
    flat = [torch.zeros_like(p) if g is None else g for g, p in zip(column_grads + head_grads, params)]
    return [grad_x, *grad_states, *flat]


@_backward_op.register_fake
def _(chain, x, saved, grad_outputs, params, anchor_every, out_dtype, autocast_dtype, record_rng):
    n = _chain(chain)[0][0].num_levels
    return [torch.empty_like(x), *(torch.empty_like(s) for s in saved[:n]), *(torch.empty_like(p) for p in params)]


def _head_backward(head, last_state: Tensor, grad_out: Tensor, out_dtype: torch.dtype):
    """Recompute ``head(c_{n-1}')`` with grad and backprop ``grad_out`` into the state
    and the head's parameters (None for frozen ones)."""
    state = last_state.detach().requires_grad_()
    params = list(head.parameters())
    trainable = [p for p in params if p.requires_grad]
    with _buffers_restored(list(head.buffers())), torch.enable_grad():
        y = head(state.to(out_dtype))
        grads = torch.autograd.grad([y], [state, *trainable], [grad_out.expand_as(y).to(y.dtype)],
                                    allow_unused=True)
    g_state = torch.zeros_like(state) if grads[0] is None else grads[0]
    g_trainable = iter(grads[1:])
    return g_state, [next(g_trainable) if p.requires_grad else None for p in params]


def _column_backward(column, x, new_states, grad_new, rng_tape, anchor=None):
    """Walk one column's levels in reverse: rebuild (c_0..c_{n-1}) from
    (c_0'..c_{n-1}') and turn the gradients on the new states into gradients on
    the old states, x, and the level parameters (ordered like
    ``column.level_parameters(0..n-1)``). ``anchor``: the column's input states
    as the forward kept them; then nothing is rebuilt, the kept states feed the
    recompute (and come back as the old states)."""
    n = column.num_levels
    grad_new = list(grad_new)
    old: list = [None] * n
    grad_old: list = [None] * n
    level_grads: list = [None] * n
    grad_x = None
    for i in reversed(range(n)):
        coarse = x if i == 0 else new_states[i - 1]
        finer = old[i + 1] if i + 1 < n else None
        if anchor is None:
            old[i], grad_old[i], g_coarse, g_finer, level_grads[i] = _invert_level(
                column, i, coarse, finer, new_states[i], grad_new[i], rng_tape[i])
        else:
            old[i] = anchor[i]
            grad_old[i], g_coarse, g_finer, level_grads[i] = _recompute_level(
                column, i, coarse, finer, anchor[i], grad_new[i], rng_tape[i])
        if finer is not None and g_finer is not None:  # c_{i+1} fed L_i: finish its gradient
            grad_old[i + 1] = grad_old[i + 1] + g_finer
        if i == 0:
            grad_x = g_coarse
        elif g_coarse is not None:  # c'_{i-1} fed L_i: add before level i-1 is walked
            grad_new[i - 1] = grad_new[i - 1] + g_coarse
    return old, grad_old, grad_x, [g for grads in level_grads for g in grads]


def _invert_level(column, i: int, coarse, finer, new_state, grad_new, rng_state):
    """Undo and backprop ``c_i' = a_i*c_i + f_i``, ``f_i = L_i(coarse, finer)``.

    ``rev_coupling_invert`` does the memory-bound part in one pass: c_i, dc_i = a_i*dc_i'
    and da_i = sum_{n,h,w} dc_i' * c_i. One autograd call then takes df_i = dc_i' into
    L_i (parameters, coarse, finer) and da_i back to the raw alpha parameters.
    """
    coarse = coarse.detach().requires_grad_()
    finer = finer.detach().requires_grad_() if finer is not None else None
    params = list(column.level_parameters(i))
    trainable = [p for p in params if p.requires_grad]
    # Buffers are put back only after autograd.grad: the recompute's graph may have
    # saved them (BatchNorm saves its running statistics), so no in-place copy before.
    with _buffers_restored(column.level_buffers(i)):
        with torch.enable_grad(), _replayed_rng(rng_state):
            f = column.update_term(i, coarse, finer, new_state.dtype)  # the forward's f, again
            alpha = column.coupling_alpha(i, new_state.dtype)
        old, g_old, g_alpha = rev_coupling_invert(new_state, f.detach(), alpha.detach(), grad_new)
        outputs, grad_outputs = [f], [grad_new]
        if alpha.requires_grad:
            outputs.append(alpha)
            grad_outputs.append(g_alpha)
        wrt = [coarse] + ([finer] if finer is not None else []) + trainable
        grads = list(torch.autograd.grad(outputs, wrt, grad_outputs, allow_unused=True))
    g_coarse, g_finer, g_params = _split_grads(grads, finer, params, trainable)
    return old, g_old, g_coarse, g_finer, g_params


def _recompute_level(column, i: int, coarse, finer, old_state, grad_new, rng_state):
    """Backprop ``c_i' = a_i*c_i + f_i`` at an anchor, where c_i (``old_state``) was
    kept: recompute f_i and the coupling forward with grad (as checkpointing would)
    and take one autograd call into c_i, L_i's inputs and parameters, a_i. Nothing
    is rebuilt, so no inversion error enters here; da_i uses the exact c_i."""
    coarse = coarse.detach().requires_grad_()
    finer = finer.detach().requires_grad_() if finer is not None else None
    old_state = old_state.detach().requires_grad_()
    params = list(column.level_parameters(i))
    trainable = [p for p in params if p.requires_grad]
    with _buffers_restored(column.level_buffers(i)):
        with torch.enable_grad(), _replayed_rng(rng_state):
            f = column.update_term(i, coarse, finer, old_state.dtype)
            new = rev_coupling_forward(old_state, f, column.coupling_alpha(i, old_state.dtype))
        wrt = [old_state, coarse] + ([finer] if finer is not None else []) + trainable
        grads = list(torch.autograd.grad([new], wrt, [grad_new], allow_unused=True))
    g_old = grads.pop(0)
    g_old = torch.zeros_like(old_state) if g_old is None else g_old
    g_coarse, g_finer, g_params = _split_grads(grads, finer, params, trainable)
    return g_old, g_coarse, g_finer, g_params


def _split_grads(grads, finer, params, trainable):
    """``autograd.grad``'s answer for [coarse, (finer), *trainable] -> (g_coarse,
    g_finer or None, one entry per parameter with None for frozen ones)."""
    g_coarse = grads[0]
    g_finer = grads[1] if finer is not None else None
    g_trainable = iter(grads[len(grads) - len(trainable):])
    g_params = [next(g_trainable) if p.requires_grad else None for p in params]
    return g_coarse, g_finer, g_params


# ------------------------------------------------------------- replay guards
def _rng_state(device: torch.device):
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda_state, device


def _same_rng(a, b) -> bool:
    """Whether no random number was drawn between two ``_rng_state`` records."""
    if not torch.equal(a[0], b[0]):
        return False
    return a[1] is None or torch.equal(a[1], b[1])


@contextlib.contextmanager
def _replayed_rng(snapshot):
    """Run the block with a recorded CPU (and CUDA) RNG state, then put the live one
    back. ``None``: the level drew no random numbers, nothing to replay."""
    if snapshot is None:
        yield
        return
    cpu_state, cuda_state, device = snapshot
    with torch.random.fork_rng(devices=[device] if cuda_state is not None else []):
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)
        yield


@contextlib.contextmanager
def _buffers_restored(buffers: Sequence[Tensor]):
    """Put the given buffers back as they were once the block is done, so that a
    recompute does not update running statistics a second time."""
    buffers = list(buffers)
    saved = [b.detach().clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)


@contextlib.contextmanager
def _autocast(device_type: str, dtype: Optional[torch.dtype]):
    """The caller's autocast state, passed to the ops explicitly: inside a compiled
    graph the op runs outside any autocast region (Inductor applied it at trace time)."""
    if dtype is None and not torch.amp.is_autocast_available(device_type):  # e.g. meta: nothing to turn off
        yield
    elif dtype is None:
        with torch.autocast(device_type, enabled=False):
            yield
    else:
        with torch.autocast(device_type, dtype=dtype):
            yield


# A custom op's body runs below autograd: the dispatcher has excluded the autograd
# keys, so even under enable_grad() nothing would be recorded for the recompute's
# autograd.grad. These are the keys put back (the rest of the TLS is kept).
_AUTOGRAD_KEYS = tuple(getattr(torch._C.DispatchKey, name) for name in (
    "AutogradFunctionality", "AutogradOther", "AutogradNestedTensor", "ADInplaceOrView")
    if hasattr(torch._C.DispatchKey, name))


@contextlib.contextmanager
def _dispatch_as_eager():
    """Run the block with autograd dispatch as in eager code outside any op."""
    excluded = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        excluded = excluded.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded):
        yield


def _rng_bytes(device: torch.device) -> int:
    """Bytes of one RNG record: a 'drew random numbers' flag, the CPU generator's
    state and, for CUDA tensors, the device generator's."""
    cuda = torch.cuda.get_rng_state(device).numel() if device.type == "cuda" else 0
    return 1 + torch.get_rng_state().numel() + cuda


def _pack_rng(tapes: list, device: torch.device) -> Tensor:
    """Per column and level, the RNG state before the update (``column_forward``'s
    tapes) as one uint8 tensor [K, n, _rng_bytes] (on the CPU, like the states)."""
    rows = torch.zeros(len(tapes), len(tapes[0]), _rng_bytes(device), dtype=torch.uint8)
    for k, tape in enumerate(tapes):
        for i, snapshot in enumerate(tape):
            if snapshot is not None:
                cpu_state, cuda_state, _ = snapshot
                parts = [torch.ones(1, dtype=torch.uint8), cpu_state] + ([cuda_state.cpu()] if cuda_state is not None
                                                                         else [])
                rows[k, i] = torch.cat(parts)
    return rows


def _unpack_rng(rows: Tensor, num_columns: int, num_levels: int, device: torch.device) -> list[list]:
    """``_pack_rng``'s tapes back: per column, per level, a snapshot or None."""
    cpu_bytes = torch.get_rng_state().numel()
    tapes = []
    for k in range(num_columns):
        tape = []
        for i in range(num_levels):
            row = rows[k, i]
            if not row[0]:
                tape.append(None)
                continue
            cuda_state = row[1 + cpu_bytes:].clone() if device.type == "cuda" else None
            tape.append((row[1:1 + cpu_bytes].clone(), cuda_state, device))
        tapes.append(tape)
    return tapes


# ---------------------------------------------------------------------- checks
def _check_columns(columns) -> list:
    if isinstance(columns, (str, bytes)) or not isinstance(columns, Sequence) or not columns:
        raise TypeError(f"columns must be a non-empty sequence of reversible columns, got {columns!r}")
    columns = list(columns)
    for k, col in enumerate(columns):
        if not isinstance(col, ReversibleColumn):
            raise TypeError(f"columns[{k}] must follow restorenet.ops.ReversibleColumn (num_levels, "
                            f"update_term, coupling_alpha, level_parameters, level_buffers), "
                            f"got {type(col).__name__}")
        if col.num_levels != columns[0].num_levels or col.num_levels < 1:
            raise ValueError(f"columns[{k}] must have num_levels == columns[0].num_levels "
                             f"({columns[0].num_levels}) >= 1, got {col.num_levels}")
    return columns


def _check_anchor_every(anchor_every) -> None:
    if anchor_every is None:
        return
    if isinstance(anchor_every, bool) or not isinstance(anchor_every, int) or anchor_every < 1:
        raise ValueError(f"anchor_every must be None or an int >= 1 (columns between kept state "
                         f"sets), got {anchor_every!r}")


def _check_states(states, num_levels: int, x, channels: Optional[Sequence[int]] = None) -> None:
    """x and the states: 4-D floating tensors on one device with one batch size, and
    the channel counts the columns declare (``state_channels``), if they do."""
    check_tensor("x", x, ndim=4, dtypes=DTYPES)
    if isinstance(states, torch.Tensor) or not isinstance(states, Sequence) or len(states) != num_levels:
        raise ValueError(f"states must be a sequence of {num_levels} tensors (one per level), "
                         f"got {type(states).__name__}"
                         + (f" of length {len(states)}" if isinstance(states, Sequence) else ""))
    for i, s in enumerate(states):
        check_tensor(f"states[{i}]", s, ndim=4, dtypes=DTYPES, device=x.device)
        if s.shape[0] != x.shape[0]:
            raise ValueError(f"states[{i}] must have the batch size of x ({x.shape[0]}), "
                             f"got shape {tuple(s.shape)}")
        if channels is not None and s.shape[1] != channels[i]:
            raise ValueError(f"states[{i}] must have {channels[i]} channels (the columns' "
                             f"state_channels[{i}]), got shape {tuple(s.shape)}")


def _check_heads(heads, num_columns: int) -> Optional[list]:
    if heads is None:
        return None
    if not isinstance(heads, (Sequence, nn.ModuleList)):
        raise TypeError(f"heads must be None or a sequence of {num_columns} nn.Modules (one per "
                        f"column), got {type(heads).__name__}")
    heads = list(heads)
    if len(heads) != num_columns:
        raise ValueError(f"heads must hold one module per column ({num_columns}), got {len(heads)}")
    for k, head in enumerate(heads):
        if not isinstance(head, nn.Module):
            raise TypeError(f"heads[{k}] must be an nn.Module, got {type(head).__name__}")
    return heads


# ---------------------------------------------------------- precision report
def reconstruction_error(columns: Sequence[ReversibleColumn], x: Tensor, states: Sequence[Tensor]) -> float:
    """Run the columns forward (no grad, in the caller's autocast), then rebuild the
    initial states by inverting every column as backward does; return the max over
    levels of max|rebuilt - initial| / max|initial|. Columns must be deterministic
    (dropout off). States are kept in ``coupling_dtype`` as in the op."""
    columns = _check_columns(columns)
    _check_states(states, columns[0].num_levels, x)
    dtype = functools.reduce(torch.promote_types, (s.dtype for s in states))
    initial = [s.to(coupling_dtype(dtype)) for s in states]
    with torch.no_grad():
        last = initial
        for col in columns:
            last = column_forward(col, x, last)
    rebuilt = list(last)
    zeros = [torch.zeros_like(s) for s in rebuilt]
    no_rng = [None] * columns[0].num_levels
    for col in reversed(columns):
        rebuilt, *_ = _column_backward(col, x, rebuilt, zeros, no_rng)
    return max(((r.double() - s.double()).abs().max() / s.double().abs().max()).item()
               for r, s in zip(rebuilt, initial))


def precision_table(ks=(2, 4, 8), width: int = 4, size: int = 4, seed: int = 0) -> list[str]:
    """The table in the module docstring (AdaRevD's decoder; imported lazily: models
    depend on ops, not the other way round)."""
    from unittest import mock

    from restorenet.models.adarevd import ReversibleColumns

    rows = [("fp32", None, "fp32"), ("bf16 autocast", torch.bfloat16, "fp32"),
            ("fp16 autocast", torch.float16, "fp32"), ("bf16 autocast", torch.bfloat16, "bf16"),
            ("fp16 autocast", torch.float16, "fp16")]
    lines = [f"{'L_i runs in':14} {'states':8} " + " ".join(f"rebuilt K={k}" if j == 0 else f"K={k:<7}"
                                                           for j, k in enumerate(ks))
             + "  " + " ".join(f"grad K={k}" if j == 0 else f"K={k:<7}" for j, k in enumerate(ks))]
    for label, amp, state_name in rows:
        state_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[state_name]
        rebuilt, grad = [], []
        for k in ks:
            torch.manual_seed(seed)
            decoder = ReversibleColumns(width, k)
            with torch.no_grad():
                for name, p in decoder.named_parameters():
                    if name.endswith(("beta", "gamma")):
                        p.normal_(0.0, 0.5)
            x = torch.randn(2, 16 * width, size // 2, size // 2)
            states = [torch.randn(2, width * 2 ** (3 - i), size * 2 ** i, size * 2 ** i) for i in range(4)]
            keep = (lambda d: state_dtype) if state_name != "fp32" else coupling_dtype
            with mock.patch(f"{__name__}.coupling_dtype", keep), _maybe_autocast(amp):
                rebuilt.append(reconstruction_error(list(decoder.columns), x, states))
            grad.append(_gradient_error(decoder, x, states, amp, keep))
        lines.append(f"{label:14} {state_name:8} " + " ".join(f"{e:.1e}  " for e in rebuilt)
                     + "  " + " ".join(f"{e:.1e} " for e in grad))
    return lines


def anchor_table(ks=(2, 4, 8), anchors=(None, 1, 2, 4), residual_std: float = 0.5,
                 width: int = 4, size: int = 4, seed: int = 0) -> list[str]:
    """Gradient error of the memory-efficient path vs plain autograd (as in
    ``precision_table``, fp32 coupling states) for each ``anchor_every``, with
    L_i in fp32 and under bf16/fp16 autocast; beta/gamma ~ N(0, residual_std)
    (0.5: every L_i strongly active; small values: closer to a trained AdaRevD,
    whose NAF blocks start at beta = gamma = 0). Last column: saved state sets
    at the largest K (x and the last states not counted)."""
    from restorenet.models.adarevd import ReversibleColumns

    lines = [f"{'L_i runs in':14} {'anchor_every':12} " + " ".join(f"K={k:<7}" for k in ks)
             + f"  state sets kept at K={ks[-1]}"]
    for label, amp in (("fp32", None), ("bf16 autocast", torch.bfloat16), ("fp16 autocast", torch.float16)):
        errors = {a: [] for a in anchors}
        for k in ks:
            torch.manual_seed(seed)
            decoder = ReversibleColumns(width, k)
            with torch.no_grad():
                for name, p in decoder.named_parameters():
                    if name.endswith(("beta", "gamma")):
                        p.normal_(0.0, residual_std)
            x = torch.randn(2, 16 * width, size // 2, size // 2)
            states = [torch.randn(2, width * 2 ** (3 - i), size * 2 ** i, size * 2 ** i) for i in range(4)]
            ref = _gradients(decoder, x, states, amp, False, None)
            for a in anchors:
                got = _gradients(decoder, x, states, amp, True, a)
                errors[a].append(((got - ref).norm() / ref.norm()).item())
        for a in anchors:
            sets = 0 if a is None else -(-ks[-1] // a)
            lines.append(f"{label:14} {str(a):12} " + " ".join(f"{e:.1e}  " for e in errors[a]) + f"  {sets}")
    return lines


def _gradients(decoder, x, states, amp, memory_efficient, anchor_every) -> Tensor:
    """Every parameter and input gradient of a fixed random projection of the outputs."""
    torch.manual_seed(1)
    weights = [torch.randn_like(states[-1]) for _ in decoder.columns]
    xs = [t.detach().clone().requires_grad_() for t in (x, *states)]
    decoder.zero_grad(set_to_none=True)
    with _maybe_autocast(amp):
        outs = reversible_columns(list(decoder.columns), xs[0], xs[1:], memory_efficient=memory_efficient,
                                  anchor_every=anchor_every)
    sum((o.float() * w).sum() for o, w in zip(outs, weights)).backward()
    tensors = [t.grad for t in xs] + [p.grad for p in decoder.parameters()]
    return torch.cat([g.double().flatten() for g in tensors if g is not None])


def _maybe_autocast(dtype):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _gradient_error(decoder, x, states, amp, keep) -> float:
    """||g_reversible - g_plain|| / ||g_plain|| over every parameter and input gradient."""
    from unittest import mock

    torch.manual_seed(1)
    weights = [torch.randn_like(states[-1]) for _ in decoder.columns]

    def grads(memory_efficient):
        xs = [t.detach().clone().requires_grad_() for t in (x, *states)]
        decoder.zero_grad(set_to_none=True)
        with mock.patch(f"{__name__}.coupling_dtype", keep), _maybe_autocast(amp):
            outs = reversible_columns(list(decoder.columns), xs[0], xs[1:], memory_efficient=memory_efficient)
        sum((o.float() * w).sum() for o, w in zip(outs, weights)).backward()
        tensors = [t.grad for t in xs] + [p.grad for p in decoder.parameters()]
        return torch.cat([g.double().flatten() for g in tensors if g is not None])

    ref = grads(False)
    return ((grads(True) - ref).norm() / ref.norm()).item()


if __name__ == "__main__":  # python -m restorenet.ops.rev_columns [precision|anchors]
    import sys

    which = sys.argv[1:] or ["precision", "anchors"]
    if "precision" in which:
        print("\n".join(precision_table()))
    if "anchors" in which:
        for std in (0.5, 0.05):
            print(f"beta/gamma ~ N(0, {std})")
            print("\n".join(anchor_table(residual_std=std)))
