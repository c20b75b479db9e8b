"""Triton kernels of cross-entropy with class-probability (soft) targets: PyTorch's
``F.cross_entropy(x, probs, weight=, label_smoothing=, reduction=)`` (the PyTorch twin is
``reference.soft_forward`` / ``soft_backward``; the C++ ones ``soft_ce`` in
csrc/cpu/kernels.cpp and ``soft_row`` in csrc/cuda/row_kernels.cuh).

Per row, with the smoothed and weighted targets ``wy_k = w_k ((1 - eps) y_k + eps / C)``:

    L = sum_k wy_k (lse - x_k),   S = sum_k wy_k,   dL/dx_j = go (S p_j - wy_j)

and the stats columns (lse, S, lse_lo, 0): ``lse_lo`` is a compensation term, below.

One online pass over the row gives ``lse`` (running max ``m``, rescaled sum ``s``), ``S`` and
the loss, the latter as ``A = sum_k wy_k (m - x_k)`` kept relative to the running max: when
the max grows from ``m`` to ``m'`` every earlier term gains ``(m' - m)``, so
``A += (m' - m) S_old``. Every term is >= 0 (no cancellation, whatever the logits' offset),
and at the end ``L = A + S log s`` (``lse - m = log s`` exactly, never a difference of two
large numbers). A class without target mass contributes 0, also at a -inf logit.

``lse`` rounded to float32 loses up to half an ulp of ``m``: at ``|x| ~ 1e4`` that is 5e-4,
and ``exp(x_j - lse)`` would carry that relative error. So the forward also stores
``lse_lo = (m - lse) + log s`` (exact: two Sterbenz subtractions), and every gradient
evaluates ``p_j = exp((x_j - lse) - lse_lo)``; ``x_j - lse`` is exact where ``p_j``
matters (``x_j`` within a factor 2 of ``lse``). Stats of another backend have 0 there:
the plain ``exp(x_j - lse)``.

Traffic per row of C logits (E bytes) and C targets (E bytes): on chip (``SINGLE``) both
rows are read once and kept in registers, the gradient written once; streamed, pass 1
reads both (L2 priority evict_last), pass 2 reads both again in reverse block order
(L2-warm) and writes the gradient, on a persistent grid sized so that the rows in flight,
logits and targets, fit in L2 (launch.py). Without the gradient: one read.
The reduction is the target kernels' (``rows._finish_reduction``): per-program partial
sums, the last program adds them in program order; 'mean' divides by N (PyTorch's mean
for probability targets), which the prologue writes on the device.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..rows import ACC, NEG_INF, RED_NONE, _finish_reduction, _grad_row_scale, _load_tile, _online_update, \
    _safe_shift, _store_stats


@triton.jit
def _row_block(rb, n_rows, BLOCK_N: tl.constexpr):
    """Rows of row block ``rb`` (int32; the launcher checks N) and which of them exist."""
    # (zeros + rb) works for a tensor rb (compiled) and a Python int (the interpreter).
    rows = (tl.zeros([BLOCK_N], tl.int32) + rb) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, rows < n_rows


@triton.jit
def _load_wy(Y, y_off, row_ok, cols, n_cols, W, smooth_own, smooth_class, EVICT: tl.constexpr,
             HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr):
    """One tile of ``wy = w ((1 - eps) y + eps / C)`` in float32, 0 outside the row."""
    mask = row_ok[:, None] & (cols < n_cols)[None, :]
    wy = tl.load(Y + y_off[:, None] + cols[None, :], mask=mask, other=0.0, eviction_policy=EVICT).to(ACC)
    if HAS_SMOOTHING:
        wy = tl.where(mask, wy * smooth_own + smooth_class, 0.0)
    if HAS_WEIGHT:
        wy = wy * tl.load(W + cols, mask=cols < n_cols, other=0.0).to(ACC)[None, :]
    return wy


@triton.jit
def _soft_stats_init(BLOCK_N: tl.constexpr):
    """(m, s, S, A) before any column: max -inf, the sums 0."""
    zero = tl.zeros([BLOCK_N], ACC)
    return zero + float("-inf"), zero, zero, zero


@triton.jit
def _store_grad(G, g_off, cols, g, mask):
    """A gradient tile, rounded once to the gradient's dtype; L2 priority evict_first."""
    tl.store(G + g_off[:, None] + cols[None, :], g.to(G.dtype.element_ty), mask=mask, eviction_policy="evict_first")


