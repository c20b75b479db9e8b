"""Triton kernels of mixup's two targets for the target-only losses (``ce``, ``nllr``,
``crl``, ``lace``, ``focal``):

    lam L(x, a) + (1 - lam) L(x, b),   each part reduced as the loss alone would be

(``fusedloss.mixup``; the C++ CPU twin is ``csrc/cpu/kernels.cpp``, ``mix_target_only``,
with ``losses.h``, ``mix_grad``). Every per-row and per-tile piece is ``rows.py``'s:
the variant math (``_variant_math``, once per target), the row loss with label smoothing
and z-loss (``_row_loss``), the gradient's extra terms (``_extra_terms``), the tile load
with the soft cap (``_load_tile``), the online pass (``_online_update``), the tile gradient
(``_target_grad_tile``) and the reduction (``_finish_reduction``). What is new here is how
the two targets share them.

Statistics, one read of the row. The online pass leaves *both* targets out (the mask of
``_online_update`` is ``k == a or k == b``): ``rest = log sum_{k not in {a, b}} e^{x_k}``. Then
exactly, as for one target, ``lse_ex(a) = logaddexp(rest, x_b)``, ``lse_ex(b) =
logaddexp(rest, x_a)`` and ``lse = logaddexp(lse_ex(a), x_a)``; ``a == b`` gives ``lse_ex(a) =
lse_ex(b) = rest``. Stats columns: ``lse, lse_ex(a), lse_ex(b), 0`` (the CPU op's).

Ignored targets (the CPU op's rule): a part whose target is ``ignore_index`` counts 0 and
its target is read as the other part's (so the row is an ``a == b`` row); a row whose both
targets are ignored gives 0 and no gradient. A target out of range makes the row NaN.

Each part's weight per row is ``k_a = lam / D_a`` and ``k_b = (1 - lam) / D_b`` for ``'mean'``
(``D`` the part's own denominator, from the prologue run on each target), ``lam`` and
``1 - lam`` otherwise; a part with ``k = 0`` adds 0 by a select (its loss may be inf). The
rows then carry their ``1 / D``, so ``'mean'`` and ``'sum'`` both add the rows up; a part whose
every row is ignored has ``D = 0`` and makes the ``'mean'`` NaN (``0 / 0``, as that part's
``'mean'`` alone and the two-pass path give).

Gradient, one write: the sum of the parts' gradients, with ``own``, ``extra`` and
``per_class`` per part from ``_extra_terms`` (``r = k go w``):

    j not in {a, b}: g_j = p_j (own_a s_a + own_b s_b + extra_a + extra_b) - (pc_a + pc_b) w_j
    j == a:          g_a = -own_a s_a (1 - p_a) + own_b p_a s_b + extra p_a - per_class w_a

(b likewise; for ``a == b`` both own terms are target terms). As for one target the
common factor is ``exp(x_j - lse + m)`` with ``m = max(log s_a, log s_b, 0)``, so every part
of the scale is a coefficient times a number ``<= 1``; ``s (1 - p)`` is the variant math's
``log(s (1 - p_c))`` and ``p_a s_b = exp(x_a - lse + log s_b) <= 1 + beta``. A part whose
``own`` is 0 (``lam`` 0 or 1, an ignored target, a zero class weight) is left out of these
terms by a select: its ``log s`` may be NaN where its loss is infinite (focal at
``p_a = 0``), and ``0 * NaN`` would spoil the other part.

Regimes, grid, eviction hints and traffic are the one-target kernels' (``one_target/kernels.py``):
an on-chip row is read once and its gradient written once; a streamed row is read
twice (the second pass in reverse block order, L2-warm) by a persistent grid.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..rows import (ACC, NEG_INF, RED_MEAN, _bce_grad_tiles, _bce_saved_stats, _bce_stats_pass, _bce_store_grad,
                      _bce_sums_pass, _capped, _extra_terms, _finish_reduction, _grad_row_scale, _load_tile, _log1p,
                      _logaddexp, _mean_denominator, _row_loss, _rows_setup, _safe_shift, _softplus, _stats_pass,
                      _store_grad, _store_row_outputs, _variant_math, _weight_total)


@triton.jit
def _mix_rows(rb, X, stride_x, TA, TB, W, LAM, n_rows, n_cols, ignore_index, softcap, softcap_k,
              BLOCK_N: tl.constexpr, HAS_WEIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ROW_ALIGN: tl.constexpr):
    """Rows of row block ``rb`` with both targets (an ignored one read as the other's, its
    class weight likewise), whether each part counts, ``bad`` (either target out of range),
    ``lam``, the rows' offsets (``rows.py``'s ROW_ALIGN hint: ``n_cols`` rewritten as
    ``(n // A) * A``, an identity the alignment analysis sees) and both target logits."""
    rows, row_ok, tc_a, keep_a, bad_a, w_a = _rows_setup(rb, TA, W, n_rows, n_cols, ignore_index, BLOCK_N,
                                                         HAS_WEIGHT, ACC)
    _, _, tc_b, keep_b, bad_b, w_b = _rows_setup(rb, TB, W, n_rows, n_cols, ignore_index, BLOCK_N, HAS_WEIGHT, ACC)
    ta = tl.where(keep_a, tc_a, tc_b)
    w_a = tl.where(keep_a, w_a, w_b)
    tb = tl.where(keep_b, tc_b, ta)
    w_b = tl.where(keep_b, w_b, w_a)
    lam = tl.load(LAM + rows, mask=row_ok, other=0.0).to(ACC)
    n_cols = (n_cols // ROW_ALIGN) * ROW_ALIGN
    row_off = tl.multiple_of(rows.to(tl.int64) * stride_x, ROW_ALIGN)
    x_a = _capped(tl.load(X + row_off + ta, mask=row_ok, other=0.0).to(ACC), softcap, softcap_k, SOFTCAP)
    x_b = _capped(tl.load(X + row_off + tb, mask=row_ok, other=0.0).to(ACC), softcap, softcap_k, SOFTCAP)
    return rows, row_ok, ta, tb, keep_a, keep_b, bad_a | bad_b, w_a, w_b, lam, n_cols, row_off, x_a, x_b


@triton.jit
def _both_targets_math(VARIANT: tl.constexpr, lse_ex_a, lse_ex_b, x_a, x_b, alpha, beta, gamma):
    """``_variant_math`` of each part: (loss, log s, log(s (1 - p))) for a and for b."""
    loss_a, log_s_a, log_gc_a, _ = _variant_math(VARIANT, lse_ex_a - x_a, alpha, beta, gamma)
    loss_b, log_s_b, log_gc_b, _ = _variant_math(VARIANT, lse_ex_b - x_b, alpha, beta, gamma)
    return loss_a, log_s_a, log_gc_a, loss_b, log_s_b, log_gc_b


@triton.jit
def _mix_grad_coefs(lse, x_a, x_b, same, log_s_a, log_gc_a, log_s_b, log_gc_b, r_a, go_a, r_b, go_b, w_a, w_b,
                    w_tot, smooth_own, smooth_class, z_loss, HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr):
    """Row coefficients of the two-target gradient (module docstring), in the form of
    ``_target_grad_coefs``: ``g_j = exp(x_j + off) scale - per_class w_j`` for j not a target,
    ``g_a`` and ``g_b`` at the targets (equal when ``a == b``)."""
    own_a, extra_a, pc_a = _extra_terms(r_a, go_a, lse, smooth_own, smooth_class, z_loss, w_tot, HAS_SMOOTHING,
                                        HAS_ZLOSS)
    own_b, extra_b, pc_b = _extra_terms(r_b, go_b, lse, smooth_own, smooth_class, z_loss, w_tot, HAS_SMOOTHING,
                                        HAS_ZLOSS)
    # A part that does not count leaves its log s out (NaN where its loss is inf).
    on_a = own_a != 0.0
    on_b = own_b != 0.0
    log_s_a = tl.where(on_a, log_s_a, NEG_INF)
    log_s_b = tl.where(on_b, log_s_b, NEG_INF)
    m = tl.maximum(tl.maximum(log_s_a, log_s_b), 0.0)
    off = m - lse
    scale = own_a * tl.exp(log_s_a - m) + own_b * tl.exp(log_s_b - m)
    own_gc_a = tl.where(on_a, own_a * tl.exp(log_gc_a), 0.0)   # own s (1 - p) at the part's target
    own_gc_b = tl.where(on_b, own_b * tl.exp(log_gc_b), 0.0)
    # The other part's p_t s at a target; for a == b it is a second target term.
    g_a = tl.where(same, -own_gc_b, own_b * tl.exp(x_a - lse + log_s_b)) - own_gc_a
    g_b = tl.where(same, -own_gc_a, own_a * tl.exp(x_b - lse + log_s_a)) - own_gc_b
    per_class = pc_a + pc_b
    if HAS_SMOOTHING or HAS_ZLOSS:
        extra = extra_a + extra_b
        scale = scale + extra * tl.exp(-m)
        g_a = g_a + extra * tl.exp(x_a - lse) - per_class * w_a
        g_b = g_b + extra * tl.exp(x_b - lse) - per_class * w_b
    return off, scale, per_class, g_a, g_b


@triton.jit
def _part_scales(lam, DENOM_A, DENOM_B, n_denom, reduction):
    """Per-row weights of the parts in the reduced loss: lam / D_a and (1 - lam) / D_b for
    'mean', lam and 1 - lam otherwise (D = 0 gives inf, and the 'mean' NaN)."""
    k_a = lam
    k_b = 1.0 - lam
    if reduction == RED_MEAN:
        k_a = k_a / _mean_denominator(DENOM_A, n_denom)
        k_b = k_b / _mean_denominator(DENOM_B, n_denom)
    return k_a, k_b


@triton.jit
def _mix_loss_rows(loss_a, loss_b, lam, w_a, w_b, keep_a, keep_b, bad, lse, w_tot, sum_wx, DENOM_A, DENOM_B, n_denom,
                   reduction, smooth_own, smooth_class, z_loss, HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr):
    """Row losses k_a L_a + k_b L_b (``_row_loss`` of each part's own term), a part with k = 0
    adding 0 by a select (its loss may be inf); NaN on bad rows."""
    k_a, k_b = _part_scales(lam, DENOM_A, DENOM_B, n_denom, reduction)
    l_a = _row_loss(loss_a, w_a, lse, w_tot, sum_wx, smooth_own, smooth_class, z_loss, keep_a, bad, HAS_SMOOTHING,
                    HAS_ZLOSS)
    l_b = _row_loss(loss_b, w_b, lse, w_tot, sum_wx, smooth_own, smooth_class, z_loss, keep_b, bad, HAS_SMOOTHING,
                    HAS_ZLOSS)
    lrow = tl.where(k_a == 0.0, 0.0, k_a * l_a) + tl.where(k_b == 0.0, 0.0, k_b * l_b)
    return tl.where(bad, float("nan"), lrow)


@triton.jit
def _mix_grad_scales(keep_a, keep_b, bad, w_a, w_b, lam, GO, rows, row_ok, DENOM_A, DENOM_B, n_denom, reduction,
                     GO_PER_ROW: tl.constexpr):
    """``_grad_row_scale`` of each part times its lam (lam, 1 - lam): (r_a, go_a, r_b, go_b)."""
    r_a, go_a = _grad_row_scale(keep_a, bad, w_a, GO, rows, row_ok, DENOM_A, n_denom, reduction, GO_PER_ROW)
    r_b, go_b = _grad_row_scale(keep_b, bad, w_b, GO, rows, row_ok, DENOM_B, n_denom, reduction, GO_PER_ROW)
    return r_a * lam, go_a * lam, r_b * (1.0 - lam), go_b * (1.0 - lam)


@triton.jit
def _bwd_weight_total(W, n_cols, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                      HAS_SMOOTHING: tl.constexpr):
    """W = sum_k w_k for a backward's label smoothing (0 without it: never read)."""
    if HAS_SMOOTHING:
        w_tot = _weight_total(W, n_cols, BLOCK_N, BLOCK_C, HAS_WEIGHT)
    else:
        w_tot = tl.zeros([BLOCK_N], ACC)
    return w_tot


@triton.jit
def _row_blocks(n_rows, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr):
    """The row blocks of a forward program, as ``range(first, stop, step)``: its own block on chip
    (SINGLE), else blocks p, p + P, ... of a persistent grid of P programs."""
    first = tl.program_id(0)
    if SINGLE:
        step = 1
        stop = first + 1
    else:
        step = tl.num_programs(0)
        stop = tl.cdiv(n_rows, BLOCK_N)
    return first, stop, step


@triton.jit
def _mix_fwd_rows(
    rb, X, stride_x, TA, TB, LAM, W, LOSS, STATS, G, stride_g, DENOM_A, DENOM_B, n_rows, n_cols, ignore_index,
    smooth_own, smooth_class, alpha, beta, gamma, z_loss, softcap, softcap_k, reduction, n_denom,
    VARIANT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr,
    SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr, SINGLE: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr, ROW_ALIGN: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Rows of row block ``rb`` of :func:`mix_fwd_kernel`; returns the sum of their losses
    (each part already divided by its 'mean' denominator)."""
    P1_EVICT: tl.constexpr = "evict_last" if COMPUTE_GRAD else "evict_first"
    rows, row_ok, ta, tb, keep_a, keep_b, bad, w_a, w_b, lam, n_cols, row_off, x_a, x_b = _mix_rows(
        rb, X, stride_x, TA, TB, W, LAM, n_rows, n_cols, ignore_index, softcap, softcap_k, BLOCK_N, HAS_WEIGHT,
        SOFTCAP, ROW_ALIGN)
    keep = keep_a | keep_b
    same = ta == tb

    # ---- pass 1: the log-sum-exp over k not in {a, b}; sums for label smoothing ----------
    _, _, m, s, sum_wx, w_tot, x, mask, slope = _stats_pass(
        X, row_off, row_ok, n_cols, ta, tb, W, softcap, softcap_k, P1_EVICT, HAS_WEIGHT, HAS_SMOOTHING, SOFTCAP, SINGLE,
        BLOCK_N, BLOCK_C, NUM_STAGES, True, False)
    rest = _safe_shift(m) + tl.log(s)
    lse_ex_a = tl.where(same, rest, _logaddexp(rest, x_b))
    lse_ex_b = tl.where(same, rest, _logaddexp(rest, x_a))
    lse = _logaddexp(lse_ex_a, x_a)
    loss_a, log_s_a, log_gc_a, loss_b, log_s_b, log_gc_b = _both_targets_math(VARIANT, lse_ex_a, lse_ex_b, x_a, x_b,
                                                                              alpha, beta, gamma)

    # ---- loss rows: k_a L_a + k_b L_b, a part with k = 0 adding 0 -------------------------
    lrow = _mix_loss_rows(loss_a, loss_b, lam, w_a, w_b, keep_a, keep_b, bad, lse, w_tot, sum_wx, DENOM_A, DENOM_B,
                          n_denom, reduction, smooth_own, smooth_class, z_loss, HAS_SMOOTHING, HAS_ZLOSS)
    part = _store_row_outputs(LOSS, STATS, rows, row_ok, lrow, lse, lse_ex_a, lse_ex_b, tl.zeros([BLOCK_N], ACC),
                              reduction)

    # ---- gradient for grad_output = 1 ----------------------------------------------------
    if COMPUTE_GRAD:
        r_a, go_a, r_b, go_b = _mix_grad_scales(keep_a, keep_b, bad, w_a, w_b, lam, None, rows, row_ok, DENOM_A,
                                                DENOM_B, n_denom, reduction, False)
        off, scale, per_class, g_a, g_b = _mix_grad_coefs(
            lse, x_a, x_b, same, log_s_a, log_gc_a, log_s_b, log_gc_b, r_a, go_a, r_b, go_b, w_a, w_b, w_tot,
            smooth_own, smooth_class, z_loss, HAS_SMOOTHING, HAS_ZLOSS)
        _store_grad(X, row_off, row_ok, n_cols, softcap, softcap_k, G, stride_g, rows, x, mask, slope, off, scale,
                    per_class, W, keep, ta, g_a, tb, g_b, HAS_WEIGHT, HAS_SMOOTHING, SOFTCAP, SINGLE, BLOCK_C,
                    NUM_STAGES, ROW_ALIGN, True)
    return part


@triton.jit
def mix_fwd_kernel(
    X, stride_x, TA, TB, LAM, W, LOSS, STATS, G, stride_g, DENOM_A, DENOM_B, PARTIAL, COUNTER,
    n_rows, n_cols, ignore_index, smooth_own, smooth_class, alpha, beta, gamma, z_loss, softcap, softcap_k,
    reduction, n_denom, total_reduction,
    VARIANT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr,
    SOFTCAP: tl.constexpr, COMPUTE_GRAD: tl.constexpr, SINGLE: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr, PARTIAL_BLOCK: tl.constexpr, ROW_ALIGN: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Forward of a target-only variant with two targets (and with COMPUTE_GRAD the gradient
    for grad_output = 1): ``one_target.kernels.target_fwd_kernel``'s regimes and grid."""
    acc = tl.sum(tl.zeros([BLOCK_N], ACC), 0)
    first, stop, step = _row_blocks(n_rows, BLOCK_N, SINGLE)
    for rb in range(first, stop, step):
        acc += _mix_fwd_rows(rb, X, stride_x, TA, TB, LAM, W, LOSS, STATS, G, stride_g, DENOM_A, DENOM_B, n_rows,
                             n_cols, ignore_index, smooth_own, smooth_class, alpha, beta, gamma, z_loss, softcap,
                             softcap_k, reduction, n_denom, VARIANT, HAS_WEIGHT, HAS_SMOOTHING, HAS_ZLOSS, SOFTCAP,
                             COMPUTE_GRAD, SINGLE, BLOCK_N, BLOCK_C, ROW_ALIGN, NUM_STAGES)
    # The rows carry each part's 1 / denominator: 'mean' and 'sum' both add them up
    # (total_reduction is 'sum' for both, from the launcher).
    _finish_reduction(acc, LOSS, PARTIAL, COUNTER, DENOM_A, n_denom, total_reduction, PARTIAL_BLOCK)


@triton.jit
def mix_bwd_kernel(
    GO, X, stride_x, TA, TB, LAM, W, STATS, G, stride_g, DENOM_A, DENOM_B,
    n_rows, n_cols, ignore_index, smooth_own, smooth_class, alpha, beta, gamma, z_loss, softcap, softcap_k,
    reduction, n_denom,
    VARIANT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr,
    SOFTCAP: tl.constexpr, GO_PER_ROW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
):
    """Backward from the saved statistics (lse, lse_ex(a), lse_ex(b)): one pass, read C*E +
    write C*E per row; the per-row math is the forward's."""
    rows, row_ok, ta, tb, keep_a, keep_b, bad, w_a, w_b, lam, n_cols, row_off, x_a, x_b = _mix_rows(
        tl.program_id(0), X, stride_x, TA, TB, W, LAM, n_rows, n_cols, ignore_index, softcap, softcap_k, BLOCK_N,
        HAS_WEIGHT, SOFTCAP, ROW_ALIGN)
    st = STATS + rows.to(tl.int64) * 4
    lse = tl.load(st, mask=row_ok, other=0.0).to(ACC)
    lse_ex_a = tl.load(st + 1, mask=row_ok, other=0.0).to(ACC)
    lse_ex_b = tl.load(st + 2, mask=row_ok, other=0.0).to(ACC)
    _, log_s_a, log_gc_a, _, log_s_b, log_gc_b = _both_targets_math(VARIANT, lse_ex_a, lse_ex_b, x_a, x_b, alpha,
                                                                     beta, gamma)
    r_a, go_a, r_b, go_b = _mix_grad_scales(keep_a, keep_b, bad, w_a, w_b, lam, GO, rows, row_ok, DENOM_A, DENOM_B,
                                            n_denom, reduction, GO_PER_ROW)
    w_tot = _bwd_weight_total(W, n_cols, BLOCK_N, BLOCK_C, HAS_WEIGHT, HAS_SMOOTHING)
    off, scale, per_class, g_a, g_b = _mix_grad_coefs(
        lse, x_a, x_b, ta == tb, log_s_a, log_gc_a, log_s_b, log_gc_b, r_a, go_a, r_b, go_b, w_a, w_b, w_tot,
        smooth_own, smooth_class, z_loss, HAS_SMOOTHING, HAS_ZLOSS)
    # One pass over the row (the forward's streamed gradient pass: no tile kept, SINGLE off).
    _store_grad(X, row_off, row_ok, n_cols, softcap, softcap_k, G, stride_g, rows, None, None, 1.0, off, scale,
                per_class, W, keep_a | keep_b, ta, g_a, tb, g_b, HAS_WEIGHT, HAS_SMOOTHING, SOFTCAP, False, BLOCK_C, 1,
                ROW_ALIGN, True)


# ----------------------------------------------------------------------------
# bce: both parts share lse, the arg-max w and log(1 - p_w) (pass 1, rows.py's
# _bce_stats_pass); pass 2 sums over k not in {a, b} once (rows.py's _bce_sums_pass with
# TWO_TARGETS) and each part adds the other target's terms (_bce_mix_part_r,
# _bce_mix_part_loss); the gradient is the sum of both parts' _bce_grad_tile (rows.py's
# _bce_grad_tiles / _bce_store_grad with TWO_TARGETS), written once. Stats columns: lse,
# lse_ex(a), log(1 - p_w), w (the CPU op's).
# ----------------------------------------------------------------------------

@triton.jit
def _bce_mix_part_r(same, o_is_w, p_o, s_r):
    """A part's R = sum_{k != w} a_k (a_c = -1) from _bce_tile_sums' S: the other target o's odds
    join where o is neither c nor w; where o is w (and not c) the -1 of a_c was left out of S."""
    return s_r + tl.where(same | o_is_w, 0.0, p_o / (1.0 - p_o)) - tl.where(~same & o_is_w, 1.0, 0.0)


@triton.jit
def _bce_mix_part_loss(same, o_is_w, p_o, lse_ex_c, x_c, log1m_pw, s_l):
    """A part's own term -log p_c - sum_{k != c} log(1 - p_k): o's log(1 - p_o) joins the sum over
    k not in {a, b} where o is not c (from log1m_pw where o is w; p_o <= 1/2 otherwise: exact)."""
    l1m_o = tl.where(o_is_w, log1m_pw, _log1p(-p_o))
    return _softplus(lse_ex_c - x_c) - (s_l + tl.where(same, 0.0, l1m_o))


@triton.jit
def _bce_mix_rs(ta, tb, Wi, x_a, x_b, lse, s_r):
    """(R_a, R_b, p_a, p_b) of a row."""
    same = ta == tb
    p_a = tl.exp(x_a - lse)
    p_b = tl.exp(x_b - lse)
    return _bce_mix_part_r(same, tb == Wi, p_b, s_r), _bce_mix_part_r(same, ta == Wi, p_a, s_r), p_a, p_b


@triton.jit
def _bce_mix_terms(r_a, go_a, r_b, go_b, lse, w_tot, smooth_own, smooth_class, z_loss, HAS_SMOOTHING: tl.constexpr,
                   HAS_ZLOSS: tl.constexpr):
    """Each part's own, extra and per_class coefficients (rows.py's _extra_terms) for its
    _bce_grad_tile: (own_a, extra_a, pc_a, own_b, extra_b, pc_b)."""
    own_a, extra_a, pc_a = _extra_terms(r_a, go_a, lse, smooth_own, smooth_class, z_loss, w_tot, HAS_SMOOTHING,
                                        HAS_ZLOSS)
    own_b, extra_b, pc_b = _extra_terms(r_b, go_b, lse, smooth_own, smooth_class, z_loss, w_tot, HAS_SMOOTHING,
                                        HAS_ZLOSS)
    return own_a, extra_a, pc_a, own_b, extra_b, pc_b


@triton.jit
def _bce_mix_fwd_rows(
    rb, X, stride_x, TA, TB, LAM, W, LOSS, STATS, G, stride_g, DENOM_A, DENOM_B, n_rows, n_cols, ignore_index,
    smooth_own, smooth_class, z_loss, softcap, softcap_k, reduction, n_denom,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr, SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, SINGLE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    ROW_ALIGN: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Rows of row block ``rb`` of :func:`bce_mix_fwd_kernel`; returns the sum of their losses
    (each part already divided by its 'mean' denominator)."""
    P1_EVICT: tl.constexpr = "evict_last" if COMPUTE_GRAD else "evict_first"
    rows, row_ok, ta, tb, keep_a, keep_b, bad, w_a, w_b, lam, n_cols, row_off, x_a, x_b = _mix_rows(
        rb, X, stride_x, TA, TB, W, LAM, n_rows, n_cols, ignore_index, softcap, softcap_k, BLOCK_N, HAS_WEIGHT,
        SOFTCAP, ROW_ALIGN)
    same = ta == tb

    # ---- pass 1: arg-max, lse, log(1 - p_w); sums for label smoothing -------------------
    M, Wi, lse_ow, lse, sum_wx, w_tot, x, mask, slope = _bce_stats_pass(
        X, row_off, row_ok, n_cols, W, softcap, softcap_k, HAS_WEIGHT, HAS_SMOOTHING, SOFTCAP, SINGLE, BLOCK_N,
        BLOCK_C, NUM_STAGES)
    log1m_pw = lse_ow - lse
    log_pw = M - lse

    # ---- pass 2: sums over k not in {a, b} (reverse order when streamed) ----------------
    s_l, s_r = _bce_sums_pass(X, row_off, row_ok, n_cols, softcap, softcap_k, x, mask, ta, tb, Wi, lse, log1m_pw,
                              P1_EVICT, SOFTCAP, SINGLE, BLOCK_N, BLOCK_C, True)
    # The targets' row terms are formed after pass 2, not before: fewer values live across its
    # loop (with them before it, the streamed forward spilled; aot_specs.ci_specs).
    lse_ow = lse + log1m_pw   # lse_{k != w} formed from the stats columns lse, log(1 - p_w)
    lse_ex_a = tl.where(ta == Wi, lse_ow, lse + _log1p(-tl.exp(x_a - lse)))
    lse_ex_b = tl.where(tb == Wi, lse_ow, lse + _log1p(-tl.exp(x_b - lse)))
    R_a, R_b, p_a, p_b = _bce_mix_rs(ta, tb, Wi, x_a, x_b, lse, s_r)
    loss_a = _bce_mix_part_loss(same, tb == Wi, p_b, lse_ex_a, x_a, log1m_pw, s_l)
    loss_b = _bce_mix_part_loss(same, ta == Wi, p_a, lse_ex_b, x_b, log1m_pw, s_l)
    lrow = _mix_loss_rows(loss_a, loss_b, lam, w_a, w_b, keep_a, keep_b, bad, lse, w_tot, sum_wx, DENOM_A, DENOM_B,
                          n_denom, reduction, smooth_own, smooth_class, z_loss, HAS_SMOOTHING, HAS_ZLOSS)
    part = _store_row_outputs(LOSS, STATS, rows, row_ok, lrow, lse, lse_ex_a, log1m_pw, Wi.to(ACC), reduction)

    # ---- pass 3: the gradient for grad_output = 1 ------------------------------------------
    if COMPUTE_GRAD:
        r_a, go_a, r_b, go_b = _mix_grad_scales(keep_a, keep_b, bad, w_a, w_b, lam, None, rows, row_ok, DENOM_A,
                                                DENOM_B, n_denom, reduction, False)
        own_a, extra_a, pc_a, own_b, extra_b, pc_b = _bce_mix_terms(r_a, go_a, r_b, go_b, lse, w_tot, smooth_own,
                                                                    smooth_class, z_loss, HAS_SMOOTHING, HAS_ZLOSS)
        _bce_store_grad(X, row_off, row_ok, n_cols, softcap, softcap_k, G, stride_g, rows, x, mask, slope, Wi, lse,
                        log1m_pw, log_pw, ta, R_a, own_a, extra_a, pc_a, keep_a, tb, R_b, own_b, extra_b, pc_b, keep_b,
                        W, HAS_WEIGHT, HAS_SMOOTHING, HAS_ZLOSS, SOFTCAP, SINGLE, BLOCK_C, NUM_STAGES, ROW_ALIGN, True)
    return part


@triton.jit
def bce_mix_fwd_kernel(
    X, stride_x, TA, TB, LAM, W, LOSS, STATS, G, stride_g, DENOM_A, DENOM_B, PARTIAL, COUNTER,
    n_rows, n_cols, ignore_index, smooth_own, smooth_class, z_loss, softcap, softcap_k, reduction, n_denom,
    total_reduction,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr, SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, SINGLE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    PARTIAL_BLOCK: tl.constexpr, ROW_ALIGN: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Forward of bce with two targets (and with COMPUTE_GRAD the gradient for grad_output = 1):
    ``one_target.kernels.bce_fwd_kernel``'s passes, regimes and grid."""
    acc = tl.sum(tl.zeros([BLOCK_N], ACC), 0)
    first, stop, step = _row_blocks(n_rows, BLOCK_N, SINGLE)
    for rb in range(first, stop, step):
        acc += _bce_mix_fwd_rows(rb, X, stride_x, TA, TB, LAM, W, LOSS, STATS, G, stride_g, DENOM_A, DENOM_B, n_rows,
                                 n_cols, ignore_index, smooth_own, smooth_class, z_loss, softcap, softcap_k,
                                 reduction, n_denom, HAS_WEIGHT, HAS_SMOOTHING, HAS_ZLOSS, SOFTCAP, COMPUTE_GRAD,
                                 SINGLE, BLOCK_N, BLOCK_C, ROW_ALIGN, NUM_STAGES)
    _finish_reduction(acc, LOSS, PARTIAL, COUNTER, DENOM_A, n_denom, total_reduction, PARTIAL_BLOCK)


@triton.jit
def bce_mix_bwd_kernel(
    GO, X, stride_x, TA, TB, LAM, W, STATS, G, stride_g, DENOM_A, DENOM_B,
    n_rows, n_cols, ignore_index, smooth_own, smooth_class, z_loss, softcap, softcap_k, reduction, n_denom,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr, SOFTCAP: tl.constexpr,
    GO_PER_ROW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    """Backward of bce with two targets from the saved stats (lse, lse_ex(a), log(1 - p_w), w):
    a pass for the sums (R_a, R_b), the gradient in another (reverse order, L2-warm)."""
    rows, row_ok, ta, tb, keep_a, keep_b, bad, w_a, w_b, lam, n_cols, row_off, x_a, x_b = _mix_rows(
        tl.program_id(0), X, stride_x, TA, TB, W, LAM, n_rows, n_cols, ignore_index, softcap, softcap_k, BLOCK_N,
        HAS_WEIGHT, SOFTCAP, ROW_ALIGN)
    lse, log1m_pw, Wi, x_w, s_r = _bce_saved_stats(STATS, X, row_off, rows, row_ok, n_cols, ta, tb, softcap,
                                                      softcap_k, SOFTCAP, BLOCK_N, BLOCK_C, True)
    cols0 = tl.arange(0, BLOCK_C)
    R_a, R_b, _, _ = _bce_mix_rs(ta, tb, Wi, x_a, x_b, lse, s_r)
    r_a, go_a, r_b, go_b = _mix_grad_scales(keep_a, keep_b, bad, w_a, w_b, lam, GO, rows, row_ok, DENOM_A, DENOM_B,
                                            n_denom, reduction, GO_PER_ROW)
    w_tot = _bwd_weight_total(W, n_cols, BLOCK_N, BLOCK_C, HAS_WEIGHT, HAS_SMOOTHING)
    own_a, extra_a, pc_a, own_b, extra_b, pc_b = _bce_mix_terms(r_a, go_a, r_b, go_b, lse, w_tot, smooth_own,
                                                                smooth_class, z_loss, HAS_SMOOTHING, HAS_ZLOSS)
    g_off = tl.multiple_of(rows.to(tl.int64) * stride_g, ROW_ALIGN)
    nb = tl.cdiv(n_cols, BLOCK_C)
    for i in range(0, nb):
        cols = (nb - 1 - i) * BLOCK_C + cols0
        xb, maskb, slb = _load_tile(X, row_off, row_ok, cols, n_cols, softcap, softcap_k, ACC, "evict_first", SOFTCAP)
        g = _bce_grad_tiles(xb, maskb, slb, cols, n_cols, Wi, lse, log1m_pw, x_w - lse, ta, R_a, own_a, extra_a, pc_a,
                            keep_a, tb, R_b, own_b, extra_b, pc_b, keep_b, W, HAS_WEIGHT, HAS_SMOOTHING, HAS_ZLOSS,
                            SOFTCAP, True)
        tl.store(G + g_off[:, None] + cols[None, :], g.to(G.dtype.element_ty), mask=maskb,
                 eviction_policy="evict_first")
