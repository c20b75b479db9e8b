"""Triton kernels of the one-target form (an integer class target per row): one kernel family
for the target-only variants (``ce``, ``nllr``, ``crl``, ``lace``, ``focal``), one for ``bce``,
forward (with the fused gradient) and backward. Built from ``rows.py``, whose docstring gives
the math, the options and the traffic.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..rows import (ACC, _bce_grad_tile, _bce_saved_stats, _bce_stats_pass, _bce_store_grad, _bce_sums_pass, _capped,
                    _extra_terms, _finish_reduction, _grad_row_scale, _load_tile, _log1p, _logaddexp, _row_loss,
                    _rows_setup, _safe_shift, _softplus, _stats_pass, _store_grad, _store_row_outputs,
                    _target_grad_coefs, _target_grad_tile, _variant_math, _weight_total)


@triton.jit
def _target_fwd_rows(
    rb, X, stride_x, T, W, LOSS, STATS, G, stride_g, DENOM, PARTIAL, COUNTER,
    n_rows, n_cols, ignore_index, smooth_own, smooth_class, alpha, beta, gamma, z_loss, softcap, softcap_k,
    reduction, n_denom,
    VARIANT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr,
    SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr, SINGLE: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr, PARTIAL_BLOCK: tl.constexpr, ROW_ALIGN: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Rows of row block ``rb`` of :func:`target_fwd_kernel`; returns the sum of their losses."""
    # The gradient re-reads the row: keep the first pass's blocks in L2 (gradient stores and
    # last reads are evict_first, so they do not push them out).
    P1_EVICT: tl.constexpr = "evict_last" if COMPUTE_GRAD else "evict_first"
    rows, row_ok, tc, keep, bad, w_c = _rows_setup(rb, T, W, n_rows, n_cols, ignore_index, BLOCK_N,
                                                    HAS_WEIGHT, ACC)
    # ROW_ALIGN: a power of two (<= 16) dividing both row strides and C. With it rows start
    # aligned and the column mask is constant over ROW_ALIGN lanes, so loads and stores
    # vectorize; Triton's own specialization only knows "divisible by 16", which C = 1000
    # (ImageNet) is not, and would leave 2-byte scalar accesses. (n // A) * A is n itself
    # (A divides C): an identity the compiler's alignment analysis can see, which
    # tl.multiple_of on a scalar argument is not.
    n_cols = (n_cols // ROW_ALIGN) * ROW_ALIGN
    row_off = tl.multiple_of(rows.to(tl.int64) * stride_x, ROW_ALIGN)
    x_c = _capped(tl.load(X + row_off + tc, mask=row_ok, other=0.0).to(ACC), softcap, softcap_k, SOFTCAP)

    # ---- pass 1: lse_ex (k != c) online; sums for label smoothing ------------------------
    _, _, m, s, sum_wx, w_tot, x, mask, slope = _stats_pass(
        X, row_off, row_ok, n_cols, tc, tc, W, softcap, softcap_k, P1_EVICT, HAS_WEIGHT, HAS_SMOOTHING, SOFTCAP, SINGLE,
        BLOCK_N, BLOCK_C, NUM_STAGES, False, False)
    lse_ex = _safe_shift(m) + tl.log(s)
    lse = _logaddexp(lse_ex, x_c)
    d = lse_ex - x_c
    loss, log_s, log_gc, log_q = _variant_math(VARIANT, d, alpha, beta, gamma)

    # ---- loss rows ------------------------------------------------------------------------
    lrow = _row_loss(loss, w_c, lse, w_tot, sum_wx, smooth_own, smooth_class, z_loss, keep, bad, HAS_SMOOTHING,
                     HAS_ZLOSS)
    zero = tl.zeros([BLOCK_N], ACC)
    part = _store_row_outputs(LOSS, STATS, rows, row_ok, lrow, lse, lse_ex, zero, zero, reduction)

    # ---- gradient for grad_output = 1 ----------------------------------------------------
    if COMPUTE_GRAD:
        r, go_s = _grad_row_scale(keep, bad, w_c, None, rows, row_ok, DENOM, n_denom, reduction, False)
        off, scale, per_class, g_c = _target_grad_coefs(lse, x_c, log_s, log_gc, r, go_s, w_c, w_tot, smooth_own,
                                                        smooth_class, z_loss, HAS_SMOOTHING, HAS_ZLOSS)
        _store_grad(X, row_off, row_ok, n_cols, softcap, softcap_k, G, stride_g, rows, x, mask, slope, off, scale,
                    per_class, W, keep, tc, g_c, tc, g_c, HAS_WEIGHT, HAS_SMOOTHING, SOFTCAP, SINGLE, BLOCK_C,
                    NUM_STAGES, ROW_ALIGN, False)

    return part


@triton.jit
def target_fwd_kernel(
    X, stride_x, T, W, LOSS, STATS, G, stride_g, DENOM, PARTIAL, COUNTER,
    n_rows, n_cols, ignore_index, smooth_own, smooth_class, alpha, beta, gamma, z_loss, softcap, softcap_k,
    reduction, n_denom,
    VARIANT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr,
    SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr, SINGLE: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr, PARTIAL_BLOCK: tl.constexpr, ROW_ALIGN: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Forward of a target-only variant for BLOCK_N rows, and with COMPUTE_GRAD the
    gradient for grad_output = 1 (written to G, which may be X itself: in-place).

    SINGLE: each row is one tile (BLOCK_C >= C) loaded once and kept in registers for
    the gradient: traffic = read C*E + write C*E per row. Else: pass 1 over column blocks
    for the statistics, pass 2 in reverse block order (L2-warm) for the gradient.
    HAS_SMOOTHING / HAS_ZLOSS / SOFTCAP (label smoothing > 0, z_loss != 0, softcap > 0) compile the
    options in; without them the kernel is the plain loss's."""
    acc = tl.sum(tl.zeros([BLOCK_N], ACC), 0)
    if SINGLE:
        acc += _target_fwd_rows(tl.program_id(0), X, stride_x, T, W, LOSS, STATS, G, stride_g, DENOM,
            PARTIAL, COUNTER, n_rows, n_cols, ignore_index, smooth_own, smooth_class, alpha, beta, gamma, z_loss,
            softcap, softcap_k, reduction, n_denom, VARIANT, HAS_WEIGHT, HAS_SMOOTHING, HAS_ZLOSS, SOFTCAP,
            COMPUTE_GRAD, SINGLE, BLOCK_N, BLOCK_C, PARTIAL_BLOCK, ROW_ALIGN, NUM_STAGES)
    else:
        # Persistent: program p streams row blocks p, p + P, ... with P (the grid) chosen so
        # that the rows in flight stay in L2 for the second pass (heuristics.stream_programs).
        for rb in range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_N), tl.num_programs(0)):
            acc += _target_fwd_rows(rb, X, stride_x, T, W, LOSS, STATS, G, stride_g, DENOM, PARTIAL, COUNTER,
                n_rows, n_cols, ignore_index, smooth_own, smooth_class, alpha, beta, gamma, z_loss, softcap,
                softcap_k, reduction, n_denom, VARIANT, HAS_WEIGHT, HAS_SMOOTHING, HAS_ZLOSS, SOFTCAP, COMPUTE_GRAD,
                SINGLE, BLOCK_N, BLOCK_C, PARTIAL_BLOCK, ROW_ALIGN, NUM_STAGES)

    _finish_reduction(acc, LOSS, PARTIAL, COUNTER, DENOM, n_denom, reduction, PARTIAL_BLOCK)


