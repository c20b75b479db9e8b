"""Python launchers of the Triton kernels, registered as ``torch.library.triton_op``s.

``fusedloss::triton_fwd`` / ``fusedloss::triton_bwd`` have exactly the schemas of
``fusedloss.ops`` (semantics in its docstring). Being ``triton_op``s whose bodies
call the kernels through ``wrap_triton``, ``torch.compile(fullgraph=True)`` traces
into the launches (Inductor sees the kernels); in eager they run directly. The
same bodies are the fake (meta) implementations: they only allocate and compute
grids from shapes.

``fusedloss::triton_fwd_inplace`` (``inplace_backward=True``) writes the gradient
into the logits' own storage: the logits are consumed (they hold d loss/d logits
after the forward), and no (N, C) buffer is allocated at all.

float64 logits run the reference implementation inside these ops (Triton passes
Python float arguments as float32, too coarse for float64 math): ``backend="triton"``
accepts them, at the reference's speed.
"""
from __future__ import annotations

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from fusedloss import ops
from fusedloss.variants import STATS_COLS, Reduction, Variant

from .. import rows
from ..heuristics import bwd_config
from ..launch_common import (PARTIAL_BLOCK, PROLOGUE_BLOCK, _check_rows, _check_targets, _dense, _empty_loss,
                             _fwd_grid, _launch_prologue, _option_flags, _option_scalars, _unit_class_stride,
                             _workspace, row_align, scale_fused_grad)

from . import kernels
from ..probs import launch as probs_launch


def launch_forward(logits: Tensor, target: Tensor, weight: Tensor | None, variant: int, reduction: int,
                   ignore_index: int, label_smoothing: float, alpha: float, beta: float, gamma: float,
                   z_loss: float, softcap: float, grad: Tensor | None) -> tuple[Tensor, Tensor]:
    """Run the forward kernel; with ``grad`` (an (N, C) tensor with unit class stride,
    possibly ``logits`` itself) write d loss/d logits for grad_output = 1 into it. Label smoothing
    with a loss other than ce runs the expected-loss kernel (probs/launch.py)."""
    if probs_launch.routes_to_expected(variant, label_smoothing):
        return probs_launch.launch_index_loss_forward(logits, target, None, None, weight, variant, reduction,
                                                      ignore_index, label_smoothing, alpha, beta, gamma, z_loss,
                                                      softcap, grad)
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
    if probs_launch.routes_to_expected(variant, label_smoothing):
        return probs_launch.launch_index_loss_backward(grad_loss, logits, target, None, None, weight, stats, variant,
                                                       reduction, ignore_index, label_smoothing, alpha, beta, gamma,
                                                       z_loss, softcap)
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
    denom = torch.empty((rows.DENOM_PARTIALS.value,), dtype=torch.float32, device=dev)
    n_denom = 0
    if reduction == Reduction.MEAN:
        counter = torch.empty((1,), dtype=torch.int32, device=dev)
        _launch_prologue(target, weight, denom, counter, c, ignore_index, need_denom=True)
        n_denom = min(rows.DENOM_PARTIALS.value, max(1, triton.cdiv(n, PROLOGUE_BLOCK)))
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
    """``ops.OneTargetOps.fwd_inplace``: the reduced loss, differentiable, with the logits
    consumed (they hold the gradient afterwards)."""
    return _InplaceLoss.apply(logits, target, weight, variant, reduction, ignore_index, label_smoothing,
                              alpha, beta, gamma, z_loss, softcap)
