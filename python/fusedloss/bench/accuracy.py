"""Correctness next to speed: each backend against float64 math.

The oracle is the project's reference formulas run on a float64 copy of the
*same* (already rounded) logits, so the error shown is the backend's own
arithmetic error, not the rounding of the inputs to float16/bfloat16.
Per-row losses (``reduction="none"``) are compared, and the gradient of their
sum, so one bad row cannot hide inside a mean.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

import fusedloss as fl

from .backends import HYPER, LossFn


@dataclass(frozen=True)
class Oracle:
    """Float64 per-row losses and gradient for one (loss, logits, target)."""

    loss: torch.Tensor
    grad: torch.Tensor


@dataclass(frozen=True)
class Accuracy:
    """Max abs errors over entries where both sides are finite, and the count
    of entries the backend made nan/inf where the oracle is not."""

    loss_err: float
    grad_err: float
    nan: int
    inf: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _loss_and_grad(fn: LossFn, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # A private leaf per call: some backends (Liger) overwrite their input.
    leaf = x.detach().clone().requires_grad_()
    rows = fn(leaf, t, "none")
    (grad,) = torch.autograd.grad(rows, leaf, torch.ones_like(rows))
    return rows.detach(), grad


def oracle(loss: str, x: torch.Tensor, t: torch.Tensor) -> Oracle:
    def reference(x64: torch.Tensor, t_: torch.Tensor, reduction: str) -> torch.Tensor:
        return fl.softmax_loss(x64, t_, loss, reduction=reduction, backend="reference", **HYPER)

    rows, grad = _loss_and_grad(reference, x.detach().double(), t)
    return Oracle(rows, grad)


def _compare(got: torch.Tensor, want: torch.Tensor) -> tuple[float, int, int]:
    got = got.double()
    both = torch.isfinite(got) & torch.isfinite(want)
    err = (got - want).abs()[both].max().item() if both.any() else 0.0
    nan = int((torch.isnan(got) & ~torch.isnan(want)).sum())
    inf = int((torch.isinf(got) & (got != want)).sum())
    return err, nan, inf


def check(fn: LossFn, x: torch.Tensor, t: torch.Tensor, ref: Oracle) -> Accuracy:
    """Run ``fn`` once on ``x`` and compare loss rows and gradient with ``ref``."""
    rows, grad = _loss_and_grad(fn, x, t)
    loss_err, loss_nan, loss_inf = _compare(rows, ref.loss)
    grad_err, grad_nan, grad_inf = _compare(grad, ref.grad)
    return Accuracy(loss_err, grad_err, loss_nan + grad_nan, loss_inf + grad_inf)
