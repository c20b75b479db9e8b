"""Launchers of mixup's two-target kernels (``kernels.py``), registered as the
``torch.library.triton_op``s ``fusedloss::triton_mix_fwd`` / ``fusedloss::triton_mix_bwd``
with the schemas ``mixup.MIX_FWD_SCHEMA`` / ``mixup.MIX_BWD_SCHEMA`` (``lam`` an (N,) floating
tensor, as ``fusedloss.mixup`` passes it) and the autograd formula of
``mixup.register_mix_op``.

Like ``one_target/launch.py``'s ops: the bodies launch through ``wrap_triton``, the fused gradient's
backward is ``launch_common.scale_fused_grad`` (in place on the device, skipped where grad_output
is 1), rows of any stride are read in place, O(N) inputs are made contiguous, and float64
logits run the reference: here its one-target forward and backward on each part, combined
as ``fusedloss.mixup``'s two-pass path combines them.

Fused: every loss (ce, nllr, crl, lace, focal: ``mix_fwd_kernel``/``mix_bwd_kernel``; bce:
``bce_mix_fwd_kernel``/``bce_mix_bwd_kernel``, stats ``lse, lse_ex(a), log(1 - p_w), w``), with
every option of the one-target kernels (weight, ignore_index, the three reductions, label
smoothing, z-loss, soft cap).
"""
from __future__ import annotations

import dataclasses

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from fusedloss import mixup, reference
from fusedloss.variants import STATS_COLS, Reduction, Variant

from .. import rows
from ..heuristics import Config, bwd_config
from ..heuristics import fwd_config as _one_target_fwd_config
from ..launch_common import (PARTIAL_BLOCK, PROLOGUE_BLOCK, _check_rows, _check_targets, _dense, _empty_loss, _fwd_grid,
                     _launch_prologue, _option_flags, _option_scalars, _unit_class_stride, _workspace, row_align,
                     scale_fused_grad)
from . import kernels
from ..probs import launch as probs_launch


def fuses(variant: int, softcap: float) -> bool:
    """``mixup.TwoTargetOps.fuses``: every loss, soft cap or not."""
    return True


def fwd_config(n_cols: int, elem_size: int, variant: int) -> Config:
    """The two-target forward's configuration: the one-target kernel's (``heuristics.fwd_config``),
    except bce's streamed forward, which runs 8 warps instead of 4 (8 values of a 2048-column
    block per thread, not 16): with 4, ptxas capped it at 168 registers and spilled 28-44 bytes
    (three passes over the row, both parts' row terms); with 8 it compiles without spills on
    sm_80 and sm_90 (``aot_specs.ci_specs``)."""
    cfg = _one_target_fwd_config(n_cols, elem_size, variant)
    if int(variant) == Variant.BCE and not cfg.single:
        cfg = dataclasses.replace(cfg, num_warps=8)
    return cfg


def _check_mix(logits: Tensor, target_a: Tensor, target_b: Tensor, lam: Tensor, op: str) -> None:
    """Metadata only (no device read)."""
    n = logits.shape[0]
    if tuple(target_a.shape) != (n,) or tuple(target_b.shape) != (n,) or tuple(lam.shape) != (n,):
        raise ValueError(f"fusedloss::{op}: target_a, target_b and lam must be ({n},); got "
                         f"{tuple(target_a.shape)}, {tuple(target_b.shape)}, {tuple(lam.shape)}")
    if not lam.is_floating_point() or lam.device != logits.device:
        raise ValueError(f"fusedloss::{op}: lam must be a floating tensor on the logits' device; got {lam.dtype} "
                         f"on {lam.device}")


def _denominators(logits: Tensor, target_b: Tensor, weight: Tensor | None, ignore_index: int, reduction: int,
                  denom_a: Tensor) -> Tensor:
    """Part b's 'mean' denominator (the prologue on target_b; part a's is ``denom_a``)."""
    if reduction != Reduction.MEAN:
        return denom_a  # never read
    denom_b = torch.empty_like(denom_a)
    counter = torch.empty((1,), dtype=torch.int32, device=logits.device)
    _launch_prologue(target_b, weight, denom_b, counter, logits.shape[1], ignore_index, need_denom=True)
    return denom_b


