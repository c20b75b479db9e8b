"""Python launchers of the Triton kernels, registered as ``torch.library.triton_op``s.

``fusedloss::triton_fwd`` / ``fusedloss::triton_bwd`` have exactly the schemas of
``fusedloss.ops`` (semantics in its docstring). Being ``triton_op``s whose bodies
call the kernels through ``wrap_triton``, ``torch.compile(fullgraph=True)`` traces
into the launches (Inductor sees the kernels); in eager they run directly. The
same bodies are the fake (meta) implementations: they only allocate and compute
grids from shapes.

The fused gradient's backward is ``fusedloss::triton_scale_grad_``: it multiplies the
saved gradient by ``grad_output`` in place, reading ``grad_output`` on the device
and skipping rows where it is exactly 1 (``loss.backward()``), so forward+backward
stays at one read and one write of the logits with no host synchronization.

``fusedloss::triton_fwd_inplace`` (``inplace_backward=True``) writes the gradient
into the logits' own storage: the logits are consumed (they hold d loss/d logits
after the forward), and no (N, C) buffer is allocated at all.

float64 logits run the reference implementation inside these ops (Triton passes
Python float arguments as float32, too coarse for float64 math): ``backend="triton"``
accepts them, at the reference's speed.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from fusedloss import ops
from fusedloss.validation import check_target_values, must_check_targets
from fusedloss.variants import STATS_COLS, Reduction, Variant

from . import kernels
from .heuristics import bwd_config, family, fwd_config, scale_config, stream_programs

#: Partial sums the last program of the main kernel adds per loop step.
PARTIAL_BLOCK = 1024
#: Rows per prologue program step (the prologue uses at most DENOM_PARTIALS programs).
PROLOGUE_BLOCK = 1024


def row_align(*ints: int) -> int:
    """Largest power of two (<= 16) dividing every row stride and C: a compile-time hint."""
    a = 16
    for s in ints:
        a = math.gcd(a, int(s))
    return max(a, 1)


@functools.lru_cache(maxsize=None)
def _device_limits(index: int) -> tuple[int, int]:
    p = torch.cuda.get_device_properties(index)
    return p.multi_processor_count, p.L2_cache_size


def _stream_grid(n_cols: int, elem: int, variant: int, device: torch.device) -> int:
    """Programs of the persistent streamed forward (heuristics.stream_programs); on CPU (the
    interpreter) one per row unless a test sets the family's stream_programs."""
    fixed = family(variant).stream_programs
    if fixed is not None or device.type != "cuda":
        return fixed if fixed is not None else 1 << 30
    index = device.index if device.index is not None else torch.cuda.current_device()
    return stream_programs(n_cols, elem, variant, *_device_limits(index))


#: Row indices are int32 in the kernels (element offsets are int64).
MAX_ROWS = 2 ** 31 - 2 ** 16


def _check_rows(n) -> None:
    if isinstance(n, int) and n > MAX_ROWS:
        raise ValueError(f"fusedloss triton backend: at most {MAX_ROWS} rows (N x d1 x ...); got {n}")


def _is_traced(t: Tensor) -> bool:
    """Fake/functional tensors (torch.compile, meta tracing) carry no data to check."""
    from torch._subclasses.fake_tensor import is_fake
    return torch.compiler.is_compiling() or is_fake(t)


def _check_targets(logits: Tensor, target: Tensor, ignore_index: int) -> None:
    if must_check_targets(logits.device) and not _is_traced(target):
        check_target_values(target, logits.shape[1], ignore_index)


def _workspace(logits: Tensor, grid: int, reduction: int, target: Tensor, weight: Tensor | None,
               ignore_index: int):
    """Completion counter, per-program partials and mean denominators; for a reduced loss
    the prologue launch zeroes the counter and writes the denominators."""
    dev = logits.device
    counter = torch.empty((1,), dtype=torch.int32, device=dev)
    denom = torch.empty((kernels.DENOM_PARTIALS.value,), dtype=torch.float32, device=dev)
    n_denom = 0
    if reduction == Reduction.NONE:
        partial = torch.empty((1,), dtype=torch.float32, device=dev)
        return counter, denom, partial, n_denom
    partial = torch.empty((grid,), dtype=torch.float32, device=dev)
    _launch_prologue(target, weight, denom, counter, logits.shape[1], ignore_index,
                     need_denom=reduction == Reduction.MEAN)
    if reduction == Reduction.MEAN:
        n_denom = min(kernels.DENOM_PARTIALS.value, max(1, triton.cdiv(target.shape[0], PROLOGUE_BLOCK)))
    return counter, denom, partial, n_denom


