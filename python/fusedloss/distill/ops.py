"""The distillation op every backend implements: the divergence of the student's softmax from
the teacher's, per row, and its gradient w.r.t. the student's logits, fused.

    distill(student (N, V), teacher (N, V)  same floating dtype, unit class stride,
            row_scale (N,)  float32 (float64 for float64 logits),
            temperature T > 0, divergence (DIVERGENCES), jsd_beta in (0, 1),
            grad (N, V) in the logits' dtype, contiguous, or None,   [mutated]
            accumulate)
      -> D (N,) float32 (float64 for float64 logits), computed for every row:
           P = softmax(teacher / T), Q = softmax(student / T),
           kl:          D = T^2 KL(P || Q)
           reverse_kl:  D = T^2 KL(Q || P)
           jsd:         M = beta P + (1 - beta) Q,  D = T^2 (beta KL(P || M) + (1 - beta) KL(Q || M))
    and, when ``grad`` is given, row i of ``grad`` becomes (accumulate=False) or gains
    (accumulate=True) ``row_scale[i] * dD_i / d student_i`` (computed in the math type and
    rounded once at the store; a row with row_scale 0 is written 0 / left unchanged):
           kl:          T (Q - P)
           reverse_kl:  T Q (r - sum_k Q_k r_k),          r = log Q - log P
           jsd:         T (1 - beta) Q (u - sum_k Q_k u_k), u = log Q - log M
    The logs are formed in log space (log Q_j = s_j / T - lse(s / T)), never as log(exp(.)),
    so a probability that underflows still has its exact log; 0 log 0 terms are 0.

``accumulate=True`` lets the hard loss's fused gradient and the divergence's share one
(N, V) buffer: the caller's autograd Function writes (1 - kd_weight) dH first, then this op
adds kd_weight dD into it. The op is not differentiable itself (the Function is).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..ops import NAMESPACE, stats_dtype

#: divergence ids: part of the op ABI (append, never renumber).
DIVERGENCES = {"kl": 0, "reverse_kl": 1, "jsd": 2}

DISTILL_SCHEMA = ("(Tensor student, Tensor teacher, Tensor row_scale, float temperature, int divergence, "
                  "float jsd_beta, Tensor(a!)? grad, bool accumulate) -> Tensor")


@dataclass(frozen=True)
class DistillOps:
    """Teacher logits as the target: ``fwd`` is ``fusedloss::<name>_distill`` (DISTILL_SCHEMA).
    Absent: the reference's op, on the same device."""
    fwd: Callable


def fake_distill(student, teacher, row_scale, temperature, divergence, jsd_beta, grad, accumulate):
    return student.new_empty((student.shape[0],), dtype=stats_dtype(student))


def register_distill_fake(name: str) -> None:
    torch.library.register_fake(f"{NAMESPACE}::{name}")(fake_distill)


def _xlogratio_sum(a: Tensor, log_a: Tensor, log_b: Tensor) -> Tensor:
    """sum_k a_k (log a_k - log b_k), with 0 log 0 = 0 (a_k = 0 contributes nothing, even
    where log b_k = -inf too)."""
    return torch.where(a > 0, a * (log_a - log_b), 0).sum(-1)


def distill_rows(student: Tensor, teacher: Tensor, temperature: float, divergence: int, jsd_beta: float,
                 with_grad: bool = False) -> tuple[Tensor, Tensor | None]:
    """The reference: (D (N,), dD/dstudent (N, V) or None), in the math type (float32, float64
    for float64 logits). Plain PyTorch; holds a few (N, V) temporaries."""
    md = stats_dtype(student)
    t_inv = 1.0 / temperature
    log_q = torch.log_softmax(student.to(md) * t_inv, -1)
    log_p = torch.log_softmax(teacher.to(md) * t_inv, -1)
    p, q = log_p.exp(), log_q.exp()
    if divergence == DIVERGENCES["kl"]:
        d = _xlogratio_sum(p, log_p, log_q)
    elif divergence == DIVERGENCES["reverse_kl"]:
        d = _xlogratio_sum(q, log_q, log_p)
    else:
        log_m = torch.logaddexp(log_p + math.log(jsd_beta), log_q + math.log1p(-jsd_beta))
        d = jsd_beta * _xlogratio_sum(p, log_p, log_m) + (1 - jsd_beta) * _xlogratio_sum(q, log_q, log_m)
    t2 = temperature * temperature
    if not with_grad:
        return t2 * d, None
    if divergence == DIVERGENCES["kl"]:
        g = q - p
    else:
        # dD/dz_j = T^2 Q_j (g_j - sum_k Q_k g_k) with g = dKL/dQ: r = log Q - log P (reverse kl),
        # (1 - beta)(log Q - log M) (jsd); times dz/ds = 1/T.
        log_other = log_p if divergence == DIVERGENCES["reverse_kl"] else log_m
        qu = torch.where(q > 0, q * (log_q - log_other), 0)
        g = qu - q * qu.sum(-1, keepdim=True)
        if divergence == DIVERGENCES["jsd"]:
            g = g * (1 - jsd_beta)
    # Each row of g sums to 0 (the divergence depends on the student's logits only through the
    # softmax, which ignores a constant added to them). At a dominant class w (Q_w > 1/2) the
    # forms above subtract two numbers within e^-L of each other (Q_w - P_w with P_w ~ 1,
    # r_w - sum_k Q_k r_k with the sum ~ r_w) and lose all of a gradient ~ e^-L to rounding;
    # minus the sum over the other classes (in float64) is the same number without the
    # cancellation. Only there: in an ordinary row that sum would add V roundings to an entry the
    # forms above give to one.
    if g.shape[-1] > 1:
        w = log_q.argmax(-1, keepdim=True)
        others = -g.scatter(-1, w, 0.0).sum(-1, keepdim=True, dtype=torch.float64).to(g.dtype)
        dominant = log_q.gather(-1, w) > -math.log(2.0)
        g = g.scatter(-1, w, torch.where(dominant, others, g.gather(-1, w)))
    return t2 * d, temperature * g


def _reference_distill(student: Tensor, teacher: Tensor, row_scale: Tensor, temperature: float, divergence: int,
                       jsd_beta: float, grad: Tensor | None, accumulate: bool) -> Tensor:
    d, g = distill_rows(student, teacher, temperature, divergence, jsd_beta, with_grad=grad is not None)
    if grad is not None:
        g = g * row_scale.to(g.dtype)[:, None]
        if accumulate:
            g = g + grad.to(g.dtype)
        grad.copy_(g)
    return d


reference_distill = torch.library.custom_op(f"{NAMESPACE}::reference_distill", _reference_distill,
                                            mutates_args=("grad",), schema=DISTILL_SCHEMA)
reference_distill.register_fake(fake_distill)
