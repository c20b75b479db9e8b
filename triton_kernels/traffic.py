"""Bytes moved per launch: counted from the kernels' loop structure (a model), measured
in Triton's interpreter (every load and store it executes), and, for comparison,
counted for the PyTorch reference backend (every aten op's operands).

The model (:func:`kernel_traffic`) is what the report prints for real shapes; the
interpreter count (:func:`count_interpreter_traffic`) checks the model on small
shapes in the tests, byte for byte on the logits and the gradient.

Figures are "bytes per logit byte" for forward + backward: (bytes moved) / (N C E).
A copy of the logits (read + write) is 2.0: the floor of any loss that writes its
gradient.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch

from fusedloss.variants import Reduction, Variant

from .heuristics import fwd_config

@dataclass
class KernelTraffic:
    """Traffic of one forward+backward, from the loop structure."""
    n_rows: int
    n_cols: int
    elem: int
    single: bool
    logit_passes: int          # reads of the whole logits (L1/L2 level)
    logit_dram_passes: int     # of which from DRAM when the rows in flight fit in L2
    grad_writes: int           # writes of an (N, C) gradient
    other_bytes: int           # O(N): targets, stats, loss, weights, partials

    @property
    def logit_bytes(self) -> int:
        return self.n_rows * self.n_cols * self.elem

    @property
    def requested_bytes(self) -> int:
        return (self.logit_passes + self.grad_writes) * self.logit_bytes + self.other_bytes

    @property
    def dram_bytes(self) -> int:
        return (self.logit_dram_passes + self.grad_writes) * self.logit_bytes + self.other_bytes

    @property
    def per_logit_byte(self) -> float:
        """DRAM bytes per logit byte (the figure to compare with a copy's 2.0)."""
        return self.dram_bytes / self.logit_bytes

    @property
    def requested_per_logit_byte(self) -> float:
        return self.requested_bytes / self.logit_bytes


def _other_bytes(n: int, elem: int, grid: int, n_cols: int, reduction: int, has_weight: bool,
                 compute_grad: bool) -> int:
    """Everything but the (N, C) passes, an upper bound: per row the target (8), x_c (E),
    weight[c] (4), the stats (16), the 'none' loss and grad_output (4 + 4); for 'mean' the
    prologue's second read of the targets (and weights); per program the partial sum and
    the ticket (8), the mean's partial denominators (4 each), the last program's read of
    all partials; the backward scale kernel's grad_output read per program."""
    from .heuristics import scale_config
    from . import rows
    from .launch_common import PROLOGUE_BLOCK

    w = 4 if has_weight else 0
    b = n * (8 + elem + 16 + w)
    if reduction == Reduction.NONE:
        b += n * (4 + (4 if compute_grad else 0))
    else:
        b += grid * 8 + grid * 4
    if reduction != Reduction.NONE:
        b += 4                                   # the prologue zeroes the ticket counter
    if reduction == Reduction.MEAN:
        n_denom = min(rows.DENOM_PARTIALS.value, max(1, -(-n // PROLOGUE_BLOCK)))
        b += n * (8 + w) + 4 * n_denom + grid * 4 * n_denom * (2 if compute_grad else 1)
    if compute_grad:
        b += 4 * -(-n // scale_config(n_cols).block_n)
    return b


def kernel_traffic(variant: int, n_rows: int, n_cols: int, elem: int, *, compute_grad: bool = True,
                   reduction: int = Reduction.MEAN, has_weight: bool = False) -> KernelTraffic:
    """Bytes of forward (+ fused gradient) + backward with grad_output = 1, by loop structure:

    * on chip (single tile): the tile is loaded once; the gradient is stored once;
    * streamed, target-only: pass 1 (stats) + pass 2 (gradient, reverse order) read the row;
    * streamed bce: passes 1, 2 (loss sum and R) and 3 (gradient) read the row;
    * no gradient: the passes that produce the loss only (bce streamed: 2, else 1).

    Re-reads of a streamed row are served by L2 when the rows in flight fit in it (one row
    per program, reverse order): ``logit_dram_passes`` = 1 assumes so; the report states
    the condition."""
    cfg = fwd_config(n_cols, elem, variant)
    bce = int(variant) == Variant.BCE
    if cfg.single:
        passes = 1
    elif compute_grad:
        passes = 3 if bce else 2
    else:
        passes = 2 if bce else 1
    other = _other_bytes(n_rows, elem, -(-n_rows // cfg.block_n), n_cols, reduction, has_weight, compute_grad)
    return KernelTraffic(n_rows, n_cols, elem, cfg.single, passes, 1, 1 if compute_grad else 0, other)


# ----------------------------------------------------------------------------
# Interpreter count
# ----------------------------------------------------------------------------

@dataclass
class Access:
    kind: str              # "load" | "store" | "atomic"
    addresses: np.ndarray  # byte addresses of the active lanes
    itemsize: int


@dataclass
class InterpreterTraffic:
    """Every access the interpreter executed while the context was open."""
    accesses: list[Access] = field(default_factory=list)

    def bytes(self, kind: str | None = None, tensor: torch.Tensor | None = None, exclude=()) -> int:
        """Bytes of ``kind`` accesses (all if None) inside ``tensor``'s storage (anywhere if
        None) and outside every tensor of ``exclude``."""
        total = 0
        ranges = [_range(t) for t in exclude]
        for a in self.accesses:
            if kind is not None and a.kind != kind:
                continue
            sel = np.ones(a.addresses.shape, dtype=bool)
            if tensor is not None:
                lo, hi = _range(tensor)
                sel &= (a.addresses >= lo) & (a.addresses < hi)
            for lo, hi in ranges:
                sel &= ~((a.addresses >= lo) & (a.addresses < hi))
            total += int(sel.sum()) * a.itemsize
        return total


def _range(t: torch.Tensor) -> tuple[int, int]:
    st = t.untyped_storage()
    return st.data_ptr(), st.data_ptr() + st.nbytes()


@contextlib.contextmanager
def count_interpreter_traffic():
    """Record the loads/stores/atomics of every kernel the interpreter runs (TRITON_INTERPRET=1).

    Wraps the interpreter builder's memory operations: the bytes are those of the lanes
    whose mask is on, i.e. what the kernel asks of the memory system (a GPU may serve
    some from L1/L2: the model's ``logit_dram_passes`` says which)."""
    from triton.runtime import interpreter as it

    builder = it.interpreter_builder
    rec = InterpreterTraffic()
    saved = (builder.create_masked_load, builder.create_masked_store, builder.create_atomic_rmw)

    def itemsize(ptrs):
        return ptrs.get_element_ty().primitive_bitwidth // 8

    def load(ptrs, mask, other, cache_modifier, eviction_policy, is_volatile):
        m = np.broadcast_to(mask.data, ptrs.data.shape)
        rec.accesses.append(Access("load", ptrs.data[m].astype(np.uint64), itemsize(ptrs)))
        return saved[0](ptrs, mask, other, cache_modifier, eviction_policy, is_volatile)

    def store(ptrs, value, mask, cache_modifier, eviction_policy):
        m = np.broadcast_to(mask.data, ptrs.data.shape)
        rec.accesses.append(Access("store", ptrs.data[m].astype(np.uint64), itemsize(ptrs)))
        return saved[1](ptrs, value, mask, cache_modifier, eviction_policy)

    def atomic(rmw_op, ptr, val, mask, sem, scope):
        m = np.broadcast_to(mask.data, ptr.data.shape)
        rec.accesses.append(Access("atomic", ptr.data[m].astype(np.uint64), itemsize(ptr)))
        return saved[2](rmw_op, ptr, val, mask, sem, scope)

    builder.create_masked_load, builder.create_masked_store, builder.create_atomic_rmw = load, store, atomic
    try:
        yield rec
    finally:
        builder.create_masked_load, builder.create_masked_store, builder.create_atomic_rmw = saved


# ----------------------------------------------------------------------------
# The PyTorch reference, counted op by op
# ----------------------------------------------------------------------------

_NO_TRAFFIC = {
    "view", "_unsafe_view", "expand", "t", "select", "slice", "as_strided", "alias", "detach", "unsqueeze",
    "squeeze", "permute", "transpose", "reshape", "empty", "empty_like", "new_empty", "empty_strided",
    "_to_copy_meta", "lift_fresh", "_local_scalar_dense", "is_nonzero", "numel", "sym_size", "size", "stride",
    "zeros_like_meta",
}
#: Ops that touch only the rows/elements named by an index: count index, src and out only.
_INDEXED = {"scatter", "scatter_", "gather", "index", "index_select", "index_put", "index_put_"}


def reference_traffic(loss: str, n_rows: int, n_cols: int, dtype: torch.dtype, *, seed: int = 0) -> dict:
    """Bytes the reference backend's forward + backward move, counted op by op under a
    TorchDispatchMode: each aten op reads its tensor inputs and writes its outputs once
    (views are free; scatter/gather touch only the indexed elements). A lower bound of an
    eager run (an op may read its input more than once, e.g. topk)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fusedloss import reference
    from fusedloss.variants import variant_id

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, n_cols, generator=g).to(dtype)
    t = torch.randint(0, n_cols, (n_rows,), generator=g)
    v = int(variant_id(loss))
    counted = {"bytes": 0, "ops": []}

    def nbytes(v):
        return v.numel() * v.element_size() if isinstance(v, torch.Tensor) else 0

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            name = func.overloadpacket.__name__
            if name in _NO_TRAFFIC:
                return out
            flat_in = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            flat_out = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
            if name in _INDEXED:
                idx = max((a.numel() for a in flat_in if not a.is_floating_point()), default=0)
                b = 2 * idx * max((a.element_size() for a in flat_in if a.is_floating_point()), default=4) + \
                    sum(nbytes(a) for a in flat_in if not a.is_floating_point())
            else:
                b = sum(nbytes(a) for a in flat_in) + sum(nbytes(o) for o in flat_out)
            counted["bytes"] += b
            counted["ops"].append((name, b))
            return out

    # The reference ops' bodies (a custom op is one opaque call to a dispatch mode): the
    # forward, then the backward autograd runs for grad_output = 1.
    scalars = (Reduction.MEAN, -100, 0.0, 1.5, 1.0, 2.0)
    with Count():
        out, stats = reference.forward(x, t, None, v, *scalars)
        reference.backward(torch.ones_like(out), x, t, None, stats, v, *scalars)
    logit_bytes = n_rows * n_cols * torch.empty((), dtype=dtype).element_size()
    return {"bytes": counted["bytes"], "per_logit_byte": counted["bytes"] / logit_bytes, "ops": counted["ops"]}
