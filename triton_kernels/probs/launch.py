"""Launchers of the soft-target kernels (``kernels.py``), registered as the
``torch.library.triton_op``s ``fusedloss::triton_soft_fwd`` / ``fusedloss::triton_soft_bwd``
with the schemas ``ops.SOFT_FWD_SCHEMA`` / ``ops.SOFT_BWD_SCHEMA`` (the op contract is in
``fusedloss.ops``, "Class-probability (soft) targets").

Like ``one_target/launch.py``'s ops: the bodies launch through ``wrap_triton`` (torch.compile traces
into the kernels; the bodies are also the fake implementations), the fused gradient's
backward is ``launch_common.scale_fused_grad`` (in place on the device, skipped where
grad_output is 1, no host synchronization), and float64 logits run the reference ops.
The targets' own gradient is ``reference.soft_target_grad`` (``ops.register_soft_autograd``).

Layouts: rows of any stride are read in place, for the logits and the targets alike; a
class dimension that is not dense (a transposed buffer) is copied once here
(``launch_common._unit_class_stride``). The weight is made contiguous.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from fusedloss import ops
from fusedloss.variants import STATS_COLS, Reduction, Variant

from .. import heuristics
from ..heuristics import bwd_config, fwd_config
from .. import rows
from ..launch_common import (PARTIAL_BLOCK, PROLOGUE_BLOCK, _check_rows, _dense, _empty_loss, _launch_prologue,
                             _option_flags, _option_scalars, _stream_grid, _unit_class_stride, _workspace, row_align,
                             scale_fused_grad)
from . import kernels, loss_kernels

#: The launch heuristic family the soft kernels use (heuristics.py's target-only limits).
FAMILY = Variant.CE


def _check_inputs(logits: Tensor, probs: Tensor, op: str) -> None:
    if logits.dim() != 2 or probs.shape != logits.shape:
        raise ValueError(f"fusedloss::{op}: logits (N, C) and probs of the same shape; got "
                         f"{tuple(logits.shape)} and {tuple(probs.shape)}")
    if probs.dtype != logits.dtype or probs.device != logits.device:
        raise ValueError(f"fusedloss::{op}: probs must have the logits' dtype and device ({logits.dtype}, "
                         f"{logits.device}); got {probs.dtype}, {probs.device}")


def _prologue(dev: torch.device, n: int) -> tuple[Tensor, Tensor]:
    """The completion counter (zeroed) and the mean's denominator N, written on the device."""
    counter = torch.empty((1,), dtype=torch.int32, device=dev)
    denom = torch.empty((1,), dtype=torch.float32, device=dev)
    wrap_triton(kernels.soft_prologue_kernel)[(1,)](denom, counter, n, num_warps=1)
    return counter, denom


def _smoothing(label_smoothing: float, n_cols: int) -> tuple[float, float]:
    """(1 - eps, eps / C), formed in float64 on the host."""
    own, per_class, *_ = _option_scalars(label_smoothing, 0.0, 0.0, n_cols)
    return own, per_class


