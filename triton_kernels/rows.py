"""The row machinery every Triton kernel of fusedloss is built from: the variant ids and
constants, the scalar helpers, the per-variant math of the target-only losses, the row
bookkeeping (targets, weights, reductions), the tile load with the soft cap, the online
statistics pass, the gradient tiles and bce's passes (``TWO_TARGETS`` serves mixup's two
targets and the vocabulary-parallel slices), and the two kernels every form launches: the
prologue (completion counter, mean denominator) and the backward scale. The forms' kernels
(``one_target/``, ``two_targets/``, ``probs/``, ``split_vocab/``) call these.

variants (``ce``, ``nllr``, ``crl``, ``lace``, ``focal``), one for ``bce``, a
prologue (mean denominator, reduction counter) and the backward scale.

Math (``docs/losses.md``; the PyTorch twin is ``fusedloss/reference.py``).
Per row with target ``c``, everything comes from ``x_c`` (one scalar load before
the pass) and ``lse_ex = log sum_{k != c} exp(x_k)``, computed exactly by an
online pass over column blocks with its own running max and sum over ``k != c``
(the target is masked to -inf). Then ``lse = logaddexp(lse_ex, x_c)``,
``d = lse_ex - x_c``, ``log p_c = -softplus(d)``, ``log(1 - p_c) = -softplus(-d)``:
nothing forms ``1 - p_c`` or ``lse - x_c`` by subtraction, so a target leading by
1000 gives a finite loss and a gradient with full relative accuracy. The gradient
``g_j = s (p_j - [j == c])`` is written in log space,
``g_j = exp(x_j - lse + log s)``, ``g_c = -exp(log(s (1 - p_c)))``, evaluated in
float32 and rounded once, at the store, to the logits' dtype: the target-class entry
is never formed as ``p_c - 1`` in a 16-bit buffer (the bf16 bug of Liger-Kernel
PR #1329), so it keeps its relative accuracy when ``p_c`` is near 1.

Options (docs/losses.md, "z-loss, soft-capping and lse"), each a constexpr flag so that
without them the kernels compile to the plain loss's code, with runtime values:

* SOFTCAP: every logit is read as ``y = s tanh(x / s)`` in the tile load
  (:func:`_load_tile`; ``x_c`` and bce's ``x_w`` likewise), so every pass and statistic is
  that of ``y``; the gradient tile is ``dL/dy`` times the cap's slope, recomputed from the
  raw tile when a pass re-reads it (kept in registers with the on-chip tile): no extra
  traffic, one exp2 and one division per element per pass.
* HAS_SMOOTHING (every loss) and HAS_ZLOSS: the row loss becomes
  ``(1 - eps) w_c h + w_c z lse^2 + (eps / C) (W lse - sum_k w_k y_k)`` and the gradient
  ``own dh/dy_j + extra p_j - per_class w_j`` (:func:`_extra_terms`); the target-only
  family writes ``p_j (own s + extra)`` with one exp per element, shifted by
  ``m = max(log s, 0)`` (:func:`_target_grad_coefs`).

Traffic (the figure of merit; ``traffic.py`` counts it per launch). Per row of C
logits of E bytes, forward+backward of a target-only variant:

* row on chip (``SINGLE``: the whole row is one tile held in registers):
  read C*E once, write the gradient C*E once, plus O(1) per row
  (target, weight[c], 4 stats floats, the loss) -- the floor of a copy;
* row too long for registers: pass 1 (statistics) reads the row, pass 2 reads it
  again *in reverse block order* and writes the gradient. Reversing makes the
  blocks read last in pass 1 the first ones re-read; pass 1 loads with L2 priority
  evict_last, pass 2 and the gradient stores with evict_first; and the grid is
  persistent, sized (heuristics.stream_programs) so that the rows in flight fit in
  L2. DRAM then sees read + write, the L2 one extra read; rows too long for that
  (C >= ~128k) re-read part of the row from DRAM (the report predicts how much).
* without grad: read the row once, write O(1) per row.

``bce`` needs a second reduction over the row after ``lse`` (docs/losses.md): on chip
it is still one read and one write; off chip pass 2 (loss sum and R) runs in
reverse order and pass 3 (gradient) forward, each starting where the previous
pass ended (L2-warm).

The whole forward is one launch of the main kernel; reduced losses add one
launch of the tiny prologue before it (zeroes the completion counter and, for
'mean', sums the N target weights: O(N) bytes). The main kernel's programs each
write a partial sum, and the last program to finish (an acq_rel atomic ticket)
adds them in a fixed order: deterministic, no host synchronization.
"""


from __future__ import annotations

import triton
import triton.language as tl

# Variant ids: the op ABI of fusedloss.variants.Variant (checked by the tests).
CE: tl.constexpr = tl.constexpr(0)
BCE: tl.constexpr = tl.constexpr(1)
NLLR: tl.constexpr = tl.constexpr(2)
CRL: tl.constexpr = tl.constexpr(3)
LACE: tl.constexpr = tl.constexpr(4)
FOCAL: tl.constexpr = tl.constexpr(5)
# Reductions (fusedloss.variants.Reduction).
RED_NONE: tl.constexpr = tl.constexpr(0)
RED_MEAN: tl.constexpr = tl.constexpr(1)
RED_SUM: tl.constexpr = tl.constexpr(2)
#: Number of per-program partial denominators the prologue writes at most.
DENOM_PARTIALS: tl.constexpr = tl.constexpr(64)

LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
NEG_INF: tl.constexpr = tl.constexpr(float("-inf"))
#: All arithmetic is float32 whatever the logits' dtype (float64 logits go to the reference
#: backend: Triton passes Python float arguments as float32, too coarse for float64 math).
ACC: tl.constexpr = tl.float32


# ----------------------------------------------------------------------------
# Scalar helpers (elementwise on per-row vectors or tiles)
# ----------------------------------------------------------------------------

