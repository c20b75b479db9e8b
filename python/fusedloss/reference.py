"""The exact reference: every loss of docs/losses.md in plain PyTorch, in its stable form.

This is the backend wherever no kernel is built and the baseline the benchmarks
compare against. It is written for two things at once:

* exactness: every quantity comes from the row statistics ``lse`` and
  ``lse_ex = log sum_{k != c} exp(x_k)``, through ``d = lse_ex - x_c``:
  ``log p_c = -softplus(d)``, ``log(1 - p_c) = -softplus(-d)``. Nothing forms
  ``1 - p_c`` by subtraction (in fp32 ``p_c`` rounds to 1 once the target leads
  by ~17 and the naive formulas return inf/NaN), and nothing forms ``lse - x_c``
  by subtraction either (it cancels to 0 when the loss is tiny);
* memory: no ``(N, C)`` tensor is saved for backward besides the logits; the
  forward and the backward each build at most two ``(N, C)`` float buffers and
  update them in place, so eager forward+backward stays within ~3x the logits.

All math runs in float32 (float64 for float64 logits) whatever the logits' dtype.
The functions here take 2-D ``(N, C)`` logits with rows of any stride and 1-D
targets; shape handling and argument checks live in ``functional.py``.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .variants import LOSSES, STATS_COLS, Reduction, Variant, reduction_id, variant_id


class Params(NamedTuple):
    alpha: float
    beta: float
    gamma: float


def compute_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------
# Row statistics
# ----------------------------------------------------------------------------

def shifted(x: Tensor, shift: Tensor, cdtype: torch.dtype) -> Tensor:
    """A new ``(N, C)`` buffer ``x - shift[:, None]`` in the compute dtype. Half logits are
    upcast first and shifted in place: PyTorch's mixed-dtype subtraction on CPU runs at
    about half the speed of the upcast plus an in-place subtraction."""
    if x.dtype == cdtype:
        return torch.sub(x, shift[:, None])
    return x.to(cdtype).sub_(shift[:, None])


def lse_excluding(x: Tensor, excluded: Tensor, cdtype: torch.dtype, differentiable: bool = False) -> Tensor:
    """``log sum_{k != excluded} exp(x_k)`` per row, exactly (no ``lse - x`` cancellation).

    The shift is the max over the *competitors* (top-2 of the row), so the sum
    is >= 1 whenever a competitor is finite and cannot underflow even when the
    excluded class leads by 1000. One (N, C) float buffer, updated in place;
    ``differentiable``: out of place (autograd, forward AD and vmap go through it), the
    shift held constant (the value does not depend on it).
    """
    n, c = x.shape
    if c == 1:
        return torch.full((n,), -math.inf, dtype=cdtype, device=x.device)
    top_v, top_i = x.detach().topk(2, dim=1) if differentiable else x.topk(2, dim=1)
    m_ex = torch.where(top_i[:, 0] == excluded, top_v[:, 1], top_v[:, 0]).to(cdtype)
    # All competitors -inf: shift by 0 so exp() gives 0, not NaN from (-inf) - (-inf).
    shift = torch.where(torch.isfinite(m_ex), m_ex, torch.zeros_like(m_ex))
    if differentiable:
        e = (x.to(cdtype) - shift[:, None]).exp().scatter(1, excluded[:, None], 0.0)
    else:
        e = shifted(x, shift, cdtype)
        e.exp_()
        e.scatter_(1, excluded[:, None], 0.0)
    return shift + e.sum(1).log()


def softplus(t: Tensor) -> Tensor:
    """``log(1 + e^t)`` without overflow (``logaddexp`` is exact for both signs)."""
    return torch.logaddexp(t, torch.zeros_like(t))


def log_softplus(t: Tensor) -> Tensor:
    """``log(softplus(t))``; for ``t < -30``, ``softplus(t) = e^t (1 - e^t/2 ...)`` so it is ``t``
    to within e^-30 (exact in float64), and ``exp(t)`` may already be subnormal."""
    return torch.where(t < -30, t, softplus(t).log())


def _scaled(k: float, t: Tensor) -> Tensor:
    """``k * t`` with ``0 * (-inf) = 0``: the factor ``(1 - p_c)^0`` is 1 even when ``p_c = 1``."""
    return torch.zeros_like(t) if k == 0 else k * t


# ----------------------------------------------------------------------------
# Per-variant math of the target-only family: one function each.
# Input d = lse_ex - x_c (per row). Output (loss, log s) where the gradient is
# dL/dx_j = s * (p_j - [j == c])  (docs/losses.md, "Gradients of ce, nllr, crl, lace, focal").
# ----------------------------------------------------------------------------

def _ce(d: Tensor, p: Params) -> tuple[Tensor, Tensor]:
    return softplus(d), torch.zeros_like(d)


def _nllr(d: Tensor, p: Params) -> tuple[Tensor, Tensor]:
    # log(1 - p_c) - log p_c = lse_ex - x_c = d exactly; s = 1 / (1 - p_c).
    return d.clone(), softplus(-d)


def _crl(d: Tensor, p: Params) -> tuple[Tensor, Tensor]:
    log_p, log_q = -softplus(d), -softplus(-d)
    # log(alpha + q) as logaddexp(log alpha, log q): exact for alpha = 0 (then it is log q).
    log_alpha_q = torch.logaddexp(torch.full_like(d, _log(p.alpha)), log_q)
    loss = _scaled(p.beta, log_alpha_q) + softplus(d)
    # s = 1 + beta p / (alpha + q): log s = softplus(log beta + log p - log(alpha + q)),
    # finite even for alpha = 0, q -> 0 where beta p / q overflows.
    # beta = 0 is ce (s = 1), also where alpha = 0 and q = 0 make the argument (-inf) + inf.
    log_s = torch.zeros_like(d) if p.beta == 0 else softplus(_log(p.beta) + log_p - log_alpha_q)
    return loss, log_s


def _lace(d: Tensor, p: Params) -> tuple[Tensor, Tensor]:
    return _focal(d, Params(p.alpha, p.beta, 1.0))


def _focal(d: Tensor, p: Params) -> tuple[Tensor, Tensor]:
    g = p.gamma
    log_p, log_q = -softplus(d), -softplus(-d)
    loss = torch.exp(_scaled(g, log_q)) * softplus(d)
    # s = q^g + g p q^(g-1) (-log p): both terms >= 0, summed in log space so the
    # large q^(g-1) (g < 1, q -> 0) times the small -log p ~ q never overflows.
    # log(p * (-log p)) = log p + log softplus(d); at p = 0 (d = inf) it is -inf (p log p -> 0),
    # not the (-inf) + inf = NaN the sum would give.
    log_p_neglogp = torch.where(d == math.inf, torch.full_like(d, -math.inf), log_p + log_softplus(d))
    # g = 0, or d = -inf (no competitor: q = 0 exactly, g p q^(g-1) (-log p) ~ g q^g -> 0):
    # the second term is 0, where the sum below would be (-inf) + inf = NaN.
    second = _log(g) + _scaled(g - 1.0, log_q) + log_p_neglogp
    second = torch.where(d == -math.inf, torch.full_like(d, -math.inf), second) if g > 0 else torch.full_like(d, -math.inf)
    log_s = torch.logaddexp(_scaled(g, log_q), second)
    return loss, log_s


def _log(v: float) -> float:
    return math.log(v) if v > 0 else -math.inf


TARGET_ONLY_MATH: dict[Variant, Callable[[Tensor, Params], tuple[Tensor, Tensor]]] = {
    Variant.CE: _ce,
    Variant.NLLR: _nllr,
    Variant.CRL: _crl,
    Variant.LACE: _lace,
    Variant.FOCAL: _focal,
}


# ----------------------------------------------------------------------------
# Forward and backward of the op
# ----------------------------------------------------------------------------

class _Rows(NamedTuple):
    """Per-row quantities shared by forward and backward."""
    tgt: Tensor        # target clamped to a safe index (0 for ignored / bad rows)
    scale: Tensor      # weight[c] for valid rows, 0 for ignored rows, NaN for out-of-range rows
    x_c: Tensor        # target logit, compute dtype


def _rows(x: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, cdtype) -> _Rows:
    c = x.shape[1]
    target = target.long()
    in_range = (target >= 0) & (target < c)
    keep = target != ignore_index
    tgt = torch.where(in_range & keep, target, torch.zeros_like(target))
    w = torch.ones((), dtype=cdtype, device=x.device) if weight is None else weight.to(cdtype)[tgt]
    # A bad target never indexes memory (tgt is clamped); its row is marked NaN instead,
    # which only happens on devices where the target check is off (see validation.py).
    scale = torch.where(keep, w, torch.zeros((), dtype=cdtype, device=x.device))
    scale = torch.where(keep & ~in_range, torch.full((), math.nan, dtype=cdtype, device=x.device), scale)
    x_c = x.gather(1, tgt[:, None])[:, 0].to(cdtype)
    return _Rows(tgt, scale, x_c)


def mean_denominator(target: Tensor, weight: Tensor | None, ignore_index: int, cdtype) -> Tensor:
    """What ``'mean'`` divides by: the count of non-ignored rows, or the sum of their
    class weights (PyTorch's convention). ``0/0 = nan`` for an empty batch, as PyTorch."""
    keep = target != ignore_index
    if weight is None:
        return keep.sum().to(cdtype)
    safe = torch.where(keep, target.long(), torch.zeros_like(target, dtype=torch.long))
    safe = safe.clamp(0, weight.shape[0] - 1)
    return torch.where(keep, weight.to(cdtype)[safe], torch.zeros((), dtype=cdtype, device=target.device)).sum()


def _reduce(loss_rows: Tensor, reduction: int, target: Tensor, weight, ignore_index: int) -> Tensor:
    if reduction == Reduction.NONE:
        return loss_rows
    total = loss_rows.sum()
    if reduction == Reduction.SUM:
        return total
    return total / mean_denominator(target, weight, ignore_index, loss_rows.dtype)


def _row_grad_scale(grad_loss: Tensor, rows: _Rows, reduction: int, target, weight, ignore_index) -> Tensor:
    """d(reduced loss)/d(loss_i) times weight[c_i], per row."""
    g = grad_loss.to(rows.scale.dtype)
    if reduction == Reduction.MEAN:
        g = g / mean_denominator(target, weight, ignore_index, g.dtype)
    # Ignored rows get exactly 0, also when every row is ignored and 'mean' divides by 0
    # (PyTorch: NaN loss, zero gradient); a zero weight sum still gives 0/0 = NaN, as PyTorch.
    keep = target != ignore_index
    return torch.where(keep, rows.scale * g, torch.zeros((), dtype=g.dtype, device=g.device))


def capped(logits: Tensor, softcap: float, differentiable: bool = False) -> Tensor:
    """Gemma's soft cap ``s tanh(x / s)`` in the compute dtype, or the logits themselves for
    ``softcap = 0`` (no cap)."""
    if not softcap:
        return logits
    t = torch.tanh(logits.to(compute_dtype(logits)) / softcap)
    return t * softcap if differentiable else t.mul_(softcap)


def softcap_slope(logits: Tensor, softcap: float, cdtype) -> Tensor:
    """``d(s tanh(x / s))/dx = 1 - tanh^2(x / s) = 4 e / (1 + e)^2`` with ``e = exp(-2|x / s|)``:
    no ``1 - t^2`` that cancels when the cap saturates (``t -> 1``)."""
    e = (logits.to(cdtype) / softcap).abs_().mul_(-2.0).exp_()
    return e.mul(4.0).div_((1.0 + e).square_())


def forward(
    logits: Tensor, target: Tensor, weight: Tensor | None, variant: int, reduction: int,
    ignore_index: int, label_smoothing: float, alpha: float, beta: float, gamma: float,
    z_loss: float = 0.0, softcap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Loss (reduced as asked, compute dtype) and the per-row stats ``(N, STATS_COLS)``
    (of the capped logits when ``softcap``)."""
    return _forward(logits, target, weight, variant, reduction, ignore_index, label_smoothing, alpha, beta,
                    gamma, z_loss, softcap, differentiable=False)


def differentiable_forward(
    logits: Tensor, target: Tensor, weight: Tensor | None, variant: int, reduction: int,
    ignore_index: int, label_smoothing: float, alpha: float, beta: float, gamma: float,
    z_loss: float = 0.0, softcap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """:func:`forward`'s loss and the rows' ``lse``, built of out-of-place PyTorch ops only: the
    same stable forms, differentiable to any order in the logits (and the class weights), under
    forward AD and under ``torch.func`` transforms (vmap included). The composite path of
    docs/autograd.md: double backward, ``jvp``, per-sample gradients."""
    return _forward(logits, target, weight, variant, reduction, ignore_index, label_smoothing, alpha, beta,
                    gamma, z_loss, softcap, differentiable=True)


def _forward(logits, target, weight, variant, reduction, ignore_index, label_smoothing, alpha, beta, gamma,
             z_loss, softcap, differentiable):
    x = capped(logits, softcap, differentiable)
    cdtype = compute_dtype(x)
    rows = _rows(x, target, weight, ignore_index, cdtype)
    lse_ex = lse_excluding(x, rows.tgt, cdtype, differentiable)
    lse = torch.logaddexp(lse_ex, rows.x_c)
    d = lse_ex - rows.x_c
    if differentiable:
        stats = lse
    else:
        stats = torch.zeros((x.shape[0], STATS_COLS), dtype=cdtype, device=x.device)
        stats[:, 0], stats[:, 1] = lse, lse_ex

    if variant == Variant.BCE:
        per_row = (_bce_loss_differentiable(x, rows, lse, d, cdtype) if differentiable
                   else _bce_loss(x, rows, lse, d, stats, cdtype))
    else:
        per_row, _ = TARGET_ONLY_MATH[Variant(variant)](d, Params(alpha, beta, gamma))
    if label_smoothing > 0:
        per_row = (1 - label_smoothing) * per_row
    if z_loss:
        per_row = per_row + z_loss * lse.square()
    # where, not a product: an ignored row's clamped index may point at a -inf logit (inf * 0 = NaN).
    loss_rows = torch.where(rows.scale == 0, torch.zeros_like(per_row), per_row * rows.scale)
    if label_smoothing > 0:
        if variant == Variant.CE:
            smooth = _smoothing_loss(x, lse, rows, weight, target, ignore_index, label_smoothing)
        else:  # (eps / C) sum_k w_k L(x, k): the expected loss under the uniform part of the target
            m = _uniform_mass(x, weight, label_smoothing, cdtype)
            smooth = expected_loss(x, m, variant, Params(alpha, beta, gamma), differentiable)[0]
            smooth = torch.where(target != ignore_index, smooth, torch.zeros_like(smooth))
        loss_rows = loss_rows + smooth
    return _reduce(loss_rows, reduction, target, weight, ignore_index), stats


def backward(
    grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Tensor | None, stats: Tensor,
    variant: int, reduction: int, ignore_index: int, label_smoothing: float,
    alpha: float, beta: float, gamma: float, z_loss: float = 0.0, softcap: float = 0.0,
) -> Tensor:
    """Gradient w.r.t. the logits, contiguous ``(N, C)`` in the logits' dtype, in one expression
    per variant from the saved row statistics."""
    x = capped(logits, softcap)
    cdtype = compute_dtype(x)
    rows = _rows(x, target, weight, ignore_index, cdtype)
    row_scale = _row_grad_scale(grad_loss, rows, reduction, target, weight, ignore_index)
    lse, lse_ex = stats[:, 0], stats[:, 1]
    d = lse_ex - rows.x_c
    if variant == Variant.BCE:
        g = _bce_grad(x, rows, stats, cdtype)
    else:
        _, log_s = TARGET_ONLY_MATH[Variant(variant)](d, Params(alpha, beta, gamma))
        # j != c: g_j = p_j s = exp(x_j - (lse - log s)); j == c: g_c = -s (1 - p_c) = -exp(log s + log(1 - p_c)).
        g = shifted(x, lse - log_s, cdtype)
        g.exp_()
        g.scatter_(1, rows.tgt[:, None], (-torch.exp(log_s + (lse_ex - lse)))[:, None])
    if label_smoothing > 0 and variant == Variant.CE:
        g = _smoothing_grad(g, x, lse, rows, row_scale, weight, label_smoothing, grad_loss,
                            target, ignore_index, reduction)
    elif label_smoothing > 0:
        g.mul_(((1 - label_smoothing) * row_scale)[:, None])
        go = _smoothing_row_grad_output(grad_loss, target, weight, ignore_index, reduction, cdtype)
        m = _uniform_mass(x, weight, label_smoothing, cdtype)
        g.add_(expected_grad(x, m, variant, Params(alpha, beta, gamma)).mul_(go[:, None]))
    else:
        g.mul_(row_scale[:, None])
    if z_loss:
        # d(z lse^2)/dx_j = 2 z lse p_j, times the row's weight and grad_output: its own term,
        # since s + 2 z lse may be negative and has no log (docs/losses.md).
        g.add_(shifted(x, lse, cdtype).exp_().mul_((2 * z_loss * lse * row_scale)[:, None]))
    if softcap:
        g.mul_(softcap_slope(logits, softcap, cdtype))
    # Ignored rows: a gradient of exactly 0 by select, whatever their logits and stats hold (the
    # kernels' contract: an ignored row's stats are never read, its logits neither). The terms
    # above are only multiplied by the row's 0 scale, and 0 * inf = NaN where they overflow: a
    # fully masked (-inf) row, or stats that are not this row's own, such as the zeros
    # fusedloss.parallel (and the C++ forward) leave on ignored rows, under a logit of 100.
    g.masked_fill_((target == ignore_index)[:, None], 0.0)
    return g.to(logits.dtype)


# ----------------------------------------------------------------------------
# Label smoothing, every loss: the loss's own term times (1 - eps) beside the smoothed CE
# term (for ce, PyTorch's convention with weights):
#   L_i = (1 - eps) w_c h_i + (eps / C) sum_k w_k (lse - x_k)
#   dL_i/dx_j = (1 - eps) w_c dh_i/dx_j + (eps / C) (W p_j - w_j),  W = sum_k w_k
# 'mean' divides both parts by the same sum of target weights.
# ----------------------------------------------------------------------------

def _smoothing_loss(x, lse, rows: _Rows, weight, target, ignore_index, eps) -> Tensor:
    c = x.shape[1]
    cdtype = lse.dtype
    if weight is None:
        smooth = c * lse - x.sum(1, dtype=cdtype)
    else:
        w = weight.to(cdtype)
        smooth = w.sum() * lse - torch.mv(x.to(cdtype), w)
    keep = (target != ignore_index)
    # Out-of-range rows already carry NaN through rows.scale; ignored rows give 0.
    return torch.where(keep, (eps / c) * smooth, torch.zeros_like(smooth))


def _smoothing_grad(g, x, lse, rows: _Rows, row_scale, weight, eps, grad_loss, target, ignore_index, reduction):
    """``g`` holds the loss's own gradient without scale; add the smoothing part in place."""
    c = x.shape[1]
    cdtype = g.dtype
    keep = (target != ignore_index)
    go = grad_loss.to(cdtype)
    if reduction == Reduction.MEAN:
        go = go / mean_denominator(target, weight, ignore_index, cdtype)
    go = torch.where(keep, go, torch.zeros((), dtype=cdtype, device=g.device))
    total_w = float(c) if weight is None else weight.to(cdtype).sum()
    g.mul_(((1 - eps) * row_scale)[:, None])
    # + (eps / C) * go * (W p_j - w_j); p_j = exp(x_j - lse)
    p = shifted(x, lse, cdtype).exp_()
    g.add_(p.mul_(((eps / c) * total_w * go)[:, None]))
    w_row = torch.ones(c, dtype=cdtype, device=x.device) if weight is None else weight.to(cdtype)
    g.sub_(((eps / c) * go)[:, None] * w_row[None, :])
    return g


# ----------------------------------------------------------------------------
# Multi-class BCE: L = -log p_c - sum_{k != c} log(1 - p_k)   (docs/losses.md, "bce")
# Only the arg-max w can have p_w > 1/2: log(1 - p_w) comes from lse over k != w.
# Stats columns: 2 = log(1 - p_w), 3 = w (an exact integer in float).
# ----------------------------------------------------------------------------

def _bce_loss(x: Tensor, rows: _Rows, lse: Tensor, d: Tensor, stats: Tensor, cdtype) -> Tensor:
    w = x.argmax(1)
    log1m_pw = lse_excluding(x, w, cdtype) - lse
    stats[:, 2], stats[:, 3] = log1m_pw, w.to(cdtype)
    t = bce_log1m(shifted(x, lse, cdtype).exp_())  # log(1 - p_k): exact for k != w since p_k <= 1/2
    t.scatter_(1, w[:, None], log1m_pw[:, None])  # the arg-max from its exact form
    t.scatter_(1, rows.tgt[:, None], 0.0)         # k != c
    return softplus(d) - t.sum(1)


def _bce_loss_differentiable(x: Tensor, rows: _Rows, lse: Tensor, d: Tensor, cdtype) -> Tensor:
    """``_bce_loss`` out of place: ``p`` is zeroed at ``w`` and ``c`` before ``log(1 - p)``, so
    the terms left out (``p_w`` may round to 1) carry no ``0 * inf`` into any derivative."""
    w = x.detach().argmax(1)
    log1m_pw = lse_excluding(x, w, cdtype, differentiable=True) - lse
    p = (x.to(cdtype) - lse[:, None]).exp()
    p = p.scatter(1, w[:, None], 0.0).scatter(1, rows.tgt[:, None], 0.0)
    t = torch.log1p(-p).scatter(1, w[:, None], log1m_pw[:, None]).scatter(1, rows.tgt[:, None], 0.0)
    return softplus(d) - t.sum(1)


def _bce_grad(x: Tensor, rows: _Rows, stats: Tensor, cdtype) -> Tensor:
    lse, log1m_pw = stats[:, 0], stats[:, 2]
    w = stats[:, 3].long()
    c = rows.tgt
    w_is_c = w == c
    p = shifted(x, lse, cdtype).exp_()
    # a_k = p_k / (1 - p_k) for k != c, a_c = -1; R = sum_{k != w} a_k (bounded by C).
    a = bce_odds(p)
    a.scatter_(1, c[:, None], -1.0)
    a.scatter_(1, w[:, None], 0.0)
    r = a.sum(1)
    x_w = x.gather(1, w[:, None])[:, 0].to(cdtype)
    log_pw = x_w - lse
    g = bce_grad_off_argmax(x, p, a, r, lse, bce_log_aw(log_pw, log1m_pw, w_is_c), w_is_c)
    g.scatter_(1, w[:, None], bce_grad_argmax(log_pw, log1m_pw, r, w_is_c)[:, None])
    return g


# The per-element pieces of bce, given the row's numbers (lse, w, log(1 - p_w), R): the
# reference's own loss and gradient above and fusedloss.parallel (each rank's slice, the row's
# numbers summed over the ranks) use these.

def bce_log1m(p: Tensor) -> Tensor:
    """``log(1 - p_k)`` in place on ``p``: exact for every ``k`` but the arg-max (``p_k <= 1/2``)."""
    return p.neg_().log1p_()


def bce_odds(p: Tensor) -> Tensor:
    """``a_k = p_k / (1 - p_k)``, a new buffer (at most 1 for every ``k`` but the arg-max)."""
    a = torch.neg(p).add_(1)
    return torch.div(p, a, out=a)


def bce_log_aw(log_pw: Tensor, log1m_pw: Tensor, w_is_c: Tensor) -> Tensor:
    """``log a_w = log p_w - log(1 - p_w)`` per row (0 where ``w == c``: ``p_j a_w`` is then ``-p_j``)."""
    return torch.where(w_is_c, torch.zeros_like(log_pw), log_pw - log1m_pw)


def bce_grad_off_argmax(x: Tensor, p: Tensor, a: Tensor, r: Tensor, lse: Tensor, log_aw: Tensor,
                        w_is_c: Tensor) -> Tensor:
    """``g_j = a_j - p_j R - p_j a_w`` for every column (``a`` holds ``a_j``, ``a_c = -1``; the result
    is written over ``a``, ``p`` is overwritten); the arg-max's column is then ``bce_grad_argmax``'s.
    ``a_w = p_w / (1 - p_w)`` may overflow (a wrong class leading by 89 in fp32), so ``p_j a_w =
    exp(x_j - lse + log a_w)`` in log space; when ``w == c``, ``a_w = -1``."""
    g = a.addcmul_(p, r[:, None], value=-1.0)    # a_j - p_j R
    p.copy_(x).sub_((lse - log_aw)[:, None]).exp_()
    return g.addcmul_(p, torch.where(w_is_c, 1.0, -1.0).to(p.dtype)[:, None])


def bce_grad_argmax(log_pw: Tensor, log1m_pw: Tensor, r: Tensor, w_is_c: Tensor) -> Tensor:
    """``g_w``: ``p_w (1 - R)`` when ``w != c``, ``-(1 - p_w) - p_w R`` when ``w == c``."""
    p_w = log_pw.exp()
    return torch.where(w_is_c, -log1m_pw.exp() - p_w * r, p_w * (1 - r))


# ----------------------------------------------------------------------------
# The expected loss under a distribution of targets, every loss (docs/losses.md, "Soft targets"):
#   L_i = sum_k m_ik L(x_i, k),   m_ik = w_k q_ik   (weights folded into the target mass)
# with L(x, k) the loss's own term for target k (no z-loss). For the target-only family
# L(x, k) = h(p_k); for bce, with T = sum_j log(1 - p_j),
#   L(x, k) = -log p_k - (T - log(1 - p_k)).
# Only the arg-max w can have p_w > 1/2: every k != w takes log(1 - p_k) = log1p(-p_k) (exact
# there), w takes log(1 - p_w) = lse_{k != w} - lse (bce's mechanism). The gradient keeps w
# apart (A_w = sum_{k != w} m_k s_k, S_w = sum_{k != w} m_k, R_w = sum_{k != w} a_k, a = p / (1 - p)):
#   target-only, j != w: g_j = p_j A_w + m_w exp(log p_j + log s_w) - m_j s_j
#                  j == w: g_w = p_w A_w - m_w exp(log s_w + log(1 - p_w))
#   bce,         j != w: g_j = p_j (A_w - S R_w + S) - S_w p_j / (1 - p_w) - m_j s_j + S a_j
#                  j == w: g_w = p_w (A_w - S R_w) + S_w - S (1 - p_w)
# (S = S_w + m_w; bce's s_k = 1 / (1 - p_k), nllr's). No term is formed as 1 - p_w or lse - x_w.
# ----------------------------------------------------------------------------

class _Expected(NamedTuple):
    lp: Tensor       # (N, C) log p_k (k != w: x_k - lse; at w: -softplus(d_w))
    d: Tensor        # (N, C) d_k = log(1 - p_k) - log p_k
    l1m: Tensor      # (N, C) log(1 - p_k), exact at w too
    w: Tensor        # (N,) the arg-max
    log1m_w: Tensor  # (N,)
    lse: Tensor


def _expected_rows(x: Tensor, differentiable: bool = False) -> _Expected:
    """``differentiable``: out of place only (the composite path of docs/autograd.md: a double
    backward, forward AD and vmap go through it); else the columns at w are set in place."""
    cdtype = compute_dtype(x)
    xf = x.to(cdtype)
    lse = torch.logsumexp(xf, 1)
    w = (xf.detach() if differentiable else xf).argmax(1)
    lse_ex_w = lse_excluding(xf, w, cdtype, differentiable)
    log1m_w = lse_ex_w - lse
    lp = xf - lse[:, None]
    # At the arg-max p_w may round to 1: log p_w from d_w = lse_ex_w - x_w, never lse - x_w.
    x_w = xf.gather(1, w[:, None])[:, 0]
    d_w = lse_ex_w - x_w
    # log1p(-p) for k != w (p_k <= 1/2); p_w is zeroed first (log1p(-1) = -inf is replaced below).
    l1m = torch.log1p(-lp.exp().scatter(1, w[:, None], 0.0))
    if differentiable:
        l1m = l1m.scatter(1, w[:, None], log1m_w[:, None])
        lp = lp.scatter(1, w[:, None], (-softplus(d_w))[:, None])
        d = (l1m - lp).scatter(1, w[:, None], d_w[:, None])
    else:
        l1m.scatter_(1, w[:, None], log1m_w[:, None])
        lp.scatter_(1, w[:, None], (-softplus(d_w))[:, None])
        d = l1m - lp
        d.scatter_(1, w[:, None], d_w[:, None])
    return _Expected(lp, d, l1m, w, log1m_w, lse)


def _at(t: Tensor, w: Tensor) -> Tensor:
    return t.gather(1, w[:, None])[:, 0]


def _off_w(t: Tensor, w: Tensor) -> Tensor:
    return t.scatter(1, w[:, None], 0.0)


def _masked_product(m: Tensor, v: Tensor) -> Tensor:
    """``m * v`` with ``0 * inf = 0``: a class with no target mass adds nothing, also where its
    loss is infinite (a -inf logit)."""
    return torch.where(m == 0, torch.zeros_like(v), m * v)


def expected_loss(x: Tensor, m: Tensor, variant: int, p: Params,
                  differentiable: bool = False) -> tuple[Tensor, _Expected]:
    """Row losses ``sum_k m_k L(x, k)`` of ``(N, C)`` logits (already capped) and the target mass
    ``m = w q`` (any shape broadcasting to ``(N, C)``), in the compute dtype (``differentiable``:
    out of place only, see :func:`_expected_rows`)."""
    r = _expected_rows(x, differentiable)
    m = m.to(r.lse.dtype).expand_as(r.lp)
    if variant == Variant.BCE:
        s_tot = m.sum(1)
        s_w = _off_w(m, r.w).sum(1)
        # sum_k m_k (-log p_k) + sum_{k != w} (m_k - S) log(1 - p_k) - S_w log(1 - p_w): every term >= 0.
        ce_part = _masked_product(m, softplus(r.d)).sum(1)
        rest = _off_w((m - s_tot[:, None]) * r.l1m, r.w).sum(1)
        w_part = torch.where(s_w == 0, torch.zeros_like(s_w), -s_w * r.log1m_w)
        return ce_part + rest + w_part, r
    h, _ = TARGET_ONLY_MATH[Variant(variant)](r.d, p)
    return _masked_product(m, h).sum(1), r


def expected_grad(x: Tensor, m: Tensor, variant: int, p: Params) -> Tensor:
    """``d/dx sum_k m_k L(x, k)``, ``(N, C)`` in the compute dtype (see the block comment above)."""
    r = _expected_rows(x)
    m = m.to(r.lse.dtype).expand_as(r.lp)
    w = r.w
    p_ = r.lp.exp()
    m_w = _at(m, w)
    if variant == Variant.BCE:
        a = _off_w(torch.exp(-r.d), w)  # a = p / (1 - p) = e^-d
        s = a + 1.0                     # s = 1 / (1 - p), nllr's
        a_sum = _off_w(_masked_product(m, s), w).sum(1)
        s_w = _off_w(m, w).sum(1)
        s_tot = s_w + m_w
        r_w = a.sum(1)
        coef = a_sum - s_tot * r_w + s_tot
        # S_w p_j / (1 - p_j): exp(log p_j - log(1 - p_w)), 0 where S_w = 0.
        ratio = torch.exp(r.lp - r.log1m_w[:, None])
        g = p_ * coef[:, None] - torch.where(s_w[:, None] == 0, torch.zeros_like(ratio), ratio * s_w[:, None])
        g = g - _masked_product(m, s) + s_tot[:, None] * a
        g_w = _at(p_, w) * (a_sum - s_tot * r_w) + s_w - s_tot * r.log1m_w.exp()
        return g.scatter_(1, w[:, None], g_w[:, None])
    _, log_s = TARGET_ONLY_MATH[Variant(variant)](r.d, p)
    log_s_w = _at(log_s, w)
    s = _off_w(log_s.exp(), w)
    a_sum = _off_w(_masked_product(m, s), w).sum(1)
    # m_w p_j s_w = m_w exp(log p_j + log s_w): p_j s_w stays bounded where s_w is huge (nllr, p_w -> 1).
    big = torch.exp(r.lp + log_s_w[:, None])
    g = p_ * a_sum[:, None] + torch.where(m_w[:, None] == 0, torch.zeros_like(big), big * m_w[:, None])
    g = g - _masked_product(m, s)
    g_w = _at(p_, w) * a_sum - torch.where(m_w == 0, torch.zeros_like(m_w), m_w * torch.exp(log_s_w + r.log1m_w))
    return g.scatter_(1, w[:, None], g_w[:, None])


def expected_per_class_loss(x: Tensor, variant: int, p: Params) -> Tensor:
    """``L(x, k)`` for every ``k``, ``(N, C)``: the targets' gradient ``d/dq_k sum_k w_k q_k L(x, k)``
    is ``w_k L(x, k)``."""
    r = _expected_rows(x)
    if variant == Variant.BCE:
        t_w = _off_w(r.l1m, r.w).sum(1)
        t_others = (t_w + r.log1m_w)[:, None] - r.l1m  # T - log(1 - p_k) for k != w
        t_others.scatter_(1, r.w[:, None], t_w[:, None])
        return softplus(r.d) - t_others
    return TARGET_ONLY_MATH[Variant(variant)](r.d, p)[0]


def _uniform_mass(x: Tensor, weight: Tensor | None, eps: float, cdtype) -> Tensor:
    """Label smoothing's part of the target mass, ``(eps / C) w_k``, as a ``(1, C)`` row."""
    c = x.shape[1]
    w = torch.ones(c, dtype=cdtype, device=x.device) if weight is None else weight.to(cdtype)
    return (w * (eps / c))[None, :]


def _smoothing_row_grad_output(grad_loss, target, weight, ignore_index, reduction, cdtype) -> Tensor:
    """dLoss/dloss_i per row, without the class weight: 0 on ignored rows, 'mean''s denominator in."""
    go = grad_loss.to(cdtype)
    if reduction == Reduction.MEAN:
        go = go / mean_denominator(target, weight, ignore_index, cdtype)
    keep = target != ignore_index
    return torch.where(keep, go.expand(keep.shape) if go.dim() else go, torch.zeros((), dtype=cdtype, device=keep.device))


# Class-probability targets, every loss (fusedloss::<backend>_soft_loss_fwd / _bwd, ops.py):
#   q' = (1 - eps) q + eps / C,   L_i = sum_k w_k q'_ik L(x_i, k)
# 'mean' divides by the number of rows (PyTorch's rule for probability targets). Stats:
# lse, S = sum_k w_k q'_k, log(1 - p_w), w.

def _soft_mass(probs: Tensor, weight: Tensor | None, eps: float, cdtype) -> Tensor:
    m = _smoothed(probs.to(cdtype), eps)
    return m if weight is None else m * weight.to(cdtype)


def soft_loss_forward(logits: Tensor, probs: Tensor, weight: Tensor | None, variant: int, reduction: int,
                      label_smoothing: float, alpha: float, beta: float, gamma: float,
                      differentiable: bool = False) -> tuple[Tensor, Tensor]:
    """``differentiable``: out of place only, in the logits and the targets (the composite path)."""
    cdtype = compute_dtype(logits)
    m = _soft_mass(probs, weight, label_smoothing, cdtype)
    per_row, r = expected_loss(logits, m, variant, Params(alpha, beta, gamma), differentiable)
    if differentiable:
        stats = torch.stack([r.lse, m.sum(1).expand_as(r.lse), r.log1m_w, r.w.to(cdtype)], 1)
    else:
        stats = torch.zeros((logits.shape[0], STATS_COLS), dtype=cdtype, device=logits.device)
        stats[:, 0], stats[:, 1], stats[:, 2], stats[:, 3] = r.lse, m.sum(1), r.log1m_w, r.w.to(cdtype)
    if reduction == Reduction.NONE:
        return per_row, stats
    total = per_row.sum()
    return (total if reduction == Reduction.SUM else total / logits.shape[0]), stats


def soft_loss_backward(grad_loss: Tensor, logits: Tensor, probs: Tensor, weight: Tensor | None, stats: Tensor,
                       variant: int, reduction: int, label_smoothing: float, alpha: float, beta: float,
                       gamma: float) -> Tensor:
    cdtype = stats.dtype
    go = _soft_row_grad_output(grad_loss, logits.shape[0], reduction, cdtype)
    m = _soft_mass(probs, weight, label_smoothing, cdtype)
    g = expected_grad(logits, m, variant, Params(alpha, beta, gamma)).mul_(go)
    return g.to(logits.dtype)


def soft_loss_target_grad(grad_loss: Tensor, logits: Tensor, probs: Tensor, weight: Tensor | None, stats: Tensor,
                          variant: int, reduction: int, label_smoothing: float, alpha: float, beta: float,
                          gamma: float) -> Tensor:
    """``d loss / d q_k = go (1 - eps) w_k L(x, k)`` in the targets' dtype."""
    cdtype = stats.dtype
    go = _soft_row_grad_output(grad_loss, logits.shape[0], reduction, cdtype)
    g = expected_per_class_loss(logits, variant, Params(alpha, beta, gamma))
    if weight is not None:
        g.mul_(weight.to(cdtype))
    return g.mul_((1 - label_smoothing) * go).to(probs.dtype)


# ----------------------------------------------------------------------------
# Class-probability (soft) targets, CE only: F.cross_entropy's semantics.
#   L_i = sum_k w_k y_ik (lse_i - x_ik),  y = (1 - eps) y + eps / C
#   dL_i/dx_j = (sum_k w_k y_ik) p_j - w_j y_ij;  dL_i/dy_ij = (1 - eps) w_j (lse_i - x_ij)
# 'mean' divides by the number of rows (not by weights), as PyTorch does.
# ----------------------------------------------------------------------------

def _smoothed(y: Tensor, eps: float) -> Tensor:
    return y if eps == 0 else y * (1 - eps) + eps / y.shape[1]


def _soft_rows(logits: Tensor, probs: Tensor, weight: Tensor | None, label_smoothing: float):
    """Per-row loss, ``lse`` and ``w y'`` (out of place: differentiable in all three inputs)."""
    cdtype = compute_dtype(logits)
    x = logits.to(cdtype)
    lse = torch.logsumexp(x, 1)
    wy = _smoothed(probs.to(cdtype), label_smoothing)
    if weight is not None:
        wy = wy * weight.to(cdtype)
    # sum_k wy_k (lse - x_k): every term >= 0 (no cancellation for large logits), and a -inf
    # logit with zero target mass gives 0, not NaN.
    per_row = torch.where(wy == 0, torch.zeros_like(x), wy * (lse[:, None] - x)).sum(1)
    return per_row, lse, wy


def _soft_reduce(per_row: Tensor, reduction: int) -> Tensor:
    if reduction == Reduction.NONE:
        return per_row
    total = per_row.sum()
    return total if reduction == Reduction.SUM else total / per_row.shape[0]


def soft_forward(logits: Tensor, probs: Tensor, weight: Tensor | None, reduction: int,
                 label_smoothing: float) -> tuple[Tensor, Tensor]:
    """Loss and the stats ``(N, STATS_COLS)``: ``lse``, ``S = sum_k w_k y'_k``, 0, 0."""
    per_row, lse, wy = _soft_rows(logits, probs, weight, label_smoothing)
    stats = torch.zeros((per_row.shape[0], STATS_COLS), dtype=lse.dtype, device=lse.device)
    stats[:, 0], stats[:, 1] = lse, wy.sum(1)
    return _soft_reduce(per_row, reduction), stats


def differentiable_soft_forward(logits: Tensor, probs: Tensor, weight: Tensor | None, reduction: int,
                                label_smoothing: float) -> tuple[Tensor, Tensor]:
    """:func:`soft_forward`'s loss and ``lse``, out of place (the composite path, docs/autograd.md)."""
    per_row, lse, _ = _soft_rows(logits, probs, weight, label_smoothing)
    return _soft_reduce(per_row, reduction), lse


def _soft_row_grad_output(grad_loss: Tensor, n: int, reduction: int, cdtype) -> Tensor:
    go = grad_loss.to(cdtype)
    if reduction == Reduction.MEAN:
        go = go / n
    return go[:, None] if go.dim() else go


def soft_backward(grad_loss: Tensor, logits: Tensor, probs: Tensor, weight: Tensor | None, stats: Tensor,
                  reduction: int, label_smoothing: float) -> Tensor:
    """``d loss / d logits = go (S p_j - w_j y'_j)``."""
    cdtype = stats.dtype
    go = _soft_row_grad_output(grad_loss, logits.shape[0], reduction, cdtype)
    wy = _smoothed(probs.to(cdtype), label_smoothing)
    if weight is not None:
        wy = wy * weight.to(cdtype)
    g = shifted(logits, stats[:, 0], cdtype).exp_()
    g.mul_(stats[:, 1:2]).sub_(wy).mul_(go)
    return g.to(logits.dtype)


def soft_target_grad(grad_loss: Tensor, logits: Tensor, probs: Tensor, weight: Tensor | None, stats: Tensor,
                     reduction: int, label_smoothing: float) -> Tensor:
    """``d loss / d y_j = go (1 - eps) w_j (lse - x_j)`` in the targets' dtype."""
    cdtype = stats.dtype
    go = _soft_row_grad_output(grad_loss, logits.shape[0], reduction, cdtype)
    g = torch.sub(stats[:, 0:1], logits.to(cdtype))
    if weight is not None:
        g.mul_(weight.to(cdtype))
    return g.mul_((1 - label_smoothing) * go).to(probs.dtype)


# ----------------------------------------------------------------------------
# The textbook formulas, for the benchmarks' "naive" baseline: plain autograd,
# p = softmax(x), 1 - p by subtraction. Finite on ordinary logits; inf/NaN on
# the extreme ones, which is the point of showing it.
# ----------------------------------------------------------------------------

def naive_loss(logits: Tensor, target: Tensor, loss: str = "ce", *, alpha: float = 1.5, beta: float = 1.0,
               gamma: float = 2.0, reduction: str = "mean") -> Tensor:
    v = variant_id(loss)
    p = torch.softmax(logits.float(), dim=1)
    p_c = p.gather(1, target.long()[:, None])[:, 0]
    if v == Variant.CE:
        rows = -torch.log(p_c)
    elif v == Variant.BCE:
        one_minus = torch.log(1 - p).scatter(1, target.long()[:, None], 0.0)
        rows = -torch.log(p_c) - one_minus.sum(1)
    elif v == Variant.NLLR:
        rows = torch.log(1 - p_c) - torch.log(p_c)
    elif v == Variant.CRL:
        rows = beta * torch.log(alpha + 1 - p_c) - torch.log(p_c)
    elif v == Variant.LACE:
        rows = -(1 - p_c) * torch.log(p_c)
    else:
        rows = -(1 - p_c) ** gamma * torch.log(p_c)
    r = reduction_id(reduction)
    return rows if r == Reduction.NONE else (rows.sum() if r == Reduction.SUM else rows.mean())


def extreme_logits(n: int, c: int, *, dtype: torch.dtype = torch.float32, device="cpu",
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Logits that break the textbook formulas, cycling over row kinds: the target leading
    by 20, 100 and 1000; a wrong class leading by 50; masked classes at ``-inf``; a row of
    all-equal logits; an ordinary random row. Needs ``c >= 3``."""
    if c < 3:
        raise ValueError(f"extreme_logits needs c >= 3; got {c}")
    x = torch.randn(n, c, generator=generator, dtype=torch.float32)
    t = torch.randint(0, c, (n,), generator=generator)
    rows = torch.arange(n)
    kind = rows % 7
    lead = torch.tensor([20.0, 100.0, 1000.0])
    for k in range(3):
        sel = rows[kind == k]
        x[sel, t[sel]] = x[sel].max(1).values + lead[k]
    sel = rows[kind == 3]
    wrong = (t[sel] + 1) % c
    x[sel, wrong] = x[sel].max(1).values + 50.0
    sel = rows[kind == 4]
    masked = (t[sel][:, None] + torch.arange(1, c // 2 + 1)[None, :]) % c
    x[sel[:, None], masked] = -math.inf
    x[rows[kind == 5]] = 0.25
    return x.to(dtype=dtype, device=device), t.to(device)


__all__ = ["LOSSES", "forward", "backward", "soft_forward", "soft_backward", "soft_loss_forward",
           "soft_loss_backward", "expected_loss", "expected_grad", "naive_loss",
           "differentiable_forward", "differentiable_soft_forward",
           "extreme_logits", "mean_denominator", "lse_excluding", "TARGET_ONLY_MATH"]
