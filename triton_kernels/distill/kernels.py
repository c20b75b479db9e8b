"""Triton kernels of knowledge distillation (``fusedloss::triton_distill``; the op contract is
``fusedloss.distill.ops``'s docstring, the PyTorch twin ``distill_rows``).

Per row, with ``z = student / T`` and ``y = teacher / T`` (float32 math), ``Q = softmax(z)``,
``P = softmax(y)``:

    kl:          D = T^2 KL(P || Q),  dD/ds = T (Q - P)
    reverse_kl:  D = T^2 KL(Q || P),  dD/ds = T Q (r - sum_k Q_k r_k),  r = log Q - log P
    jsd:         D = T^2 (b KL(P || M) + (1 - b) KL(Q || M)),  M = b P + (1 - b) Q,
                 dD/ds = T (1 - b) Q (u - sum_k Q_k u_k),  u = log Q - log M

**Statistics, in log space.** Pass 1 keeps, for each of the two rows, the running max ``m``,
its first arg-max ``w`` and ``s_ex = sum_{k != w} exp(x_k - m)`` (:func:`_max_ex_update`: the
block's arg-max lane is left out of the block's sum and the old max joins it when it is
overtaken), so ``L = lse - m = log1p(s_ex)`` and ``1 - softmax_w = s_ex / (1 + s_ex)`` are
exact when one class leads by 30 or 1000 (``log(s)`` of ``s = 1 + 1e-13`` would read 0).
Every log-probability is ``log Q_k = (z_k - m_q) - L_q``, never ``log(exp(.))``.

**The divergence online (kl, reverse kl).** With ``v_k = (y_k - m_p) - (z_k - m_q)`` (each
logit relative to its own row's running max), ``log P_k - log Q_k = v_k - L_p + L_q``, so

    KL(P || Q) = A / (1 + s_ex_p) - L_p + L_q,   A = sum_k exp(y_k - m_p) v_k
    KL(Q || P) = B / (1 + s_ex_q) - L_q + L_p,   B = sum_k exp(z_k - m_q) (-v_k)

and ``A`` (``B``) is summed in pass 1 beside the statistics, rescaled when a max grows as the
soft-target kernels' loss sum is (every earlier ``v_k`` moves by ``dm_q - dm_p``; the sum by
that times the earlier weights' sum). When one class dominates both rows ``v_w = 0`` exactly,
and the small terms keep their relative accuracy (no ``lse_q - lse_p`` of two large numbers).
0 log 0 terms (a weight 0, also at a -inf logit) are 0.

**The gradient** (``row_scale_i`` times it, added to ``grad`` with ACCUMULATE, else written;
a row with ``row_scale`` 0 is left as it was / written 0; float32, rounded once at the store):

* kl: ``T (Q_j - P_j)``; where both rows have their arg-max at ``j`` it is
  ``T (s_ex_p / (1 + s_ex_p) - s_ex_q / (1 + s_ex_q))`` (``(1 - P_j) - (1 - Q_j)``: no
  difference of two numbers near 1).
* reverse kl: ``r_j - sum_k Q_k r_k = -(v_j + B / (1 + s_ex_q))``; at the student's arg-max
  ``w`` that difference cancels (``Q_w`` near 1), so it is ``sum_{k != w} Q_k (v_k - v_w)``,
  summed during the gradient pass, whose store skips lane ``w``; lane ``w`` is written after
  the pass (one scalar per row).
* jsd: a middle pass sums ``KL(P || M)``, ``KL(Q || M)`` (= ``sum_k Q_k u_k``) and the same sum
  over ``k != w``; then ``u_j - sum Q u`` and, at ``w``, ``(1 - Q_w) u_w - sum_{k != w} Q_k u_k``.
  ``log P - log M = -log(b + (1 - b) e^-rho)`` and ``log Q - log M = -log((1 - b) + b e^rho)``
  with ``rho = log P - log Q``, each ``max(+-rho, 0) + log1p(k expm1(-|rho|))`` (:func:`_jsd_logs`: one exp,
  exact near ``rho = 0``, where ``log M`` itself would round ``log b`` away).

**Traffic.** On chip (``SINGLE``, rows up to bce's family limit, 2048 classes) both rows are
read once and kept in registers, the gradient written once (read too with ACCUMULATE).
Streamed, a persistent grid loops over rows: pass 1 reads both rows (L2 priority evict_last),
jsd's middle pass re-reads them in reverse block order, the gradient pass re-reads them (kl and
reverse kl: in reverse order, the L2-warm blocks first; jsd: forward, where the middle pass
ended) and writes the gradient. Without ``grad``, kl and reverse kl read each row once, jsd twice.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..rows import ACC, NEG_INF, _load_tile, _log1p, _safe_shift

# Divergence ids: the op ABI (fusedloss.distill.ops.DIVERGENCES; checked by the tests).
KL: tl.constexpr = tl.constexpr(0)
REVERSE_KL: tl.constexpr = tl.constexpr(1)
JSD: tl.constexpr = tl.constexpr(2)


@triton.jit
def _max_ex_update(m, w, s_ex, x, start, BLOCK_C: tl.constexpr):
    """Merge a tile into a row's (running max m, its first arg-max w, s_ex = sum over k != w of
    exp(x_k - m)). Returns the new (m, w, s_ex), the tile's exp(x - m') (0 on -inf lanes, with
    m' the new max, 0 while every lane so far is -inf) and the factor exp(m - m') that rescales
    sums taken against the old max (0 when that max was -inf)."""
    lanes = tl.arange(0, BLOCK_C)
    bm, bi = tl.max(x, 1, return_indices=True, return_indices_tie_break_left=True)
    new = bm > m                               # strictly: an earlier column keeps w on ties
    m_new = tl.where(new, bm, m)
    sh = _safe_shift(m_new)
    alpha = tl.exp(m - sh)
    e = tl.exp(x - sh[:, None])
    is_w = new[:, None] & (lanes[None, :] == bi[:, None])
    # the old max joins the others (weight alpha) when the block's max overtakes it
    s_ex = s_ex * alpha + tl.where(new, alpha, 0.0) + tl.sum(tl.where(is_w, 0.0, e), 1)
    w = tl.where(new, (bi + start).to(tl.int32), w)
    return m_new, w, s_ex, e, alpha


@triton.jit
def _weighted_sum(e, v):
    """sum_k e_k v_k over a tile, 0 log 0 = 0: a lane of weight 0 adds nothing (also where v is
    +-inf or NaN: a -inf logit, a masked lane)."""
    return tl.sum(tl.where(e == 0.0, 0.0, e * v), 1)


@triton.jit
def _pass1_update(mp, wp, sp, mq, wq, sq, acc, y, z, start, DIV: tl.constexpr, BLOCK_C: tl.constexpr):
    """One tile of pass 1: both rows' statistics and, for kl (reverse kl), the sum A (B)."""
    shp_old = _safe_shift(mp)
    shq_old = _safe_shift(mq)
    # weights' sums against the old maxima (1 for the arg-max itself while it is finite)
    fp_old = tl.where(mp == NEG_INF, 0.0, 1.0) + sp
    fq_old = tl.where(mq == NEG_INF, 0.0, 1.0) + sq
    mp, wp, sp, ep, ap = _max_ex_update(mp, wp, sp, y, start, BLOCK_C)
    mq, wq, sq, eq, aq = _max_ex_update(mq, wq, sq, z, start, BLOCK_C)
    if DIV != JSD:
        shp = _safe_shift(mp)
        shq = _safe_shift(mq)
        v = (y - shp[:, None]) - (z - shq[:, None])
        # every earlier v_k moved by (shq - shq_old) - (shp - shp_old)
        dv = (shq - shq_old) - (shp - shp_old)
        if DIV == KL:
            acc = ap * tl.where(fp_old == 0.0, acc, acc + dv * fp_old) + _weighted_sum(ep, v)
        else:
            acc = aq * tl.where(fq_old == 0.0, acc, acc - dv * fq_old) + _weighted_sum(eq, -v)
    return mp, wp, sp, mq, wq, sq, acc