@triton.jit
def _log1p(x):
    """``log(1 + x)`` with the rounding of ``u = 1 + x`` corrected (Goldberg):
    ``log(u) * x / (u - 1)`` is exact to a few ulp for tiny ``x`` where ``log(1 + x)``
    would return 0. Used on ``x`` in ``[-1, 1]`` only (``x = -1`` gives -inf)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def _softplus(t):
    """``log(1 + e^t)`` for every ``t``, +-inf included (``softplus(-inf) = 0``)."""
    return tl.maximum(t, 0.0) + _log1p(tl.exp(-tl.abs(t)))


@triton.jit
def _log_softplus(t):
    """``log(softplus(t))``: below -30, ``softplus(t) = e^t (1 - e^t / 2 + ...)`` so the
    log is ``t`` to within e^-30, and ``e^t`` itself may underflow (t < -87 in fp32)."""
    return tl.where(t < -30.0, t, tl.log(_softplus(t)))


@triton.jit
def _logaddexp(a, b):
    """``log(e^a + e^b)`` without overflow; equal arguments (-inf, -inf included) give
    ``a + log 2`` (so -inf stays -inf instead of the NaN of ``-inf - -inf``)."""
    m = tl.maximum(a, b)
    n = tl.minimum(a, b)
    return tl.where(a == b, m + LN2, m + _log1p(tl.exp(n - m)))


@triton.jit
def _safe_shift(m):
    """Shift for ``exp(x - shift)``: the running max, or 0 while it is -inf (all
    entries so far masked), so that ``exp(-inf - shift) = 0`` rather than NaN."""
    return tl.where(m == NEG_INF, 0.0, m)


@triton.jit
def _log_or_neg_inf(v):
    """``log v`` for a scalar hyper-parameter, -inf for 0 (``log 0``), as a float32. (The clamp
    constant must be a normal float32: Triton types a literal outside float32's normal range,
    e.g. 1e-38, as float64, and everything downstream would turn float64.)"""
    return tl.where(v > 0.0, tl.log(tl.maximum(v, 1e-30)), NEG_INF)


@triton.jit
def _soft_cap(x, cap, cap_k):
    """Gemma's soft cap ``y = cap tanh(x / cap)`` and its slope ``dy/dx = 1 - tanh^2(x / cap)``,
    both from ``e = exp(-2 |x / cap|) = exp2(|x| cap_k)`` (``cap_k = -2 log2(e) / cap``, formed
    on the host): ``t = tanh|u| = (1 - e) / (1 + e)`` and ``slope = 4 e / (1 + e)^2 = e (1 + t)^2``
    (``1 + t = 2 / (1 + e)`` has no cancellation): one exp2 and one division per element.
    ``1 - t^2`` would cancel to 0 or to rounding noise where the cap saturates (|x| >> cap),
    while ``e (1 + t)^2`` keeps its relative accuracy down to e's underflow (then y = +-cap and
    the slope is 0, both exact). The division, not a product with 1 / (1 + e): y feeds
    differences such as nllr's lse_ex - x_c, where its error is the loss's. NaN stays NaN
    (e is NaN); -inf reads -cap."""
    e = tl.exp2(tl.abs(x) * cap_k)
    t = (1.0 - e) / (1.0 + e)
    return cap * tl.where(x < 0.0, -t, t), e * ((1.0 + t) * (1.0 + t))


@triton.jit
def _capped(x, cap, cap_k, SOFTCAP: tl.constexpr):
    """A logit as every statistic reads it: soft-capped with SOFTCAP, else itself."""
    if SOFTCAP:
        x, _ = _soft_cap(x, cap, cap_k)
    return x


# ----------------------------------------------------------------------------
# Per-variant math of the target-only family: one function each.
# In: d = lse_ex - x_c, log_p = log p_c = -softplus(d), log_q = log(1 - p_c) = -softplus(-d).
# Out: (loss, log s, log(s (1 - p_c))) with dL/dx_j = s (p_j - [j == c]):
#      g_j = exp(x_j - lse + log s) (j != c), g_c = -exp(log(s (1 - p_c))).
# log(s (1 - p_c)) is formed directly (not log s + log q) so that it stays
# finite when 1 - p_c underflows to exactly 0 (C = 1, or every competitor -inf).
# ----------------------------------------------------------------------------

@triton.jit
def _ce_math(d, log_p, log_q, alpha, beta, gamma):
    # L = -log p_c = softplus(d); s = 1.
    return -log_p, tl.zeros_like(d), log_q


@triton.jit
def _nllr_math(d, log_p, log_q, alpha, beta, gamma):
    # L = log(1 - p_c) - log p_c = lse_ex - x_c = d exactly (unbounded below by definition);
    # s = 1 / (1 - p_c): g_j = p_j / (1 - p_c) = exp(x_j - lse_ex), g_c = -1.
    return d, -log_q, tl.zeros_like(d)


@triton.jit
def _crl_math(d, log_p, log_q, alpha, beta, gamma):
    # L = beta log(alpha + q) - log p, q = 1 - p_c; log(alpha + q) = logaddexp(log alpha, log q)
    # is exact for alpha = 0 too (then it is log q, -inf when q = 0).
    log_aq = _logaddexp(_log_or_neg_inf(alpha), log_q)
    loss = tl.where(beta == 0.0, 0.0, beta * log_aq) - log_p
    # s = 1 + beta p / (alpha + q): log s = softplus(log beta + log p - log(alpha + q)),
    # finite for alpha = 0, q -> 0 where beta p / q itself overflows.
    log_beta = _log_or_neg_inf(beta)
    log_s = _softplus(tl.where(beta == 0.0, NEG_INF, log_beta + log_p - log_aq))
    # s q = q + beta p q / (alpha + q); q / (alpha + q) = exp(log q - log(alpha + q)) <= 1,
    # read as 1 when both logs are -inf (alpha = 0 and q = 0).
    rq = tl.where(log_q == log_aq, 0.0, log_q - log_aq)
    log_gc = _logaddexp(log_q, log_beta + log_p + rq)
    return loss, log_s, log_gc


@triton.jit
def _focal_math(d, log_p, log_q, alpha, beta, gamma):
    # L = q^g (-log p), q = 1 - p_c, g = gamma; -log p = softplus(d).
    # s = q^g + g p q^(g-1) (-log p): both terms >= 0, summed in log space so that the
    # large q^(g-1) (g < 1, q -> 0) times the small -log p ~ q never overflows.
    # 0 * log q is 0 even when q = 0 ((1 - p)^0 = 1): hence the selects on g.
    glq = tl.where(gamma == 0.0, 0.0, gamma * log_q)                # log q^g
    g1lq = tl.where(gamma == 1.0, 0.0, (gamma - 1.0) * log_q)       # log q^(g-1)
    lsp = _log_softplus(d)                                           # log(-log p)
    log_g = _log_or_neg_inf(gamma)
    # d = -inf means q = 0 exactly: the second term g p q^(g-1) (-log p) ~ g q^g -> 0.
    second = tl.where((gamma == 0.0) | (d == NEG_INF), NEG_INF, log_g + log_p + g1lq + lsp)
    second_q = tl.where((gamma == 0.0) | (d == NEG_INF), NEG_INF, log_g + log_p + glq + lsp)
    loss = tl.exp(glq) * (-log_p)
    log_s = _logaddexp(glq, second)
    log_gc = _logaddexp(glq + log_q, second_q)
    return loss, log_s, log_gc


@triton.jit
def _lace_math(d, log_p, log_q, alpha, beta, gamma):
    # L = -(1 - p_c) log p_c: focal with gamma = 1 (a compile-time 1, so its selects fold).
    return _focal_math(d, log_p, log_q, alpha, beta, 1.0)


@triton.jit
def _variant_math(VARIANT: tl.constexpr, d, alpha, beta, gamma):
    log_p = -_softplus(d)
    log_q = -_softplus(-d)
    if VARIANT == CE:
        loss, log_s, log_gc = _ce_math(d, log_p, log_q, alpha, beta, gamma)
    elif VARIANT == NLLR:
        loss, log_s, log_gc = _nllr_math(d, log_p, log_q, alpha, beta, gamma)
    elif VARIANT == CRL:
        loss, log_s, log_gc = _crl_math(d, log_p, log_q, alpha, beta, gamma)
    elif VARIANT == LACE:
        loss, log_s, log_gc = _lace_math(d, log_p, log_q, alpha, beta, gamma)
    else:
        tl.static_assert(VARIANT == FOCAL, "target-only kernel: unknown variant")
        loss, log_s, log_gc = _focal_math(d, log_p, log_q, alpha, beta, gamma)
    return loss, log_s, log_gc, log_q


# ----------------------------------------------------------------------------
# Row bookkeeping shared by every kernel
# ----------------------------------------------------------------------------

@triton.jit
def _rows_setup(pid, T, Wt, n_rows, n_cols, ignore_index, BLOCK_N: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                ACC: tl.constexpr):
    """Rows of this program, their clamped targets and weights. A target outside [0, C)
    that is not ignore_index is never used as an index (clamped to 0) and marks its row
    ``bad`` (loss and gradient NaN)."""
    # Row indices in int32 (the launcher checks N < 2^31 - 2^16): only element offsets,
    # rows * stride, need 64 bits, and they are formed where used. Likewise the int64
    # target is folded at once into one int32 code (the clamped index, -1 ignored, -2 bad):
    # kept alive as int64 for the later keep/bad tests, it made ptxas spill. And an int32
    # target compared with int32 column indices keeps the tile's indices 32-bit.
    # (zeros + pid) works for a tensor pid (compiled) and a Python int (the interpreter).
    rows = (tl.zeros([BLOCK_N], tl.int32) + pid) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    tgt = tl.load(T + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    code = tl.where((tgt >= 0) & (tgt < n_cols), tgt, -2)
    code = tl.where((tgt == ignore_index) | (~row_ok), -1, code).to(tl.int32)
    keep = code != -1
    bad = code == -2
    tc = tl.maximum(code, 0)
    if HAS_WEIGHT:
        w_c = tl.load(Wt + tc, mask=row_ok, other=0.0).to(ACC)
    else:
        w_c = tl.full([BLOCK_N], 1.0, ACC)
    return rows, row_ok, tc, keep, bad, w_c


@triton.jit
def _mean_denominator(DENOM, n_denom):
    """Sum of the prologue's per-program partial denominators, in a fixed order."""
    offs = tl.arange(0, DENOM_PARTIALS)
    return tl.sum(tl.load(DENOM + offs, mask=offs < n_denom, other=0.0), 0)