@triton.jit
def _soft_stats_update(m, s, S, A, x, wy):
    """Merge a tile into the running (max m, sum s of exp(x - m), S = sum wy, A = sum wy (m - x)).
    The shift is _safe_shift(m) (0 while every logit so far is -inf), as in the lse sum."""
    sh_old = _safe_shift(m)
    m, s = _online_update(m, s, x, False)
    sh = _safe_shift(m)
    # where: a class without target mass adds 0, also at x = -inf (not 0 * inf)
    A = A + (sh - sh_old) * S + tl.sum(tl.where(wy == 0.0, 0.0, wy * (sh[:, None] - x)), 1)
    S = S + tl.sum(wy, 1)
    return m, s, S, A


@triton.jit
def _soft_grad_tile(x, wy, lse, lse_lo, S, go):
    """``go (S p_j - wy_j)`` in float32, ``p_j = exp((x_j - lse) - lse_lo)``."""
    p = tl.exp((x - lse[:, None]) - lse_lo[:, None])
    return p * (S * go)[:, None] - wy * go[:, None]


@triton.jit
def _soft_fwd_rows(
    rb, X, stride_x, Y, stride_y, W, LOSS, STATS, G, stride_g, DENOM, n_rows, n_cols, smooth_own, smooth_class,
    reduction, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    SINGLE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ROW_ALIGN: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """Rows of row block ``rb`` of :func:`soft_fwd_kernel`; returns the sum of their losses."""
    P1_EVICT: tl.constexpr = "evict_last" if COMPUTE_GRAD else "evict_first"
    rows, row_ok = _row_block(rb, n_rows, BLOCK_N)
    # ROW_ALIGN divides C and every row stride (one_target.kernels.target_fwd_kernel: vectorized access)
    n_cols = (n_cols // ROW_ALIGN) * ROW_ALIGN
    x_off = tl.multiple_of(rows.to(tl.int64) * stride_x, ROW_ALIGN)
    y_off = tl.multiple_of(rows.to(tl.int64) * stride_y, ROW_ALIGN)
    cols0 = tl.arange(0, BLOCK_C)
    m, s, S, A = _soft_stats_init(BLOCK_N)

    # ---- pass 1: lse, S and the loss ------------------------------------------------------
    if SINGLE:
        x, mask, slope = _load_tile(X, x_off, row_ok, cols0, n_cols, 0.0, 0.0, ACC, "evict_first", False)
        wy = _load_wy(Y, y_off, row_ok, cols0, n_cols, W, smooth_own, smooth_class, "evict_first", HAS_WEIGHT,
                      HAS_SMOOTHING)
        m, s, S, A = _soft_stats_update(m, s, S, A, x, wy)
    else:
        for start in tl.range(0, n_cols, BLOCK_C, num_stages=NUM_STAGES):
            cols = start + cols0
            xb, maskb, slb = _load_tile(X, x_off, row_ok, cols, n_cols, 0.0, 0.0, ACC, P1_EVICT, False)
            wyb = _load_wy(Y, y_off, row_ok, cols, n_cols, W, smooth_own, smooth_class, P1_EVICT, HAS_WEIGHT,
                           HAS_SMOOTHING)
            m, s, S, A = _soft_stats_update(m, s, S, A, xb, wyb)
    sh = _safe_shift(m)
    log_s = tl.log(s)
    lse = sh + log_s
    lse_lo = tl.where(m == NEG_INF, 0.0, (sh - lse) + log_s)
    lrow = A + tl.where(S == 0.0, 0.0, S * log_s)
    _store_stats(STATS, rows, row_ok, lse, S, lse_lo, tl.zeros([BLOCK_N], ACC))
    if reduction == RED_NONE:
        tl.store(LOSS + rows, lrow, mask=row_ok)
    part = tl.sum(tl.where(row_ok, lrow, 0.0), 0)

    # ---- gradient for grad_output = 1 ------------------------------------------------------
    if COMPUTE_GRAD:
        r, go = _grad_row_scale(row_ok, rows < 0, tl.full([BLOCK_N], 1.0, ACC), None, rows, row_ok, DENOM, 1,
                                reduction, False)
        g_off = tl.multiple_of(rows.to(tl.int64) * stride_g, ROW_ALIGN)
        if SINGLE:
            _store_grad(G, g_off, cols0, _soft_grad_tile(x, wy, lse, lse_lo, S, go), mask)
        else:
            nb = tl.cdiv(n_cols, BLOCK_C)
            for i in tl.range(0, nb, num_stages=NUM_STAGES):
                cols = (nb - 1 - i) * BLOCK_C + cols0       # reverse: L2-warm blocks first
                xb, maskb, slb = _load_tile(X, x_off, row_ok, cols, n_cols, 0.0, 0.0, ACC, "evict_first", False)
                wyb = _load_wy(Y, y_off, row_ok, cols, n_cols, W, smooth_own, smooth_class, "evict_first",
                               HAS_WEIGHT, HAS_SMOOTHING)
                _store_grad(G, g_off, cols, _soft_grad_tile(xb, wyb, lse, lse_lo, S, go), maskb)
    return part


@triton.jit
def soft_fwd_kernel(
    X, stride_x, Y, stride_y, W, LOSS, STATS, G, stride_g, DENOM, PARTIAL, COUNTER,
    n_rows, n_cols, smooth_own, smooth_class, reduction,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, COMPUTE_GRAD: tl.constexpr, SINGLE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, PARTIAL_BLOCK: tl.constexpr, ROW_ALIGN: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """Forward of soft-target ce for BLOCK_N rows (SINGLE: one program per row block, the rows
    held in registers), or, streamed, a persistent program looping over row blocks; with
    COMPUTE_GRAD the gradient for grad_output = 1 into G. smooth_own = 1 - eps,
    smooth_class = eps / C (HAS_SMOOTHING)."""
    acc = tl.sum(tl.zeros([BLOCK_N], ACC), 0)
    if SINGLE:
        acc += _soft_fwd_rows(tl.program_id(0), X, stride_x, Y, stride_y, W, LOSS, STATS, G, stride_g, DENOM,
                              n_rows, n_cols, smooth_own, smooth_class, reduction, HAS_WEIGHT, HAS_SMOOTHING,
                              COMPUTE_GRAD, SINGLE, BLOCK_N, BLOCK_C, ROW_ALIGN, NUM_STAGES)
    else:
        for rb in range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_N), tl.num_programs(0)):
            acc += _soft_fwd_rows(rb, X, stride_x, Y, stride_y, W, LOSS, STATS, G, stride_g, DENOM, n_rows, n_cols,
                                  smooth_own, smooth_class, reduction, HAS_WEIGHT, HAS_SMOOTHING, COMPUTE_GRAD,
                                  SINGLE, BLOCK_N, BLOCK_C, ROW_ALIGN, NUM_STAGES)
    # n_denom = 1: the prologue wrote N into DENOM[0]
    _finish_reduction(acc, LOSS, PARTIAL, COUNTER, DENOM, 1, reduction, PARTIAL_BLOCK)


@triton.jit
def soft_bwd_kernel(
    GO, X, stride_x, Y, stride_y, W, STATS, G, stride_g, DENOM, n_rows, n_cols, smooth_own, smooth_class,
    reduction, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, GO_PER_ROW: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    """Backward from the saved stats (lse, S, lse_lo): one pass, reads both rows once and
    writes the gradient once. grad_output per row ('none') or a scalar; 'mean' divides by
    DENOM[0] = N (the prologue's)."""
    rows, row_ok = _row_block(tl.program_id(0), n_rows, BLOCK_N)
    n_cols = (n_cols // ROW_ALIGN) * ROW_ALIGN
    x_off = tl.multiple_of(rows.to(tl.int64) * stride_x, ROW_ALIGN)
    y_off = tl.multiple_of(rows.to(tl.int64) * stride_y, ROW_ALIGN)
    g_off = tl.multiple_of(rows.to(tl.int64) * stride_g, ROW_ALIGN)
    st = STATS + rows.to(tl.int64) * 4
    lse = tl.load(st, mask=row_ok, other=0.0).to(ACC)
    S = tl.load(st + 1, mask=row_ok, other=0.0).to(ACC)
    lse_lo = tl.load(st + 2, mask=row_ok, other=0.0).to(ACC)
    r, go = _grad_row_scale(row_ok, rows < 0, tl.full([BLOCK_N], 1.0, ACC), GO, rows, row_ok, DENOM, 1, reduction,
                            GO_PER_ROW)
    for start in range(0, n_cols, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        xb, maskb, slb = _load_tile(X, x_off, row_ok, cols, n_cols, 0.0, 0.0, ACC, "evict_first", False)
        wyb = _load_wy(Y, y_off, row_ok, cols, n_cols, W, smooth_own, smooth_class, "evict_first", HAS_WEIGHT,
                       HAS_SMOOTHING)
        _store_grad(G, g_off, cols, _soft_grad_tile(xb, wyb, lse, lse_lo, S, go), maskb)


@triton.jit
def soft_prologue_kernel(DENOM, COUNTER, n_rows):
    """Before a reduced forward (or a 'mean' backward): zero the completion counter and write
    the mean's denominator, N (one program, 8 bytes)."""
    one = tl.arange(0, 1)
    tl.store(COUNTER + one, tl.zeros([1], tl.int32))
    tl.store(DENOM + one, tl.zeros([1], tl.float32) + n_rows)
