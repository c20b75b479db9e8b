"""bce's split rounds: round one, each rank's bce forward kernel and one all-gather (the global
arg-max ``w`` and three log-sum-exps); round two, each rank's sums over its classes but ``c`` and ``w``
and one all-reduce SUM; the gradient, local from the global numbers. By the backend's ops given those
numbers where it has them, else by the reference's per-element functions in blocks of rows."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import ops, reference
from ..head import _blocks, default_chunk_rows
from ..variants import Reduction, Variant
from . import smoothing
from .plan import LOCAL_IGNORE, Plan, _Config
from .terms import (_add_smoothing, _cap, _class_weight_of, _local_target, _owner, _p_and_class_terms, _put,
                    _weight_total, _weighted_x_sum, _zero)


class _BceState(NamedTuple):
    t: Tensor          # global targets
    w: Tensor          # the global arg-max (int64)
    stats: Tensor      # (N, 4): lse, R = sum_{k != w} a_k, log(1 - p_w), x_w (capped)
    slice_idx: Tensor  # (N, 3) int64: local c, local w (-1: elsewhere), w == c (1, 0; -1: ignored row)
    sm: Tensor         # (N, 3) label smoothing's summed terms (smoothing.partial_sums); (N, 0) without it


def _bce_kernels(be) -> ops.SplitVocabOps | None:
    """The backend's bce ops given global numbers (ops.BCE_PARTIAL_SCHEMA), or None."""
    return be.family(ops.SplitVocabOps)