@triton.jit
def _finish_reduction(acc, LOSS, PARTIAL, COUNTER, DENOM, n_denom, reduction, PARTIAL_BLOCK: tl.constexpr):
    """'sum'/'mean': store this program's partial sum (its rows, in a fixed order); the last
    program to take a ticket adds all partials in program order (deterministic) and
    divides by the mean's denominator. The ticket is an acq_rel atomic at GPU scope: it
    releases this program's partial and, for the last program, acquires everyone's; the
    partials are then read with .cg (from L2, never a stale L1 line)."""
    if reduction != RED_NONE:
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        tl.store(PARTIAL + pid, acc)
        tl.debug_barrier()
        ticket = tl.atomic_add(COUNTER, 1, sem="acq_rel", scope="gpu")
        if ticket == nprog - 1:
            part = tl.zeros([PARTIAL_BLOCK], acc.dtype)
            for start in range(0, nprog, PARTIAL_BLOCK):
                offs = start + tl.arange(0, PARTIAL_BLOCK)
                part += tl.load(PARTIAL + offs, mask=offs < nprog, other=0.0, cache_modifier=".cg")
            total = tl.sum(part, 0)
            if reduction == RED_MEAN:
                total = total / _mean_denominator(DENOM, n_denom)
            tl.store(LOSS, total)


@triton.jit
def _grad_row_scale(keep, bad, w_c, GO, rows, row_ok, DENOM, n_denom, reduction, GO_PER_ROW: tl.constexpr):
    """d(reduced loss)/d(loss_i) * weight[c_i] for each row: grad_output (a scalar, or
    per row for 'none'), divided by the denominator for 'mean'; 0 for ignored rows,
    NaN for bad ones. GO = None means grad_output = 1 (the fused forward)."""
    if GO is None:
        go = tl.full(w_c.shape, 1.0, w_c.dtype)
    elif GO_PER_ROW:
        go = tl.load(GO + rows, mask=row_ok, other=0.0).to(w_c.dtype)
    else:
        go = tl.full(w_c.shape, 1.0, w_c.dtype) * tl.load(GO).to(w_c.dtype)
    if reduction == RED_MEAN:
        go = go / _mean_denominator(DENOM, n_denom)
    go = tl.where(keep, go, 0.0)
    go = tl.where(bad, float("nan"), go)
    return go * w_c, go


@triton.jit
def _store_stats(STATS, rows, row_ok, s0, s1, s2, s3):
    base = STATS + rows.to(tl.int64) * 4
    tl.store(base + 0, s0, mask=row_ok)
    tl.store(base + 1, s1, mask=row_ok)
    tl.store(base + 2, s2, mask=row_ok)
    tl.store(base + 3, s3, mask=row_ok)



@triton.jit
def _store_row_outputs(LOSS, STATS, rows, row_ok, lrow, s0, s1, s2, s3, reduction):
    """The rows' four stats and, for 'none', their losses; returns the sum of the rows' losses
    (this program's partial for 'mean' / 'sum')."""
    _store_stats(STATS, rows, row_ok, s0, s1, s2, s3)
    if reduction == RED_NONE:
        tl.store(LOSS + rows, lrow, mask=row_ok)
    return tl.sum(tl.where(row_ok, lrow, 0.0), 0)

# ----------------------------------------------------------------------------
# Target-only family: statistics and gradient of one tile
# ----------------------------------------------------------------------------

