"""Triton kernels of class-probability (soft) targets for every loss: the expected loss
``L_i = sum_k m_ik L(x_i, k)``, ``m_ik = w_k ((1 - eps) q_ik + eps / C)`` (docs/losses.md,
"Soft targets: the expected loss"; the PyTorch twin is ``reference.soft_loss_forward`` /
``expected_loss`` / ``expected_grad``, the C++ one ``expected_row`` in csrc/cpu/kernels.cpp).
The ce-only kernels (``kernels.py``) stay for ``loss='ce'`` (PyTorch's op family).

Per row, three passes (the row on chip, ``SINGLE``: one read of the logits and the targets,
one write of the gradient; streamed: the blocks re-read from L2 in alternating order, as bce's
kernels do):

1. the logits only: bce's statistics pass (``rows._bce_stats_pass``): ``lse``, the arg-max
   ``w`` (first index of the max), its logit ``x_w`` and ``lse_{k != w}``, so that
   ``log(1 - p_w) = lse_{k != w} - lse`` and ``d_w = lse_{k != w} - x_w`` exactly (never
   ``1 - p_w`` or ``lse - x_w``);
2. over ``k != w`` (every such ``p_k <= 1/2``: ``log1p(-p_k)`` exact), the per-lane terms of
   :func:`_lane_terms` (``h_k = L(x, k)``'s target-only part and ``s_k = -p_k h'(p_k)``) summed
   apart for the targets' part and the uniform part: ``sum w y h``, ``sum w h``, ``sum w y s``,
   ``sum w s``, ``sum w y``, ``sum w``; bce also ``sum w y log(1 - p)``, ``sum w log(1 - p)``,
   ``T_w = sum log(1 - p)`` and ``R_w = sum a``. Every sum of the mass is then formed as
   ``(1 - eps) sum w y . + (eps / C) sum w .``: no pass adds ``C`` nearly equal ``eps / C``
   values (without weights ``sum_{k != w} w = C - 1`` exactly). ``w``'s own terms come from
   ``d_w`` through ``rows._variant_math``, as for a class index.
3. the gradient, ``go`` times

       target-only, j != w: p_j A_w + m_w exp(log p_j + log s_w) - m_j s_j
                    j == w: p_w A_w - m_w exp(log(s_w (1 - p_w)))
       bce,         j != w: p_j (A_w - S R_w + S) - S_w exp(x_j - lse_{k != w}) - m_j s_j + S a_j
                    j == w: p_w (A_w - S R_w) + S_w - S (1 - p_w)

   with ``A_w = sum_{k != w} m_k s_k``, ``S_w = sum_{k != w} m_k``, ``S = S_w + m_w``.

Stats (the reference's): ``lse, S, log(1 - p_w), w``; the backward kernel reads them and reruns
passes 2 and 3 (``x_w``, ``q_w``, ``w_w`` by scalar loads). A class with no mass adds 0, also
where its loss is infinite (a -inf logit): selects, never ``0 * inf``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..rows import (ACC, BCE, CE, CRL, FOCAL, LACE, NEG_INF, NLLR, RED_MEAN, RED_NONE, RED_SUM, _bce_stats_pass,
                    _capped, _finish_reduction, _grad_row_scale, _load_tile, _log1p, _mean_denominator, _no_tile,
                    _rows_setup, _softplus, _store_stats, _variant_math)
from .kernels import _row_block


@triton.jit
def _load_q(Y, y_off, row_ok, cols, n_cols, EVICT: tl.constexpr):
    """A tile of the targets in float32, 0 outside the row."""
    mask = row_ok[:, None] & (cols < n_cols)[None, :]
    return tl.load(Y + y_off[:, None] + cols[None, :], mask=mask, other=0.0, eviction_policy=EVICT).to(ACC)


@triton.jit
def _load_w(W, cols, n_cols, HAS_WEIGHT: tl.constexpr):
    """The class weights of a tile's columns (0 outside the row), 1 without weights."""
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(ACC)
    else:
        w = tl.full(cols.shape, 1.0, ACC)
    return w


