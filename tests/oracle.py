"""The float64 oracle every test compares with: docs/losses.md's closed forms, written here
independently of the code under test (masked log-sum-exp, no memory tricks), and
gradients from float64 autograd of those forms.

Also the per-dtype tolerances, stated once.
"""
from __future__ import annotations

import math

import torch

#: (rtol, atol) for losses, and for gradients atol is relative to the largest |gradient|.
TOLERANCES = {
    torch.float64: dict(loss=(1e-10, 1e-12), grad=(1e-9, 1e-12)),
    torch.float32: dict(loss=(2e-5, 1e-6), grad=(1e-4, 1e-6)),
    torch.float16: dict(loss=(2e-3, 1e-4), grad=(4e-3, 2e-3)),
    torch.bfloat16: dict(loss=(1.6e-2, 1e-3), grad=(1.6e-2, 8e-3)),
}


def _softplus(t: torch.Tensor) -> torch.Tensor:
    """log(1 + e^t), exact for every t (torch's softplus is linear past its threshold)."""
    return torch.logaddexp(t, torch.zeros_like(t))


def _row_terms(x: torch.Tensor, t: torch.Tensor):
    """log p_c and log(1 - p_c) from x_c and lse_ex, the log-sum-exp over the competitors
    (docs/losses.md, "Four numbers per row"). Not ``x_c - lse``: when the target leads by
    more than ~37, lse - x_c = log1p(e^-37) is below float64's resolution of lse and would
    read 0 (likewise lse_ex - lse when the target trails)."""
    lse = torch.logsumexp(x, 1)
    masked = x.scatter(1, t[:, None], -math.inf)
    lse_ex = torch.logsumexp(masked, 1) if x.shape[1] > 1 else torch.full_like(lse, -math.inf)
    x_c = x.gather(1, t[:, None])[:, 0]
    return -_softplus(lse_ex - x_c), -_softplus(x_c - lse_ex), lse


