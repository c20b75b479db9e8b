"""Label smoothing of the split losses other than ce: the expected loss under the uniform part of
the target, ``(eps / V) sum_k w_k L(x, k)`` (docs/losses.md; reference.expected_loss /
expected_grad, the single-process form), from the row's global numbers.

With ``m_k = (eps / V) w_k`` (the global ``V`` and weights), ``S = sum_k m_k``, ``S_w = S - m_w``
and the global arg-max ``w`` (the only class that can have ``p_k > 1/2``), the sum over classes is
a sum of per-class terms given the global ``lse``: each rank sums its slice but ``w``
(``sum_{k != w} m_k L(x, k)``, ``A_w = sum_{k != w} m_k s_k``, and for bce ``R_w = sum_{k != w} a_k``),
the sums ride in the loss's all-reduce SUM, and ``w``'s own term comes from ``log(1 - p_w)``
(``lse_{k != w} - lse``, bce's mechanism: never ``1 - p_w``). The gradient is elementwise on the
slice given those numbers (reference.expected_grad's formulas)."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .. import reference
from ..variants import Variant
from .plan import Plan, _Config
from .terms import _cap, _put, _zero

#: Columns of the smoothing sums in the loss's all-reduce (bce also sums R_w).
FWD, A_SUM, R_SUM = 0, 1, 2


class Global(NamedTuple):
    """The row's global numbers the expected term needs (compute dtype, ``(N,)``)."""
    lse: Tensor
    w: Tensor         # the global arg-max (int64)
    log1m_pw: Tensor  # log(1 - p_w) = lse_{k != w} - lse
    x_w: Tensor       # the (capped) logit at w


def expected(cfg: _Config) -> bool:
    """Whether this call adds the expected-loss smoothing term (label smoothing, a loss other than ce)."""
    return cfg.label_smoothing > 0 and cfg.variant != Variant.CE


def n_sums(cfg: _Config, need_grad: bool) -> int:
    if not need_grad:
        return 1
    return 3 if cfg.variant == Variant.BCE else 2


