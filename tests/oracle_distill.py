"""The float64 oracle of distillation (docs/distillation.md), written from the definitions:
P = softmax(teacher / T), Q = softmax(student / T), the divergences as sums of p log(p / q)
over the classes where p > 0, gradients by float64 autograd. Independent of
fusedloss.distill (no log-space shortcuts shared with it)."""
from __future__ import annotations

import math

import torch


def _kl(a_log: torch.Tensor, b_log: torch.Tensor) -> torch.Tensor:
    """KL(A || B) per row from log-probabilities; classes with A = 0 contribute 0."""
    a = a_log.exp()
    terms = a * (a_log - b_log)
    return torch.where(a > 0, terms, torch.zeros_like(terms)).sum(-1)


def divergence_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float, divergence: str,
                    jsd_beta: float = 0.5) -> torch.Tensor:
    """D_i (float64) = T^2 times the divergence of row i; differentiable w.r.t. ``student``."""
    s = student.double() / temperature
    t = teacher.double().detach() / temperature
    log_q = s - torch.logsumexp(s, -1, keepdim=True)
    log_p = t - torch.logsumexp(t, -1, keepdim=True)
    if divergence == "kl":
        d = _kl(log_p, log_q)
    elif divergence == "reverse_kl":
        d = _kl(log_q, log_p)
    elif divergence == "jsd":
        m = jsd_beta * log_p.exp() + (1 - jsd_beta) * log_q.exp()
        log_m = torch.log(m)
        d = jsd_beta * _kl(log_p, log_m) + (1 - jsd_beta) * _kl(log_q, log_m)
    else:
        raise ValueError(divergence)
    return temperature * temperature * d


def divergence_grad(student: torch.Tensor, teacher: torch.Tensor, temperature: float, divergence: str,
                    jsd_beta: float = 0.5, row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """d (sum_i row_weight_i D_i) / d student, float64 autograd."""
    x = student.detach().double().requires_grad_(True)
    d = divergence_rows(x, teacher, temperature, divergence, jsd_beta)
    w = torch.ones_like(d) if row_weight is None else row_weight.double()
    (g,) = torch.autograd.grad((d * w).sum(), x)
    return g


def check_logs_math(student, teacher, temperature, divergence, jsd_beta=0.5):
    """A second float64 evaluation by plain loops over one row (tiny shapes only): the oracle of
    the oracle, used once in the tests to pin the formulas above."""
    out = []
    for srow, trow in zip(student.double().tolist(), teacher.double().tolist()):
        zs = [v / temperature for v in srow]
        zt = [v / temperature for v in trow]
        ms, mt = max(zs), max(zt)
        q = [math.exp(v - ms) for v in zs]
        p = [math.exp(v - mt) for v in zt]
        q = [v / sum(q) for v in q]
        p = [v / sum(p) for v in p]

        def kl(a, b):
            return sum(ai * math.log(ai / bi) for ai, bi in zip(a, b) if ai > 0)

        if divergence == "kl":
            d = kl(p, q)
        elif divergence == "reverse_kl":
            d = kl(q, p)
        else:
            m = [jsd_beta * pi + (1 - jsd_beta) * qi for pi, qi in zip(p, q)]
            d = jsd_beta * kl(p, m) + (1 - jsd_beta) * kl(q, m)
        out.append(temperature * temperature * d)
    return torch.tensor(out, dtype=torch.float64)


def kl_grad_stable(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """kl's dD/dstudent = T (Q_j - P_j) in float64 without the cancellation at a class where Q_j or
    P_j exceeds 1/2 (both near 1 when teacher and student lead on the same class: the plain
    difference of two numbers within e^-lead of 1 reads 0 in float64 at a lead of 100): there
    T ((1 - P_j) - (1 - Q_j)) = T (sum_{k != j} P_k - sum_{k != j} Q_k), each sum over the other
    classes. Elsewhere the plain difference (no cancellation: both are below 1/2)."""
    s = student.double() / temperature
    t = teacher.double() / temperature
    q, p = torch.softmax(s, -1), torch.softmax(t, -1)
    g = q - p
    for i, j in ((p > 0.5) | (q > 0.5)).nonzero().tolist():
        others = torch.ones(s.shape[-1], dtype=torch.bool)
        others[j] = False
        g[i, j] = p[i, others].sum() - q[i, others].sum()
    return temperature * g