def _launch_prologue(target: Tensor, weight: Tensor | None, denom: Tensor, counter: Tensor, n_cols: int,
                     ignore_index: int, need_denom: bool) -> None:
    n = target.shape[0]
    programs = min(kernels.DENOM_PARTIALS.value, max(1, triton.cdiv(n, PROLOGUE_BLOCK))) if need_denom else 1
    rows_per_program = triton.cdiv(max(n, 1), programs)
    w = weight if weight is not None else denom
    wrap_triton(kernels.prologue_kernel)[(programs,)](
        target, w, denom, counter, n, n_cols, ignore_index, rows_per_program,
        NEED_DENOM=need_denom, HAS_WEIGHT=weight is not None, BLOCK=PROLOGUE_BLOCK, num_warps=4)


def _dense(t: Tensor | None) -> Tensor | None:
    """The kernels index target, weight, stats and grad_output as dense arrays (``T + rows``),
    so every O(N) or O(C) input is made contiguous here, whatever view the caller made:
    ``L.sum()`` hands the backward an expanded grad_output of stride 0, ``t[::2]`` a strided
    target. A no-op (no copy) for tensors already contiguous."""
    return None if t is None else t.contiguous()


def _unit_class_stride(logits: Tensor) -> Tensor:
    """Rows of any stride are read in place; the class dimension must be dense."""
    return logits if logits.shape[1] <= 1 or logits.stride(1) == 1 else logits.contiguous()


def _empty_loss(logits: Tensor, reduction: int) -> Tensor:
    """N = 0: an empty 'none', 0 for 'sum', NaN for 'mean' (as PyTorch)."""
    if reduction == Reduction.NONE:
        return logits.new_empty((0,), dtype=torch.float32)
    return torch.full((), 0.0 if reduction == Reduction.SUM else math.nan, dtype=torch.float32,
                      device=logits.device)


def _option_flags(label_smoothing: float, z_loss: float, softcap: float) -> dict:
    """The options' compile-time flags: off, they compile to the plain loss's kernel (the values
    themselves are runtime arguments: one compiled kernel serves every eps, z and cap)."""
    return dict(HAS_SMOOTHING=label_smoothing > 0, HAS_ZLOSS=z_loss != 0, SOFTCAP=softcap > 0)


def _option_scalars(label_smoothing: float, z_loss: float, softcap: float, n_cols: int) -> tuple:
    """The kernels' option arguments, in their order: (1 - eps, eps / C, z, cap, -2 log2(e) / cap).
    The kernels never derive a scalar from their arguments: such a value would stay in a
    register across the persistent loop (ptxas spilled them), an argument is re-read from
    constant memory. (Formed in float64, rounded once to the kernels' float32.)"""
    eps = float(label_smoothing)
    cap = float(softcap)
    cap_k = -2.0 / (math.log(2.0) * cap) if cap > 0 else 0.0
    return 1.0 - eps, eps / max(int(n_cols), 1), float(z_loss), cap, cap_k


def _fwd_grid(logits: Tensor, variant: int, config=fwd_config) -> tuple:
    """A forward's configuration (``config``: ``heuristics.fwd_config``, or a family's own) and grid:
    a program per row block on chip; streamed, a persistent grid of at most ``_stream_grid``
    programs, each looping over rows."""
    n, c = logits.shape
    cfg = config(c, logits.element_size(), variant)
    grid = triton.cdiv(n, cfg.block_n)
    if not cfg.single:
        grid = min(grid, _stream_grid(c, logits.element_size(), variant, logits.device))
    return cfg, grid


def launch_forward(logits: Tensor, target: Tensor, weight: Tensor | None, variant: int, reduction: int,
                   ignore_index: int, label_smoothing: float, alpha: float, beta: float, gamma: float,
                   z_loss: float, softcap: float, grad: Tensor | None) -> tuple[Tensor, Tensor]:
    """Run the forward kernel; with ``grad`` (an (N, C) tensor with unit class stride,
    possibly ``logits`` itself) write d loss/d logits for grad_output = 1 into it."""
    n, c = logits.shape
    _check_rows(n)
    if grad is not logits:  # in place, the caller guarantees a unit class stride
        logits = _unit_class_stride(logits)
    target, weight = _dense(target), _dense(weight)
    stats = logits.new_empty((n, STATS_COLS), dtype=torch.float32)
    if n == 0:
        return _empty_loss(logits, reduction), stats
    cfg, grid = _fwd_grid(logits, variant)
    counter, denom, partial, n_denom = _workspace(logits, grid, reduction, target, weight, ignore_index)
    loss = logits.new_empty((n,) if reduction == Reduction.NONE else (), dtype=torch.float32)
    compute_grad = grad is not None
    g = grad if compute_grad else logits          # never written when not compute_grad
    w = weight if weight is not None else denom  # dummy pointer, never read
    common = dict(PARTIAL_BLOCK=PARTIAL_BLOCK, BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c, SINGLE=cfg.single,
                  HAS_WEIGHT=weight is not None, COMPUTE_GRAD=compute_grad, num_warps=cfg.num_warps,
                  ROW_ALIGN=row_align(logits.stride(0), g.stride(0), c), NUM_STAGES=cfg.num_stages,
                  **_option_flags(label_smoothing, z_loss, softcap))
    own, per_class, z, cap, cap_k = _option_scalars(label_smoothing, z_loss, softcap, c)
    if variant == Variant.BCE:
        wrap_triton(kernels.bce_fwd_kernel)[(grid,)](
            logits, logits.stride(0), target, w, loss, stats, g, g.stride(0), denom, partial, counter,
            n, c, ignore_index, own, per_class, z, cap, cap_k, reduction, n_denom, **common)
    else:
        wrap_triton(kernels.target_fwd_kernel)[(grid,)](
            logits, logits.stride(0), target, w, loss, stats, g, g.stride(0), denom, partial, counter,
            n, c, ignore_index, own, per_class, float(alpha), float(beta), float(gamma), z, cap, cap_k,
            reduction, n_denom, VARIANT=int(variant), **common)
    return loss, stats