@triton.jit
def _load_rows(S, s_off, Tt, t_off, row_ok, cols, n_cols, t_inv, EVICT: tl.constexpr):
    """One tile of both rows at temperature T (z = student / T, y = teacher / T; masked lanes -inf)."""
    z, mask, _ = _load_tile(S, s_off, row_ok, cols, n_cols, 0.0, 0.0, ACC, EVICT, False)
    y, _, _ = _load_tile(Tt, t_off, row_ok, cols, n_cols, 0.0, 0.0, ACC, EVICT, False)
    return y * t_inv, z * t_inv, mask


@triton.jit
def _expm1_neg(t):
    """exp(t) - 1 for t <= 0 (-inf included: -1): for t > -1 the rounding of u = exp(t) corrected
    (Kahan: (u - 1) t / log u), below it u - 1 itself (no cancellation; and u may be a subnormal
    there, whose log is not t)."""
    u = tl.exp(t)
    near = t > -1.0
    return tl.where(u == 1.0, t, tl.where(near, (u - 1.0) * (t / tl.log(tl.where(near, u, 0.5))), u - 1.0))


@triton.jit
def _probs(y, z, shp, lp, shq, lq):
    """P and Q of a tile, exp((x - m) - L): no lse of a large m rounded before the subtraction."""
    p = tl.exp((y - shp[:, None]) - lp[:, None])
    q = tl.exp((z - shq[:, None]) - lq[:, None])
    return p, q