def launch_soft_forward(logits: Tensor, probs: Tensor, weight: Tensor | None, reduction: int,
                        label_smoothing: float, compute_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    n, c = logits.shape
    _check_rows(n)
    logits, probs, weight = _unit_class_stride(logits), _unit_class_stride(probs), _dense(weight)
    stats = logits.new_empty((n, STATS_COLS), dtype=torch.float32)
    grad = torch.empty((n, c), dtype=logits.dtype, device=logits.device) if compute_grad else logits.new_empty((0,))
    if n == 0:
        return _empty_loss(logits, reduction), stats, grad
    cfg = fwd_config(c, logits.element_size(), FAMILY)
    grid = triton.cdiv(n, cfg.block_n)
    if not cfg.single:  # persistent; the rows in flight are a row of logits and a row of targets
        grid = min(grid, _stream_grid(c, logits.element_size() + probs.element_size(), FAMILY, logits.device))
    dev = logits.device
    if reduction == Reduction.NONE:
        counter = torch.empty((1,), dtype=torch.int32, device=dev)
        denom = torch.empty((1,), dtype=torch.float32, device=dev)
        partial = denom
    else:
        counter, denom = _prologue(dev, n)
        partial = torch.empty((grid,), dtype=torch.float32, device=dev)
    loss = logits.new_empty((n,) if reduction == Reduction.NONE else (), dtype=torch.float32)
    g = grad if compute_grad else logits           # never written without compute_grad
    w = weight if weight is not None else denom    # dummy pointer, never read
    own, per_class = _smoothing(label_smoothing, c)
    wrap_triton(kernels.soft_fwd_kernel)[(grid,)](
        logits, logits.stride(0), probs, probs.stride(0), w, loss, stats, g, g.stride(0), denom, partial, counter,
        n, c, own, per_class, reduction,
        HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing > 0, COMPUTE_GRAD=compute_grad,
        SINGLE=cfg.single, BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c, PARTIAL_BLOCK=PARTIAL_BLOCK,
        ROW_ALIGN=row_align(logits.stride(0), probs.stride(0), g.stride(0), c), NUM_STAGES=cfg.num_stages,
        num_warps=cfg.num_warps)
    return loss, stats, grad


def launch_soft_backward(grad_loss: Tensor, logits: Tensor, probs: Tensor, weight: Tensor | None, stats: Tensor,
                         reduction: int, label_smoothing: float) -> Tensor:
    n, c = logits.shape
    _check_rows(n)
    logits, probs = _unit_class_stride(logits), _unit_class_stride(probs)
    grad_loss, weight, stats = _dense(grad_loss), _dense(weight), _dense(stats)
    grad = torch.empty((n, c), dtype=logits.dtype, device=logits.device)
    if n == 0:
        return grad
    if reduction == Reduction.MEAN:
        _, denom = _prologue(logits.device, n)
    else:
        denom = torch.empty((1,), dtype=torch.float32, device=logits.device)
    cfg = bwd_config(c, logits.element_size(), FAMILY)
    own, per_class = _smoothing(label_smoothing, c)
    wrap_triton(kernels.soft_bwd_kernel)[(triton.cdiv(n, cfg.block_n),)](
        grad_loss, logits, logits.stride(0), probs, probs.stride(0), weight if weight is not None else denom, stats,
        grad, grad.stride(0), denom, n, c, own, per_class, reduction,
        HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing > 0, GO_PER_ROW=reduction == Reduction.NONE,
        BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c, ROW_ALIGN=row_align(logits.stride(0), probs.stride(0), c),
        num_warps=cfg.num_warps)
    return grad


# ----------------------------------------------------------------------------
# The ops
# ----------------------------------------------------------------------------

@triton_op("fusedloss::triton_soft_fwd", mutates_args=(), schema=ops.SOFT_FWD_SCHEMA)
def triton_soft_fwd(logits: Tensor, probs: Tensor, weight: Tensor | None, reduction: int, label_smoothing: float,
                    compute_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    _check_inputs(logits, probs, "triton_soft_fwd")
    if logits.dtype == torch.float64:
        return ops.reference_soft_fwd(logits, probs, weight, reduction, label_smoothing, compute_grad)
    return launch_soft_forward(logits, probs, weight, reduction, label_smoothing, compute_grad)


@triton_op("fusedloss::triton_soft_bwd", mutates_args=(), schema=ops.SOFT_BWD_SCHEMA)
def triton_soft_bwd(grad_loss: Tensor, logits: Tensor, probs: Tensor, weight: Tensor | None, stats: Tensor,
                    reduction: int, label_smoothing: float) -> Tensor:
    _check_inputs(logits, probs, "triton_soft_bwd")
    if logits.dtype == torch.float64:
        return ops.reference_soft_bwd(grad_loss, logits, probs, weight, stats, reduction, label_smoothing)
    return launch_soft_backward(grad_loss, logits, probs, weight, stats, reduction, label_smoothing)


ops.register_soft_autograd("triton_soft_fwd", triton_soft_bwd, scale_grad=scale_fused_grad)


# ----------------------------------------------------------------------------
# Every loss: the expected loss (loss_kernels.py), ops.SOFT_LOSS_FWD_SCHEMA / SOFT_LOSS_BWD_SCHEMA
# ----------------------------------------------------------------------------

#: The launch heuristic family of the expected-loss kernels: bce's limits (three passes, more live
#: per-row sums and per-lane terms than the ce kernels).
LOSS_FAMILY = Variant.BCE


#: Streamed rows of the expected-loss kernels: column blocks and warps (see :func:`loss_config`).
LOSS_STREAM_BLOCK = 512
LOSS_STREAM_WARPS = 8
#: Row values per thread on chip.
LOSS_VALUES_PER_THREAD = 4


def loss_config(kernel: str, n_cols: int, elem_size: int):
    """The configuration of every expected-loss kernel (one row function, forward and backward):
    on chip up to bce's limit (2048 classes) with LOSS_VALUES_PER_THREAD row values per thread (up to
    16 warps); streamed rows in blocks of LOSS_STREAM_BLOCK columns with LOSS_STREAM_WARPS warps (2 values
    per thread). ptxas spilled 4-36 bytes, one loop-invariant register stored before the loop, with
    bce's own numbers (2048 x 4 warps streamed, 8 values per thread on chip), with 2048 x 8, 1024 x 4,
    1024 x 8 and 512 x 4 (sm_80, crl's two-target forward); 512 x 8 compiles every CI specialization
    without a spill (docs/triton.md, "Registers")."""
    cfg = fwd_config(n_cols, elem_size, LOSS_FAMILY)
    if heuristics.family(LOSS_FAMILY).stream_programs is not None:
        return cfg            # the interpreter tests' overridden heuristics
    if cfg.single:
        warps = max(cfg.num_warps, min(heuristics.MAX_WARPS, cfg.tile // (32 * LOSS_VALUES_PER_THREAD)))
        return dataclasses.replace(cfg, num_warps=warps)
    return dataclasses.replace(cfg, block_c=LOSS_STREAM_BLOCK, num_warps=LOSS_STREAM_WARPS)


def launch_soft_loss_forward(logits: Tensor, probs: Tensor, weight: Tensor | None, variant: int, reduction: int,
                             label_smoothing: float, alpha: float, beta: float, gamma: float,
                             compute_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    n, c = logits.shape
    _check_rows(n)
    logits, probs, weight = _unit_class_stride(logits), _unit_class_stride(probs), _dense(weight)
    stats = logits.new_empty((n, STATS_COLS), dtype=torch.float32)
    grad = torch.empty((n, c), dtype=logits.dtype, device=logits.device) if compute_grad else logits.new_empty((0,))
    if n == 0:
        return _empty_loss(logits, reduction), stats, grad
    cfg = loss_config("soft_loss_fwd", c, logits.element_size())
    grid = triton.cdiv(n, cfg.block_n)
    if not cfg.single:
        grid = min(grid, _stream_grid(c, logits.element_size() + probs.element_size(), LOSS_FAMILY, logits.device))
    dev = logits.device
    if reduction == Reduction.NONE:
        counter = torch.empty((1,), dtype=torch.int32, device=dev)
        denom = torch.empty((1,), dtype=torch.float32, device=dev)
        partial = denom
    else:
        counter, denom = _prologue(dev, n)
        partial = torch.empty((grid,), dtype=torch.float32, device=dev)
    loss = logits.new_empty((n,) if reduction == Reduction.NONE else (), dtype=torch.float32)
    g = grad if compute_grad else logits
    w = weight if weight is not None else denom
    own, per_class = _smoothing(label_smoothing, c)
    wrap_triton(loss_kernels.soft_loss_fwd_kernel)[(grid,)](
        logits, logits.stride(0), probs, probs.stride(0), w, loss, stats, g, g.stride(0), denom, partial, counter,
        n, c, own, per_class, alpha, beta, gamma, reduction,
        VARIANT=int(variant), HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing > 0,
        COMPUTE_GRAD=compute_grad, SINGLE=cfg.single, BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c,
        PARTIAL_BLOCK=PARTIAL_BLOCK, ROW_ALIGN=row_align(logits.stride(0), probs.stride(0), g.stride(0), c),
        NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps)
    return loss, stats, grad


def launch_soft_loss_backward(grad_loss: Tensor, logits: Tensor, probs: Tensor, weight: Tensor | None,
                              stats: Tensor, variant: int, reduction: int, label_smoothing: float, alpha: float,
                              beta: float, gamma: float) -> Tensor:
    n, c = logits.shape
    _check_rows(n)
    logits, probs = _unit_class_stride(logits), _unit_class_stride(probs)
    grad_loss, weight, stats = _dense(grad_loss), _dense(weight), _dense(stats.to(torch.float32))
    grad = torch.empty((n, c), dtype=logits.dtype, device=logits.device)
    if n == 0:
        return grad
    if reduction == Reduction.MEAN:
        _, denom = _prologue(logits.device, n)
    else:
        denom = torch.empty((1,), dtype=torch.float32, device=logits.device)
    cfg = loss_config("soft_loss_bwd", c, logits.element_size())
    own, per_class = _smoothing(label_smoothing, c)
    wrap_triton(loss_kernels.soft_loss_bwd_kernel)[(triton.cdiv(n, cfg.block_n),)](
        grad_loss.to(torch.float32), logits, logits.stride(0), probs, probs.stride(0),
        weight if weight is not None else denom, stats, grad, grad.stride(0), denom, n, c, own, per_class,
        alpha, beta, gamma, reduction, VARIANT=int(variant), HAS_WEIGHT=weight is not None,
        HAS_SMOOTHING=label_smoothing > 0, GO_PER_ROW=reduction == Reduction.NONE, SINGLE=cfg.single,
        BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c, ROW_ALIGN=row_align(logits.stride(0), probs.stride(0), c),
        num_warps=cfg.num_warps)
    return grad


@triton_op("fusedloss::triton_soft_loss_fwd", mutates_args=(), schema=ops.SOFT_LOSS_FWD_SCHEMA)
def triton_soft_loss_fwd(logits: Tensor, probs: Tensor, weight: Tensor | None, variant: int, reduction: int,
                         label_smoothing: float, alpha: float, beta: float, gamma: float,
                         compute_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    _check_inputs(logits, probs, "triton_soft_loss_fwd")
    if logits.dtype == torch.float64:
        return ops.reference_soft_loss_fwd(logits, probs, weight, variant, reduction, label_smoothing, alpha, beta,
                                           gamma, compute_grad)
    return launch_soft_loss_forward(logits, probs, weight, variant, reduction, label_smoothing, alpha, beta, gamma,
                                    compute_grad)


@triton_op("fusedloss::triton_soft_loss_bwd", mutates_args=(), schema=ops.SOFT_LOSS_BWD_SCHEMA)
def triton_soft_loss_bwd(grad_loss: Tensor, logits: Tensor, probs: Tensor, weight: Tensor | None, stats: Tensor,
                         variant: int, reduction: int, label_smoothing: float, alpha: float, beta: float,
                         gamma: float) -> Tensor:
    _check_inputs(logits, probs, "triton_soft_loss_bwd")
    if logits.dtype == torch.float64:
        return ops.reference_soft_loss_bwd(grad_loss, logits, probs, weight, stats, variant, reduction,
                                           label_smoothing, alpha, beta, gamma)
    return launch_soft_loss_backward(grad_loss, logits, probs, weight, stats, variant, reduction, label_smoothing,
                                     alpha, beta, gamma)


ops.register_soft_loss_autograd("triton_soft_loss_fwd", triton_soft_loss_bwd, scale_grad=scale_fused_grad)


# ----------------------------------------------------------------------------
# Class indices with label smoothing, loss != 'ce' (one target, or mixup's two): the expected loss
# with the (two-)hot target formed in the kernel (loss_kernels.index_loss_*_kernel). The one- and
# two-target launchers route here (docs/triton.md, "Label smoothing for loss != 'ce'").
# ----------------------------------------------------------------------------

def routes_to_expected(variant: int, label_smoothing: float) -> bool:
    """Whether a class-index launch runs the expected-loss kernels: label smoothing with a loss other
    than ce (its smoothing term is ``(eps / C) sum_k w_k L(x, k)``, which the one- and two-target
    kernels do not compute)."""
    return label_smoothing > 0 and int(variant) != Variant.CE


def _index_denominators(logits: Tensor, grid: int, reduction: int, target_a: Tensor, target_b: Tensor | None,
                        weight: Tensor | None, ignore_index: int, fwd: bool):
    """counter, partials and 'mean''s prologue partial denominators of each target."""
    dev = logits.device
    if fwd:
        counter, denom_a, partial, n_denom = _workspace(logits, grid, reduction, target_a, weight, ignore_index)
    else:
        counter = torch.empty((1,), dtype=torch.int32, device=dev)
        partial = counter
        denom_a = torch.empty((rows.DENOM_PARTIALS.value,), dtype=torch.float32, device=dev)
        n_denom = 0
        if reduction == Reduction.MEAN:
            _launch_prologue(target_a, weight, denom_a, counter, logits.shape[1], ignore_index, need_denom=True)
            n_denom = min(rows.DENOM_PARTIALS.value, max(1, triton.cdiv(logits.shape[0], PROLOGUE_BLOCK)))
    denom_b = denom_a
    if target_b is not None and reduction == Reduction.MEAN:
        denom_b = torch.empty_like(denom_a)
        c2 = torch.empty((1,), dtype=torch.int32, device=dev)
        _launch_prologue(target_b, weight, denom_b, c2, logits.shape[1], ignore_index, need_denom=True)
    return counter, partial, denom_a, denom_b, n_denom


def launch_index_loss_forward(logits: Tensor, target_a: Tensor, target_b: Tensor | None, lam: Tensor | None,
                              weight: Tensor | None, variant: int, reduction: int, ignore_index: int,
                              label_smoothing: float, alpha: float, beta: float, gamma: float, z_loss: float,
                              softcap: float, grad: Tensor | None) -> tuple[Tensor, Tensor]:
    """One target (``target_b`` None) or mixup's two; with ``grad`` (unit class stride, possibly the
    logits themselves: inplace_backward) the gradient for grad_output = 1 into it. Stats: lse,
    lse_ex(a), log(1 - p_w), w."""
    n, c = logits.shape
    _check_rows(n)
    if grad is not logits:
        logits = _unit_class_stride(logits)
    target_a, weight = _dense(target_a), _dense(weight)
    two = target_b is not None
    tb = _dense(target_b) if two else target_a
    lam_t = _dense(lam) if two else target_a
    stats = logits.new_empty((n, STATS_COLS), dtype=torch.float32)
    if n == 0:
        return _empty_loss(logits, reduction), stats
    cfg = loss_config("index_loss_fwd", c, logits.element_size())
    grid = triton.cdiv(n, cfg.block_n)
    if not cfg.single:
        grid = min(grid, _stream_grid(c, logits.element_size(), LOSS_FAMILY, logits.device))
    counter, partial, denom_a, denom_b, n_denom = _index_denominators(logits, grid, reduction, target_a,
                                                                      tb if two else None, weight, ignore_index, True)
    loss = logits.new_empty((n,) if reduction == Reduction.NONE else (), dtype=torch.float32)
    compute_grad = grad is not None
    g = grad if compute_grad else logits
    w = weight if weight is not None else denom_a
    own, per_class, z, cap, cap_k = _option_scalars(label_smoothing, z_loss, softcap, c)
    wrap_triton(loss_kernels.index_loss_fwd_kernel)[(grid,)](
        logits, logits.stride(0), target_a, tb, lam_t, w, loss, stats, g, g.stride(0), denom_a, denom_b, partial,
        counter, n, c, ignore_index, own, per_class, float(alpha), float(beta), float(gamma), z, cap, cap_k,
        int(reduction), n_denom, VARIANT=int(variant), TARGETS=2 if two else 1, HAS_WEIGHT=weight is not None,
        COMPUTE_GRAD=compute_grad, SINGLE=cfg.single, BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c,
        PARTIAL_BLOCK=PARTIAL_BLOCK, ROW_ALIGN=row_align(logits.stride(0), g.stride(0), c),
        NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps, **_option_flags(label_smoothing, z_loss, softcap))
    return loss, stats


def launch_index_loss_backward(grad_loss: Tensor, logits: Tensor, target_a: Tensor, target_b: Tensor | None,
                               lam: Tensor | None, weight: Tensor | None, stats: Tensor, variant: int, reduction: int,
                               ignore_index: int, label_smoothing: float, alpha: float, beta: float, gamma: float,
                               z_loss: float, softcap: float) -> Tensor:
    n, c = logits.shape
    _check_rows(n)
    logits = _unit_class_stride(logits)
    grad_loss, target_a, weight, stats = _dense(grad_loss), _dense(target_a), _dense(weight), _dense(stats)
    two = target_b is not None
    tb = _dense(target_b) if two else target_a
    lam_t = _dense(lam) if two else target_a
    grad = torch.empty((n, c), dtype=logits.dtype, device=logits.device)
    if n == 0:
        return grad
    cfg = loss_config("index_loss_bwd", c, logits.element_size())
    _, _, denom_a, denom_b, n_denom = _index_denominators(logits, 1, reduction, target_a, tb if two else None,
                                                          weight, ignore_index, False)
    own, per_class, z, cap, cap_k = _option_scalars(label_smoothing, z_loss, softcap, c)
    wrap_triton(loss_kernels.index_loss_bwd_kernel)[(triton.cdiv(n, cfg.block_n),)](
        grad_loss.to(torch.float32), logits, logits.stride(0), target_a, tb, lam_t,
        weight if weight is not None else denom_a, stats.to(torch.float32), grad, grad.stride(0), denom_a, denom_b,
        n, c, ignore_index, own, per_class, float(alpha), float(beta), float(gamma), z, cap, cap_k, int(reduction),
        n_denom, VARIANT=int(variant), TARGETS=2 if two else 1, HAS_WEIGHT=weight is not None,
        GO_PER_ROW=reduction == Reduction.NONE, SINGLE=cfg.single, BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c,
        ROW_ALIGN=row_align(logits.stride(0), grad.stride(0), c), num_warps=cfg.num_warps,
        **_option_flags(label_smoothing, z_loss, softcap))
    return grad