def _row_blocks(x: Tensor, cdtype):
    """Blocks of rows for the elementwise passes over the slice: two compute-dtype buffers per block,
    at most ``head.default_chunk_rows`` of them (bounded memory whatever N)."""
    n, vl = x.shape
    return _blocks(n, default_chunk_rows(n, vl, torch.finfo(cdtype).bits // 8))


def _bce_rows(x, t, keep, weight, plan: Plan, be, cfg: _Config, group, need_grad: bool):
    n, vl = x.shape
    cs = plan.class_start
    cdtype = reference.compute_dtype(x)
    cap = cfg.softcap
    zero = _zero(cdtype, x.device)
    owner = _owner(t, keep, cs, vl)
    local_t = _local_target(t, keep, owner, cs)
    # Round one, local: the bce forward kernel on the slice. Its stats: the local lse, lse_ex of the
    # local target, log(1 - p_w) of the local arg-max w_r, and w_r (a local class; ties with the
    # target go to the target). Its loss is the slice's, not needed.
    _, st, _ = be.one_target.fwd(x, local_t, None, int(Variant.BCE), int(Reduction.NONE), LOCAL_IGNORE, 0.0,
                      cfg.alpha, cfg.beta, cfg.gamma, 0.0, cap, False)
    st = st.to(cdtype)
    w_r = st[:, 3].long().clamp(0, vl - 1)
    m_r = _cap(x.gather(1, w_r[:, None])[:, 0].to(cdtype), cap)
    lse_r = st[:, 0]
    x_t = _cap(x.gather(1, local_t.clamp(min=0)[:, None])[:, 0].to(cdtype), cap)
    cols = [m_r, (w_r + cs).to(cdtype), lse_r,
            lse_r + st[:, 2],                         # log sum_{local k != w_r} exp(x_k)
            torch.where(owner, st[:, 1], lse_r),      # log sum_{local k != c} exp(x_k)
            torch.where(owner, x_t, zero)]
    if cfg.label_smoothing > 0 and not smoothing.expected(cfg):
        cols.append(_weighted_x_sum(x, weight, plan, cap, cdtype))
    # One all-gather: every rank forms the arg-max (the max value, the lowest index among ties) and
    # three log-sum-exps over different sets of classes, each shifted by its own max (torch.logsumexp),
    # so log(1 - p_w) stays exact when a wrong class leads by 100 or 1000.
    mine = torch.stack(cols)
    parts = [torch.empty_like(mine) for _ in range(plan.world_size)]
    dist.all_gather(parts, mine, group=group)
    allr = torch.stack(parts)                         # (P, k, N)
    # the one rank whose slice holds w (holds_w); a NaN row: any index, its loss is NaN
    x_w, w, holds_w = smoothing.argmax_of_gathered(allr[:, 0], allr[:, 1])
    lse = torch.logsumexp(allr[:, 2], 0)
    lse_ex_w = torch.logsumexp(torch.where(holds_w, allr[:, 3], allr[:, 2]), 0)
    lse_ex = torch.logsumexp(allr[:, 4], 0)
    x_c = allr[:, 5].sum(0)
    wx_sum = allr[:, 6].sum(0) if cfg.label_smoothing > 0 and not smoothing.expected(cfg) else None
    log1m_pw = lse_ex_w - lse
    w_is_c = w == t
    c_loc, w_loc = t - cs, w - cs
    holds_c, holds_w = owner, keep & (w_loc >= 0) & (w_loc < vl)
    none = torch.full_like(t, -1)
    slice_idx = torch.stack([torch.where(holds_c, c_loc, none), torch.where(holds_w, w_loc, none),
                             torch.where(keep, w_is_c.long(), none)], 1)
    stats = torch.stack([lse, torch.zeros_like(lse), log1m_pw, x_w], 1)  # column 1: R, below

    # Round two: this rank's sum_{k not in {c, w}} log(1 - p_k) and R_r = sum_{k not in {c, w}} a_k
    # (every p_k <= 1/2 there): the kernel's second pass given the global lse and w, or the
    # reference's per-element functions, one block of rows at a time.
    if _bce_kernels(be):
        sums = _bce_kernels(be).bce_partial(x, stats, slice_idx, cap).T[:2 if need_grad else 1].contiguous()
    else:
        sums = torch.zeros((2 if need_grad else 1, n), dtype=cdtype, device=x.device)
        for s, e in _row_blocks(x, cdtype):
            p = reference.shifted(reference.capped(x[s:e], cap), lse[s:e], cdtype).exp_()
            odds = [reference.bce_odds(p)] if need_grad else []   # a new buffer, before p becomes log(1 - p)
            for k, buf in enumerate([reference.bce_log1m(p)] + odds):
                _put(buf, c_loc[s:e], holds_c[s:e], 0.0)
                _put(buf, w_loc[s:e], holds_w[s:e], 0.0)
                sums[k, s:e] = buf.sum(1)
            del p, odds, buf
    sm = torch.empty((n, 0), dtype=cdtype, device=x.device)
    if smoothing.expected(cfg):
        # Label smoothing's sums over the slice given the global lse, w and log(1 - p_w) ride in the
        # same all-reduce.
        g = smoothing.Global(torch.where(keep, lse, zero), w, torch.where(keep, log1m_pw, zero), x_w)
        k = sums.shape[0]
        sums = torch.cat([sums, smoothing.partial_sums(x, g, keep, weight, plan, cfg, need_grad)])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    if smoothing.expected(cfg):
        sums, sm_sums = sums[:k], sums[k:]
        wx_sum = smoothing.row_term(g, sm_sums, keep, weight, plan, cfg)
        sm = sm_sums.T.contiguous()
    h = reference.softplus(lse_ex - x_c) - (sums[0] + torch.where(w_is_c, zero, log1m_pw))
    if need_grad:
        stats[:, 1] = sums[1] - torch.where(w_is_c, zero, torch.ones_like(zero))  # a_c = -1
    return h, lse, wx_sum, _BceState(t, w, stats, slice_idx, sm)


def _bce_grad(x, st: _BceState, go, weight, plan: Plan, be, cfg: _Config) -> Tensor:
    """docs/losses.md's three-case form from the global ``lse``, ``w``, ``R``, ``log(1 - p_w)`` on this
    rank's slice: the backend's kernel given those numbers, or the reference's per-element functions,
    one block of rows at a time."""
    t, w, stats, slice_idx, sm = st
    exp_smooth = smoothing.expected(cfg)
    vl = x.shape[1]
    cs = plan.class_start
    cdtype = stats.dtype
    eps, cap, z = cfg.label_smoothing, cfg.softcap, cfg.z_loss
    lse, r, log1m_pw, x_w = stats.unbind(1)
    keep = t != cfg.ignore_index
    rs = torch.where(keep, _class_weight_of(t, keep, weight, cdtype) * go, _zero(cdtype, x.device))  # w_c go
    if _bce_kernels(be):
        # As for the target-only losses: the class weight rides in the row's coefficient, z is
        # rescaled so that 2 z lse w_c go comes out exact with own = (1 - eps) w_c go, and label
        # smoothing (global V and W) is added outside the kernel.
        g = None
        if eps < 1:
            z_k = z / (1 - eps) if eps > 0 else z
            g = _bce_kernels(be).bce_global_bwd(((1 - eps) * rs).contiguous(), x, stats, slice_idx, z_k, cap)
        if exp_smooth:
            return smoothing.add_grad(g, x, _global(st, keep), sm.T, go, rs, keep, weight, plan, cfg)
        return _add_smoothing(g, x, lse, go, rs, keep, weight, plan, cfg)
    holds_c = _owner(t, keep, cs, vl)
    w_loc = w - cs
    holds_w = keep & (w_loc >= 0) & (w_loc < vl)
    w_is_c = w == t
    own = (1 - eps) * rs
    log_pw = x_w - lse
    log_aw = reference.bce_log_aw(log_pw, log1m_pw, w_is_c)
    g_w = reference.bce_grad_argmax(log_pw, log1m_pw, r, w_is_c)
    # z-loss 2 z lse w_c go p_j and smoothing (eps / V) go (W p_j - w_j): p_j extra - per_class w_j.
    extra = 2 * z * lse * rs if z else None
    per_class = w_loc_weight = None
    if eps > 0 and not exp_smooth:
        per_class = (eps / plan.num_classes) * go
        smooth = per_class * _weight_total(weight, plan, cdtype)
        extra = smooth if extra is None else extra + smooth
        w_loc_weight = None if weight is None else weight[cs:cs + vl]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    for s, e in _row_blocks(x, cdtype):
        xc = reference.capped(x[s:e], cap)
        if eps < 1:
            p = reference.shifted(xc, lse[s:e], cdtype).exp_()
            a = reference.bce_odds(p)
            _put(a, t[s:e] - cs, holds_c[s:e], -1.0)  # a_c = -1
            g = reference.bce_grad_off_argmax(xc, p, a, r[s:e], lse[s:e], log_aw[s:e], w_is_c[s:e])
            _put(g, w_loc[s:e], holds_w[s:e], g_w[s:e])
            g.mul_(own[s:e, None])
            del p
        else:
            g = torch.zeros((e - s, vl), dtype=cdtype, device=x.device)
        if extra is not None:
            g.add_(_p_and_class_terms(xc, lse[s:e], extra[s:e], None if per_class is None else per_class[s:e],
                                      w_loc_weight, cdtype))
        if cap:
            g.mul_(reference.softcap_slope(x[s:e], cap, cdtype))
        out[s:e] = g.masked_fill_(~keep[s:e, None], 0.0)  # ignored rows: 0 (their numbers are arbitrary)
        del g
    if exp_smooth:  # z-loss is in out already
        return smoothing.add_grad(out, x, _global(st, keep), sm.T, go, rs, keep, weight, plan, cfg, add_z=False)
    return out


def _global(st: _BceState, keep: Tensor) -> smoothing.Global:
    zero = _zero(st.stats.dtype, st.stats.device)
    lse, _, log1m_pw, x_w = st.stats.unbind(1)
    return smoothing.Global(torch.where(keep, lse, zero), st.w, torch.where(keep, log1m_pw, zero), x_w)