@triton.jit
def _jsd_logs(rho, beta, omb, WITH_HP: tl.constexpr):
    """u = log Q - log M and (WITH_HP) log P - log M from rho = log P - log Q. With
    E = expm1(-|rho|) (one exp, shared):
        u = -log((1 - b) + b e^rho)  = -(max(rho, 0) + log1p(k_u E)),  k_u = b (rho <= 0), 1 - b (rho > 0)
        log P - log M = -log(b + (1 - b) e^-rho) = -(max(-rho, 0) + log1p(k_p E)),  k_p = 1 - b (rho >= 0), b
    exact near rho = 0 (where log M would round log b away) and finite at rho = +-inf."""
    e = _expm1_neg(-tl.abs(rho))
    pos = rho > 0.0
    u = -(tl.maximum(rho, 0.0) + _log1p(tl.where(pos, omb, beta) * e))
    if WITH_HP:
        hp = -(tl.maximum(-rho, 0.0) + _log1p(tl.where(pos | (rho == 0.0), omb, beta) * e))
    else:
        hp = u
    return hp, u


@triton.jit
def _jsd_terms(y, z, shp, lp, shq, lq, beta, omb, WITH_HP: tl.constexpr):
    """P, Q, log P - log M (WITH_HP) and u = log Q - log M of a tile (:func:`_jsd_logs`)."""
    p, q = _probs(y, z, shp, lp, shq, lq)
    rho = ((y - shp[:, None]) - (z - shq[:, None])) - (lp - lq)[:, None]
    hp, u = _jsd_logs(rho, beta, omb, WITH_HP)
    return p, q, hp, u


@triton.jit
def _jsd_update(kpm, kqm, uex, y, z, cols, shp, lp, shq, lq, wq, beta, omb):
    """A tile of jsd's middle pass: KL(P || M), KL(Q || M) = sum Q u, and sum_{k != w} Q_k u_k."""
    p, q, hp, u = _jsd_terms(y, z, shp, lp, shq, lq, beta, omb, True)
    kpm += _weighted_sum(p, hp)
    kqm += _weighted_sum(q, u)
    qx = tl.where(cols[None, :] == wq[:, None], 0.0, q)
    uex += _weighted_sum(qx, u)
    return kpm, kqm, uex


@triton.jit
def _grad_tile(y, z, cols, shp, lp, shq, lq, wp, wq, c0, c1, c2, temperature, coef, beta, omb,
               DIV: tl.constexpr):
    """dD/ds of a tile (float32), without row_scale; reverse kl: also this tile's part of
    sum_{k != w} Q_k (v_k - v_w) (c1 = v_w; 0 for the other divergences).
    kl: c0 = the arg-max lane's value when both rows' arg-max is w (else unused);
    reverse kl: c0 = B / (1 + s_ex_q); jsd: c0 = sum Q u, c2 = the lane w's value."""
    is_w = cols[None, :] == wq[:, None]
    part = tl.zeros_like(shp)
    if DIV == KL:
        p, q = _probs(y, z, shp, lp, shq, lq)
        g = temperature * (q - p)
        g = tl.where(is_w & (wq == wp)[:, None], c0[:, None], g)
    elif DIV == REVERSE_KL:
        p, q = _probs(y, z, shp, lp, shq, lq)
        v = (y - shp[:, None]) - (z - shq[:, None])
        g = -temperature * tl.where(q == 0.0, 0.0, q * (v + c0[:, None]))
        part = _weighted_sum(tl.where(is_w, 0.0, q), v - c1[:, None])
    else:
        p, q, hp, u = _jsd_terms(y, z, shp, lp, shq, lq, beta, omb, False)
        g = coef * tl.where(q == 0.0, 0.0, q * (u - c0[:, None]))
        g = tl.where(is_w, c2[:, None], g)
    return g, part