def argmax_of_gathered(m_all: Tensor, idx_all: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """From each rank's local max ``m_all`` and its global index ``idx_all`` (``(P, N)``): the global
    max ``x_w``, the arg-max ``w`` (the lowest index among ties; int64) and which rank holds it."""
    x_w = m_all.max(0).values
    cand = m_all == x_w[None]
    w_f = torch.where(cand, idx_all, torch.full_like(idx_all, math.inf)).min(0).values
    holds_w = cand & (idx_all == w_f[None])
    w = torch.where(torch.isfinite(w_f), w_f, torch.zeros_like(w_f)).long()  # a NaN row: any index
    return x_w, w, holds_w


def local_argmax_cols(x: Tensor, cap: float, class_start: int, cdtype) -> list[Tensor]:
    """This rank's ``[local max, its global index, local lse, log sum_{local k != arg-max} exp(x_k)]``
    of the (capped) slice, for the all-gather that gives the global ``w`` and ``log(1 - p_w)``."""
    n, vl = x.shape
    out = torch.empty((4, n), dtype=cdtype, device=x.device)
    for s, e in _row_blocks(n, vl, cdtype):  # bounded memory: one capped block at a time
        xc = _cap(x[s:e].to(cdtype), cap)
        k = xc.argmax(1)
        out[0, s:e] = xc.gather(1, k[:, None])[:, 0]
        out[1, s:e] = (k + class_start).to(cdtype)
        out[2, s:e] = torch.logsumexp(xc, 1)
        out[3, s:e] = reference.lse_excluding(xc, k, cdtype)
    return list(out)


def _mass(weight: Tensor | None, plan: Plan, cs: int, vl: int, cfg: _Config, cdtype, device):
    """``m_k`` on the slice (a ``(1, V_local)`` row, or a scalar without weights), ``S``."""
    scale = cfg.label_smoothing / plan.num_classes
    if weight is None:
        return torch.full((), scale, dtype=cdtype, device=device), scale * plan.num_classes
    return (weight[cs:cs + vl].to(cdtype) * scale)[None, :], weight.to(cdtype).sum() * scale


def _m_w(g: Global, weight: Tensor | None, plan: Plan, cfg: _Config, cdtype) -> Tensor:
    scale = cfg.label_smoothing / plan.num_classes
    if weight is None:
        return torch.full_like(g.lse, scale)
    return weight.to(cdtype)[g.w.clamp(0, plan.num_classes - 1)] * scale


def _masked(m: Tensor, v: Tensor) -> Tensor:
    """``m * v`` with ``0 * inf = 0`` (reference._masked_product)."""
    return torch.where(m == 0, torch.zeros_like(v), m * v)


def _row_blocks(n: int, vl: int, cdtype):
    from ..head import _blocks, default_chunk_rows
    return _blocks(n, default_chunk_rows(n, vl, torch.finfo(cdtype).bits // 8))


def _slice_terms(xc: Tensor, lse: Tensor, w_loc: Tensor, holds_w: Tensor, cfg: _Config):
    """Per entry of a block of the capped slice: ``log p_k``, ``p_k`` and ``d_k = log(1 - p_k) - log p_k``
    with ``p_w`` zeroed (its terms come from ``log(1 - p_w)``, never from ``p_w``)."""
    lp = xc - lse[:, None]
    p = lp.exp()
    _put(p, w_loc, holds_w, 0.0)
    d = torch.log1p(-p) - lp
    return lp, p, d


def partial_sums(x: Tensor, g: Global, keep: Tensor, weight, plan: Plan, cfg: _Config, need_grad: bool) -> Tensor:
    """``(n_sums, N)``: this rank's ``sum_{k != w}`` of the row's expected term, and of ``m_k s_k`` (and
    bce's ``a_k``) for the gradient; 0 on ignored rows. To be all-reduced (SUM) over the ranks."""
    n, vl = x.shape
    cs, cap, cdtype = plan.class_start, cfg.softcap, g.lse.dtype
    m, s_tot = _mass(weight, plan, cs, vl, cfg, cdtype, x.device)
    w_loc = g.w - cs
    holds_w = keep & (w_loc >= 0) & (w_loc < vl)
    lse = torch.where(keep, g.lse, _zero(cdtype, x.device))
    out = torch.zeros((n_sums(cfg, need_grad), n), dtype=cdtype, device=x.device)
    params = reference.Params(cfg.alpha, cfg.beta, cfg.gamma)
    for s, e in _row_blocks(n, vl, cdtype):
        xc = _cap(x[s:e].to(cdtype), cap)
        lp, p, d = _slice_terms(xc, lse[s:e], w_loc[s:e], holds_w[s:e], cfg)
        del lp
        if cfg.variant == Variant.BCE:
            a = p / (1 - p)                                # 0 at w
            l1m = torch.log1p(-p)                          # 0 at w
            terms = [_masked(m, reference.softplus(d)) + (m - s_tot) * l1m]
            if need_grad:
                terms += [_masked(m, a + 1), a]
        else:
            h, log_s = reference.TARGET_ONLY_MATH[Variant(cfg.variant)](d, params)
            terms = [_masked(m, h)] + ([_masked(m, log_s.exp())] if need_grad else [])
        for i, t in enumerate(terms):
            t = t.expand(e - s, vl).clone() if t.shape != (e - s, vl) else t
            _put(t, w_loc[s:e], holds_w[s:e], 0.0)         # k != w
            out[i, s:e] = t.sum(1)
    return torch.where(keep[None, :], out, _zero(cdtype, x.device))


def _w_numbers(g: Global):
    """``d_w = lse_{k != w} - x_w`` and ``log p_w = -softplus(d_w)``."""
    d_w = g.log1m_pw + g.lse - g.x_w
    return d_w, -reference.softplus(d_w)


def row_term(g: Global, sums: Tensor, keep: Tensor, weight, plan: Plan, cfg: _Config) -> Tensor:
    """The row's expected term from the all-reduced ``sums``: ``sums[FWD]`` plus ``w``'s own term
    (from ``log(1 - p_w)``); 0 on ignored rows."""
    cdtype = g.lse.dtype
    zero = _zero(cdtype, g.lse.device)
    m_w = _m_w(g, weight, plan, cfg, cdtype)
    d_w, _ = _w_numbers(g)
    if cfg.variant == Variant.BCE:
        s_tot = _mass(weight, plan, 0, 0, cfg, cdtype, g.lse.device)[1]
        s_w = s_tot - m_w
        w_term = _masked(m_w, reference.softplus(d_w)) + torch.where(s_w == 0, zero, -s_w * g.log1m_pw)
    else:
        h_w, _ = reference.TARGET_ONLY_MATH[Variant(cfg.variant)](d_w, reference.Params(cfg.alpha, cfg.beta,
                                                                                          cfg.gamma))
        w_term = _masked(m_w, h_w)
    return torch.where(keep, sums[FWD] + w_term, zero)


def add_grad(g_out: Tensor | None, x: Tensor, g: Global, sums: Tensor, go: Tensor, rs: Tensor, keep: Tensor,
             weight, plan: Plan, cfg: _Config, add_z: bool = True) -> Tensor:
    """A kernel's gradient ``g_out`` run without label smoothing (None: eps = 1 left the kernel out),
    plus ``go`` times the expected term's gradient (reference.expected_grad's formulas on the slice,
    given the global numbers; and z-loss's ``2 z lse w_c go p_j`` when eps = 1 and ``add_z``), one block of rows
    at a time; 0 on ignored rows."""
    n, vl = x.shape
    cs, cap, z, eps = plan.class_start, cfg.softcap, cfg.z_loss, cfg.label_smoothing
    cdtype = g.lse.dtype
    zero = _zero(cdtype, x.device)
    m, s_tot = _mass(weight, plan, cs, vl, cfg, cdtype, x.device)
    m_w = _m_w(g, weight, plan, cfg, cdtype)
    w_loc = g.w - cs
    holds_w = keep & (w_loc >= 0) & (w_loc < vl)
    lse = torch.where(keep, g.lse, zero)
    log1m_pw = torch.where(keep, g.log1m_pw, zero)
    d_w, log_pw = _w_numbers(g)
    p_w = log_pw.exp()
    a_sum = sums[A_SUM]
    params = reference.Params(cfg.alpha, cfg.beta, cfg.gamma)
    if cfg.variant == Variant.BCE:
        s_w = s_tot - m_w
        r_w = sums[R_SUM]
        coef = a_sum - s_tot * r_w + s_tot
        col_w = p_w * (a_sum - s_tot * r_w) + s_w - s_tot * log1m_pw.exp()
    else:
        _, log_s_w = reference.TARGET_ONLY_MATH[Variant(cfg.variant)](d_w, params)
        col_w = p_w * a_sum - _masked(m_w, torch.exp(log_s_w + log1m_pw))
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    for s, e in _row_blocks(n, vl, cdtype):
        xc = _cap(x[s:e].to(cdtype), cap)
        lp, p, d = _slice_terms(xc, lse[s:e], w_loc[s:e], holds_w[s:e], cfg)
        if cfg.variant == Variant.BCE:
            a = p / (1 - p)
            # j != w: p_j (A_w - S R_w + S) - S_w p_j / (1 - p_w) - m_j s_j + S a_j
            ratio = torch.exp(lp - log1m_pw[s:e, None])
            sw = s_w[s:e, None]
            gb = (p * coef[s:e, None] - torch.where(sw == 0, torch.zeros_like(ratio), ratio * sw)
                  - _masked(m, a + 1) + s_tot * a)
        else:
            _, log_s = reference.TARGET_ONLY_MATH[Variant(cfg.variant)](d, params)
            # j != w: p_j A_w + m_w p_j s_w - m_j s_j (p_j s_w as exp(log p_j + log s_w))
            big = torch.exp(lp + log_s_w[s:e, None])
            mw = m_w[s:e, None]
            gb = p * a_sum[s:e, None] + torch.where(mw == 0, torch.zeros_like(big), big * mw) - _masked(m, log_s.exp())
        _put(gb, w_loc[s:e], holds_w[s:e], col_w[s:e])
        gb.mul_(go[s:e, None])
        if add_z and eps >= 1 and z:  # the kernel did not run: z-loss's term here
            gb.add_(lp.exp().mul_((2 * z * lse[s:e] * rs[s:e])[:, None]))
        if cap:
            gb.mul_(reference.softcap_slope(x[s:e], cap, cdtype))
        if g_out is not None:
            gb.add_(g_out[s:e].to(cdtype))
        out[s:e] = gb.masked_fill_(~keep[s:e, None], 0.0)
    return out
