"""Launcher of the distillation kernel (``kernels.py``), registered as the
``torch.library.triton_op`` ``fusedloss::triton_distill`` with exactly
``fusedloss.distill.ops.DISTILL_SCHEMA`` (the contract is that module's docstring; ``grad`` is
mutated in place). The backend declares it as its ``DistillOps`` family (backend.py).

Like the other forms' ops: the body launches through ``wrap_triton`` (``torch.compile`` traces into
the kernel; the body is also the fake implementation), float64 logits run the reference's math
inside the op (Triton passes Python floats as float32, too coarse for float64), rows of any stride
are read in place (a class dimension that is not dense is copied once,
``launch_common._unit_class_stride``), and a gradient buffer whose class dimension is not dense is
written through a dense copy. Not differentiable itself: the caller's autograd Function calls it.

Configuration: bce's launch family (``heuristics.fwd_config``): both rows of up to 2048 classes
held in registers (SINGLE), longer rows streamed in blocks of 2048 by a persistent grid sized for
both rows in flight in L2 (``launch_common._stream_grid`` with the two rows' bytes per class).
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

import triton

from fusedloss.distill import ops as distill_ops
from fusedloss.distill.ops import DISTILL_SCHEMA, DIVERGENCES

from ..heuristics import fwd_config
from ..launch_common import _check_rows, _stream_grid, _unit_class_stride, row_align
from . import kernels

#: The launch heuristic family: bce's limits (two rows per program, more per-row state than the
#: target-only kernels).
FAMILY = 1  # Variant.BCE

OP = "fusedloss::triton_distill"


#: Warps of the streamed regime: 8, i.e. 8 values per thread of each row's 2048-column block. With
#: bce's 4 warps jsd's streamed kernel took 164-255 registers (an earlier form of its logs spilled
#: 24-48 bytes), kl and reverse kl 80-128; with 8 warps jsd takes 99-128, kl and reverse kl 56-64
#: (sm_80 / sm_90, no spills: tests/test_triton_aot.py).
STREAM_WARPS = 8


def config(n_cols: int, elem_size: int):
    """The kernel's configuration for rows of ``n_cols`` classes of ``elem_size`` bytes: bce's
    family of ``heuristics.fwd_config``, streamed with STREAM_WARPS warps."""
    cfg = fwd_config(n_cols, elem_size, FAMILY)
    return cfg if cfg.single else dataclasses.replace(cfg, num_warps=STREAM_WARPS)


def _check(student: Tensor, teacher: Tensor, row_scale: Tensor, temperature: float, divergence: int,
           jsd_beta: float, grad: Tensor | None) -> None:
    """What the op needs, each a ValueError naming the argument."""
    if student.dim() != 2 or not student.is_floating_point():
        raise ValueError(f"{OP}: student must be a floating (N, V) tensor; got {student.dtype} "
                         f"{tuple(student.shape)}")
    if teacher.shape != student.shape or teacher.dtype != student.dtype or teacher.device != student.device:
        raise ValueError(f"{OP}: teacher must have the student's shape, dtype and device ({tuple(student.shape)}, "
                         f"{student.dtype}, {student.device}); got {tuple(teacher.shape)}, {teacher.dtype}, "
                         f"{teacher.device}")
    n = student.shape[0]
    if (row_scale.dim() != 1 or row_scale.shape[0] != n or not row_scale.is_floating_point()
            or row_scale.device != student.device):
        raise ValueError(f"{OP}: row_scale must be a floating ({n},) tensor on the student's device; got "
                         f"{row_scale.dtype} {tuple(row_scale.shape)} on {row_scale.device}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"{OP}: temperature must be > 0 and finite; got {temperature}")
    if divergence not in DIVERGENCES.values():
        raise ValueError(f"{OP}: divergence must be one of {DIVERGENCES}; got {divergence}")
    if divergence == DIVERGENCES["jsd"] and not 0 < jsd_beta < 1:
        raise ValueError(f"{OP}: jsd_beta must be in (0, 1); got {jsd_beta}")
    if grad is not None and (grad.shape != student.shape or grad.dtype != student.dtype
                             or grad.device != student.device):
        raise ValueError(f"{OP}: grad must have the student's shape, dtype and device ({tuple(student.shape)}, "
                         f"{student.dtype}, {student.device}); got {tuple(grad.shape)}, {grad.dtype}, {grad.device}")


def _scalars(temperature: float, jsd_beta: float) -> tuple:
    """The kernel's scalar arguments, formed in float64 on the host: 1 / T, T, T^2, b, 1 - b,
    T (1 - b) (b is only read for jsd; any value in (0, 1) otherwise)."""
    t = float(temperature)
    b = float(jsd_beta) if 0 < jsd_beta < 1 else 0.5
    return 1.0 / t, t, t * t, b, 1.0 - b, t * (1.0 - b)


def launch(student: Tensor, teacher: Tensor, row_scale: Tensor, temperature: float, divergence: int,
           jsd_beta: float, grad: Tensor | None, accumulate: bool) -> Tensor:
    """D (N,) float32; with ``grad`` (unit class stride) row_scale times dD/dstudent written or added."""
    n, c = student.shape
    _check_rows(n)
    student, teacher = _unit_class_stride(student), _unit_class_stride(teacher)
    d = student.new_empty((n,), dtype=torch.float32)
    if n == 0:
        return d
    if c == 0:
        return d.zero_()
    compute_grad = grad is not None
    rs = row_scale.to(torch.float32).contiguous() if compute_grad else d
    g = grad if compute_grad else student          # never written without grad
    elem = student.element_size()
    cfg = config(c, elem)
    grid = triton.cdiv(n, cfg.block_n)
    if not cfg.single:
        grid = min(grid, _stream_grid(c, 2 * elem, FAMILY, student.device))
    wrap_triton(kernels.distill_kernel)[(grid,)](
        student, student.stride(0), teacher, teacher.stride(0), rs, d, g, g.stride(0), n, c,
        *_scalars(temperature, jsd_beta), DIV=int(divergence), COMPUTE_GRAD=compute_grad,
        ACCUMULATE=bool(accumulate) and compute_grad, SINGLE=cfg.single, BLOCK_N=cfg.block_n,
        BLOCK_C=cfg.block_c, ROW_ALIGN=row_align(student.stride(0), teacher.stride(0), g.stride(0), c),
        NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps)
    return d


@triton_op(OP, mutates_args=("grad",), schema=DISTILL_SCHEMA)
def triton_distill(student: Tensor, teacher: Tensor, row_scale: Tensor, temperature: float, divergence: int,
                   jsd_beta: float, grad: Tensor | None, accumulate: bool) -> Tensor:
    _check(student, teacher, row_scale, temperature, divergence, jsd_beta, grad)
    if student.dtype == torch.float64:
        return distill_ops._reference_distill(student, teacher, row_scale, temperature, divergence, jsd_beta, grad,
                                              accumulate)
    if grad is not None and grad.shape[1] > 1 and grad.stride(1) != 1:
        # the kernel writes rows of unit class stride: through a dense copy, copied back
        dense = grad.contiguous()
        d = launch(student, teacher, row_scale, temperature, divergence, jsd_beta, dense, accumulate)
        grad.copy_(dense)
        return d
    return launch(student, teacher, row_scale, temperature, divergence, jsd_beta, grad, accumulate)
