"""The split rounds of the target-only losses (ce, nllr, crl, lace, focal): each rank's partial
``lse`` / ``lse_ex`` from its forward kernel, one all-reduce MAX and one SUM, the row losses from the
global ``d = lse_ex - x_c``; the gradient from the rank's backward kernel fed the global numbers."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import reference
from ..variants import Reduction, Variant
from .plan import K0, LOCAL_IGNORE, Plan, _Config
from . import smoothing
from .terms import _add_smoothing, _cap, _class_weight_of, _local_target, _owner, _put, _weighted_x_sum, _zero


class _TargetOnlyState(NamedTuple):
    t: Tensor          # global targets
    local_t: Tensor    # the kernels' local target (K0 or the local arg-max where owned elsewhere)
    stats: Tensor      # (N, 4): global lse and lse_ex as the backward kernel reads them
    log_s: Tensor      # log s of the variant (docs/losses.md)
    x_t: Tensor        # the (capped) logit at the local target
    sm: Tensor         # (N, 2 + sums) label smoothing's log(1 - p_w), x_w and summed terms; (N, 0) without it
    sm_w: Tensor       # (N, 1) int64: the global arg-max w; (N, 0) without label smoothing


def _sync_free(device: torch.device) -> bool:
    """Whether a host check of device data would be a synchronization (tests force True on the CPU)."""
    return device.type != "cpu"


def _avoid_masked_fake_targets(x: Tensor, local_t: Tensor, absent: Tensor, cap: float,
                               k0_masked: bool | None) -> Tensor | None:
    """Move the fake target of a row owned elsewhere off a masked (-inf) logit, in place.

    The backward kernel gets ``lse_ex = d + x_k`` for the fake target ``k`` so that its
    ``lse_ex - x_k`` is the global ``d``; at ``x_k = -inf`` that is ``-inf - (-inf) = NaN``. Such rows
    take their local arg-max instead, and a row whose whole slice is masked is left out of the
    kernels (its local gradient is 0 but for label smoothing's term, added outside them). Capped
    logits are finite (``-softcap``): nothing to do. Returns the rows whose slice is entirely
    masked, or None.

    No host synchronization on an accelerator: ``k0_masked`` came to the host with the
    validation, and where it is False there is nothing to do; where it is True or unknown (None:
    ``validate=False``, the head's blocks) every row's arg-max is taken on the device, one more
    read of the slice. On the CPU the check costs nothing and only the rows that need it are read."""
    if cap or k0_masked is False:
        return None
    bad = absent & (x[:, K0] == -math.inf)
    if _sync_free(x.device):
        k = x.argmax(1)
        dead = bad & (x.gather(1, k[:, None])[:, 0] == -math.inf)
        local_t.copy_(torch.where(bad, torch.where(dead, torch.full_like(k, LOCAL_IGNORE), k), local_t))
        return dead
    if not bool(bad.any()):  # on the CPU: not a synchronization
        return None
    rows = bad.nonzero()[:, 0]
    xa = x[rows]
    k = xa.argmax(1)
    dead = xa.gather(1, k[:, None])[:, 0] == -math.inf
    local_t[rows] = torch.where(dead, torch.full_like(k, LOCAL_IGNORE), k)
    masked = torch.zeros_like(absent)
    masked[rows] = dead
    return masked


def _target_only_rows(x, t, keep, weight, plan: Plan, be, cfg: _Config, group, need_grad: bool = True):
    vl = x.shape[1]
    cs = plan.class_start
    cdtype = reference.compute_dtype(x)
    cap = cfg.softcap
    owner = _owner(t, keep, cs, vl)
    local_t = _local_target(t, keep, owner, cs)
    masked = _avoid_masked_fake_targets(x, local_t, keep & ~owner, cap, plan.k0_masked)
    # Partial statistics of the slice (the kernel's stats are of the capped logits).
    # Variant and options do not change stats[:, :2]: ce, no smoothing, the cheapest pass.
    _, stats, _ = be.one_target.fwd(x, local_t, None, int(Variant.CE), int(Reduction.NONE), LOCAL_IGNORE, 0.0,
                         cfg.alpha, cfg.beta, cfg.gamma, 0.0, cap, False)
    part = torch.where(owner, stats[:, 1], stats[:, 0]).to(cdtype)
    x_t = _cap(x.gather(1, local_t.clamp(min=0)[:, None])[:, 0].to(cdtype), cap)
    if masked is not None:  # every local class at -inf: the slice adds nothing to the row's sums
        part = torch.where(masked, torch.full_like(part, -math.inf), part)
        x_t = torch.where(masked, torch.zeros_like(x_t), x_t)
    zero = _zero(cdtype, x.device)
    if smoothing.expected(cfg):
        return _expected_rows(x, t, keep, weight, plan, cfg, group, owner, local_t, part, x_t, need_grad)
    # log-sum-exp over ranks: MAX, then SUM of exp(part - M) (each term <= 1, the max rank's is 1).
    m = part.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    shift = torch.where(torch.isfinite(m), m, zero)  # every class masked (-inf): exp gives 0, not NaN
    sums = [torch.exp(part - shift), torch.where(owner, x_t, zero)]
    if cfg.label_smoothing > 0:
        sums.append(_weighted_x_sum(x, weight, plan, cap, cdtype))
    buf = torch.stack(sums)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    lse_ex = shift + buf[0].log()
    x_c = buf[1]
    wx_sum = buf[2] if cfg.label_smoothing > 0 else None
    none = torch.empty((x.shape[0], 0), dtype=cdtype, device=x.device)
    h, lse, state = _row_numbers(x, t, keep, owner, local_t, lse_ex, x_c, x_t, none, none.long(), cfg)
    return h, lse, wx_sum, state


def _row_numbers(x, t, keep, owner, local_t, lse_ex, x_c, x_t, sm, sm_w, cfg: _Config):
    """The row's ``h``, ``lse`` and the backward's state from the global ``lse_ex`` and ``x_c``."""
    cdtype = lse_ex.dtype
    zero = _zero(cdtype, x.device)
    lse = torch.logaddexp(lse_ex, x_c)
    d = lse_ex - x_c
    # Ignored rows: neutral numbers (their loss and gradient are 0 by select).
    lse = torch.where(keep, lse, zero)
    d = torch.where(keep, d, zero)
    h, log_s = reference.TARGET_ONLY_MATH[Variant(cfg.variant)](d, reference.Params(cfg.alpha, cfg.beta, cfg.gamma))

    # Global statistics for the backward kernel. A row whose target is on another rank is
    # read by the kernel at the fake target K0: lse_ex = d + x_K0 makes its d = lse_ex - x_K0
    # the global d, so its s, and every entry j != K0, are exact (entry K0 is fixed in _grad).
    stats_g = torch.zeros((x.shape[0], 4), dtype=cdtype, device=x.device)
    stats_g[:, 0] = lse
    stats_g[:, 1] = torch.where(owner, lse_ex, torch.where(keep & (local_t >= 0), d + x_t, zero))
    return h, lse, _TargetOnlyState(t, local_t, stats_g, log_s, x_t, sm, sm_w)


def _expected_rows(x, t, keep, weight, plan: Plan, cfg: _Config, group, owner, local_t, part, x_t, need_grad):
    """The rounds with label smoothing's expected term: one all-gather of the partial ``lse_ex``, the
    target's logit and the slice's arg-max numbers (as bce's round one: every rank forms the global
    arg-max ``w`` and ``log(1 - p_w)`` from log-sum-exps over ranks, each shifted by its own max), then
    one all-reduce SUM of the slice's smoothing sums given the global ``lse``: two collectives, as
    without smoothing."""
    cdtype = part.dtype
    zero = _zero(cdtype, x.device)
    cols = [part, torch.where(owner, x_t, zero)] + smoothing.local_argmax_cols(x, cfg.softcap, plan.class_start,
                                                                               cdtype)
    mine = torch.stack(cols)
    parts = [torch.empty_like(mine) for _ in range(plan.world_size)]
    dist.all_gather(parts, mine, group=group)
    allr = torch.stack(parts)                         # (P, 6, N)
    lse_ex = torch.logsumexp(allr[:, 0], 0)
    x_c = allr[:, 1].sum(0)
    x_w, w, holds_w = smoothing.argmax_of_gathered(allr[:, 2], allr[:, 3])
    lse_ex_w = torch.logsumexp(torch.where(holds_w, allr[:, 5], allr[:, 4]), 0)
    h, lse, state = _row_numbers(x, t, keep, owner, local_t, lse_ex, x_c, x_t, None, None, cfg)
    g = smoothing.Global(lse, w, torch.where(keep, lse_ex_w - lse, zero), x_w)
    sums = smoothing.partial_sums(x, g, keep, weight, plan, cfg, need_grad)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    term = smoothing.row_term(g, sums, keep, weight, plan, cfg)
    sm = torch.cat([torch.stack([g.log1m_pw, x_w], 1), sums.T], 1)
    return h, lse, term, state._replace(sm=sm, sm_w=w[:, None])


def _target_only_grad(x, st: _TargetOnlyState, go, weight, plan: Plan, be, cfg: _Config) -> Tensor:
    t, local_t, stats_g, log_s, x_t = st[:5]
    vl = x.shape[1]
    cs = plan.class_start
    cdtype = stats_g.dtype
    eps, cap, z = cfg.label_smoothing, cfg.softcap, cfg.z_loss
    keep = t != cfg.ignore_index
    rs = torch.where(keep, _class_weight_of(t, keep, weight, cdtype) * go, _zero(cdtype, x.device))  # w_c go
    lse = stats_g[:, 0]

    if eps < 1:
        # The kernel gets the weight folded into the row's grad_output and no weight of its own:
        # it would read w at the *local* target, the fake K0 for rows owned elsewhere. Label
        # smoothing stays out of it (it would use the local class count and weight total); z is
        # rescaled so its 2 z lse w_c go term is exact with own = (1 - eps) w_c go.
        go_k = (1 - eps) * rs
        z_k = z / (1 - eps) if eps > 0 else z
        g = be.one_target.bwd(go_k.contiguous(), x, local_t, None, stats_g, cfg.variant, int(Reduction.NONE),
                   LOCAL_IGNORE, 0.0, cfg.alpha, cfg.beta, cfg.gamma, z_k, cap)
        # The fake target's entry of a row owned elsewhere holds the kernel's target formula; it
        # is a competitor: g = p_k (own s + extra) = exp(x_k - lse + log s) own + exp(x_k - lse) 2 z lse own
        # (p_k s <= 1 + beta for every variant, so the product form cannot overflow).
        absent = keep & ((t < cs) | (t >= cs + vl)) & (local_t >= 0)
        idx = local_t.clamp(min=0)
        log_p = x_t - lse
        val = torch.exp(log_p + log_s) * go_k
        if z_k:
            val = val + torch.exp(log_p) * (2 * z_k * lse * go_k)
        if cap:
            val = val * reference.softcap_slope(x.gather(1, idx[:, None])[:, 0], cap, cdtype)
        _put(g, idx, absent, val)
    else:
        g = None
    if smoothing.expected(cfg):
        g_num = smoothing.Global(lse, st.sm_w[:, 0], st.sm[:, 0], st.sm[:, 1])
        return smoothing.add_grad(g, x, g_num, st.sm[:, 2:].T, go, rs, keep, weight, plan, cfg)
    return _add_smoothing(g, x, lse, go, rs, keep, weight, plan, cfg)