def _n_denom(n: int, reduction: int) -> int:
    return min(rows.DENOM_PARTIALS.value, max(1, triton.cdiv(n, PROLOGUE_BLOCK))) if reduction == Reduction.MEAN \
        else 0


def _common(logits: Tensor, grad: Tensor, weight: Tensor | None, variant: int, label_smoothing: float,
            z_loss: float, softcap: float, cfg) -> dict:
    """Constexprs of either kernel pair (VARIANT for the target-only one)."""
    flags = dict(HAS_WEIGHT=weight is not None, BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c,
                 ROW_ALIGN=row_align(logits.stride(0), grad.stride(0), logits.shape[1]), num_warps=cfg.num_warps,
                 **_option_flags(label_smoothing, z_loss, softcap))
    if int(variant) != Variant.BCE:
        flags.update(VARIANT=int(variant))
    return flags


def _kernel_and_shape(variant: int, fwd: bool, alpha: float, beta: float, gamma: float):
    """The kernel of ``variant`` and its shape arguments (none for bce)."""
    if int(variant) == Variant.BCE:
        return (kernels.bce_mix_fwd_kernel if fwd else kernels.bce_mix_bwd_kernel), ()
    return ((kernels.mix_fwd_kernel if fwd else kernels.mix_bwd_kernel),
            (float(alpha), float(beta), float(gamma)))


def launch_mix_forward(logits: Tensor, target_a: Tensor, target_b: Tensor, lam: Tensor, weight: Tensor | None,
                       variant: int, reduction: int, ignore_index: int, label_smoothing: float, alpha: float,
                       beta: float, gamma: float, z_loss: float, softcap: float,
                       grad: Tensor | None) -> tuple[Tensor, Tensor]:
    """Run the two-target forward kernel; with ``grad`` (an (N, C) tensor with unit class
    stride) write d loss/d logits for grad_output = 1 into it. Label smoothing with a loss other
    than ce runs the expected-loss kernel with the two-hot target formed on the fly (probs/launch.py)."""
    if probs_launch.routes_to_expected(variant, label_smoothing):
        return probs_launch.launch_index_loss_forward(logits, target_a, target_b, lam, weight, variant, reduction,
                                                      ignore_index, label_smoothing, alpha, beta, gamma, z_loss,
                                                      softcap, grad)
    n, c = logits.shape
    _check_rows(n)
    logits = _unit_class_stride(logits)
    target_a, target_b, lam, weight = _dense(target_a), _dense(target_b), _dense(lam), _dense(weight)
    stats = logits.new_empty((n, STATS_COLS), dtype=torch.float32)
    if n == 0:
        return _empty_loss(logits, reduction), stats
    cfg, grid = _fwd_grid(logits, variant, fwd_config)
    counter, denom_a, partial, n_denom = _workspace(logits, grid, reduction, target_a, weight, ignore_index)
    denom_b = _denominators(logits, target_b, weight, ignore_index, reduction, denom_a)
    loss = logits.new_empty((n,) if reduction == Reduction.NONE else (), dtype=torch.float32)
    compute_grad = grad is not None
    g = grad if compute_grad else logits          # never written when not compute_grad
    w = weight if weight is not None else denom_a  # dummy pointer, never read
    total = Reduction.NONE if reduction == Reduction.NONE else Reduction.SUM
    own, per_class, z, cap, cap_k = _option_scalars(label_smoothing, z_loss, softcap, c)
    kernel, shape = _kernel_and_shape(variant, True, alpha, beta, gamma)
    wrap_triton(kernel)[(grid,)](
        logits, logits.stride(0), target_a, target_b, lam, w, loss, stats, g, g.stride(0), denom_a, denom_b, partial,
        counter, n, c, ignore_index, own, per_class, *shape, z, cap, cap_k,
        int(reduction), n_denom, int(total), SINGLE=cfg.single, COMPUTE_GRAD=compute_grad, PARTIAL_BLOCK=PARTIAL_BLOCK,
        NUM_STAGES=cfg.num_stages, **_common(logits, g, weight, variant, label_smoothing, z_loss, softcap, cfg))
    return loss, stats


