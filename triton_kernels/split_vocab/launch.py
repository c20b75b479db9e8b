"""Launchers of the vocabulary-parallel bce kernels (``kernels.py``), registered as
``fusedloss::triton_bce_partial`` / ``fusedloss::triton_bce_global_bwd`` with the schemas of the
C++ CPU ops (``ops.BCE_PARTIAL_SCHEMA`` / ``ops.BCE_GLOBAL_BWD_SCHEMA``; contract in ``fusedloss.ops``)
and their fakes (``ops.register_bce_parallel_fakes``). ``fusedloss.parallel`` calls them through
``ops.SplitVocabOps`` (backend.py). Not differentiable: the caller's
autograd.Function calls them.

Inputs checked as the C++ op checks them: logits (N, C) floating, stats (N, 4) floating and
slice_idx (N, 3) int64 on the logits' device, grad_rows (N,) floating, softcap and z_loss >= 0.
stats and grad_rows are converted to float32 and made contiguous (slice_idx contiguous); logits rows
of any stride are read in place (a class dimension that is not dense is copied once). slice_idx's
values are checked as the C++ op does where that is free of a device synchronization
(``validation.must_check_targets``: CPU tensors, or strict mode); the kernels only compare them
with column indices, so a bad value elsewhere gives wrong numbers, never a bad memory access.

float64 logits run a PyTorch evaluation of the same contract (Triton passes Python floats as
float32: too coarse for float64 math), as the other Triton ops run the reference for float64.
"""
from __future__ import annotations

import math

import torch
import triton
from torch import Tensor

from fusedloss import ops, reference
from fusedloss.validation import must_check_targets

from ..heuristics import bwd_config
from ..launch_common import _check_rows, _is_traced, _unit_class_stride, row_align
from . import kernels

#: The launch heuristic family (heuristics.py's bce limits: column blocks of at most 2048).
FAMILY = 1  # Variant.BCE


def _check(logits: Tensor, stats: Tensor, slice_idx: Tensor, softcap: float, op: str) -> tuple[Tensor, Tensor]:
    """The C++ op's checks; returns (stats as float32 or float64 contiguous, slice_idx contiguous)."""
    if logits.dim() != 2 or not logits.is_floating_point():
        raise RuntimeError(f"{op}: logits must be a floating (N, C) tensor; got {logits.dtype} {tuple(logits.shape)}")
    n, c = logits.shape
    if stats.dim() != 2 or stats.shape[0] != n or stats.shape[1] != 4 or not stats.is_floating_point():
        raise RuntimeError(f"{op}: stats must be floating ({n}, 4); got {stats.dtype} {tuple(stats.shape)}")
    if slice_idx.dim() != 2 or slice_idx.shape[0] != n or slice_idx.shape[1] != 3 or slice_idx.dtype != torch.int64:
        raise RuntimeError(f"{op}: slice_idx must be int64 ({n}, 3); got {slice_idx.dtype} {tuple(slice_idx.shape)}")
    if stats.device != logits.device or slice_idx.device != logits.device:
        raise RuntimeError(f"{op}: stats and slice_idx must be on the logits' device")
    if not (softcap >= 0 and math.isfinite(softcap)):
        raise RuntimeError(f"{op}: softcap must be >= 0 (0: no cap); got {softcap}")
    slice_idx = slice_idx.contiguous()
    if must_check_targets(logits.device) and not _is_traced(slice_idx):
        _check_values(slice_idx, c, op)
    return stats.to(ops.stats_dtype(logits)).contiguous(), slice_idx


def _check_values(idx: Tensor, n_cols: int, op: str) -> None:
    c, w, kind = idx.unbind(1)
    out = (c < -1) | (c >= n_cols) | (w < -1) | (w >= n_cols) | (kind < -1) | (kind > 1)
    same = (kind == 1) & (c != w)
    differ = (kind == 0) & (c == w) & (c != -1)
    for bad, what in ((out, "out of range for {C} classes"), (same, "says w == c but has c = {c}, w = {w}"),
                      (differ, "says w != c but has c = w = {c}")):
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            row = [int(v) for v in idx[i]]
            msg = f"{op}: slice_idx row {i} = {tuple(row)} " + what.format(C=n_cols, c=row[0], w=row[1])
            raise (IndexError if bad is out else RuntimeError)(msg)


def _config(logits: Tensor):
    n, c = logits.shape
    cfg = bwd_config(c, logits.element_size(), FAMILY)
    return cfg, triton.cdiv(n, cfg.block_n)


def _cap_scalars(softcap: float) -> tuple[float, float]:
    cap = float(softcap)
    return cap, (-2.0 / (math.log(2.0) * cap) if cap > 0 else 0.0)


# ---- float64: the contract in PyTorch ----------------------------------------------------------

def _put(buf: Tensor, idx: Tensor, value) -> None:
    """``buf[i, idx[i]] = value[i]`` on the rows where idx >= 0."""
    has = idx >= 0
    j = idx.clamp(min=0)[:, None]
    if isinstance(value, Tensor):
        value = value[:, None]
    buf.scatter_(1, j, torch.where(has[:, None], value, buf.gather(1, j)).to(buf.dtype))


