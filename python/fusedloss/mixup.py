"""Mixup's two targets for every loss: ``target=(y_a, y_b, lam)`` means

    lam * L(x, y_a) + (1 - lam) * L(x, y_b)

with each part reduced as the loss alone would be (``'mean'`` divides part a by its own
denominator and part b by its own, as the original mixup code's
``lam * criterion(out, y_a) + (1 - lam) * criterion(out, y_b)`` does); ``lam`` a float or a
per-row tensor (then ``lam_i`` weighs row i's parts). Defined for every loss, where a
class-probability target has no meaning for nllr/crl/lace/focal/bce.

Two implementations:

* fused (the backend's two-target op, where its ``TwoTargetOps.fuses`` says so: the C++
  extension's ``fusedloss::ext_mix_fwd/bwd`` on CPU and CUDA and the triton backend's
  ``fusedloss::triton_mix_fwd/bwd``, each for every loss, with or without ``softcap``): one
  read of each row for both targets' statistics and one gradient write. bce's two parts
  share ``lse``, the arg-max ``w`` and ``log(1 - p_w)``; each has its own ``R`` and loss term
  (its second, cached pass sums over the classes that are neither target nor ``w``, and each
  part adds the other target's terms);
* two passes (a backend without a two-target op, the reference, or a loss its ``TwoTargetOps.fuses``
  leaves out): the backend's one-target op twice, with ``reduction='none'``, combined here.
  Same values, twice the logits' traffic.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from . import dispatch, ops, reference
from .ops import (NAMESPACE, SCALARS, composite_backward_needed, composite_vjp, fake_backward, fake_forward,
                  scale_fused_grad)
from .validation import check_class_target, finite
from .variants import Reduction

MIX_FWD_SCHEMA = (f"(Tensor logits, Tensor target_a, Tensor target_b, Tensor lam, Tensor? weight, {SCALARS}, "
                  "bool compute_grad) -> (Tensor, Tensor, Tensor)")
MIX_BWD_SCHEMA = (f"(Tensor grad_loss, Tensor logits, Tensor target_a, Tensor target_b, Tensor lam, Tensor? weight, "
                  f"Tensor stats, {SCALARS}) -> Tensor")


def register_mix_op(fwd_name: str, bwd_op: Callable,
                    scale_grad: Callable[[Tensor, Tensor], Tensor] = scale_fused_grad) -> None:
    """Fake implementations and the autograd formula of a two-target op pair (``lam`` and the
    targets get no gradient)."""
    torch.library.register_fake(f"{NAMESPACE}::{fwd_name}")(
        lambda x, ta, tb, lam, w, *rest: fake_forward(x, ta, w, *rest))
    torch.library.register_fake(f"{NAMESPACE}::{fwd_name.replace('_fwd', '_bwd')}")(
        lambda go, x, ta, tb, lam, w, st, *scalars: fake_backward(go, x, ta, w, st, *scalars))

    def setup_context(ctx, inputs, output):
        logits, ta, tb, lam, weight, *scalars, compute_grad = inputs
        _, stats, grad = output
        ctx.scalars = tuple(scalars)
        ctx.fused = bool(compute_grad)
        ctx.mark_non_differentiable(stats, grad)
        ctx.set_materialize_grads(False)
        # The logits are saved with the fused gradient too (a double backward reads them).
        ctx.save_for_backward(grad if ctx.fused else logits, ta, tb, lam, weight, stats, logits)

    def backward(ctx, grad_loss, _grad_stats, _grad_grad):
        nones = (None,) * 14
        if grad_loss is None:
            return (None,) + nones
        saved, ta, tb, lam, weight, stats, logits = ctx.saved_tensors
        if composite_backward_needed(grad_loss):
            scalars = ctx.scalars
            (gx,) = composite_vjp(lambda x: composite_mixed_loss(x, ta, tb, lam, weight, scalars), grad_loss,
                                  (logits,), (True,))
            return (gx,) + nones
        if ctx.fused:
            return (scale_grad(saved, grad_loss),) + nones
        return (bwd_op(grad_loss, saved, ta, tb, lam, weight, stats, *ctx.scalars),) + nones

    torch.library.register_autograd(f"{NAMESPACE}::{fwd_name}", backward, setup_context=setup_context)
    ops.register_eager(fwd_name, setup_context, backward)


def check_mixed_target(logits: Tensor, target: tuple) -> tuple[Tensor, Tensor, float | Tensor]:
    """``(y_a, y_b, lam)``: two class-index targets of the usual shape, ``lam`` a float in
    [0, 1] or a floating tensor of the targets' shape (or a scalar tensor). Tensor values of
    ``lam`` are not range-checked (that would read device memory)."""
    if len(target) != 3:
        raise ValueError(f"a mixed target is (y_a, y_b, lam); got a tuple of {len(target)} items")
    ya, yb, lam = target
    for name, t in (("y_a", ya), ("y_b", yb)):
        if not isinstance(t, Tensor) or t.is_floating_point():
            raise TypeError(f"mixed target {name} must be a tensor of class indices (int64/int32); got "
                            f"{type(t).__name__ if not isinstance(t, Tensor) else t.dtype}")
    check_class_target(logits, ya)
    check_class_target(logits, yb)
    if isinstance(lam, Tensor) and lam.dim() == 0 and lam.device.type == "cpu" and lam.device != logits.device:
        # A CPU scalar beside device logits (torch.distributions.Beta(a, a).sample()): read as a
        # float, as PyTorch's ops take CPU scalars; reading CPU memory is not a synchronization.
        if not lam.is_floating_point():
            raise TypeError(f"mixed target lam must be floating; got {lam.dtype}")
        lam = float(lam)
    if isinstance(lam, Tensor):
        if not lam.is_floating_point():
            raise TypeError(f"mixed target lam must be floating; got {lam.dtype}")
        if lam.dim() != 0 and tuple(lam.shape) != tuple(ya.shape):
            raise ValueError(f"mixed target lam must be a scalar or have the targets' shape {tuple(ya.shape)}; "
                             f"got {tuple(lam.shape)}")
        if lam.device != logits.device:
            raise ValueError(f"lam is on {lam.device} but logits are on {logits.device}; move them to one device")
    elif isinstance(lam, (int, float)) and not isinstance(lam, bool):
        if not (finite(lam) and 0.0 <= lam <= 1.0):
            raise ValueError(f"mixed target lam must be in [0, 1]; got {lam}")
    else:
        raise TypeError(f"mixed target lam must be a float or a tensor; got {type(lam).__name__}")
    return ya, yb, lam


def lam_rows(lam: float | Tensor, n: int, like: Tensor, dtype: torch.dtype) -> Tensor:
    """``lam`` as an (N,) tensor of the math type (no gradient flows into it)."""
    if isinstance(lam, Tensor):
        return lam.detach().to(dtype).reshape(-1).expand(n) if lam.dim() == 0 else lam.detach().reshape(-1).to(dtype)
    return torch.full((n,), float(lam), dtype=dtype, device=like.device)


@dataclass(frozen=True)
class TwoTargetOps:
    """Mixup's two targets: ``fusedloss::<name>_mix_fwd`` (MIX_FWD_SCHEMA), for the (variant, softcap)
    that ``fuses`` accepts; ``compute_grad`` follows the one-target ops' ``fused_grad``. Absent, or not
    fused: two passes of the backend's one-target forward."""
    fwd: Callable
    fuses: Callable[[int, float], bool] = lambda variant, softcap: True