def launch_backward(grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Tensor | None, stats: Tensor,
                    variant: int, reduction: int, ignore_index: int, label_smoothing: float, alpha: float,
                    beta: float, gamma: float, z_loss: float, softcap: float) -> Tensor:
    n, c = logits.shape
    _check_rows(n)
    logits = _unit_class_stride(logits)
    grad_loss, target, weight, stats = _dense(grad_loss), _dense(target), _dense(weight), _dense(stats)
    grad = torch.empty((n, c), dtype=logits.dtype, device=logits.device)
    if n == 0:
        return grad
    cfg = bwd_config(c, logits.element_size(), variant)
    grid = triton.cdiv(n, cfg.block_n)
    dev = logits.device
    denom = torch.empty((kernels.DENOM_PARTIALS.value,), dtype=torch.float32, device=dev)
    n_denom = 0
    if reduction == Reduction.MEAN:
        counter = torch.empty((1,), dtype=torch.int32, device=dev)
        _launch_prologue(target, weight, denom, counter, c, ignore_index, need_denom=True)
        n_denom = min(kernels.DENOM_PARTIALS.value, max(1, triton.cdiv(n, PROLOGUE_BLOCK)))
    w = weight if weight is not None else denom
    common = dict(HAS_WEIGHT=weight is not None, GO_PER_ROW=reduction == Reduction.NONE,
                  BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps,
                  ROW_ALIGN=row_align(logits.stride(0), grad.stride(0), c),
                  **_option_flags(label_smoothing, z_loss, softcap))
    own, per_class, z, cap, cap_k = _option_scalars(label_smoothing, z_loss, softcap, c)
    if variant == Variant.BCE:
        wrap_triton(kernels.bce_bwd_kernel)[(grid,)](
            grad_loss, logits, logits.stride(0), target, w, stats, grad, grad.stride(0), denom,
            n, c, ignore_index, own, per_class, z, cap, cap_k, reduction, n_denom, **common)
    else:
        wrap_triton(kernels.target_bwd_kernel)[(grid,)](
            grad_loss, logits, logits.stride(0), target, w, stats, grad, grad.stride(0), denom,
            n, c, ignore_index, own, per_class, float(alpha), float(beta), float(gamma), z, cap, cap_k,
            reduction, n_denom, VARIANT=int(variant), **common)
    return grad


def launch_scale(grad: Tensor, grad_loss: Tensor) -> None:
    n, c = grad.shape
    if n == 0:
        return
    cfg = scale_config(c)
    grad_loss = _dense(grad_loss)
    wrap_triton(kernels.scale_grad_kernel)[(triton.cdiv(n, cfg.block_n),)](
        grad, grad.stride(0), grad_loss, n, c, GO_PER_ROW=grad_loss.dim() > 0,
        BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)


# ----------------------------------------------------------------------------
# The ops
# ----------------------------------------------------------------------------