def _torch_partial(x: Tensor, stats: Tensor, idx: Tensor, softcap: float) -> Tensor:
    c, w, kind = idx.unbind(1)
    keep = kind >= 0
    p = reference.shifted(reference.capped(x, softcap), stats[:, 0], stats.dtype).exp_()
    a = reference.bce_odds(p)
    l1m = reference.bce_log1m(p)
    out = []
    for buf in (l1m, a):
        _put(buf, c, 0.0)
        _put(buf, w, 0.0)
        out.append(torch.where(keep, buf.sum(1), 0.0))
    return torch.stack(out, 1)


def _torch_global_bwd(go: Tensor, x: Tensor, stats: Tensor, idx: Tensor, z_loss: float, softcap: float) -> Tensor:
    c, w, kind = idx.unbind(1)
    keep = kind >= 0
    w_is_c = kind == 1
    lse, r, log1m_pw, x_w = stats.unbind(1)
    xc = reference.capped(x, softcap)
    log_pw = x_w - lse
    p = reference.shifted(xc, lse, stats.dtype).exp_()
    a = reference.bce_odds(p)
    _put(a, c, -1.0)
    pz = p.clone() if z_loss else None
    g = reference.bce_grad_off_argmax(xc, p, a, r, lse, reference.bce_log_aw(log_pw, log1m_pw, w_is_c), w_is_c)
    _put(g, w, reference.bce_grad_argmax(log_pw, log1m_pw, r, w_is_c))
    g.mul_(go[:, None])
    if z_loss:
        g.add_(pz * (2 * z_loss * lse * go)[:, None])
    if softcap:
        g.mul_(reference.softcap_slope(x, softcap, stats.dtype))
    return g.masked_fill_(~keep[:, None], 0.0).to(x.dtype)


# ---- the ops ------------------------------------------------------------------------------------

@torch.library.custom_op("fusedloss::triton_bce_partial", mutates_args=(), schema=ops.BCE_PARTIAL_SCHEMA)
def triton_bce_partial(logits: Tensor, stats: Tensor, slice_idx: Tensor, softcap: float) -> Tensor:
    op = "fusedloss::triton_bce_partial"
    stats, slice_idx = _check(logits, stats, slice_idx, softcap, op)
    n, c = logits.shape
    _check_rows(n)
    if logits.dtype == torch.float64:
        return _torch_partial(logits, stats, slice_idx, softcap)
    logits = _unit_class_stride(logits)
    out = torch.empty((n, 2), dtype=torch.float32, device=logits.device)
    if n == 0:
        return out
    cfg, grid = _config(logits)
    cap, cap_k = _cap_scalars(softcap)
    kernels.bce_partial_kernel[(grid,)](
        logits, logits.stride(0), stats, slice_idx, out, n, c, cap, cap_k,
        SOFTCAP=softcap > 0, BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c, ROW_ALIGN=row_align(logits.stride(0), c),
        num_warps=cfg.num_warps)
    return out


@torch.library.custom_op("fusedloss::triton_bce_global_bwd", mutates_args=(), schema=ops.BCE_GLOBAL_BWD_SCHEMA)
def triton_bce_global_bwd(grad_rows: Tensor, logits: Tensor, stats: Tensor, slice_idx: Tensor, z_loss: float,
                          softcap: float) -> Tensor:
    op = "fusedloss::triton_bce_global_bwd"
    stats, slice_idx = _check(logits, stats, slice_idx, softcap, op)
    n, c = logits.shape
    if (grad_rows.dim() != 1 or grad_rows.shape[0] != n or not grad_rows.is_floating_point()
            or grad_rows.device != logits.device):
        raise RuntimeError(f"{op}: grad_rows must be floating ({n},) on the logits' device; got {grad_rows.dtype} "
                           f"{tuple(grad_rows.shape)}")
    if not (z_loss >= 0 and math.isfinite(z_loss)):
        raise RuntimeError(f"{op}: z_loss must be >= 0; got {z_loss}")
    _check_rows(n)
    go = grad_rows.to(stats.dtype).contiguous()
    if logits.dtype == torch.float64:
        return _torch_global_bwd(go, logits, stats, slice_idx, z_loss, softcap)
    logits = _unit_class_stride(logits)
    grad = torch.empty((n, c), dtype=logits.dtype, device=logits.device)
    if n == 0:
        return grad
    cfg, grid = _config(logits)
    cap, cap_k = _cap_scalars(softcap)
    kernels.bce_global_bwd_kernel[(grid,)](
        go, logits, logits.stride(0), stats, slice_idx, grad, grad.stride(0), n, c, float(z_loss), cap, cap_k,
        HAS_ZLOSS=z_loss != 0, SOFTCAP=softcap > 0, BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c,
        ROW_ALIGN=row_align(logits.stride(0), grad.stride(0), c), num_warps=cfg.num_warps)
    return grad


ops.register_bce_parallel_fakes("triton_bce_partial", "triton_bce_global_bwd")