@triton.jit
def target_bwd_kernel(
    GO, X, stride_x, T, W, STATS, G, stride_g, DENOM,
    n_rows, n_cols, ignore_index, smooth_own, smooth_class, alpha, beta, gamma, z_loss, softcap, softcap_k,
    reduction, n_denom,
    VARIANT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr,
    SOFTCAP: tl.constexpr, GO_PER_ROW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
):
    """Backward from the saved statistics (used when the forward did not fuse it):
    one pass, read C*E + write C*E per row; the per-variant math is the forward's.
    With SOFTCAP the stats are those of the capped logits (as the forward wrote them)."""
    pid = tl.program_id(0)
    rows, row_ok, tc, keep, bad, w_c = _rows_setup(pid, T, W, n_rows, n_cols, ignore_index, BLOCK_N,
                                                    HAS_WEIGHT, ACC)
    # ROW_ALIGN: a power of two (<= 16) dividing both row strides and C. With it rows start
    # aligned and the column mask is constant over ROW_ALIGN lanes, so loads and stores
    # vectorize; Triton's own specialization only knows "divisible by 16", which C = 1000
    # (ImageNet) is not, and would leave 2-byte scalar accesses. (n // A) * A is n itself
    # (A divides C): an identity the compiler's alignment analysis can see, which
    # tl.multiple_of on a scalar argument is not.
    n_cols = (n_cols // ROW_ALIGN) * ROW_ALIGN
    row_off = tl.multiple_of(rows.to(tl.int64) * stride_x, ROW_ALIGN)
    x_c = _capped(tl.load(X + row_off + tc, mask=row_ok, other=0.0).to(ACC), softcap, softcap_k, SOFTCAP)
    lse = tl.load(STATS + rows.to(tl.int64) * 4, mask=row_ok, other=0.0).to(ACC)
    lse_ex = tl.load(STATS + rows.to(tl.int64) * 4 + 1, mask=row_ok, other=0.0).to(ACC)
    _, log_s, log_gc, _ = _variant_math(VARIANT, lse_ex - x_c, alpha, beta, gamma)
    r, go_s = _grad_row_scale(keep, bad, w_c, GO, rows, row_ok, DENOM, n_denom, reduction, GO_PER_ROW)
    if HAS_SMOOTHING:
        w_tot = _weight_total(W, n_cols, BLOCK_N, BLOCK_C, HAS_WEIGHT)
    else:
        w_tot = tl.zeros([BLOCK_N], ACC)
    off, scale, per_class, g_c = _target_grad_coefs(lse, x_c, log_s, log_gc, r, go_s, w_c, w_tot, smooth_own,
                                                    smooth_class, z_loss, HAS_SMOOTHING, HAS_ZLOSS)
    g_off = tl.multiple_of(rows.to(tl.int64) * stride_g, ROW_ALIGN)
    for start in range(0, n_cols, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        xb, maskb, slb = _load_tile(X, row_off, row_ok, cols, n_cols, softcap, softcap_k, ACC, "evict_first", SOFTCAP)
        g = _target_grad_tile(xb, maskb, slb, cols, tc, n_cols, off, scale, per_class, g_c, W, keep,
                              HAS_WEIGHT, HAS_SMOOTHING, SOFTCAP)
        tl.store(G + g_off[:, None] + cols[None, :], g.to(G.dtype.element_ty), mask=maskb,
                     eviction_policy="evict_first")


@triton.jit
def _bce_fwd_rows(
    rb, X, stride_x, T, W, LOSS, STATS, G, stride_g, DENOM, PARTIAL, COUNTER,
    n_rows, n_cols, ignore_index, smooth_own, smooth_class, z_loss, softcap, softcap_k, reduction, n_denom,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr, SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, SINGLE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    PARTIAL_BLOCK: tl.constexpr, ROW_ALIGN: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Rows of row block ``rb`` of :func:`bce_fwd_kernel`; returns the sum of their losses."""
    # The gradient re-reads the row: keep the first pass's blocks in L2 (gradient stores and
    # last reads are evict_first, so they do not push them out).
    P1_EVICT: tl.constexpr = "evict_last" if COMPUTE_GRAD else "evict_first"
    rows, row_ok, tc, keep, bad, w_c = _rows_setup(rb, T, W, n_rows, n_cols, ignore_index, BLOCK_N,
                                                    HAS_WEIGHT, ACC)
    # ROW_ALIGN: a power of two (<= 16) dividing both row strides and C. With it rows start
    # aligned and the column mask is constant over ROW_ALIGN lanes, so loads and stores
    # vectorize; Triton's own specialization only knows "divisible by 16", which C = 1000
    # (ImageNet) is not, and would leave 2-byte scalar accesses. (n // A) * A is n itself
    # (A divides C): an identity the compiler's alignment analysis can see, which
    # tl.multiple_of on a scalar argument is not.
    n_cols = (n_cols // ROW_ALIGN) * ROW_ALIGN
    row_off = tl.multiple_of(rows.to(tl.int64) * stride_x, ROW_ALIGN)
    x_c = _capped(tl.load(X + row_off + tc, mask=row_ok, other=0.0).to(ACC), softcap, softcap_k, SOFTCAP)
    M, Wi, lse_ow, lse, sum_wx, w_tot, x, mask, slope = _bce_stats_pass(
        X, row_off, row_ok, n_cols, W, softcap, softcap_k, HAS_WEIGHT, HAS_SMOOTHING, SOFTCAP, SINGLE, BLOCK_N,
        BLOCK_C, NUM_STAGES)
    log1m_pw = lse_ow - lse
    lse_ex = tl.where(tc == Wi, lse_ow, lse + _log1p(-tl.exp(x_c - lse)))
    d = lse_ex - x_c

    l1m, R = _bce_sums_pass(X, row_off, row_ok, n_cols, softcap, softcap_k, x, mask, tc, tc, Wi, lse, log1m_pw,
                            P1_EVICT, SOFTCAP, SINGLE, BLOCK_N, BLOCK_C, False)
    lrow = _row_loss(_softplus(d) - l1m, w_c, lse, w_tot, sum_wx, smooth_own, smooth_class, z_loss, keep, bad,
                     HAS_SMOOTHING, HAS_ZLOSS)
    part = _store_row_outputs(LOSS, STATS, rows, row_ok, lrow, lse, lse_ex, log1m_pw, Wi.to(ACC), reduction)

    if COMPUTE_GRAD:
        r, go_s = _grad_row_scale(keep, bad, w_c, None, rows, row_ok, DENOM, n_denom, reduction, False)
        own, extra, per_class = _extra_terms(r, go_s, lse, smooth_own, smooth_class, z_loss, w_tot, HAS_SMOOTHING,
                                             HAS_ZLOSS)
        _bce_store_grad(X, row_off, row_ok, n_cols, softcap, softcap_k, G, stride_g, rows, x, mask, slope, Wi, lse,
                        log1m_pw, M - lse, tc, R, own, extra, per_class, keep, tc, R, own, extra, per_class, keep, W,
                        HAS_WEIGHT, HAS_SMOOTHING, HAS_ZLOSS, SOFTCAP, SINGLE, BLOCK_C, NUM_STAGES, ROW_ALIGN, False)

    return part


@triton.jit
def bce_fwd_kernel(
    X, stride_x, T, W, LOSS, STATS, G, stride_g, DENOM, PARTIAL, COUNTER,
    n_rows, n_cols, ignore_index, smooth_own, smooth_class, z_loss, softcap, softcap_k, reduction, n_denom,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr, SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, SINGLE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    PARTIAL_BLOCK: tl.constexpr, ROW_ALIGN: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Forward (and fused gradient) of bce. SINGLE: the tile stays in registers for all
    three reductions (read C*E + write C*E). Else: pass 1 forward (arg-max, lse), pass 2
    reverse (loss sum, R), pass 3 forward (gradient): each pass starts on the blocks the
    previous one read last, so re-reads are L2-warm. The options as in target_fwd_kernel."""
    acc = tl.sum(tl.zeros([BLOCK_N], ACC), 0)
    if SINGLE:
        acc += _bce_fwd_rows(tl.program_id(0), X, stride_x, T, W, LOSS, STATS, G, stride_g, DENOM, PARTIAL,
            COUNTER, n_rows, n_cols, ignore_index, smooth_own, smooth_class, z_loss, softcap, softcap_k, reduction,
            n_denom, HAS_WEIGHT, HAS_SMOOTHING, HAS_ZLOSS, SOFTCAP, COMPUTE_GRAD, SINGLE, BLOCK_N, BLOCK_C,
            PARTIAL_BLOCK, ROW_ALIGN, NUM_STAGES)
    else:
        # Persistent: program p streams row blocks p, p + P, ... with P (the grid) chosen so
        # that the rows in flight stay in L2 for the second pass (heuristics.stream_programs).
        for rb in range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_N), tl.num_programs(0)):
            acc += _bce_fwd_rows(rb, X, stride_x, T, W, LOSS, STATS, G, stride_g, DENOM, PARTIAL, COUNTER,
                n_rows, n_cols, ignore_index, smooth_own, smooth_class, z_loss, softcap, softcap_k, reduction,
                n_denom, HAS_WEIGHT, HAS_SMOOTHING, HAS_ZLOSS, SOFTCAP, COMPUTE_GRAD, SINGLE, BLOCK_N, BLOCK_C,
                PARTIAL_BLOCK, ROW_ALIGN, NUM_STAGES)

    _finish_reduction(acc, LOSS, PARTIAL, COUNTER, DENOM, n_denom, reduction, PARTIAL_BLOCK)


@triton.jit
def bce_bwd_kernel(
    GO, X, stride_x, T, W, STATS, G, stride_g, DENOM,
    n_rows, n_cols, ignore_index, smooth_own, smooth_class, z_loss, softcap, softcap_k, reduction, n_denom,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr, SOFTCAP: tl.constexpr,
    GO_PER_ROW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    """Backward of bce from the saved statistics: R needs one pass (R is not among the four
    stats columns), the gradient another (reverse order, L2-warm)."""
    pid = tl.program_id(0)
    rows, row_ok, tc, keep, bad, w_c = _rows_setup(pid, T, W, n_rows, n_cols, ignore_index, BLOCK_N,
                                                    HAS_WEIGHT, ACC)
    # ROW_ALIGN: a power of two (<= 16) dividing both row strides and C. With it rows start
    # aligned and the column mask is constant over ROW_ALIGN lanes, so loads and stores
    # vectorize; Triton's own specialization only knows "divisible by 16", which C = 1000
    # (ImageNet) is not, and would leave 2-byte scalar accesses. (n // A) * A is n itself
    # (A divides C): an identity the compiler's alignment analysis can see, which
    # tl.multiple_of on a scalar argument is not.
    n_cols = (n_cols // ROW_ALIGN) * ROW_ALIGN
    row_off = tl.multiple_of(rows.to(tl.int64) * stride_x, ROW_ALIGN)
    lse, log1m_pw, Wi, x_w, R = _bce_saved_stats(STATS, X, row_off, rows, row_ok, n_cols, tc, tc, softcap,
                                                    softcap_k, SOFTCAP, BLOCK_N, BLOCK_C, False)
    cols0 = tl.arange(0, BLOCK_C)
    r, go_s = _grad_row_scale(keep, bad, w_c, GO, rows, row_ok, DENOM, n_denom, reduction, GO_PER_ROW)
    if HAS_SMOOTHING:
        w_tot = _weight_total(W, n_cols, BLOCK_N, BLOCK_C, HAS_WEIGHT)
    else:
        w_tot = tl.zeros([BLOCK_N], ACC)
    own, extra, per_class = _extra_terms(r, go_s, lse, smooth_own, smooth_class, z_loss, w_tot, HAS_SMOOTHING,
                                             HAS_ZLOSS)
    g_off = tl.multiple_of(rows.to(tl.int64) * stride_g, ROW_ALIGN)
    nb = tl.cdiv(n_cols, BLOCK_C)
    for i in range(0, nb):
        cols = (nb - 1 - i) * BLOCK_C + cols0
        xb, maskb, slb = _load_tile(X, row_off, row_ok, cols, n_cols, softcap, softcap_k, ACC, "evict_first", SOFTCAP)
        g = _bce_grad_tile(xb, maskb, slb, cols, n_cols, tc, Wi, lse, log1m_pw, x_w - lse, R, own, extra, per_class,
                           W, keep, HAS_WEIGHT, HAS_SMOOTHING, HAS_ZLOSS, SOFTCAP)
        tl.store(G + g_off[:, None] + cols[None, :], g.to(G.dtype.element_ty), mask=maskb,
                     eviction_policy="evict_first")