@triton_op("fusedloss::triton_fwd", mutates_args=(), schema=ops.FWD_SCHEMA)
def triton_fwd(logits: Tensor, target: Tensor, weight: Tensor | None, variant: int, reduction: int,
               ignore_index: int, label_smoothing: float, alpha: float, beta: float, gamma: float,
               z_loss: float, softcap: float, compute_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    if logits.dtype == torch.float64:
        return ops.reference_fwd(logits, target, weight, variant, reduction, ignore_index, label_smoothing,
                                 alpha, beta, gamma, z_loss, softcap, compute_grad)
    _check_targets(logits, target, ignore_index)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if compute_grad else None
    loss, stats = launch_forward(logits, target, weight, variant, reduction, ignore_index, label_smoothing,
                                 alpha, beta, gamma, z_loss, softcap, grad)
    return loss, stats, grad if compute_grad else logits.new_empty((0,))


@triton_op("fusedloss::triton_bwd", mutates_args=(), schema=ops.BWD_SCHEMA)
def triton_bwd(grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Tensor | None, stats: Tensor,
               variant: int, reduction: int, ignore_index: int, label_smoothing: float, alpha: float,
               beta: float, gamma: float, z_loss: float, softcap: float) -> Tensor:
    if logits.dtype == torch.float64:
        return ops.reference_bwd(grad_loss, logits, target, weight, stats, variant, reduction, ignore_index,
                                 label_smoothing, alpha, beta, gamma, z_loss, softcap)
    return launch_backward(grad_loss, logits, target, weight, stats, variant, reduction, ignore_index,
                           label_smoothing, alpha, beta, gamma, z_loss, softcap)


@triton_op("fusedloss::triton_scale_grad_", mutates_args=("grad",),
           schema="(Tensor(a!) grad, Tensor grad_loss) -> ()")
def triton_scale_grad_(grad: Tensor, grad_loss: Tensor) -> None:
    launch_scale(grad, grad_loss)


INPLACE_SCHEMA = ("(Tensor(a!) logits, Tensor target, Tensor? weight, " + ops.SCALARS + ") -> (Tensor, Tensor)")


@triton_op("fusedloss::triton_fwd_inplace", mutates_args=("logits",), schema=INPLACE_SCHEMA)
def triton_fwd_inplace(logits: Tensor, target: Tensor, weight: Tensor | None, variant: int, reduction: int,
                       ignore_index: int, label_smoothing: float, alpha: float, beta: float,
                       gamma: float, z_loss: float, softcap: float) -> tuple[Tensor, Tensor]:
    """Forward whose gradient (grad_output = 1) overwrites ``logits``."""
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError(f"inplace_backward=True needs logits with unit class stride (the gradient is written "
                         f"into their storage); got strides {tuple(logits.stride())}")
    if logits.shape[0] > 1 and logits.stride(0) < logits.shape[1]:
        raise ValueError(f"inplace_backward=True needs logits whose rows do not overlap in memory (the gradient "
                         f"is written over them); got shape {tuple(logits.shape)} with strides "
                         f"{tuple(logits.stride())}, e.g. rows expanded from one row")
    if logits.dtype == torch.float64:
        loss, stats, grad = ops.reference_fwd(logits, target, weight, variant, reduction, ignore_index,
                                              label_smoothing, alpha, beta, gamma, z_loss, softcap, True)
        logits.copy_(grad)
        return loss, stats
    _check_targets(logits, target, ignore_index)
    return launch_forward(logits, target, weight, variant, reduction, ignore_index, label_smoothing,
                          alpha, beta, gamma, z_loss, softcap, logits)


def scale_fused_grad(grad: Tensor, grad_loss: Tensor) -> Tensor:
    """``register_autograd``'s hook: ``grad *= grad_output`` in place on the device,
    skipped where grad_output is 1 (no extra pass, no host synchronization).

    In place means the saved gradient is consumed by the first backward. The op is
    declared mutating, so autograd bumps the saved tensor's version: a second backward
    through the same graph (``retain_graph=True``) raises autograd's "modified by an
    inplace operation" error instead of scaling twice."""
    if grad_loss is None:  # the loss received no gradient (autograd does not materialize zeros)
        return None
    if grad.dtype == torch.float64:
        return ops.scale_fused_grad(grad, grad_loss)
    triton_scale_grad_(grad, grad_loss)
    return grad


ops.register_autograd("triton_fwd", triton_bwd, scale_grad=scale_fused_grad)


class _InplaceLoss(torch.autograd.Function):
    """The loss with ``inplace_backward=True``: the forward overwrites the logits with the
    gradient (grad_output = 1); the backward scales them in place and returns them."""

    @staticmethod
    def forward(ctx, logits, target, weight, *scalars):
        loss, _ = triton_fwd_inplace(logits, target, weight, *scalars)
        ctx.save_for_backward(logits)
        return loss

    @staticmethod
    @ops.first_order("inplace_backward=True")  # the logits are consumed: a double backward raises
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return (scale_fused_grad(grad, grad_loss),) + (None,) * 11


def forward_inplace(logits: Tensor, target: Tensor, weight: Tensor | None, variant: int, reduction: int,
                    ignore_index: int, label_smoothing: float, alpha: float, beta: float, gamma: float,
                    z_loss: float, softcap: float) -> Tensor:
    """``dispatch.Backend.fwd_inplace``: the reduced loss, differentiable, with the logits
    consumed (they hold the gradient afterwards)."""
    return _InplaceLoss.apply(logits, target, weight, variant, reduction, ignore_index, label_smoothing,
                              alpha, beta, gamma, z_loss, softcap)