@triton.jit
def _store_grad_tile(G, g_off, cols, g, mask, rs, ACCUMULATE: tl.constexpr):
    """row_scale times a gradient tile into G (added to G's values with ACCUMULATE); rows with
    row_scale 0 keep their values (ACCUMULATE) or get 0, whatever the tile holds."""
    ptr = G + g_off[:, None] + cols[None, :]
    keep0 = (rs == 0.0)[:, None]
    if ACCUMULATE:
        old = tl.load(ptr, mask=mask, other=0.0).to(ACC)
        out = tl.where(keep0, old, old + rs[:, None] * g)
    else:
        out = tl.where(keep0, 0.0, rs[:, None] * g)
    tl.store(ptr, out.to(G.dtype.element_ty), mask=mask, eviction_policy="evict_first")


@triton.jit
def _distill_rows(
    rb, S, stride_x, Tt, stride_y, RS, D, G, stride_g, n_rows, n_cols, t_inv, temperature, t2, beta, omb, coef,
    DIV: tl.constexpr, COMPUTE_GRAD: tl.constexpr, ACCUMULATE: tl.constexpr, SINGLE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ROW_ALIGN: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """The rows of row block ``rb``: D into D, and with COMPUTE_GRAD the gradient into G."""
    MORE: tl.constexpr = COMPUTE_GRAD or DIV == JSD
    P1_EVICT: tl.constexpr = "evict_last" if MORE else "evict_first"
    # (zeros + rb) works for a tensor rb (compiled) and a Python int (the interpreter)
    rows = (tl.zeros([BLOCK_N], tl.int32) + rb) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    n_cols = (n_cols // ROW_ALIGN) * ROW_ALIGN
    s_off = tl.multiple_of(rows.to(tl.int64) * stride_x, ROW_ALIGN)
    t_off = tl.multiple_of(rows.to(tl.int64) * stride_y, ROW_ALIGN)
    cols0 = tl.arange(0, BLOCK_C)
    zero = tl.zeros([BLOCK_N], ACC)
    izero = tl.zeros([BLOCK_N], tl.int32)
    mp, wp, sp = zero + NEG_INF, izero, zero
    mq, wq, sq = zero + NEG_INF, izero, zero
    acc = zero

    # ---- pass 1: both rows' statistics (and kl's / reverse kl's sum) ------------------------
    if SINGLE:
        y, z, mask = _load_rows(S, s_off, Tt, t_off, row_ok, cols0, n_cols, t_inv, "evict_first")
        mp, wp, sp, mq, wq, sq, acc = _pass1_update(mp, wp, sp, mq, wq, sq, acc, y, z, 0, DIV, BLOCK_C)
    else:
        for start in tl.range(0, n_cols, BLOCK_C, num_stages=NUM_STAGES):
            yb, zb, _ = _load_rows(S, s_off, Tt, t_off, row_ok, start + cols0, n_cols, t_inv, P1_EVICT)
            mp, wp, sp, mq, wq, sq, acc = _pass1_update(mp, wp, sp, mq, wq, sq, acc, yb, zb, start, DIV, BLOCK_C)
    shp = _safe_shift(mp)
    shq = _safe_shift(mq)
    lp = _log1p(sp)
    lq = _log1p(sq)
    nb = tl.cdiv(n_cols, BLOCK_C)

    # ---- the divergence (jsd: the middle pass) -----------------------------------------------
    uex = zero
    kqm = zero
    if DIV == KL:
        d = acc / (1.0 + sp) - lp + lq
    elif DIV == REVERSE_KL:
        d = acc / (1.0 + sq) - lq + lp
    else:
        kpm = zero
        if SINGLE:
            kpm, kqm, uex = _jsd_update(kpm, kqm, uex, y, z, cols0, shp, lp, shq, lq, wq, beta, omb)
        else:
            for i in tl.range(0, nb, num_stages=NUM_STAGES):
                cols = (nb - 1 - i) * BLOCK_C + cols0       # reverse: L2-warm blocks first
                yb, zb, _ = _load_rows(S, s_off, Tt, t_off, row_ok, cols, n_cols, t_inv,
                                       "evict_last" if COMPUTE_GRAD else "evict_first")
                kpm, kqm, uex = _jsd_update(kpm, kqm, uex, yb, zb, cols, shp, lp, shq, lq, wq, beta, omb)
        d = beta * kpm + omb * kqm
    tl.store(D + rows, t2 * d, mask=row_ok)

    # ---- the gradient ----------------------------------------------------------------------------
    if COMPUTE_GRAD:
        rs = tl.load(RS + rows, mask=row_ok, other=0.0).to(ACC)
        g_off = tl.multiple_of(rows.to(tl.int64) * stride_g, ROW_ALIGN)
        c1 = zero
        c2 = zero
        if DIV == KL:
            c0 = temperature * (sp / (1.0 + sp) - sq / (1.0 + sq))
        elif DIV == REVERSE_KL:
            c0 = acc / (1.0 + sq)
            # v at the student's arg-max: (y_w - m_p) - 0
            y_w = tl.load(Tt + t_off + wq, mask=row_ok, other=0.0).to(ACC) * t_inv
            c1 = y_w - shp
        else:
            c0 = kqm
            # lane w: (1 - Q_w) u_w - sum_{k != w} Q_k u_k, times T (1 - b) Q_w
            q_w = 1.0 / (1.0 + sq)
            y_w = tl.load(Tt + t_off + wq, mask=row_ok, other=0.0).to(ACC) * t_inv
            _, u_w = _jsd_logs(((y_w - shp) - lp) + lq, beta, omb, False)
            c2 = coef * q_w * ((sq / (1.0 + sq)) * u_w - uex)
        fix = zero
        if SINGLE:
            g, part = _grad_tile(y, z, cols0, shp, lp, shq, lq, wp, wq, c0, c1, c2, temperature, coef, beta, omb,
                                 DIV)
            fix += part
            smask = mask
            if DIV == REVERSE_KL:
                smask = mask & (cols0[None, :] != wq[:, None])
            _store_grad_tile(G, g_off, cols0, g, smask, rs, ACCUMULATE)
        else:
            for i in tl.range(0, nb, num_stages=NUM_STAGES):
                if DIV == JSD:
                    cols = i * BLOCK_C + cols0                  # forward: where the middle pass ended
                else:
                    cols = (nb - 1 - i) * BLOCK_C + cols0       # reverse: L2-warm blocks first
                yb, zb, maskb = _load_rows(S, s_off, Tt, t_off, row_ok, cols, n_cols, t_inv, "evict_first")
                g, part = _grad_tile(yb, zb, cols, shp, lp, shq, lq, wp, wq, c0, c1, c2, temperature, coef, beta,
                                     omb, DIV)
                fix += part
                if DIV == REVERSE_KL:
                    maskb = maskb & (cols[None, :] != wq[:, None])
                _store_grad_tile(G, g_off, cols, g, maskb, rs, ACCUMULATE)
        if DIV == REVERSE_KL:
            # lane w: T Q_w sum_{k != w} Q_k (v_k - v_w), stored after the pass skipped it
            g_w = temperature * fix / (1.0 + sq)
            ptr = G + g_off + wq
            if ACCUMULATE:
                old = tl.load(ptr, mask=row_ok, other=0.0).to(ACC)
                out = tl.where(rs == 0.0, old, old + rs * g_w)
            else:
                out = tl.where(rs == 0.0, 0.0, rs * g_w)
            tl.store(ptr, out.to(G.dtype.element_ty), mask=row_ok)


@triton.jit
def distill_kernel(
    S, stride_x, Tt, stride_y, RS, D, G, stride_g, n_rows, n_cols, t_inv, temperature, t2, beta, omb, coef,
    DIV: tl.constexpr, COMPUTE_GRAD: tl.constexpr, ACCUMULATE: tl.constexpr, SINGLE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ROW_ALIGN: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """The distillation op for BLOCK_N rows (SINGLE: one program per row block, both rows in
    registers) or, streamed, a persistent program looping over rows. Scalars from the host (never
    derived here: they would stay in registers across the loop): t_inv = 1 / T, temperature,
    t2 = T^2, beta, omb = 1 - beta, coef = T (1 - beta)."""
    if SINGLE:
        _distill_rows(tl.program_id(0), S, stride_x, Tt, stride_y, RS, D, G, stride_g, n_rows, n_cols, t_inv,
                      temperature, t2, beta, omb, coef, DIV, COMPUTE_GRAD, ACCUMULATE, SINGLE,
                      BLOCK_N, BLOCK_C, ROW_ALIGN, NUM_STAGES)
    else:
        for rb in range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_N), tl.num_programs(0)):
            _distill_rows(rb, S, stride_x, Tt, stride_y, RS, D, G, stride_g, n_rows, n_cols, t_inv, temperature,
                          t2, beta, omb, coef, DIV, COMPUTE_GRAD, ACCUMULATE, SINGLE, BLOCK_N,
                          BLOCK_C, ROW_ALIGN, NUM_STAGES)
