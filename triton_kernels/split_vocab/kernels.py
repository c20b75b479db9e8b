"""Triton kernels of bce on a vocabulary-parallel row given its global numbers: the Triton twins
of the C++ CPU ops ``ext_bce_partial`` / ``ext_bce_global_bwd`` (csrc/cpu/ops_cpu_bce_parallel.cpp;
the op contract is in ``fusedloss.ops``, above ``BCE_PARTIAL_SCHEMA``; the caller is
``fusedloss.parallel``'s bce, docs/parallel.md "bce: a second round").

Each kernel takes a rank's slice of the logits (rows of any stride, unit class stride), the rows'
global ``stats`` (N, 4) float32 (lse, R, log(1 - p_w), x_w) and ``slice_idx`` (N, 3) int64 (local
c, local w, -1 where on another rank; w == c globally: 1 / 0, -1 an ignored row). A program takes
BLOCK_N rows and streams them in BLOCK_C column tiles (a masked ragged tail); an ignored row
reads no logit and writes zeros.

The math is rows.py's, reused as is:

* ``bce_partial_kernel``: :func:`rows._bce_tile_sums` with TWO_TARGETS, targets (c, w): w's
  lanes read as p = 0 and the arg-max taken as c, so both sums run over the slice's k not in
  {c, w}: sum log(1 - p_k) and sum a_k (the caller adds a_c = -1 and log(1 - p_w) itself);
* ``bce_global_bwd_kernel``: :func:`rows._bce_grad_tile` with the global lse, R,
  log(1 - p_w), log p_w = x_w - lse, own = grad_rows and z-loss's extra = 2 z lse own
  (:func:`rows._extra_terms`); c and w as local columns, or negative codes that match no
  column: the target elsewhere -1, the arg-max elsewhere -1 when w == c (so that the tile sees
  w == c) and -2 when not.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..rows import ACC, _bce_grad_tile, _bce_tile_sums, _extra_terms, _load_tile


@triton.jit
def _slice_rows(pid, IDX, n_rows, n_cols, BLOCK_N: tl.constexpr):
    """This program's rows, whether each is in range, the local target c and arg-max w as int32
    codes (-1: on another rank; -2: an arg-max elsewhere that is not the target), w == c (kind 1)
    and whether the row counts (kind >= 0). Indices out of [-1, C) (never checked on a GPU) are
    clamped: they only ever meet column indices, never address memory."""
    rows = (tl.zeros([BLOCK_N], tl.int32) + pid) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < n_rows
    base = IDX + rows.to(tl.int64) * 3
    c = tl.load(base, mask=row_in, other=-1)
    w = tl.load(base + 1, mask=row_in, other=-1)
    kind = tl.load(base + 2, mask=row_in, other=-1)
    c = tl.minimum(tl.maximum(c, -1), n_cols).to(tl.int32)
    w = tl.minimum(tl.maximum(w, -1), n_cols).to(tl.int32)
    keep = row_in & (kind >= 0)
    w = tl.where(w >= 0, w, tl.where(kind == 1, c, -2))
    return rows, row_in, keep, c, w


@triton.jit
def bce_partial_kernel(
    X, stride_x, STATS, IDX, OUT, n_rows, n_cols, softcap, softcap_k,
    SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ROW_ALIGN: tl.constexpr,
):
    """OUT (N, 2) float32: per row, over the slice's k not in {c, w}, sum log(1 - p_k) and sum a_k,
    p_k = exp(x_k - lse) of the (capped) logits with the global lse; zeros on an ignored row."""
    rows, row_in, keep, c, w = _slice_rows(tl.program_id(0), IDX, n_rows, n_cols, BLOCK_N)
    lse = tl.load(STATS + rows.to(tl.int64) * 4, mask=keep, other=0.0).to(ACC)
    # ROW_ALIGN divides the row stride and C (launch.row_align): vectorized loads.
    n_cols = (n_cols // ROW_ALIGN) * ROW_ALIGN
    row_off = tl.multiple_of(rows.to(tl.int64) * stride_x, ROW_ALIGN)
    cols0 = tl.arange(0, BLOCK_C)
    unused = tl.zeros([BLOCK_N], ACC)  # log(1 - p_w): w's lanes are left out (the arg-max read as c)
    l1m = tl.zeros([BLOCK_N], ACC)
    odds = tl.zeros([BLOCK_N], ACC)
    for start in range(0, n_cols, BLOCK_C):
        cols = start + cols0
        xb, maskb, _ = _load_tile(X, row_off, keep, cols, n_cols, softcap, softcap_k, ACC, "evict_first", SOFTCAP)
        s_l, s_a = _bce_tile_sums(xb, maskb, cols, c, w, w, lse, unused, True)
        l1m += s_l
        odds += s_a
    out = OUT + rows.to(tl.int64) * 2
    tl.store(out, tl.where(keep, l1m, 0.0), mask=row_in)
    tl.store(out + 1, tl.where(keep, odds, 0.0), mask=row_in)


@triton.jit
def bce_global_bwd_kernel(
    GO, X, stride_x, STATS, IDX, G, stride_g, n_rows, n_cols, z_loss, softcap, softcap_k,
    HAS_ZLOSS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
):
    """G (N, C) in the logits' dtype: grad_rows times bce's gradient given the global lse, R,
    log(1 - p_w) and x_w, plus z-loss's 2 z lse grad_rows p_j, times the cap's slope with SOFTCAP;
    zeros on an ignored row."""
    rows, row_in, keep, c, w = _slice_rows(tl.program_id(0), IDX, n_rows, n_cols, BLOCK_N)
    st = STATS + rows.to(tl.int64) * 4
    lse = tl.load(st, mask=keep, other=0.0).to(ACC)
    R = tl.load(st + 1, mask=keep, other=0.0).to(ACC)
    log1m_pw = tl.load(st + 2, mask=keep, other=0.0).to(ACC)
    x_w = tl.load(st + 3, mask=keep, other=0.0).to(ACC)
    go = tl.load(GO + rows, mask=keep, other=0.0).to(ACC)
    zero = tl.zeros([BLOCK_N], ACC)
    own, extra, per_class = _extra_terms(go, go, lse, 1.0, 0.0, z_loss, zero, False, HAS_ZLOSS)
    n_cols = (n_cols // ROW_ALIGN) * ROW_ALIGN
    row_off = tl.multiple_of(rows.to(tl.int64) * stride_x, ROW_ALIGN)
    g_off = tl.multiple_of(rows.to(tl.int64) * stride_g, ROW_ALIGN)
    cols0 = tl.arange(0, BLOCK_C)
    for start in range(0, n_cols, BLOCK_C):
        cols = start + cols0
        xb, maskb, slb = _load_tile(X, row_off, keep, cols, n_cols, softcap, softcap_k, ACC, "evict_first", SOFTCAP)
        g = _bce_grad_tile(xb, maskb, slb, cols, n_cols, c, w, lse, log1m_pw, x_w - lse, R, own, extra, per_class,
                           GO, keep, False, False, HAS_ZLOSS, SOFTCAP)
        out_mask = row_in[:, None] & (cols < n_cols)[None, :]  # ignored rows too: their zeros
        tl.store(G + g_off[:, None] + cols[None, :], g.to(G.dtype.element_ty), mask=out_mask,
                 eviction_policy="evict_first")