def launch_mix_backward(grad_loss: Tensor, logits: Tensor, target_a: Tensor, target_b: Tensor, lam: Tensor,
                        weight: Tensor | None, stats: Tensor, variant: int, reduction: int, ignore_index: int,
                        label_smoothing: float, alpha: float, beta: float, gamma: float, z_loss: float,
                        softcap: float) -> Tensor:
    if probs_launch.routes_to_expected(variant, label_smoothing):
        return probs_launch.launch_index_loss_backward(grad_loss, logits, target_a, target_b, lam, weight, stats,
                                                       variant, reduction, ignore_index, label_smoothing, alpha, beta,
                                                       gamma, z_loss, softcap)
    n, c = logits.shape
    _check_rows(n)
    logits = _unit_class_stride(logits)
    grad_loss, target_a, target_b, lam, weight, stats = (_dense(t) for t in (grad_loss, target_a, target_b, lam,
                                                                             weight, stats))
    grad = torch.empty((n, c), dtype=logits.dtype, device=logits.device)
    if n == 0:
        return grad
    cfg = bwd_config(c, logits.element_size(), variant)
    denom_a = torch.empty((rows.DENOM_PARTIALS.value,), dtype=torch.float32, device=logits.device)
    if reduction == Reduction.MEAN:
        counter = torch.empty((1,), dtype=torch.int32, device=logits.device)
        _launch_prologue(target_a, weight, denom_a, counter, c, ignore_index, need_denom=True)
    denom_b = _denominators(logits, target_b, weight, ignore_index, reduction, denom_a)
    w = weight if weight is not None else denom_a
    own, per_class, z, cap, cap_k = _option_scalars(label_smoothing, z_loss, softcap, c)
    kernel, shape = _kernel_and_shape(variant, False, alpha, beta, gamma)
    wrap_triton(kernel)[(triton.cdiv(n, cfg.block_n),)](
        grad_loss, logits, logits.stride(0), target_a, target_b, lam, w, stats, grad, grad.stride(0), denom_a,
        denom_b, n, c, ignore_index, own, per_class, *shape, z, cap, cap_k,
        int(reduction), _n_denom(n, reduction), GO_PER_ROW=reduction == Reduction.NONE,
        **_common(logits, grad, weight, variant, label_smoothing, z_loss, softcap, cfg))
    return grad


# ----------------------------------------------------------------------------
# float64: the reference's one-target forward and backward on each part
# ----------------------------------------------------------------------------