def _bce_log1m(x: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """log(1 - p_k) for every k: log1p(-p_k) except at the arg-max, whose value comes from
    the log-sum-exp over the other classes (docs/losses.md, "bce", stability)."""
    w = x.argmax(1)
    # Zero p_w before log1p: log1p(-1) = -inf would make autograd's 0 * inf a NaN.
    p_others = torch.exp(x - lse[:, None]).scatter(1, w[:, None], 0.0)
    out = torch.log1p(-p_others)
    if x.shape[1] > 1:
        lse_exw = torch.logsumexp(x.scatter(1, w[:, None], -math.inf), 1)
    else:
        lse_exw = torch.full_like(lse, -math.inf)
    return out.scatter(1, w[:, None], -_softplus(x.gather(1, w[:, None])[:, 0] - lse_exw)[:, None])


def per_row_loss(x: torch.Tensor, t: torch.Tensor, loss: str, alpha=1.5, beta=1.0, gamma=2.0):
    log_p, log_q, lse = _row_terms(x, t)
    if loss == "ce":
        return -log_p
    if loss == "bce":
        return -log_p - _bce_log1m(x, lse).scatter(1, t[:, None], 0.0).sum(1)
    if loss == "nllr":
        return log_q - log_p
    if loss == "crl":
        # beta = 0 is ce, also at C = 1 with alpha = 0, where beta * log(0) would read 0 * -inf.
        return (beta * torch.log(alpha + torch.exp(log_q)) if beta else 0.0) - log_p
    if loss == "lace":
        return -torch.exp(log_q) * log_p
    if loss == "focal":
        q_gamma = torch.ones_like(log_q) if gamma == 0 else torch.exp(gamma * log_q)
        return -q_gamma * log_p
    raise ValueError(loss)


def per_class_loss(x: torch.Tensor, loss: str, alpha=1.5, beta=1.0, gamma=2.0) -> torch.Tensor:
    """(N, C): L(x, k), the loss of each row had its target been class k (docs/losses.md's table),
    from log p_k and log(1 - p_k) of every k (log(1 - p_k) exact at the arg-max, _bce_log1m)."""
    lse = torch.logsumexp(x, 1)
    log_q = _bce_log1m(x, lse)                    # log(1 - p_k)
    # log p_k = -softplus(lse_{j != k} - x_k), lse_{j != k} = lse + log(1 - p_k): exact where p_k -> 1.
    log_p = -_softplus(lse[:, None] + log_q - x)
    q = torch.exp(log_q)
    if loss == "ce":
        return -log_p
    if loss == "bce":
        return -log_p - (log_q.sum(1, keepdim=True) - log_q)
    if loss == "nllr":
        return log_q - log_p
    if loss == "crl":
        return (beta * torch.log(alpha + q) if beta else 0.0) - log_p
    if loss == "lace":
        return -q * log_p
    if loss == "focal":
        return -(torch.ones_like(q) if gamma == 0 else q ** gamma) * log_p
    raise ValueError(loss)


def oracle_soft_loss(x, q, loss="ce", weight=None, reduction="mean", label_smoothing=0.0, alpha=1.5, beta=1.0,
                     gamma=2.0):
    """Float64 expected loss sum_k w_k q'_k L(x, k) of class probabilities q (N, C), q' = (1 - eps) q + eps / C;
    'mean' divides by N (PyTorch's rule for probability targets). A class with no mass adds 0 even where its
    loss is infinite."""
    assert x.dtype == torch.float64
    c = x.shape[1]
    q = q.double()
    if label_smoothing:
        q = (1 - label_smoothing) * q + label_smoothing / c
    m = q if weight is None else q * weight.double()[None, :]
    per = per_class_loss(x, loss, alpha, beta, gamma)
    # An infinite loss with no mass adds 0 (and keeps autograd's d/dm = L(x, k) where it is finite).
    per = torch.where(torch.isinf(per) & (m == 0), torch.zeros_like(per), per)
    rows = (m * per).sum(1)
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / x.shape[0]


def oracle_soft_loss_and_grad(x, q, loss="ce", grad_output=None, **kw):
    """(loss, d loss/d x, d loss/d q) in float64 by autograd of :func:`oracle_soft_loss`."""
    x64 = x.detach().double().requires_grad_(True)
    q64 = q.detach().double().requires_grad_(True)
    out = oracle_soft_loss(x64, q64, loss, **kw)
    go = torch.ones_like(out) if grad_output is None else grad_output.double()
    gx, gq = torch.autograd.grad(out, (x64, q64), go)
    return out.detach(), gx, gq


def oracle_loss(x, target, loss="ce", weight=None, ignore_index=-100, reduction="mean",
                label_smoothing=0.0, alpha=1.5, beta=1.0, gamma=2.0, z_loss=0.0, softcap=None,
                smoothing_term="expected"):
    """Float64 loss of (N, C) logits with PyTorch's weight / ignore_index / reduction semantics.
    ``x`` must be float64 (pass ``requires_grad`` to get the gradient by autograd).

    ``softcap``: the loss of ``softcap * tanh(x / softcap)``; ``z_loss``: ``z_loss * lse^2`` added
    to each counted row's loss, times its class weight (docs/losses.md). Label smoothing is the
    expected loss under the uniform part, ``(eps / C) sum_k w_k L(x, k)``; ``smoothing_term="ce"``
    gives the older smoothed-CE term ``(eps / C) sum_k w_k (lse - x_k)`` beside every loss, which the
    Triton kernels still compute when called directly (the functional refuses it for loss != ce)."""
    assert x.dtype == torch.float64
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    c = x.shape[1]
    target = target.long()
    keep = target != ignore_index
    t = torch.where(keep, target, torch.zeros_like(target))
    w = torch.ones(c, dtype=torch.float64) if weight is None else weight.double()
    w_row = torch.where(keep, w[t], torch.zeros((), dtype=torch.float64))
    rows = per_row_loss(x, t, loss, alpha, beta, gamma)
    rows = torch.where(keep, rows * w_row, torch.zeros_like(rows))
    if label_smoothing:
        # The expected loss under the uniform part of the target: (eps / C) sum_k w_k L(x, k).
        per = per_class_loss(x, "ce" if smoothing_term == "ce" else loss, alpha, beta, gamma)
        smooth = (per * w[None, :]).sum(1)
        rows = (1 - label_smoothing) * rows + torch.where(keep, label_smoothing / c * smooth, torch.zeros_like(smooth))
    if z_loss:
        rows = rows + torch.where(keep, z_loss * torch.logsumexp(x, 1).square() * w_row, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / w_row.sum()


def oracle_loss_and_grad(x, target, loss="ce", grad_output=None, **kw):
    """(loss, d loss/d x) in float64 for logits of any dtype (converted exactly to float64)."""
    x64 = x.detach().double().requires_grad_(True)
    out = oracle_loss(x64, target, loss, **kw)
    go = torch.ones_like(out) if grad_output is None else grad_output.double()
    (g,) = torch.autograd.grad(out, x64, go)
    return out.detach(), g


def assert_close(actual, expected, dtype, kind: str, msg: str = ""):
    """Compare with the per-dtype tolerance of ``kind`` ("loss" or "grad"); for gradients the
    absolute part scales with the largest expected magnitude. NaN/inf must match exactly."""
    rtol, atol = TOLERANCES[dtype][kind]
    expected = expected.double()
    actual = actual.double()
    if kind == "grad":
        scale = expected[torch.isfinite(expected)].abs().max().item() if expected.numel() else 0.0
        atol = atol * max(scale, 1e-30)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{msg}\n{m}")