@triton.jit
def _log1p_lane(x):
    """rows._log1p with the approximate division (2 ulp; ``u - 1`` is exact, the ratio is about 1):
    no per-lane call of the IEEE division's slow path, whose register saves ptxas counted as
    spills (4-16 bytes, sm_90) in the streamed kernels."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * tl.fdiv(x, u - 1.0, ieee_rounding=False))


@triton.jit
def _lane_terms(VARIANT: tl.constexpr, x, lse, alpha, beta, gamma):
    """Per lane with ``p <= 1/2`` (every k != w): ``p``, ``h = L(x, k)`` (bce: its ``-log p_k``
    part), ``s = -p h'(p)``, ``log(1 - p)`` and ``a = p / (1 - p)`` (docs/losses.md, "Kernels").
    ``p log p`` and ``a log p`` are 0 at ``p = 0`` (a -inf logit)."""
    lp = x - lse[:, None]
    p = tl.exp(lp)
    l1m = _log1p_lane(-p)
    # p / (1 - p) with p <= 1/2: the approximate division (2 ulp), as in _log1p_lane
    a = tl.fdiv(p, 1.0 - p, ieee_rounding=False)
    if VARIANT == CE:
        h = -lp
        s = tl.full(p.shape, 1.0, ACC)
    elif VARIANT == BCE:
        h = -lp
        s = 1.0 + a
    elif VARIANT == NLLR:
        h = l1m - lp
        s = 1.0 + a
    elif VARIANT == CRL:
        t = tl.fdiv(p, 1.0 + alpha, ieee_rounding=False)
        h = tl.where(beta == 0.0, 0.0, beta * (tl.log(1.0 + alpha) + _log1p_lane(-t))) - lp
        s = 1.0 + beta * tl.fdiv(t, 1.0 - t, ieee_rounding=False)
    elif VARIANT == LACE:
        h = -(1.0 - p) * lp
        s = (1.0 - p) - tl.where(p == 0.0, 0.0, p * lp)
    else:
        tl.static_assert(VARIANT == FOCAL, "soft-loss kernel: unknown variant")
        qg = tl.exp(tl.where(gamma == 0.0, 0.0, gamma * l1m))     # (1 - p)^gamma, 1 for gamma = 0
        h = -qg * lp
        s = qg * (1.0 - tl.where(p == 0.0, 0.0, gamma * a * lp))
    return p, h, s, l1m, a


@triton.jit
def _masked_sum(cond, v):
    return tl.sum(tl.where(cond, v, 0.0), 1)


@triton.jit
def _tile_sums(VARIANT: tl.constexpr, x, mask, q, w, cols, Wi, lse, alpha, beta, gamma, HAS_SMOOTHING: tl.constexpr):
    """Pass 2 over one tile (lanes k != w): the sums of the module docstring, the targets' part
    (``wy = w q``) and, with smoothing, the uniform part (``w``) apart."""
    keep = mask & (cols[None, :] != Wi[:, None])
    p, h, s, l1m, a = _lane_terms(VARIANT, x, lse, alpha, beta, gamma)
    wy = q * w[None, :]
    has_y = keep & (wy != 0.0)
    syh = _masked_sum(has_y, wy * h)
    sys_ = _masked_sum(has_y, wy * s)
    sy = _masked_sum(keep, wy)
    zero = tl.zeros_like(sy)
    suh = zero
    sus = zero
    su = zero
    syl = zero
    sul = zero
    tw = zero
    rw = zero
    if HAS_SMOOTHING:
        has_w = keep & (w != 0.0)[None, :]
        suh = _masked_sum(has_w, w[None, :] * h)
        sus = _masked_sum(has_w, w[None, :] * s)
        su = _masked_sum(keep, w[None, :] + zero[:, None])
    if VARIANT == BCE:
        syl = _masked_sum(keep, wy * l1m)
        if HAS_SMOOTHING:
            sul = _masked_sum(keep, w[None, :] * l1m)
        tw = _masked_sum(keep, l1m)
        rw = _masked_sum(keep, a)
    return syh, sys_, sy, suh, sus, su, syl, sul, tw, rw


@triton.jit
def _grad_tile(VARIANT: tl.constexpr, x, mask, slope, q, w, cols, Wi, lse, lse_ow, c1, m_w, log_s_w, s_w_mass, s_tot,
               g_w, ay, u, go, alpha, beta, gamma, HAS_SMOOTHING: tl.constexpr, SOFTCAP: tl.constexpr):
    """Pass 3: the gradient of one tile (the module docstring's forms), times go (and the soft cap's
    slope); c1 is ``A_w`` (target-only) or ``A_w - S R_w + S`` (bce), plus z-loss's ``2 z' lse``."""
    p, h, s, l1m, a = _lane_terms(VARIANT, x, lse, alpha, beta, gamma)
    if HAS_SMOOTHING:
        m = (ay * q + u[:, None]) * w[None, :]
    else:
        m = q * w[None, :]
    ms = tl.where(m == 0.0, 0.0, m * s)
    if VARIANT == CE:
        g = p * c1[:, None] - ms                   # s_w = 1: c1 = A_w + m_w = S
    elif VARIANT == BCE:
        r = tl.exp(x - lse_ow[:, None])
        g = p * c1[:, None] - tl.where(s_w_mass[:, None] == 0.0, 0.0, s_w_mass[:, None] * r) - ms \
            + s_tot[:, None] * a
    else:
        big = tl.exp(x + (log_s_w - lse)[:, None])
        g = p * c1[:, None] + tl.where(m_w[:, None] == 0.0, 0.0, m_w[:, None] * big) - ms
    g = tl.where(cols[None, :] == Wi[:, None], g_w[:, None], g) * go[:, None]
    if SOFTCAP:
        g = g * slope
    return tl.where(mask, g, 0.0)


@triton.jit
def _target_tile(Y, y_off, row_ok, cols, n_cols, ta, ka, tb, kb, EVICT: tl.constexpr, TARGETS: tl.constexpr):
    """The tile of the targets q: read from Y (TARGETS = 0), or formed on the fly from class indices,
    ``ka [k == a] (+ kb [k == b])`` (TARGETS = 1, 2): no (N, C) target is read or written."""
    if TARGETS == 0:
        q = _load_q(Y, y_off, row_ok, cols, n_cols, EVICT)
    else:
        q = tl.where(cols[None, :] == ta[:, None], ka[:, None], 0.0)
        if TARGETS == 2:
            q += tl.where(cols[None, :] == tb[:, None], kb[:, None], 0.0)
    return q


@triton.jit
def _soft_loss_rows(
    rb, X, stride_x, Y, stride_y, TA, TB, LAM, W, LOSS, STATS, G, stride_g, GO, DENOM, DENOM_B, n_denom, n_rows,
    n_cols, ignore_index, smooth_own, smooth_class, alpha, beta, gamma, z_loss, softcap, softcap_k, reduction,
    VARIANT: tl.constexpr, TARGETS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_ZLOSS: tl.constexpr, SOFTCAP: tl.constexpr, FROM_STATS: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    GO_PER_ROW: tl.constexpr, SINGLE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    ROW_ALIGN: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Rows of row block ``rb``: the forward (FROM_STATS false: pass 1, the loss and the stats,
    with COMPUTE_GRAD the gradient for grad_output = 1) or the backward (FROM_STATS: the stats
    read back, the gradient for GO). Returns the sum of the rows' losses (0 for the backward).

    TARGETS = 0: probabilities Y (stride_y), 'mean' divides by DENOM[0] = N. TARGETS = 1: a class
    index TA with label smoothing (``m = w ((1 - eps) e_c + eps / C)``, the row's weight w_c only
    in 'mean''s denominator, the prologue's partials DENOM), z-loss ``z w_c lse^2``, ignored rows 0,
    out-of-range targets NaN. TARGETS = 2: mixup's (TA, TB, LAM), each part's mass scaled by
    ``k_a = lam``, ``k_b = 1 - lam`` (divided by its own denominator DENOM / DENOM_B for 'mean', then
    summed: the kernel reduces as 'sum'), an ignored part's k = 0, z-loss ``z (k_a w_a + k_b w_b)``."""
    P2_EVICT: tl.constexpr = "evict_last" if COMPUTE_GRAD else "evict_first"
    cols0 = tl.arange(0, BLOCK_C)
    zero = tl.zeros([BLOCK_N], ACC)
    # ---- the rows and their targets ----------------------------------------------------------
    if TARGETS == 0:
        rows, row_ok = _row_block(rb, n_rows, BLOCK_N)
        keep = row_ok
        bad = rows < 0
        ta = tl.zeros([BLOCK_N], tl.int32)
        tb = ta
        ka = zero
        kb = zero
        u = zero + smooth_class
        red_go = reduction
        go_n = 1
    else:
        rows, row_ok, ta, keep_a, bad, w_a = _rows_setup(rb, TA, W, n_rows, n_cols, ignore_index, BLOCK_N,
                                                         HAS_WEIGHT, ACC)
        if TARGETS == 1:
            tb = ta
            ka = tl.where(keep_a, 1.0, 0.0)
            kb = zero
            keep = keep_a
            zc = ka * w_a
            red_go = reduction
            go_n = n_denom
        else:
            _rb, _okb, tb, keep_b, bad_b, w_b = _rows_setup(rb, TB, W, n_rows, n_cols, ignore_index, BLOCK_N, HAS_WEIGHT,
                                                       ACC)
            lam = tl.load(LAM + rows, mask=row_ok, other=0.0).to(ACC)
            ka = lam
            kb = 1.0 - lam
            if reduction == RED_MEAN:
                ka = ka / _mean_denominator(DENOM, n_denom)
                kb = kb / _mean_denominator(DENOM_B, n_denom)
            ka = tl.where(keep_a, ka, 0.0)
            kb = tl.where(keep_b, kb, 0.0)
            bad = bad | bad_b
            keep = keep_a | keep_b
            zc = ka * w_a + kb * w_b
            red_go = RED_SUM                              # 'mean' is folded into ka, kb
            go_n = n_denom
        u = smooth_class * (ka + kb)
    n_cols = (n_cols // ROW_ALIGN) * ROW_ALIGN
    x_off = tl.multiple_of(rows.to(tl.int64) * stride_x, ROW_ALIGN)
    y_off = tl.multiple_of(rows.to(tl.int64) * stride_y, ROW_ALIGN)
    ay = smooth_own

    # ---- pass 1 (or the stats): lse, w, x_w, lse_{k != w} ----------------------------------
    if FROM_STATS:
        st = STATS + rows.to(tl.int64) * 4
        lse = tl.load(st, mask=row_ok, other=0.0).to(ACC)
        log1m_w = tl.load(st + 2, mask=row_ok, other=0.0).to(ACC)
        Wi = tl.minimum(tl.maximum(tl.load(st + 3, mask=row_ok, other=0.0).to(tl.int32), 0), n_cols - 1)
        x_w = _capped(tl.load(X + x_off + Wi, mask=row_ok, other=0.0).to(ACC), softcap, softcap_k, SOFTCAP)
        lse_ow = lse + log1m_w
        if SINGLE:
            x, mask, slope = _load_tile(X, x_off, row_ok, cols0, n_cols, softcap, softcap_k, ACC, "evict_first",
                                        SOFTCAP)
        else:
            x, mask, slope = _no_tile(BLOCK_N, BLOCK_C)
    else:
        x_w, Wi, lse_ow, lse, _swx, _wt, x, mask, slope = _bce_stats_pass(
            X, x_off, row_ok, n_cols, W, softcap, softcap_k, HAS_WEIGHT, False, SOFTCAP, SINGLE, BLOCK_N, BLOCK_C,
            NUM_STAGES)
        log1m_w = tl.where(lse_ow == NEG_INF, NEG_INF, lse_ow - lse)
    if TARGETS == 0:
        y_w = tl.load(Y + y_off + Wi, mask=row_ok, other=0.0).to(ACC)
    else:
        y_w = tl.where(Wi == ta, ka, 0.0)
        if TARGETS == 2:
            y_w += tl.where(Wi == tb, kb, 0.0)
    if HAS_WEIGHT:
        w_w = tl.load(W + Wi, mask=row_ok, other=0.0).to(ACC)
    else:
        w_w = zero + 1.0

    # ---- pass 2: the sums over k != w ------------------------------------------------------
    syh, sys_, sy, suh, sus, su, syl, sul, tw, rw = zero, zero, zero, zero, zero, zero, zero, zero, zero, zero
    if SINGLE:
        q = _target_tile(Y, y_off, row_ok, cols0, n_cols, ta, ka, tb, kb, "evict_first", TARGETS)
        w = _load_w(W, cols0, n_cols, HAS_WEIGHT)
        syh, sys_, sy, suh, sus, su, syl, sul, tw, rw = _tile_sums(VARIANT, x, mask, q, w, cols0, Wi, lse, alpha,
                                                                   beta, gamma, HAS_SMOOTHING)
    else:
        nb = tl.cdiv(n_cols, BLOCK_C)
        for i in tl.range(0, nb, num_stages=NUM_STAGES):
            cols = (nb - 1 - i) * BLOCK_C + cols0          # reverse: pass 1's last blocks are L2-warm
            xb, maskb, slb2 = _load_tile(X, x_off, row_ok, cols, n_cols, softcap, softcap_k, ACC, P2_EVICT, SOFTCAP)
            qb = _target_tile(Y, y_off, row_ok, cols, n_cols, ta, ka, tb, kb, P2_EVICT, TARGETS)
            wb = _load_w(W, cols, n_cols, HAS_WEIGHT)
            a0, a1, a2, a3, a4, a5, a6, a7, a8, a9 = _tile_sums(VARIANT, xb, maskb, qb, wb, cols, Wi, lse, alpha,
                                                                beta, gamma, HAS_SMOOTHING)
            syh += a0
            sys_ += a1
            sy += a2
            suh += a3
            sus += a4
            su += a5
            syl += a6
            sul += a7
            tw += a8
            rw += a9

    # ---- the row: w's own terms, the mass sums, the loss ------------------------------------
    d_w = lse_ow - x_w
    if VARIANT == BCE:
        h_w, log_s_w, log_gc_w, _lq = _variant_math(CE, d_w, alpha, beta, gamma)    # w's -log p_w
    else:
        h_w, log_s_w, log_gc_w, _lq = _variant_math(VARIANT, d_w, alpha, beta, gamma)
    p_w = tl.exp(-_softplus(d_w))
    if HAS_SMOOTHING:
        if not HAS_WEIGHT:
            su = zero + (n_cols - 1)                      # sum_{k != w} 1, exact
        m_w = (ay * y_w + u) * w_w
        s_wm = ay * sy + u * su
        a_w = ay * sys_ + u * sus
        lsum = ay * syh + u * suh
    else:
        m_w = y_w * w_w
        s_wm = sy
        a_w = sys_
        lsum = syh
    s_tot = s_wm + m_w
    lrow = lsum + tl.where(m_w == 0.0, 0.0, m_w * h_w)
    if VARIANT == BCE:
        if HAS_SMOOTHING:
            lsum_l = ay * syl + u * sul
        else:
            lsum_l = syl
        lrow = lrow + lsum_l - s_tot * tw - tl.where(s_wm == 0.0, 0.0, s_wm * log1m_w)
        c1 = a_w - s_tot * rw + s_tot
        g_w = p_w * (a_w - s_tot * rw) + s_wm - s_tot * tl.exp(log1m_w)
    elif VARIANT == CE:
        c1 = a_w + m_w
        g_w = p_w * a_w - tl.where(m_w == 0.0, 0.0, m_w * tl.exp(log_gc_w))
    else:
        c1 = a_w
        g_w = p_w * a_w - tl.where(m_w == 0.0, 0.0, m_w * tl.exp(log_gc_w))
    if HAS_ZLOSS:
        if TARGETS != 0:
            zl = 2.0 * z_loss * zc * lse
            lrow = lrow + z_loss * zc * lse * lse
            c1 = c1 + zl
            g_w = g_w + zl * p_w
    part = tl.sum(zero, 0)
    if not FROM_STATS:
        lrow = tl.where(bad, float("nan"), tl.where(keep, lrow, 0.0))
        if TARGETS == 0:
            col1 = s_tot
        else:   # lse_ex of target a, as the one-target kernels and the reference store it
            x_a = _capped(tl.load(X + x_off + ta, mask=row_ok, other=0.0).to(ACC), softcap, softcap_k, SOFTCAP)
            col1 = tl.where(ta == Wi, lse_ow, lse + _log1p(-tl.exp(x_a - lse)))
        _store_stats(STATS, rows, row_ok, lse, col1, log1m_w, Wi.to(ACC))
        if reduction == RED_NONE:
            tl.store(LOSS + rows, lrow, mask=row_ok)
        part = tl.sum(tl.where(row_ok, lrow, 0.0), 0)

    # ---- pass 3: the gradient ----------------------------------------------------------------
    if COMPUTE_GRAD:
        ones = zero + 1.0
        if FROM_STATS:
            _r, go = _grad_row_scale(keep, bad, ones, GO, rows, row_ok, DENOM, go_n, red_go, GO_PER_ROW)
        else:
            _r, go = _grad_row_scale(keep, bad, ones, None, rows, row_ok, DENOM, go_n, red_go, False)
        g_off = tl.multiple_of(rows.to(tl.int64) * stride_g, ROW_ALIGN)
        if SINGLE:
            g = _grad_tile(VARIANT, x, mask & keep[:, None], slope, q, w, cols0, Wi, lse, lse_ow, c1, m_w, log_s_w, s_wm, s_tot, g_w,
                           ay, u, go, alpha, beta, gamma, HAS_SMOOTHING, SOFTCAP)
            tl.store(G + g_off[:, None] + cols0[None, :], g.to(G.dtype.element_ty), mask=mask,
                     eviction_policy="evict_first")
        else:
            for start in tl.range(0, n_cols, BLOCK_C, num_stages=NUM_STAGES):
                cols = start + cols0                         # forward: pass 2 ended on the first blocks
                xb, maskb, slb = _load_tile(X, x_off, row_ok, cols, n_cols, softcap, softcap_k, ACC, "evict_first",
                                            SOFTCAP)
                qb = _target_tile(Y, y_off, row_ok, cols, n_cols, ta, ka, tb, kb, "evict_first", TARGETS)
                wb = _load_w(W, cols, n_cols, HAS_WEIGHT)
                g = _grad_tile(VARIANT, xb, maskb & keep[:, None], slb, qb, wb, cols, Wi, lse, lse_ow, c1, m_w, log_s_w, s_wm, s_tot,
                               g_w, ay, u, go, alpha, beta, gamma, HAS_SMOOTHING, SOFTCAP)
                tl.store(G + g_off[:, None] + cols[None, :], g.to(G.dtype.element_ty), mask=maskb,
                         eviction_policy="evict_first")
    return part


@triton.jit
def soft_loss_fwd_kernel(
    X, stride_x, Y, stride_y, W, LOSS, STATS, G, stride_g, DENOM, PARTIAL, COUNTER,
    n_rows, n_cols, smooth_own, smooth_class, alpha, beta, gamma, reduction,
    VARIANT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    SINGLE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, PARTIAL_BLOCK: tl.constexpr,
    ROW_ALIGN: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Forward of the expected loss of probability rows Y for BLOCK_N rows (SINGLE: one program per
    row block, the rows in registers) or, streamed, a persistent program looping over row blocks;
    with COMPUTE_GRAD the gradient for grad_output = 1 into G. smooth_own = 1 - eps,
    smooth_class = eps / C. 'mean' divides by DENOM[0] = N (probs/kernels.soft_prologue_kernel)."""
    acc = tl.sum(tl.zeros([BLOCK_N], ACC), 0)
    if SINGLE:
        acc += _soft_loss_rows(tl.program_id(0), X, stride_x, Y, stride_y, None, None, None, W, LOSS, STATS, G,
                               stride_g, None, DENOM, None, 1, n_rows, n_cols, 0, smooth_own, smooth_class, alpha,
                               beta, gamma, 0.0, 0.0, 0.0, reduction, VARIANT, 0, HAS_WEIGHT, HAS_SMOOTHING, False,
                               False, False, COMPUTE_GRAD, False, SINGLE, BLOCK_N, BLOCK_C, ROW_ALIGN, NUM_STAGES)
    else:
        for rb in range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_N), tl.num_programs(0)):
            acc += _soft_loss_rows(rb, X, stride_x, Y, stride_y, None, None, None, W, LOSS, STATS, G, stride_g, None,
                                   DENOM, None, 1, n_rows, n_cols, 0, smooth_own, smooth_class, alpha, beta, gamma,
                                   0.0, 0.0, 0.0, reduction, VARIANT, 0, HAS_WEIGHT, HAS_SMOOTHING, False, False,
                                   False, COMPUTE_GRAD, False, SINGLE, BLOCK_N, BLOCK_C, ROW_ALIGN, NUM_STAGES)
    _finish_reduction(acc, LOSS, PARTIAL, COUNTER, DENOM, 1, reduction, PARTIAL_BLOCK)


@triton.jit
def soft_loss_bwd_kernel(
    GO, X, stride_x, Y, stride_y, W, STATS, G, stride_g, DENOM, n_rows, n_cols, smooth_own, smooth_class,
    alpha, beta, gamma, reduction, VARIANT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    GO_PER_ROW: tl.constexpr, SINGLE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
):
    """Backward from the saved stats (lse, S, log(1 - p_w), w): passes 2 and 3 of one row block.
    grad_output per row ('none') or a scalar; 'mean' divides by DENOM[0] = N."""
    _soft_loss_rows(tl.program_id(0), X, stride_x, Y, stride_y, None, None, None, W, None, STATS, G, stride_g, GO,
                    DENOM, None, 1, n_rows, n_cols, 0, smooth_own, smooth_class, alpha, beta, gamma, 0.0, 0.0, 0.0,
                    reduction, VARIANT, 0, HAS_WEIGHT, HAS_SMOOTHING, False, False, True, True, GO_PER_ROW, SINGLE,
                    BLOCK_N, BLOCK_C, ROW_ALIGN, 1)


@triton.jit
def index_loss_fwd_kernel(
    X, stride_x, TA, TB, LAM, W, LOSS, STATS, G, stride_g, DENOM, DENOM_B, PARTIAL, COUNTER,
    n_rows, n_cols, ignore_index, smooth_own, smooth_class, alpha, beta, gamma, z_loss, softcap, softcap_k,
    reduction, n_denom, VARIANT: tl.constexpr, TARGETS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr, SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    SINGLE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, PARTIAL_BLOCK: tl.constexpr,
    ROW_ALIGN: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """The expected loss of class indices (TARGETS = 1: TA; 2: mixup's TA, TB, LAM) with label
    smoothing, the (two-)hot target formed on the fly (:func:`_soft_loss_rows`): the one- and
    two-target launchers route ``label_smoothing > 0`` with ``loss != 'ce'`` here. 'mean' divides by
    the prologue's partial denominators (one target), or is folded into each part's scale (two)."""
    acc = tl.sum(tl.zeros([BLOCK_N], ACC), 0)
    if SINGLE:
        acc += _soft_loss_rows(tl.program_id(0), X, stride_x, None, 0, TA, TB, LAM, W, LOSS, STATS, G, stride_g,
                               None, DENOM, DENOM_B, n_denom, n_rows, n_cols, ignore_index, smooth_own, smooth_class,
                               alpha, beta, gamma, z_loss, softcap, softcap_k, reduction, VARIANT, TARGETS,
                               HAS_WEIGHT, HAS_SMOOTHING, HAS_ZLOSS, SOFTCAP, False, COMPUTE_GRAD, False, SINGLE,
                               BLOCK_N, BLOCK_C, ROW_ALIGN, NUM_STAGES)
    else:
        for rb in range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_N), tl.num_programs(0)):
            acc += _soft_loss_rows(rb, X, stride_x, None, 0, TA, TB, LAM, W, LOSS, STATS, G, stride_g, None, DENOM,
                                   DENOM_B, n_denom, n_rows, n_cols, ignore_index, smooth_own, smooth_class, alpha,
                                   beta, gamma, z_loss, softcap, softcap_k, reduction, VARIANT, TARGETS, HAS_WEIGHT,
                                   HAS_SMOOTHING, HAS_ZLOSS, SOFTCAP, False, COMPUTE_GRAD, False, SINGLE, BLOCK_N,
                                   BLOCK_C, ROW_ALIGN, NUM_STAGES)
    if TARGETS == 2:
        # 'mean' is folded into each part's scale: the partial sums are added as for 'sum'
        _finish_reduction(acc, LOSS, PARTIAL, COUNTER, DENOM, n_denom, tl.where(reduction == RED_MEAN, RED_SUM,
                                                                                 reduction), PARTIAL_BLOCK)
    else:
        _finish_reduction(acc, LOSS, PARTIAL, COUNTER, DENOM, n_denom, reduction, PARTIAL_BLOCK)


@triton.jit
def index_loss_bwd_kernel(
    GO, X, stride_x, TA, TB, LAM, W, STATS, G, stride_g, DENOM, DENOM_B, n_rows, n_cols, ignore_index, smooth_own,
    smooth_class, alpha, beta, gamma, z_loss, softcap, softcap_k, reduction, n_denom, VARIANT: tl.constexpr,
    TARGETS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr,
    SOFTCAP: tl.constexpr, GO_PER_ROW: tl.constexpr, SINGLE: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    """Backward of :func:`index_loss_fwd_kernel` from its stats (lse, lse_ex(a), log(1 - p_w), w)."""
    _soft_loss_rows(tl.program_id(0), X, stride_x, None, 0, TA, TB, LAM, W, None, STATS, G, stride_g, GO, DENOM,
                    DENOM_B, n_denom, n_rows, n_cols, ignore_index, smooth_own, smooth_class, alpha, beta, gamma,
                    z_loss, softcap, softcap_k, reduction, VARIANT, TARGETS, HAS_WEIGHT, HAS_SMOOTHING, HAS_ZLOSS,
                    SOFTCAP, True, True, GO_PER_ROW, SINGLE, BLOCK_N, BLOCK_C, ROW_ALIGN, 1)