@triton.jit
def _load_tile(X, row_off, row_ok, cols, n_cols, cap, cap_k, ACC: tl.constexpr, EVICT: tl.constexpr,
               SOFTCAP: tl.constexpr):
    """One tile as the loss reads it (soft-capped with SOFTCAP), masked lanes at -inf (they
    vanish from every max and exp-sum), and the cap's slope dy/dx for the gradient (1.0, a
    constant that compiles to nothing, without SOFTCAP). Capping here, at the load, makes
    every pass and statistic (lse, lse_ex, bce's arg-max, smoothing sums) those of the
    capped logits; a gradient pass re-reads the raw tile and recomputes the slope, so no
    (N, C) slope buffer exists.

    EVICT is the L2 eviction priority: "evict_last" on a pass whose data a later pass
    re-reads (keep it in L2), "evict_first" on the last read of a block (dead afterwards,
    so it does not displace rows still to be re-read)."""
    mask = row_ok[:, None] & (cols < n_cols)[None, :]
    x = tl.load(X + row_off[:, None] + cols[None, :], mask=mask, other=float("-inf"),
                eviction_policy=EVICT).to(ACC)
    if SOFTCAP:
        x, slope = _soft_cap(x, cap, cap_k)
        # masked lanes back to -inf: capped they would read -cap, a class like any other
        x = tl.where(mask, x, float("-inf"))
    else:
        slope = 1.0
    return x, mask, slope


@triton.jit
def _online_update(m, s, x, is_c):
    """One column block of the online log-sum-exp over k != c: the block max rescales
    the running sum once (one exp per element, one per row per block)."""
    x_ex = tl.where(is_c, float("-inf"), x)
    m_new = tl.maximum(m, tl.max(x_ex, 1))
    shift = _safe_shift(m_new)
    s = s * tl.exp(m - shift) + tl.sum(tl.exp(x_ex - shift[:, None]), 1)
    return m_new, s


@triton.jit
def _extra_terms(r, go_s, lse, smooth_own, smooth_class, z_loss, w_tot, HAS_SMOOTHING: tl.constexpr,
                 HAS_ZLOSS: tl.constexpr):
    """What label smoothing (eps) and z-loss (z) add to every loss's gradient, beside the
    loss's own dh/dx_j (docs/losses.md; the C++ twin is losses.h, extra_terms):
        g_j = own dh/dx_j + extra p_j - per_class w_j
        own = (1 - eps) r,  per_class = (eps / C) go,  extra = per_class W + 2 z lse r
    with r = w_c go, go = d(reduced loss)/d(row loss) (/ denominator for 'mean') and
    W = sum_k w_k (C without weights). Without either option: own = r, the rest 0.
    smooth_own = 1 - eps and smooth_class = eps / C come from the host, and z enters through
    a per-row product first: no scalar derived from the arguments stays alive across the
    persistent loop (ptxas spilled such values; arguments it re-reads from constant memory)."""
    if HAS_SMOOTHING:
        per_class = smooth_class * go_s
        own = smooth_own * r
        extra = per_class * w_tot
    else:
        per_class = tl.zeros_like(r)
        own = r
        extra = tl.zeros_like(r)
    if HAS_ZLOSS:
        extra = extra + z_loss * lse * r * 2.0
    return own, extra, per_class


@triton.jit
def _target_grad_coefs(lse, x_c, log_s, log_gc, r, go_s, w_c, w_tot, smooth_own, smooth_class, z_loss,
                       HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr):
    """Per-row coefficients of the target-only gradient, dh/dx_j = s (p_j - [j == c]):
        j != c: g_j = exp(x_j + off) scale - per_class w_j,     j == c: g_c.

    Without smoothing and z-loss (the fast path, unchanged): off = log s - lse, scale = r,
    g_c = -r exp(log(s (1 - p_c))). With them g_j = p_j (own s + extra) - per_class w_j, and
    s may overflow (nllr near p_c = 1) or underflow (focal) while own s + extra may be
    negative (no log). So, with m = max(log s, 0):
        p_j (own s + extra) = exp(x_j - lse + m) (own exp(log s - m) + extra exp(-m)),
    both parts of the scale a coefficient times a number <= 1, one exp per element. The
    target's entry keeps -own s (1 - p_c) = -own exp(log(s (1 - p_c))), never p_c - 1:
        g_c = -own exp(log(s (1 - p_c))) + extra p_c - per_class w_c."""
    if HAS_SMOOTHING or HAS_ZLOSS:
        own, extra, per_class = _extra_terms(r, go_s, lse, smooth_own, smooth_class, z_loss, w_tot, HAS_SMOOTHING,
                                             HAS_ZLOSS)
        m = tl.maximum(log_s, 0.0)
        off = m - lse
        scale = own * tl.exp(log_s - m) + extra * tl.exp(-m)
        g_c = -own * tl.exp(log_gc) + extra * tl.exp(x_c - lse) - per_class * w_c
    else:
        per_class = tl.zeros_like(r)
        off = log_s - lse
        scale = r
        g_c = -tl.exp(log_gc) * r
    return off, scale, per_class, g_c


@triton.jit
def _minus_per_class(g, per_class, W, cols, n_cols, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr):
    """A gradient tile minus label smoothing's per-class term per_class w_j (w = 1 without
    weight); g itself without smoothing."""
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            w_j = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(g.dtype)
            g = g - per_class[:, None] * w_j[None, :]
        else:
            g = g - per_class[:, None]
    return g


@triton.jit
def _finish_grad_tile(g, mask, slope, keep, SOFTCAP: tl.constexpr):
    """A gradient tile times the soft cap's slope, zero off the rows that count (keep) and the
    columns in range (mask): a where, not a product with r = 0, since an ignored row's tile may
    hold -inf (or NaN) logits."""
    if SOFTCAP:
        g = g * slope
    return tl.where(keep[:, None] & mask, g, 0.0)


@triton.jit
def _target_grad_tile(x, mask, slope, cols, tc, n_cols, off, scale, per_class, g_c, W, keep,
                      HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, SOFTCAP: tl.constexpr):
    """Gradient of one tile (float32) from the row coefficients of :func:`_target_grad_coefs`:
    g_j = exp(x_j + off) scale - per_class w_j, g_c at the target; with SOFTCAP, x is the
    capped tile and the gradient w.r.t. the raw logits is that times the cap's slope."""
    is_c = cols[None, :] == tc[:, None]
    g = _minus_per_class(tl.exp(x + off[:, None]) * scale[:, None], per_class, W, cols, n_cols, HAS_WEIGHT,
                         HAS_SMOOTHING)
    return _finish_grad_tile(tl.where(is_c, g_c[:, None], g), mask, slope, keep, SOFTCAP)


