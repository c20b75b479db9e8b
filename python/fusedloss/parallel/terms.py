"""The per-row pieces every split loss shares: a rank's slice of the targets, the class weights,
the row losses with z-loss and label smoothing (the global ``V`` and weight total), and their
gradient terms."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..variants import Variant
from .plan import K0, LOCAL_IGNORE, Plan, _Config


def _cap(x: Tensor, softcap: float) -> Tensor:
    return torch.tanh(x / softcap) * softcap if softcap else x


def _zero(cdtype, device) -> Tensor:
    return torch.zeros((), dtype=cdtype, device=device)


def _class_weight_of(t: Tensor, keep: Tensor, weight: Tensor | None, cdtype) -> Tensor:
    """``weight[c]`` per row (1 without weights; any value on ignored rows)."""
    if weight is None:
        return torch.ones((), dtype=cdtype, device=t.device)
    return weight.to(cdtype)[torch.where(keep, t, torch.zeros_like(t))]


def _weight_total(weight: Tensor | None, plan: Plan, cdtype):
    return float(plan.num_classes) if weight is None else weight.to(cdtype).sum()


def _weighted_x_sum(x: Tensor, weight: Tensor | None, plan: Plan, cap: float, cdtype) -> Tensor:
    """This rank's ``sum_k w_k x_k`` (capped) of the smoothing term, a sum over classes like the others."""
    xs = _cap(x.to(cdtype), cap)
    if weight is None:
        return xs.sum(1)
    return torch.mv(xs, weight[plan.class_start:plan.class_start + x.shape[1]].to(cdtype))


def _owner(t: Tensor, keep: Tensor, start: int, size: int) -> Tensor:
    return keep & (t >= start) & (t < start + size)


def _local_target(t: Tensor, keep: Tensor, owner: Tensor, start: int) -> Tensor:
    """``c - class_start`` where this rank owns the target, ``K0`` elsewhere, ``LOCAL_IGNORE`` on ignored rows."""
    local_t = torch.where(owner, t - start, torch.full_like(t, K0))
    return torch.where(keep, local_t, torch.full_like(t, LOCAL_IGNORE))


def _put(buf: Tensor, idx: Tensor, mask: Tensor, value) -> None:
    """``buf[i, idx[i]] = value[i]`` on the rows where ``mask`` (rows elsewhere write their own value back)."""
    j = idx.clamp(0, buf.shape[1] - 1)[:, None]
    if isinstance(value, Tensor):
        value = value[:, None]
    buf.scatter_(1, j, torch.where(mask[:, None], value, buf.gather(1, j)).to(buf.dtype))


def _row_losses(h: Tensor, lse: Tensor, t: Tensor, keep: Tensor, weight, plan: Plan, cfg: _Config,
                wx_sum: Tensor | None) -> Tensor:
    """Weighted row losses from the loss's own term ``h`` (unweighted): ``(1 - eps) w_c h + z w_c lse^2 +``
    the smoothing term, 0 on ignored rows (reference.forward's, with the global V, W). ce: ``(eps / V)(W lse -
    sum_k w_k x_k)`` from ``wx_sum``; the other losses: ``wx_sum`` is their expected term itself
    (smoothing.row_term, 0 on ignored rows)."""
    cdtype = h.dtype
    zero = _zero(cdtype, h.device)
    eps = cfg.label_smoothing
    scale = torch.where(keep, _class_weight_of(t, keep, weight, cdtype), zero)
    per_row = (1 - eps) * h if eps > 0 else h
    if cfg.z_loss:
        per_row = per_row + cfg.z_loss * lse.square()
    loss_rows = torch.where(scale == 0, torch.zeros_like(per_row), per_row * scale)
    if eps > 0 and cfg.variant != Variant.CE:  # wx_sum holds the expected term (smoothing.row_term)
        loss_rows = loss_rows + wx_sum
    elif eps > 0:
        smooth = (eps / plan.num_classes) * (_weight_total(weight, plan, cdtype) * lse - wx_sum)
        loss_rows = loss_rows + torch.where(keep, smooth, zero)
    return loss_rows


def _p_and_class_terms(x: Tensor, lse: Tensor, extra: Tensor, per_class: Tensor | None, w_loc: Tensor | None,
                       cdtype) -> Tensor:
    """``p_j extra - per_class w_j`` per entry (a new buffer, capped-logit space): the gradient terms of
    z-loss (``2 z lse w_c go p_j``) and label smoothing (``(eps / V) go (W p_j - w_j)``)."""
    add = reference.shifted(x, lse, cdtype).exp_().mul_(extra[:, None])
    if per_class is not None:
        w_row = torch.ones((), dtype=cdtype, device=x.device) if w_loc is None else w_loc.to(cdtype)[None, :]
        add.sub_(per_class[:, None] * w_row)
    return add


def _add_smoothing(g: Tensor | None, x: Tensor, lse, go, rs, keep, weight, plan: Plan, cfg: _Config) -> Tensor:
    """A kernel's gradient ``g``, run without label smoothing (None: eps = 1 left the kernel out), plus
    smoothing's ``(eps / V) go (W p_j - w_j)`` with the global V and W (and z-loss's
    ``2 z lse w_c go p_j`` when eps = 1): one elementwise pass over the slice, 0 on ignored rows."""
    eps, cap, z = cfg.label_smoothing, cfg.softcap, cfg.z_loss
    if g is None:
        g = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    if eps == 0:
        return g
    cdtype = lse.dtype
    cs, vl = plan.class_start, x.shape[1]
    per_class = (eps / plan.num_classes) * go
    extra = per_class * _weight_total(weight, plan, cdtype)
    if eps >= 1 and z:
        extra = extra + 2 * z * lse * rs
    w_loc = None if weight is None else weight[cs:cs + vl]
    add = _p_and_class_terms(_cap(x.to(cdtype), cap), lse, extra, per_class, w_loc, cdtype)
    if cap:
        add.mul_(reference.softcap_slope(x, cap, cdtype))
    # An ignored row's lse is 0, so its p_j may overflow: 0 * inf would be NaN.
    add.masked_fill_(~keep[:, None], 0.0)
    return (g.to(cdtype) + add).to(x.dtype)