def composite_mixed_loss(x: Tensor, ta: Tensor, tb: Tensor, lam: Tensor, weight: Tensor | None,
                         scalars: tuple) -> Tensor:
    """The two-target loss in differentiable PyTorch ops (``reference.differentiable_forward`` per
    part; ``lam`` differentiable too): the composite path of docs/autograd.md."""
    variant, red = scalars[0], scalars[1]
    none_scalars = (variant, int(Reduction.NONE)) + tuple(scalars[2:])
    return _combine([(reference.differentiable_forward(x, t, weight, *none_scalars)[0], k)
                     for t, k in ((ta, lam), (tb, 1.0 - lam))], red, ta, tb, weight, scalars[2])


def _combine(parts: list, red: int, ta: Tensor, tb: Tensor, weight: Tensor | None, ignore_index: int) -> Tensor:
    """``k_a L_a + k_b L_b`` from the parts' per-row losses, each part reduced on its own."""
    # where, not a product: a row whose part counts 0 adds 0 even when its loss is inf
    parts = [torch.where(k == 0, torch.zeros_like(rows), k * rows) for rows, k in parts]
    if red == Reduction.NONE:
        return parts[0] + parts[1]
    if red == Reduction.SUM:
        return parts[0].sum() + parts[1].sum()
    dt = parts[0].dtype
    return (parts[0].sum() / reference.mean_denominator(ta, weight, ignore_index, dt)
            + parts[1].sum() / reference.mean_denominator(tb, weight, ignore_index, dt))


def mixed_loss(be: dispatch.Backend, x: Tensor, ta: Tensor, tb: Tensor, lam: Tensor, weight: Tensor | None,
               scalars: tuple, compute_grad: bool) -> Tensor:
    """The reduced (or per-row) two-target loss of ``(N, C)`` rows, fused where the backend
    has a two-target kernel for this loss, else two passes."""
    variant, red, ignore_index, eps, alpha, beta, gamma, z_loss, softcap = scalars
    mix = be.family(TwoTargetOps)
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    if mix is not None and mix.fuses(variant, softcap):
        out, _, _ = ops.call_eager(mix.fwd, needs_grad, x, ta, tb, lam, weight, *scalars, compute_grad)
        return out
    none_scalars = (variant, int(Reduction.NONE)) + tuple(scalars[2:])
    parts = [(ops.call_eager(be.one_target.fwd, needs_grad, x, t, weight, *none_scalars, compute_grad)[0], k)
             for t, k in ((ta, lam), (tb, 1.0 - lam))]
    return _combine(parts, red, ta, tb, weight, ignore_index)