@triton.jit
def _smoothing_sums(x, mask, cols, n_cols, W, HAS_WEIGHT: tl.constexpr):
    """Per row: sum_k w_k x_k and W = sum_k w_k over this tile (w = 1 without weight)."""
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(x.dtype)
        return tl.sum(tl.where(mask, x * w[None, :], 0.0), 1), tl.sum(w, 0)
    else:
        return tl.sum(tl.where(mask, x, 0.0), 1), tl.sum((cols < n_cols).to(x.dtype), 0)


@triton.jit
def _add_smoothing_sums(sum_wx, w_tot, x, mask, cols, n_cols, W, HAS_WEIGHT: tl.constexpr,
                        HAS_SMOOTHING: tl.constexpr):
    """A statistics pass's running smoothing sums (sum_k w_k x_k, W) plus this tile's
    (:func:`_smoothing_sums`); unchanged without label smoothing."""
    if HAS_SMOOTHING:
        a_wx, a_w = _smoothing_sums(x, mask, cols, n_cols, W, HAS_WEIGHT)
        sum_wx += a_wx
        w_tot += a_w
    return sum_wx, w_tot


@triton.jit
def _no_tile(BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """The (x, mask, slope) a streamed statistics pass returns in place of the on-chip tile:
    a placeholder that no one reads."""
    x = tl.zeros([BLOCK_N, BLOCK_C], ACC)
    return x, x != 0.0, 1.0


@triton.jit
def _weight_total(W, n_cols, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """W = sum_k w_k (C without weights), per row, for a backward that does not read the
    whole row in a statistics pass."""
    w_tot = tl.zeros([BLOCK_N], ACC)
    if HAS_WEIGHT:
        for start in range(0, n_cols, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C)
            w_tot += tl.sum(tl.load(W + cols, mask=cols < n_cols, other=0.0).to(ACC), 0)
    else:
        w_tot += n_cols
    return w_tot


@triton.jit
def _excluded(cols, ta, tb, TWO_TARGETS: tl.constexpr):
    """The lanes a statistics pass leaves out: the target's (k == c), and with TWO_TARGETS also
    mixup's second target's (k == b; two_targets/kernels.py)."""
    out = cols[None, :] == ta[:, None]
    if TWO_TARGETS:
        out = out | (cols[None, :] == tb[:, None])
    return out


@triton.jit
def _stats_update(M, Wi, m, s, x, cols, start, ta, tb, TWO_TARGETS: tl.constexpr, ARGMAX: tl.constexpr):
    """A statistics pass's update by one tile. ARGMAX (bce): :func:`_argmax_update` of the max M,
    its column Wi and (m, s) over k != Wi; else :func:`_online_update` of (m, s) over the classes
    that are not targets (:func:`_excluded`), M and Wi passed through."""
    if ARGMAX:
        M, Wi, m, s = _argmax_update(M, Wi, m, s, x, cols, start)
    else:
        m, s = _online_update(m, s, x, _excluded(cols, ta, tb, TWO_TARGETS))
    return M, Wi, m, s


@triton.jit
def _stats_pass(X, row_off, row_ok, n_cols, ta, tb, W, softcap, softcap_k, EVICT: tl.constexpr,
                HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, SOFTCAP: tl.constexpr, SINGLE: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, NUM_STAGES: tl.constexpr, TWO_TARGETS: tl.constexpr,
                ARGMAX: tl.constexpr):
    """Pass 1 of either family: the running statistics of :func:`_stats_update` (the target-only
    family's online log-sum-exp, or with ARGMAX bce's arg-max and log-sum-exp over k != w) and
    the sums for label smoothing; returns (M, Wi, m, s, sum_wx, w_tot, x, mask, slope). SINGLE:
    the row is one tile, loaded evict_first and returned (x, mask, slope) to stay in registers
    for the gradient; else column blocks loaded with EVICT (the tile returned is a placeholder
    that no one reads, :func:`_no_tile`)."""
    cols0 = tl.arange(0, BLOCK_C)
    M = tl.full([BLOCK_N], float("-inf"), ACC)
    Wi = tl.zeros([BLOCK_N], tl.int32)
    m = tl.full([BLOCK_N], float("-inf"), ACC)
    s = tl.zeros([BLOCK_N], ACC)
    sum_wx = tl.zeros([BLOCK_N], ACC)
    w_tot = tl.zeros([BLOCK_N], ACC)
    if SINGLE:
        x, mask, slope = _load_tile(X, row_off, row_ok, cols0, n_cols, softcap, softcap_k, ACC, "evict_first", SOFTCAP)
        M, Wi, m, s = _stats_update(M, Wi, m, s, x, cols0, 0, ta, tb, TWO_TARGETS, ARGMAX)
        sum_wx, w_tot = _add_smoothing_sums(sum_wx, w_tot, x, mask, cols0, n_cols, W, HAS_WEIGHT, HAS_SMOOTHING)
    else:
        for start in tl.range(0, n_cols, BLOCK_C, num_stages=NUM_STAGES):
            cols = start + cols0
            xb, maskb, _ = _load_tile(X, row_off, row_ok, cols, n_cols, softcap, softcap_k, ACC, EVICT, SOFTCAP)
            M, Wi, m, s = _stats_update(M, Wi, m, s, xb, cols, start, ta, tb, TWO_TARGETS, ARGMAX)
            sum_wx, w_tot = _add_smoothing_sums(sum_wx, w_tot, xb, maskb, cols, n_cols, W, HAS_WEIGHT, HAS_SMOOTHING)
        x, mask, slope = _no_tile(BLOCK_N, BLOCK_C)
    return M, Wi, m, s, sum_wx, w_tot, x, mask, slope


@triton.jit
def _targets_grad_tile(x, mask, slope, cols, n_cols, off, scale, per_class, W, keep, ta, g_a, tb, g_b,
                       HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, SOFTCAP: tl.constexpr,
                       TWO_TARGETS: tl.constexpr):
    """:func:`_target_grad_tile` with target a's entry g_a, and with TWO_TARGETS b's entry g_b
    placed too (times the cap's slope)."""
    g = _target_grad_tile(x, mask, slope, cols, ta, n_cols, off, scale, per_class, g_a, W, keep, HAS_WEIGHT,
                          HAS_SMOOTHING, SOFTCAP)
    if TWO_TARGETS:
        gb = tl.zeros_like(g) + g_b[:, None]
        if SOFTCAP:
            gb = gb * slope
        g = tl.where((cols[None, :] == tb[:, None]) & keep[:, None] & mask, gb, g)
    return g


@triton.jit
def _store_grad(X, row_off, row_ok, n_cols, softcap, softcap_k, G, stride_g, rows, x, mask, slope, off, scale,
                per_class, W, keep, ta, g_a, tb, g_b, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                SOFTCAP: tl.constexpr, SINGLE: tl.constexpr, BLOCK_C: tl.constexpr, NUM_STAGES: tl.constexpr,
                ROW_ALIGN: tl.constexpr, TWO_TARGETS: tl.constexpr):
    """Write the target-only gradient of the rows (:func:`_targets_grad_tile`) to G's rows (stride
    stride_g, ROW_ALIGN's hint): SINGLE from the tile (x, mask, slope) kept in registers since
    pass 1; else a pass over the row in reverse block order (the blocks pass 1 read last are the
    L2-warm ones), the stores evict_first."""
    g_off = tl.multiple_of(rows.to(tl.int64) * stride_g, ROW_ALIGN)
    cols0 = tl.arange(0, BLOCK_C)
    if SINGLE:
        g = _targets_grad_tile(x, mask, slope, cols0, n_cols, off, scale, per_class, W, keep, ta, g_a, tb, g_b,
                               HAS_WEIGHT, HAS_SMOOTHING, SOFTCAP, TWO_TARGETS)
        tl.store(G + g_off[:, None] + cols0[None, :], g.to(G.dtype.element_ty), mask=mask,
                 eviction_policy="evict_first")
    else:
        nb = tl.cdiv(n_cols, BLOCK_C)
        for i in tl.range(0, nb, num_stages=NUM_STAGES):
            cols = (nb - 1 - i) * BLOCK_C + cols0       # reverse: L2-warm blocks first
            xb, maskb, slb = _load_tile(X, row_off, row_ok, cols, n_cols, softcap, softcap_k, ACC, "evict_first",
                                        SOFTCAP)
            g = _targets_grad_tile(xb, maskb, slb, cols, n_cols, off, scale, per_class, W, keep, ta, g_a, tb, g_b,
                                   HAS_WEIGHT, HAS_SMOOTHING, SOFTCAP, TWO_TARGETS)
            tl.store(G + g_off[:, None] + cols[None, :], g.to(G.dtype.element_ty), mask=maskb,
                     eviction_policy="evict_first")


@triton.jit
def _row_loss(h, w_c, lse, w_tot, sum_wx, smooth_own, smooth_class, z_loss, keep, bad,
              HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr):
    """Row loss of any variant from its own unweighted term h (losses.h, row_loss):
        (1 - eps) w_c h + w_c z lse^2 + (eps / C) (W lse - sum_k w_k x_k),
    0 on ignored rows, NaN on bad ones (selects, not products: an ignored row may read a
    -inf logit). smooth_own = 1 - eps, smooth_class = eps / C."""
    if HAS_SMOOTHING:
        lrow = smooth_own * w_c * h
    else:
        lrow = h * w_c
    if HAS_ZLOSS:
        lrow = lrow + w_c * (z_loss * lse * lse)
    if HAS_SMOOTHING:
        lrow = lrow + smooth_class * (w_tot * lse - sum_wx)
    lrow = tl.where(keep, lrow, 0.0)
    return tl.where(bad, float("nan"), lrow)


# ----------------------------------------------------------------------------
# bce: L = -log p_c - sum_{k != c} log(1 - p_k)   (docs/losses.md, "bce")
# Only the arg-max w can have p_w > 1/2, so the online pass tracks w, its logit M and
# the log-sum-exp over k != w (its own running max M2 and sum S2: exact when w leads
# by 1000). Then log(1 - p_w) = lse_ow - lse exactly, and log1p(-p_k) is exact for
# every k != w. lse_ex (over k != c) is lse_ow when c == w; when c != w, p_c <= 1/2
# and log(1 - p_c) = log1p(-p_c) has no cancellation, so lse_ex = lse + log1p(-p_c)
# is exact to an ulp without a third running sum.
# Stats columns: 0 lse, 1 lse_ex, 2 log(1 - p_w), 3 w (an exact integer in float),
# as in reference.py, so either backend's backward reads the other's stats.
# ----------------------------------------------------------------------------

@triton.jit
def _argmax_update(M, Wi, M2, S2, x, cols, start):
    """Merge a column block into (max M, first arg-max Wi, log-sum-exp (M2, S2) over k != Wi)."""
    bm, bi = tl.max(x, 1, return_indices=True, return_indices_tie_break_left=True)
    bi = tl.where(bm == float("-inf"), 0, bi)  # a fully masked block: any index, it never wins
    is_bi = cols[None, :] == (bi + start)[:, None]
    xo = tl.where(is_bi, float("-inf"), x)
    bm2 = tl.max(xo, 1)
    bs2 = tl.sum(tl.exp(xo - _safe_shift(bm2)[:, None]), 1)
    # Strictly greater: an earlier column keeps the arg-max on ties (torch.argmax's choice).
    new_max = bm > M
    cm = tl.where(new_max, M, bm)     # the one of {old max, block max} that joins the others
    mm = tl.maximum(tl.maximum(M2, bm2), cm)
    sh = _safe_shift(mm)
    S2 = S2 * tl.exp(M2 - sh) + bs2 * tl.exp(bm2 - sh) + tl.exp(cm - sh)
    Wi = tl.where(new_max, (bi + start).to(tl.int32), Wi)
    M = tl.where(new_max, bm, M)
    return M, Wi, mm, S2


@triton.jit
def _bce_stats_pass(X, row_off, row_ok, n_cols, W, softcap, softcap_k, HAS_WEIGHT: tl.constexpr,
                    HAS_SMOOTHING: tl.constexpr, SOFTCAP: tl.constexpr, SINGLE: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_C: tl.constexpr, NUM_STAGES: tl.constexpr):
    """bce's pass 1 (one target or mixup's two, two_targets/kernels.py; :func:`_stats_pass` with ARGMAX,
    streamed blocks loaded evict_last: the later passes re-read them): the arg-max logit M and its
    column Wi, lse_{k != w}, lse (so log(1 - p_w) = lse_{k != w} - lse, log p_w = M - lse), the
    smoothing sums and the tile (x, mask, slope)."""
    M, Wi, M2, S2, sum_wx, w_tot, x, mask, slope = _stats_pass(
        X, row_off, row_ok, n_cols, None, None, W, softcap, softcap_k, "evict_last", HAS_WEIGHT,
        HAS_SMOOTHING, SOFTCAP, SINGLE, BLOCK_N, BLOCK_C, NUM_STAGES, False, True)
    lse_ow = _safe_shift(M2) + tl.log(S2)
    return M, Wi, lse_ow, _logaddexp(M, lse_ow), sum_wx, w_tot, x, mask, slope


@triton.jit
def _bce_sums(x, mask, cols, tc, Wi, lse, log1m_pw):
    """Per row over this tile: sum_{k != c} log(1 - p_k) and R = sum_{k != w} a_k with
    a_k = p_k / (1 - p_k) (k != c), a_c = -1. Every k != w has p_k <= 1/2: exact."""
    p = tl.exp(x - lse[:, None])
    is_c = cols[None, :] == tc[:, None]
    is_w = cols[None, :] == Wi[:, None]
    l1m = tl.where(is_w, log1m_pw[:, None], _log1p(-p))
    l1m = tl.where(is_c | (~mask), 0.0, l1m)
    a = tl.where(is_c, -1.0, p / (1.0 - p))
    a = tl.where(is_w | (~mask), 0.0, a)
    return tl.sum(l1m, 1), tl.sum(a, 1)


@triton.jit
def _bce_tile_sums(x, mask, cols, ta, tb, Wi, lse, log1m_pw, TWO_TARGETS: tl.constexpr):
    """:func:`_bce_sums` of a tile for target ta; with TWO_TARGETS (mixup, two_targets/kernels.py) over
    k not in {a, b}: b's lanes read as p = 0 (x = -inf) and, when w is b, the arg-max taken as a
    (a lane left out anyway). Then the first sum is over k not in {a, b} (w's log(1 - p_w) from
    log1m_pw) and the second is S = sum_{k not in {a, b, w}} a_k - [w not in {a, b}] (a_a = -1
    counts only where a is not the arg-max that _bce_sums sees)."""
    if TWO_TARGETS:
        x = tl.where(cols[None, :] == tb[:, None], float("-inf"), x)
        Wi = tl.where(Wi == tb, ta, Wi)
    return _bce_sums(x, mask, cols, ta, Wi, lse, log1m_pw)


@triton.jit
def _bce_sums_pass(X, row_off, row_ok, n_cols, softcap, softcap_k, x, mask, ta, tb, Wi, lse, log1m_pw,
                   EVICT: tl.constexpr, SOFTCAP: tl.constexpr, SINGLE: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_C: tl.constexpr, TWO_TARGETS: tl.constexpr):
    """bce's pass 2, the row's :func:`_bce_tile_sums`: from the on-chip tile (x, mask) with SINGLE,
    else over column blocks in reverse order (pass 1 read the last ones last: L2-warm) loaded
    with EVICT."""
    cols0 = tl.arange(0, BLOCK_C)
    if SINGLE:
        l1m, R = _bce_tile_sums(x, mask, cols0, ta, tb, Wi, lse, log1m_pw, TWO_TARGETS)
    else:
        l1m = tl.zeros([BLOCK_N], ACC)
        R = tl.zeros([BLOCK_N], ACC)
        nb = tl.cdiv(n_cols, BLOCK_C)
        for i in range(0, nb):
            cols = (nb - 1 - i) * BLOCK_C + cols0
            xb, maskb, _ = _load_tile(X, row_off, row_ok, cols, n_cols, softcap, softcap_k, ACC, EVICT, SOFTCAP)
            a_l, a_r = _bce_tile_sums(xb, maskb, cols, ta, tb, Wi, lse, log1m_pw, TWO_TARGETS)
            l1m += a_l
            R += a_r
    return l1m, R


@triton.jit
def _bce_saved_stats(STATS, X, row_off, rows, row_ok, n_cols, ta, tb, softcap, softcap_k, SOFTCAP: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, TWO_TARGETS: tl.constexpr):
    """A bce backward's row terms: lse, log(1 - p_w) and w (clamped to a column) from the saved
    stats, x_w (log p_w = x_w - lse), and the second sum of :func:`_bce_tile_sums` (R, or mixup's S) in a
    pass over the row whose blocks are loaded evict_last (the gradient pass reads them back in
    reverse order)."""
    lse = tl.load(STATS + rows.to(tl.int64) * 4, mask=row_ok, other=0.0).to(ACC)
    log1m_pw = tl.load(STATS + rows.to(tl.int64) * 4 + 2, mask=row_ok, other=0.0).to(ACC)
    Wi = tl.load(STATS + rows.to(tl.int64) * 4 + 3, mask=row_ok, other=0.0).to(tl.int32)
    Wi = tl.minimum(tl.maximum(Wi, 0), n_cols - 1)
    x_w = _capped(tl.load(X + row_off + Wi, mask=row_ok, other=0.0).to(ACC), softcap, softcap_k, SOFTCAP)
    cols0 = tl.arange(0, BLOCK_C)
    R = tl.zeros([BLOCK_N], ACC)
    for start in range(0, n_cols, BLOCK_C):
        cols = start + cols0
        xb, maskb, _ = _load_tile(X, row_off, row_ok, cols, n_cols, softcap, softcap_k, ACC, "evict_last", SOFTCAP)
        _, a_r = _bce_tile_sums(xb, maskb, cols, ta, tb, Wi, lse, log1m_pw, TWO_TARGETS)
        R += a_r
    return lse, log1m_pw, Wi, x_w, R


@triton.jit
def _bce_grad_tile(x, mask, slope, cols, n_cols, tc, Wi, lse, log1m_pw, log_pw, R, own, extra, per_class, W, keep,
                   HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr,
                   SOFTCAP: tl.constexpr):
    """g_j = a_j - p_j R - p_j a_w (j != w), g_w = p_w (1 - R) (w != c) or
    -(1 - p_c) - p_c R (w == c). a_w = p_w / (1 - p_w) overflows once a wrong class leads
    by 89 (fp32), so p_j a_w = exp(x_j - lse + log p_w - log(1 - p_w)); a_w = -1 if w == c.
    That is bce's own gradient, scaled by own = (1 - eps) r; label smoothing and z-loss add
    extra p_j - per_class w_j to every entry, w and c included (_extra_terms; p_j <= 1, so
    no log form is needed). With SOFTCAP, times the cap's slope."""
    w_is_c = Wi == tc
    p = tl.exp(x - lse[:, None])
    is_c = cols[None, :] == tc[:, None]
    is_w = cols[None, :] == Wi[:, None]
    a = tl.where(is_c, -1.0, p / (1.0 - p))
    log_aw = tl.where(w_is_c, 0.0, log_pw - log1m_pw)
    pa_w = tl.where(w_is_c[:, None], -p, tl.exp(x + (log_aw - lse)[:, None]))
    g = a - p * R[:, None] - pa_w
    p_w = tl.exp(log_pw)
    g_w = tl.where(w_is_c, -tl.exp(log1m_pw) - p_w * R, p_w * (1.0 - R))
    g = tl.where(is_w, g_w[:, None], g) * own[:, None]
    if HAS_SMOOTHING or HAS_ZLOSS:
        g = g + p * extra[:, None]
    g = _minus_per_class(g, per_class, W, cols, n_cols, HAS_WEIGHT, HAS_SMOOTHING)
    return _finish_grad_tile(g, mask, slope, keep, SOFTCAP)


@triton.jit
def _bce_grad_tiles(x, mask, slope, cols, n_cols, Wi, lse, log1m_pw, log_pw, ta, R_a, own_a, extra_a, pc_a, keep_a, tb,
                    R_b, own_b, extra_b, pc_b, keep_b, W, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                    HAS_ZLOSS: tl.constexpr, SOFTCAP: tl.constexpr, TWO_TARGETS: tl.constexpr):
    """:func:`_bce_grad_tile` of target a (R_a, its terms, keep_a) and, with TWO_TARGETS, plus that
    of mixup's target b (two_targets/kernels.py: the parts share lse, w and log(1 - p_w))."""
    g = _bce_grad_tile(x, mask, slope, cols, n_cols, ta, Wi, lse, log1m_pw, log_pw, R_a, own_a, extra_a, pc_a, W,
                       keep_a, HAS_WEIGHT, HAS_SMOOTHING, HAS_ZLOSS, SOFTCAP)
    if TWO_TARGETS:
        g += _bce_grad_tile(x, mask, slope, cols, n_cols, tb, Wi, lse, log1m_pw, log_pw, R_b, own_b, extra_b, pc_b, W,
                            keep_b, HAS_WEIGHT, HAS_SMOOTHING, HAS_ZLOSS, SOFTCAP)
    return g


@triton.jit
def _bce_store_grad(X, row_off, row_ok, n_cols, softcap, softcap_k, G, stride_g, rows, x, mask, slope, Wi, lse,
                    log1m_pw, log_pw, ta, R_a, own_a, extra_a, pc_a, keep_a, tb, R_b, own_b, extra_b, pc_b, keep_b, W,
                    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr,
                    SOFTCAP: tl.constexpr, SINGLE: tl.constexpr, BLOCK_C: tl.constexpr, NUM_STAGES: tl.constexpr,
                    ROW_ALIGN: tl.constexpr, TWO_TARGETS: tl.constexpr):
    """bce's gradient pass (:func:`_bce_grad_tiles`), written once to G's rows (stride stride_g):
    SINGLE from the tile (x, mask, slope) kept in registers; else over column blocks in forward
    order (pass 2 ended on the first ones: L2-warm), the loads and stores evict_first."""
    g_off = tl.multiple_of(rows.to(tl.int64) * stride_g, ROW_ALIGN)
    cols0 = tl.arange(0, BLOCK_C)
    if SINGLE:
        g = _bce_grad_tiles(x, mask, slope, cols0, n_cols, Wi, lse, log1m_pw, log_pw, ta, R_a, own_a, extra_a, pc_a,
                            keep_a, tb, R_b, own_b, extra_b, pc_b, keep_b, W, HAS_WEIGHT, HAS_SMOOTHING, HAS_ZLOSS,
                            SOFTCAP, TWO_TARGETS)
        tl.store(G + g_off[:, None] + cols0[None, :], g.to(G.dtype.element_ty), mask=mask,
                 eviction_policy="evict_first")
    else:
        for start in tl.range(0, n_cols, BLOCK_C, num_stages=NUM_STAGES):
            cols = start + cols0
            xb, maskb, slb = _load_tile(X, row_off, row_ok, cols, n_cols, softcap, softcap_k, ACC, "evict_first",
                                        SOFTCAP)
            g = _bce_grad_tiles(xb, maskb, slb, cols, n_cols, Wi, lse, log1m_pw, log_pw, ta, R_a, own_a, extra_a,
                                pc_a, keep_a, tb, R_b, own_b, extra_b, pc_b, keep_b, W, HAS_WEIGHT, HAS_SMOOTHING,
                                HAS_ZLOSS, SOFTCAP, TWO_TARGETS)
            tl.store(G + g_off[:, None] + cols[None, :], g.to(G.dtype.element_ty), mask=maskb,
                     eviction_policy="evict_first")


# ----------------------------------------------------------------------------
# Prologue and backward scale
# ----------------------------------------------------------------------------

@triton.jit
def prologue_kernel(T, W, DENOM, COUNTER, n_rows, n_cols, ignore_index, rows_per_program,
                    NEED_DENOM: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    """Zero the completion counter of the main kernel (program 0) and, for 'mean', write
    per-program partial denominators: the count of non-ignored rows, or the sum of their
    class weights (PyTorch's convention), over contiguous chunks of rows. O(N) bytes."""
    pid = tl.program_id(0)
    if pid == 0:
        tl.store(COUNTER, 0)
    if NEED_DENOM:
        acc = tl.zeros([BLOCK], tl.float32)
        base = pid.to(tl.int64) * rows_per_program
        for off in range(0, rows_per_program, BLOCK):
            local = off + tl.arange(0, BLOCK)
            rows = base + local
            ok = (rows < n_rows) & (local < rows_per_program)
            t = tl.load(T + rows, mask=ok, other=ignore_index).to(tl.int64)
            keep = (t != ignore_index) & ok
            if HAS_WEIGHT:
                tcl = tl.minimum(tl.maximum(tl.where(keep, t, 0), 0), n_cols - 1)
                acc += tl.where(keep, tl.load(W + tcl, mask=keep, other=0.0).to(tl.float32), 0.0)
            else:
                acc += keep.to(tl.float32)
        tl.store(DENOM + pid, tl.sum(acc, 0))


@triton.jit
def scale_grad_kernel(G, stride_g, GO, n_rows, n_cols, GO_PER_ROW: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Backward of a fused gradient: G *= grad_output, in place. grad_output is read on the
    device; rows whose grad_output is exactly 1 (the usual case: loss.backward()) are
    skipped, so the backward then costs O(N) bytes and no host synchronization."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    if GO_PER_ROW:
        go = tl.load(GO + rows, mask=row_ok, other=1.0).to(ACC)
    else:
        go = tl.full([BLOCK_N], 1.0, ACC) * tl.load(GO).to(ACC)
    # NaN != 1 too: a NaN grad_output propagates.
    if tl.max((go != 1.0).to(tl.int32), 0) > 0:
        g_off = rows * stride_g
        for start in range(0, n_cols, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C)
            mask = row_ok[:, None] & (cols < n_cols)[None, :]
            ptr = G + g_off[:, None] + cols[None, :]
            g = tl.load(ptr, mask=mask, other=0.0)
            tl.store(ptr, (g.to(ACC) * go[:, None]).to(g.dtype), mask=mask)