def _reference_part_scales(target_a: Tensor, target_b: Tensor, lam: Tensor, weight: Tensor | None,
                           reduction: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Per-row weights of the parts: lam / D_a and (1 - lam) / D_b for 'mean', else lam and 1 - lam."""
    k_a, k_b = lam, 1.0 - lam
    if reduction == Reduction.MEAN:
        k_a = k_a / reference.mean_denominator(target_a, weight, ignore_index, lam.dtype)
        k_b = k_b / reference.mean_denominator(target_b, weight, ignore_index, lam.dtype)
    return k_a, k_b


def _reference_mix_fwd(logits, target_a, target_b, lam, weight, variant, reduction, ignore_index, *rest):
    *scalars, compute_grad = rest
    none = (variant, int(Reduction.NONE), ignore_index)
    rows_a, st_a = reference.forward(logits, target_a, weight, *none, *scalars)
    rows_b, st_b = reference.forward(logits, target_b, weight, *none, *scalars)
    k_a, k_b = _reference_part_scales(target_a, target_b, lam.to(rows_a.dtype), weight, reduction, ignore_index)
    rows = (torch.where(k_a == 0, torch.zeros_like(rows_a), k_a * rows_a)
            + torch.where(k_b == 0, torch.zeros_like(rows_b), k_b * rows_b))
    # bce: lse, lse_ex(a), log(1 - p_w), w (the last two shared by the parts); else lse, lse_ex(a), lse_ex(b), 0
    stats = st_a if variant == Variant.BCE else torch.stack([st_a[:, 0], st_a[:, 1], st_b[:, 1],
                                                             torch.zeros_like(rows)], 1)
    loss = rows if reduction == Reduction.NONE else rows.sum()
    grad = (_reference_mix_bwd(torch.ones_like(loss), logits, target_a, target_b, lam, weight, stats, variant,
                               reduction, ignore_index, *scalars) if compute_grad else logits.new_empty((0,)))
    return loss, stats, grad


def _reference_mix_bwd(grad_loss, logits, target_a, target_b, lam, weight, stats, variant, reduction, ignore_index,
                       *scalars):
    k_a, k_b = _reference_part_scales(target_a, target_b, lam.to(stats.dtype), weight, reduction, ignore_index)
    go = grad_loss.to(stats.dtype).expand(k_a.shape)
    grad = 0
    for t, k, col in ((target_a, k_a, 1), (target_b, k_b, 2)):
        st = stats.clone()  # bce reads lse, log(1 - p_w) and w (cols 0, 2, 3), shared by the parts
        if variant != Variant.BCE:
            st[:, 1], st[:, 2:] = stats[:, col], 0
        grad = grad + reference.backward(go * k, logits, t, weight, st, variant, int(Reduction.NONE), ignore_index,
                                         *scalars)
    return grad


# ----------------------------------------------------------------------------
# The ops
# ----------------------------------------------------------------------------

@triton_op("fusedloss::triton_mix_fwd", mutates_args=(), schema=mixup.MIX_FWD_SCHEMA)
def triton_mix_fwd(logits: Tensor, target_a: Tensor, target_b: Tensor, lam: Tensor, weight: Tensor | None,
                   variant: int, reduction: int, ignore_index: int, label_smoothing: float, alpha: float,
                   beta: float, gamma: float, z_loss: float, softcap: float,
                   compute_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    _check_mix(logits, target_a, target_b, lam, "triton_mix_fwd")
    _check_targets(logits, target_a, ignore_index)
    _check_targets(logits, target_b, ignore_index)
    if logits.dtype == torch.float64:
        return _reference_mix_fwd(logits, target_a, target_b, lam, weight, variant, reduction, ignore_index,
                                   label_smoothing, alpha, beta, gamma, z_loss, softcap, compute_grad)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if compute_grad else None
    loss, stats = launch_mix_forward(logits, target_a, target_b, lam, weight, variant, reduction, ignore_index,
                                     label_smoothing, alpha, beta, gamma, z_loss, softcap, grad)
    return loss, stats, grad if compute_grad else logits.new_empty((0,))


@triton_op("fusedloss::triton_mix_bwd", mutates_args=(), schema=mixup.MIX_BWD_SCHEMA)
def triton_mix_bwd(grad_loss: Tensor, logits: Tensor, target_a: Tensor, target_b: Tensor, lam: Tensor,
                   weight: Tensor | None, stats: Tensor, variant: int, reduction: int, ignore_index: int,
                   label_smoothing: float, alpha: float, beta: float, gamma: float, z_loss: float,
                   softcap: float) -> Tensor:
    _check_mix(logits, target_a, target_b, lam, "triton_mix_bwd")
    if logits.dtype == torch.float64:
        return _reference_mix_bwd(grad_loss, logits, target_a, target_b, lam, weight, stats, variant, reduction,
                                  ignore_index, label_smoothing, alpha, beta, gamma, z_loss, softcap)
    return launch_mix_backward(grad_loss, logits, target_a, target_b, lam, weight, stats, variant, reduction,
                               ignore_index, label_smoothing, alpha, beta, gamma, z_loss, softcap)


mixup.register_mix_op("triton_mix_fwd", triton_mix_bwd, scale_grad=scale_fused_grad)
