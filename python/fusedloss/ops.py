"""The ``torch.library`` ops: one forward/backward pair per backend, one schema for all.

Every backend registers ``fusedloss::<backend>_fwd`` and ``fusedloss::<backend>_bwd``
with the schemas below (the C++ extension defines them in C++ with the same text),
and this module adds the fake (meta) implementations and the autograd formula,
so ``torch.compile(fullgraph=True)`` traces any backend without graph breaks.

Forward contract::

    fwd(logits (N, C) with unit class stride, target (N,) int64/int32, weight (C,)?,
        variant, reduction, ignore_index, label_smoothing, alpha, beta, gamma, z_loss, softcap,
        compute_grad)   (softcap 0.0: no cap)
      -> (loss:  ()  for mean/sum or (N,) for none, float32 (float64 for float64 logits),
          stats: (N, STATS_COLS) same dtype, per-row statistics for the backward,
          grad:  (N, C) in the logits' dtype = d loss / d logits for grad_output = 1,
                 when compute_grad (backends with a fused gradient), else empty (0,))

    bwd(grad_loss (shape of loss), logits, target, weight, stats, <same scalars>) -> (N, C)

The backward saves no ``(N, C)`` tensor except the logits, or, when the forward
already produced the gradient, that gradient instead of the logits.
"""
from __future__ import annotations

from dataclasses import dataclass
import functools
from typing import Callable

import torch
from torch import Tensor

from . import reference
from .validation import check_target_values, must_check_targets
from .variants import STATS_COLS, Reduction

NAMESPACE = "fusedloss"

SCALARS = ("int variant, int reduction, int ignore_index, float label_smoothing, "
           "float alpha, float beta, float gamma, float z_loss, float softcap")
FWD_SCHEMA = (f"(Tensor logits, Tensor target, Tensor? weight, {SCALARS}, bool compute_grad) "
              "-> (Tensor, Tensor, Tensor)")
BWD_SCHEMA = (f"(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, Tensor stats, "
              f"{SCALARS}) -> Tensor")


def stats_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def loss_dtype(logits: Tensor, dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype of the loss returned for ``logits``: the logits' own, except for float16/bfloat16
    logits under ``torch.autocast`` for their device type, where it is float32, as PyTorch's losses
    give there (``log_softmax``, ``nll_loss``, ``cross_entropy``, ``kl_div`` are on autocast's float32
    list: PyTorch casts the logits to float32 and returns a float32 loss). Our kernels compute in
    float32 from the half logits in either case (no float32 copy of them); only the final rounding
    of the loss differs: without this, a bfloat16 mean is rounded to 8 bits and a float16 sum can
    overflow to inf where PyTorch's is finite. The gradient keeps the logits' dtype, as PyTorch's
    (the cast's backward rounds it back). ``dtype``: the math dtype when it is not ``logits``' own
    (the promoted dtype of two inputs)."""
    d = logits.dtype if dtype is None else dtype
    if (d is torch.float16 or d is torch.bfloat16) and torch.is_autocast_enabled(logits.device.type):
        return torch.float32
    return d


def fake_forward(logits, target, weight, variant, reduction, ignore_index, label_smoothing,
                 alpha, beta, gamma, z_loss, softcap, compute_grad):
    n = logits.shape[0]
    dt = stats_dtype(logits)
    loss = logits.new_empty((n,) if reduction == Reduction.NONE else (), dtype=dt)
    stats = logits.new_empty((n, STATS_COLS), dtype=dt)
    grad = logits.new_empty(logits.shape) if compute_grad else logits.new_empty((0,))
    return loss, stats, grad


def fake_backward(grad_loss, logits, target, weight, stats, variant, reduction, ignore_index,
                  label_smoothing, alpha, beta, gamma, z_loss, softcap):
    return logits.new_empty(logits.shape)


def scale_fused_grad(grad: Tensor, grad_loss: Tensor) -> Tensor:
    """Default backward of a fused gradient: ``grad * grad_output`` (per row for 'none')."""
    scale = grad_loss if grad_loss.dim() == 0 else grad_loss[:, None]
    return (grad * scale).to(grad.dtype)


def scale_fused_grad_reusing(grad: Tensor, grad_loss: Tensor | None) -> Tensor | None:
    """Backward of a fused forward: ``grad * grad_loss``, without a second (N, C)
    buffer when ``grad_loss`` is one (``loss.backward()``): then the gradient the
    forward wrote *is* the answer, and autograd hands that very buffer to ``.grad``.

    The shortcut reads ``grad_loss``'s values, so it runs only in eager mode on CPU
    tensors, where that is a memory read and not a device synchronization. Traced
    (``torch.compile``: fake or functional tensors) and on GPUs, the product."""
    if grad_loss is None:  # the loss output got no gradient (grads are not materialized)
        return None
    if grad.device.type == "cpu" and type(grad_loss) is Tensor and not torch.compiler.is_compiling():
        # A 0-d grad_output (loss.backward() of 'mean'/'sum') is read as one number: cheaper
        # than the elementwise comparison and its reduction.
        if grad_loss.dim() == 0 and not grad_loss.requires_grad:
            if grad_loss.item() == 1.0:
                return grad
        elif bool((grad_loss == 1).all()):
            return grad
    return scale_fused_grad(grad, grad_loss)


def transforms_active() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jvp, ...) is active: the kernels' ops have
    no batching or forward-AD rule, so the loss and its backward take the composite path then."""
    return torch._C._are_functorch_transforms_active()


def composite_vjp(fn: Callable[..., Tensor], grad_loss: Tensor, inputs: tuple, needs: tuple) -> tuple:
    """``grad_loss`` times the derivative of ``fn(*inputs)`` (``reference.differentiable_*``) with
    respect to each input whose ``needs`` is true (None for the others): the backward's
    composite path. With grad mode on (``create_graph=True``: a double backward was asked for)
    the result is built on the saved inputs themselves, so it carries a graph to them and to
    ``grad_loss``; otherwise (a ``torch.func`` transform over the backward, e.g. the batched
    gradients of vmap) by ``torch.func.vjp`` on detached inputs."""
    idx = [i for i, need in enumerate(needs) if need]
    create = torch.is_grad_enabled()
    if create or not transforms_active():  # autograd (also under gradcheck's legacy vmap)
        xs = list(inputs)
        for i in idx:
            if not (create and xs[i].requires_grad):
                xs[i] = xs[i].detach().requires_grad_()
        with torch.enable_grad():
            out = fn(*xs)
        grads = torch.autograd.grad(out, [xs[i] for i in idx], grad_loss, create_graph=create, allow_unused=True)
        grads = [torch.zeros_like(xs[i]) if g is None else g for i, g in zip(idx, grads)]
    else:
        rest = [t.detach() if t is not None else None for t in inputs]

        def part(*wrt):
            args = list(rest)
            for i, t in zip(idx, wrt):
                args[i] = t
            return fn(*args)

        _, vjp_fn = torch.func.vjp(part, *[rest[i] for i in idx])
        grads = vjp_fn(grad_loss)
    res = [None] * len(inputs)
    for i, g in zip(idx, grads):
        res[i] = g
    return tuple(res)


def composite_backward_needed(grad_loss: Tensor) -> bool:
    """A registered backward takes the composite path when a graph is to be built through it
    (grad mode on: ``create_graph=True``) or a vmap wraps it (``torch.func`` transforms, or the
    legacy vmap of ``gradcheck(check_batched_grad=True)``, whose ``grad_loss`` is batched)."""
    return (torch.is_grad_enabled() or transforms_active()
            or torch._C._functorch.is_legacy_batchedtensor(grad_loss))


def first_order(what: str) -> Callable:
    """A backward decorator for the first-order-only paths (the LLM head, the vocabulary-parallel
    losses, triton's ``inplace_backward``): under ``create_graph=True`` the gradients it returns
    carry a node that raises when differentiated, naming ``what``. ``once_differentiable`` does
    that only when an argument of the backward requires grad, and ``grad_output`` usually does
    not, so a gradient penalty through it was a silent zero."""
    msg = (f"fusedloss: {what} is first order: differentiating its gradient (a double backward) is "
           "not implemented; fusedloss.softmax_loss on the logits supports it (docs/autograd.md)").encode()

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(ctx, *args):
            with torch.no_grad():
                outputs = fn(ctx, *args)
            if not torch.is_grad_enabled():
                return outputs
            outs = outputs if isinstance(outputs, tuple) else (outputs,)
            idx = [i for i, o in enumerate(outs) if isinstance(o, Tensor)]
            if not idx:
                return outputs
            wrapped = torch._C._functions.DelayedError(msg, len(idx))(
                *[outs[i].detach().requires_grad_() for i in idx])
            wrapped = wrapped if isinstance(wrapped, tuple) else (wrapped,)
            res = list(outs)
            for i, w in zip(idx, wrapped):
                res[i] = w
            return tuple(res) if isinstance(outputs, tuple) else res[0]
        return wrapper
    return deco


def one_target_backward(grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Tensor | None, saved: Tensor,
                        fused: bool, scalars: tuple, bwd_op: Callable,
                        scale_grad: Callable[[Tensor, Tensor], Tensor] = scale_fused_grad) -> Tensor:
    """The gradient of a one-target forward op's loss w.r.t. the logits: the composite path when
    a graph is built through the backward or a vmap wraps it, else the fused gradient times
    ``grad_loss`` (``saved`` is the forward's gradient) or ``bwd_op`` from the row stats (``saved``
    is the stats). The formula of :func:`register_autograd`'s Python ops, and of the C++ Autograd
    kernel of the extension's op outside the eager first-order step (csrc/autograd.cpp)."""
    if composite_backward_needed(grad_loss):
        grad_logits, _ = composite_vjp(
            lambda x, w: reference.differentiable_forward(x, target, w, *scalars)[0], grad_loss,
            (logits, weight), (True, False))
        return grad_logits
    if fused:
        return scale_grad(saved, grad_loss)
    return bwd_op(grad_loss, logits, target, weight, saved, *scalars)


def register_autograd(fwd_name: str, bwd_op: Callable,
                      scale_grad: Callable[[Tensor, Tensor], Tensor] = scale_fused_grad) -> None:
    """Attach the shared autograd formula to ``fusedloss::<fwd_name>``: the backward
    calls ``bwd_op`` (recomputing from the logits and the row stats), or, when the
    forward already produced the gradient, returns ``scale_grad(grad, grad_loss)``
    (a backend may pass a kernel that skips the pass when ``grad_loss`` is 1, read on
    the device, without a host synchronization)."""

    def setup_context(ctx, inputs, output):
        logits, target, weight, *scalars, compute_grad = inputs
        _, stats, grad = output
        ctx.scalars = tuple(scalars)
        ctx.fused = bool(compute_grad)
        ctx.mark_non_differentiable(stats, grad)
        # The stats and grad outputs never receive a gradient; without this autograd
        # would hand backward() an (N, C) tensor of zeros for `grad`, allocated every step.
        ctx.set_materialize_grads(False)
        # The logits are saved with the fused gradient too: a double backward differentiates
        # the gradient through them (docs/autograd.md); they cost no memory while the caller
        # holds them (as training loops and gradient penalties do).
        ctx.save_for_backward(logits, target, weight, grad if ctx.fused else stats)

    def backward(ctx, grad_loss, _grad_stats, _grad_grad):
        if grad_loss is None:  # the loss itself got no gradient (grads are not materialized)
            return (None,) * 13
        grad_logits = one_target_backward(grad_loss, *ctx.saved_tensors, ctx.fused, ctx.scalars, bwd_op, scale_grad)
        return (grad_logits,) + (None,) * 12

    torch.library.register_autograd(f"{NAMESPACE}::{fwd_name}", backward, setup_context=setup_context)
    register_eager(fwd_name, setup_context, backward)


def register_eager(fwd_name: str, setup_context: Callable, backward: Callable) -> None:
    """The autograd formula of ``fusedloss::<fwd_name>`` (as given to ``register_autograd``) as an
    ``autograd.Function`` that calls the op below the Autograd key, for the eager path
    (:func:`eager_fwd`, :func:`call_eager`): it skips the Python wrapper ``register_autograd``
    builds around the op (``fill_defaults`` over the op's schema on every call, about a third of
    the per-call cost at small sizes). ``torch.compile`` and ``opcheck`` use the op itself."""
    op = getattr(getattr(torch.ops, NAMESPACE), fwd_name).default
    formula = backward

    class EagerFwd(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            with torch._C._AutoDispatchBelowAutograd():
                out = op(*inputs)
            setup_context(ctx, inputs, out)
            return out

        backward = staticmethod(formula)

    EagerFwd.__name__ = EagerFwd.__qualname__ = f"{fwd_name}_eager"
    _EAGER[op] = EagerFwd.apply


#: OpOverload of a forward op -> the apply of its eager autograd.Function (register_autograd).
_EAGER: dict = {}


def eager_fwd(fwd: Callable) -> Callable:
    """What the functional calls for a forward op in eager mode (no transform, not compiling):
    below the Autograd key when no gradient is needed, else the eager ``autograd.Function``."""
    op = getattr(fwd, "_opoverload", fwd)  # a torch.library.custom_op's CustomOpDef -> its OpOverload
    return _EAGER.get(op, fwd)


def call_below_autograd(fwd: Callable, *args):
    """The forward op without its autograd wrapper (nothing requires grad, or grad mode is off)."""
    with torch._C._AutoDispatchBelowAutograd():
        return fwd(*args)


def call_eager(fwd: Callable, needs_grad: bool, *args):
    """A forward op called from the functional (no ``torch.func`` transform: the composite path
    takes those): the op itself while compiling, its eager ``autograd.Function`` when
    ``needs_grad`` (grad mode on and an input requires grad), else below the Autograd key."""
    if torch.compiler.is_compiling():
        return fwd(*args)
    if needs_grad:
        return eager_fwd(fwd)(*args)
    return call_below_autograd(fwd, *args)


def register_fakes(fwd_name: str, bwd_name: str) -> None:
    """Fake implementations for ops whose schema was defined elsewhere (C++)."""
    torch.library.register_fake(f"{NAMESPACE}::{fwd_name}")(fake_forward)
    torch.library.register_fake(f"{NAMESPACE}::{bwd_name}")(fake_backward)


def define_python_ops(backend: str, fwd_impl: Callable, bwd_impl: Callable, device_types=None):
    """Define ``fusedloss::<backend>_fwd/_bwd`` as custom ops implemented in Python
    (the reference, or a Python launcher of kernels), with fake and autograd registered.
    Returns the two op handles."""
    fwd = torch.library.custom_op(f"{NAMESPACE}::{backend}_fwd", fwd_impl, mutates_args=(),
                                  device_types=device_types, schema=FWD_SCHEMA)
    bwd = torch.library.custom_op(f"{NAMESPACE}::{backend}_bwd", bwd_impl, mutates_args=(),
                                  device_types=device_types, schema=BWD_SCHEMA)
    fwd.register_fake(fake_forward)
    bwd.register_fake(fake_backward)
    register_autograd(f"{backend}_fwd", bwd)
    return fwd, bwd


# ----------------------------------------------------------------------------
# The reference backend's ops
# ----------------------------------------------------------------------------

def _reference_fwd(logits, target, weight, variant, reduction, ignore_index, label_smoothing,
                   alpha, beta, gamma, z_loss, softcap, compute_grad):
    if must_check_targets(logits.device):
        check_target_values(target, logits.shape[1], ignore_index)
    loss, stats = reference.forward(logits, target, weight, variant, reduction, ignore_index,
                                    label_smoothing, alpha, beta, gamma, z_loss, softcap)
    if compute_grad:
        ones = torch.ones_like(loss)
        grad = reference.backward(ones, logits, target, weight, stats, variant, reduction,
                                  ignore_index, label_smoothing, alpha, beta, gamma, z_loss, softcap)
    else:
        grad = logits.new_empty((0,))
    return loss, stats, grad


def _reference_bwd(grad_loss, logits, target, weight, stats, variant, reduction, ignore_index,
                   label_smoothing, alpha, beta, gamma, z_loss, softcap):
    return reference.backward(grad_loss, logits, target, weight, stats, variant, reduction,
                              ignore_index, label_smoothing, alpha, beta, gamma, z_loss, softcap)


reference_fwd, reference_bwd = define_python_ops("reference", _reference_fwd, _reference_bwd)


# ----------------------------------------------------------------------------
# Class-probability (soft) targets, ce only: a second op family with its own schema.
#   soft_fwd(logits (N, C), probs (N, C) in the logits' dtype, weight (C,)?, reduction,
#            label_smoothing, compute_grad) -> (loss, stats (N, STATS_COLS): lse, S = sum_k w_k y'_k, grad)
#   soft_bwd(grad_loss, logits, probs, weight, stats, reduction, label_smoothing) -> d loss / d logits
# The targets' own gradient, (1 - eps) w_j (lse - x_j) per unit of the row's grad_output, is
# one elementwise expression on the saved lse: PyTorch's, on every backend (soft_target_grad).
# ----------------------------------------------------------------------------

SOFT_FWD_SCHEMA = ("(Tensor logits, Tensor probs, Tensor? weight, int reduction, float label_smoothing, "
                   "bool compute_grad) -> (Tensor, Tensor, Tensor)")
SOFT_BWD_SCHEMA = ("(Tensor grad_loss, Tensor logits, Tensor probs, Tensor? weight, Tensor stats, int reduction, "
                   "float label_smoothing) -> Tensor")


def fake_soft_forward(logits, probs, weight, reduction, label_smoothing, compute_grad):
    return fake_forward(logits, None, weight, 0, reduction, 0, label_smoothing, 0.0, 0.0, 0.0, 0.0, 0.0,
                        compute_grad)


def fake_soft_backward(grad_loss, logits, probs, weight, stats, reduction, label_smoothing):
    return logits.new_empty(logits.shape)


def _register_probs_autograd(fwd_name: str, bwd_op: Callable, scale_grad: Callable[[Tensor, Tensor], Tensor],
                             differentiable_loss: Callable, target_grad: Callable) -> None:
    """The autograd formula shared by the class-probability ops, ``(logits, probs, weight, *scalars,
    compute_grad)``: the logits' gradient from the fused forward or ``bwd_op``, the targets' from
    ``target_grad``; a double backward or a vmap through it goes through ``differentiable_loss``
    (``(logits, probs, weight, *scalars)`` -> loss, PyTorch ops: the composite path of docs/autograd.md)."""

    def setup_context(ctx, inputs, output):
        logits, probs, weight, *scalars, compute_grad = inputs
        _, stats, grad = output
        ctx.args = tuple(scalars)
        ctx.fused = bool(compute_grad)
        ctx.mark_non_differentiable(stats, grad)
        ctx.set_materialize_grads(False)
        # The logits are saved in both cases: the targets' gradient reads them.
        ctx.save_for_backward(logits, probs, weight, stats, grad if ctx.fused else None)

    def backward(ctx, grad_loss, _grad_stats, _grad_grad):
        rest = (None,) * (len(ctx.args) + 2)  # weight, the scalars, compute_grad
        if grad_loss is None:
            return (None, None) + rest
        logits, probs, weight, stats, grad = ctx.saved_tensors
        args = ctx.args
        if composite_backward_needed(grad_loss):
            gx, gy = composite_vjp(lambda x, y: differentiable_loss(x, y, weight, *args), grad_loss,
                                   (logits, probs), tuple(ctx.needs_input_grad[:2]))
            return (gx, gy) + rest
        gx = gy = None
        if ctx.needs_input_grad[0]:
            gx = scale_grad(grad, grad_loss) if ctx.fused else bwd_op(grad_loss, logits, probs, weight, stats, *args)
        if ctx.needs_input_grad[1]:
            gy = target_grad(grad_loss, logits, probs, weight, stats, *args)
        return (gx, gy) + rest

    torch.library.register_autograd(f"{NAMESPACE}::{fwd_name}", backward, setup_context=setup_context)
    register_eager(fwd_name, setup_context, backward)


def register_soft_autograd(fwd_name: str, bwd_op: Callable,
                           scale_grad: Callable[[Tensor, Tensor], Tensor] = scale_fused_grad) -> None:
    """The autograd formula of ``fusedloss::<fwd_name>`` (a soft_fwd op, ce): the targets' gradient
    from :func:`reference.soft_target_grad`."""
    _register_probs_autograd(fwd_name, bwd_op, scale_grad,
                             lambda x, y, w, *args: reference.differentiable_soft_forward(x, y, w, *args)[0],
                             reference.soft_target_grad)


def register_soft_fakes(fwd_name: str, bwd_name: str) -> None:
    torch.library.register_fake(f"{NAMESPACE}::{fwd_name}")(fake_soft_forward)
    torch.library.register_fake(f"{NAMESPACE}::{bwd_name}")(fake_soft_backward)


def _reference_soft_fwd(logits, probs, weight, reduction, label_smoothing, compute_grad):
    loss, stats = reference.soft_forward(logits, probs, weight, reduction, label_smoothing)
    if compute_grad:
        grad = reference.soft_backward(torch.ones_like(loss), logits, probs, weight, stats, reduction,
                                       label_smoothing)
    else:
        grad = logits.new_empty((0,))
    return loss, stats, grad


reference_soft_fwd = torch.library.custom_op(f"{NAMESPACE}::reference_soft_fwd", _reference_soft_fwd,
                                             mutates_args=(), schema=SOFT_FWD_SCHEMA)
reference_soft_bwd = torch.library.custom_op(f"{NAMESPACE}::reference_soft_bwd", reference.soft_backward,
                                             mutates_args=(), schema=SOFT_BWD_SCHEMA)
reference_soft_fwd.register_fake(fake_soft_forward)
reference_soft_bwd.register_fake(fake_soft_backward)
register_soft_autograd("reference_soft_fwd", reference_soft_bwd)


# ----------------------------------------------------------------------------
# Class-probability targets for every loss: the expected loss sum_k w_k q'_k L(x, k)
# (docs/losses.md, "Soft targets"); a third op family, so the ce family above keeps its schema.
#   soft_loss_fwd(logits, probs, weight?, variant, reduction, label_smoothing, alpha, beta, gamma,
#                 compute_grad) -> (loss, stats (N, STATS_COLS): lse, S = sum_k w_k q'_k, log(1 - p_w), w, grad)
#   soft_loss_bwd(grad_loss, logits, probs, weight?, stats, <same scalars>) -> d loss / d logits
# The targets' gradient, go (1 - eps) w_k L(x, k), is reference.soft_loss_target_grad on every backend.
# ----------------------------------------------------------------------------

SOFT_LOSS_SCALARS = "int variant, int reduction, float label_smoothing, float alpha, float beta, float gamma"
SOFT_LOSS_FWD_SCHEMA = (f"(Tensor logits, Tensor probs, Tensor? weight, {SOFT_LOSS_SCALARS}, bool compute_grad) "
                        "-> (Tensor, Tensor, Tensor)")
SOFT_LOSS_BWD_SCHEMA = (f"(Tensor grad_loss, Tensor logits, Tensor probs, Tensor? weight, Tensor stats, "
                        f"{SOFT_LOSS_SCALARS}) -> Tensor")


def fake_soft_loss_forward(logits, probs, weight, variant, reduction, label_smoothing, alpha, beta, gamma,
                           compute_grad):
    return fake_forward(logits, None, weight, variant, reduction, 0, label_smoothing, alpha, beta, gamma, 0.0, 0.0,
                        compute_grad)


def fake_soft_loss_backward(grad_loss, logits, probs, weight, stats, variant, reduction, label_smoothing, alpha,
                            beta, gamma):
    return logits.new_empty(logits.shape)


def register_soft_loss_autograd(fwd_name: str, bwd_op: Callable,
                                scale_grad: Callable[[Tensor, Tensor], Tensor] = scale_fused_grad) -> None:
    """The autograd formula of ``fusedloss::<fwd_name>`` (a soft_loss_fwd op, every loss): the targets'
    gradient from :func:`reference.soft_loss_target_grad`."""
    _register_probs_autograd(
        fwd_name, bwd_op, scale_grad,
        lambda x, y, w, *args: reference.soft_loss_forward(x, y, w, *args, differentiable=True)[0],
        reference.soft_loss_target_grad)


def register_soft_loss_fakes(fwd_name: str, bwd_name: str) -> None:
    torch.library.register_fake(f"{NAMESPACE}::{fwd_name}")(fake_soft_loss_forward)
    torch.library.register_fake(f"{NAMESPACE}::{bwd_name}")(fake_soft_loss_backward)


def _reference_soft_loss_fwd(logits, probs, weight, variant, reduction, label_smoothing, alpha, beta, gamma,
                             compute_grad):
    loss, stats = reference.soft_loss_forward(logits, probs, weight, variant, reduction, label_smoothing, alpha,
                                              beta, gamma)
    if compute_grad:
        grad = reference.soft_loss_backward(torch.ones_like(loss), logits, probs, weight, stats, variant, reduction,
                                            label_smoothing, alpha, beta, gamma)
    else:
        grad = logits.new_empty((0,))
    return loss, stats, grad


reference_soft_loss_fwd = torch.library.custom_op(f"{NAMESPACE}::reference_soft_loss_fwd", _reference_soft_loss_fwd,
                                                  mutates_args=(), schema=SOFT_LOSS_FWD_SCHEMA)
reference_soft_loss_bwd = torch.library.custom_op(f"{NAMESPACE}::reference_soft_loss_bwd",
                                                  reference.soft_loss_backward, mutates_args=(),
                                                  schema=SOFT_LOSS_BWD_SCHEMA)
reference_soft_loss_fwd.register_fake(fake_soft_loss_forward)
reference_soft_loss_bwd.register_fake(fake_soft_loss_backward)
register_soft_loss_autograd("reference_soft_loss_fwd", reference_soft_loss_bwd)


# ----------------------------------------------------------------------------
# bce of a vocabulary-parallel row given its global numbers (fusedloss.parallel; the C++ CPU kernels'
# ext_bce_partial / ext_bce_global_bwd, csrc/cpu/ops_cpu_bce_parallel.cpp). Not differentiable:
# the caller's autograd.Function calls them. Layout:
#   stats (N, 4) in the math type: the global lse, R = sum_{k != w} a_k (a_c = -1), log(1 - p_w),
#     x_w (the partial op reads lse only);
#   slice_idx (N, 3) int64: the target's local index c, the global arg-max's local index w (-1:
#     on another rank), and 1 where w == c globally, 0 where not, -1 on an ignored row (zeros);
#   partial -> (N, 2) in the math type: over the slice's k not in {c, w}, with p_k = exp(x_k - lse),
#     sum log(1 - p_k) and sum a_k, a_k = p_k / (1 - p_k);
#   global_bwd(grad_rows (N,): (1 - eps) w_c dLoss/dloss_i, ..., z_loss) -> (N, V_local) in the
#     logits' dtype: grad_rows (a_j - p_j R - p_j a_w) + 2 z_loss lse grad_rows p_j off {c, w}, the
#     entries at a local w and c by their own forms; no class weight or label smoothing;
#   softcap (0: none): both read x as softcap tanh(x / softcap) (stats of the capped logits), and
#     the gradient is w.r.t. the raw logits.
# ----------------------------------------------------------------------------

BCE_PARTIAL_SCHEMA = "(Tensor logits, Tensor stats, Tensor slice_idx, float softcap) -> Tensor"
BCE_GLOBAL_BWD_SCHEMA = ("(Tensor grad_rows, Tensor logits, Tensor stats, Tensor slice_idx, float z_loss, "
                         "float softcap) -> Tensor")


def fake_bce_partial(logits, stats, slice_idx, softcap):
    return logits.new_empty((logits.shape[0], 2), dtype=stats_dtype(logits))


def fake_bce_global_bwd(grad_rows, logits, stats, slice_idx, z_loss, softcap):
    return logits.new_empty(logits.shape)


def register_bce_parallel_fakes(partial_name: str, bwd_name: str) -> None:
    torch.library.register_fake(f"{NAMESPACE}::{partial_name}")(fake_bce_partial)
    torch.library.register_fake(f"{NAMESPACE}::{bwd_name}")(fake_bce_global_bwd)


# ----------------------------------------------------------------------------
# Op families: what a backend implements per target form (``dispatch.Backend.families``)
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class OneTargetOps:
    """An integer class target per row: ``fusedloss::<name>_fwd`` / ``_bwd`` (FWD_SCHEMA, BWD_SCHEMA).
    Every backend has them."""
    fwd: Callable
    bwd: Callable
    fused_grad: bool = False  # the forward can return the gradient (compute_grad=True)
    # inplace_backward=True: (logits, target, weight, <scalars>) -> loss, differentiable; the
    # forward writes the gradient into the logits' storage (the logits are consumed). None:
    # inplace_backward=True raises NotImplementedError.
    fwd_inplace: Callable | None = None
    # Whether fwd (and the backend's two-target op) give label smoothing's term for loss != 'ce' as the
    # expected loss (eps / C) sum_k w_k L(x, k) (docs/losses.md). False: label_smoothing > 0 with
    # loss != 'ce' raises NotImplementedError on this backend (dispatch.check_smoothing), never the
    # older smoothed-CE number.
    expected_smoothing: bool = False
    # fwd checks every argument itself (shapes, dtypes, devices, the scalars' ranges) and raises
    # before its kernel runs, and has its autograd registered with the op (C++, the Autograd key):
    # the functional's eager fast path calls it directly and leaves the checks to it
    # (functional.softmax_loss). False: the functional checks first and calls eager_fwd(fwd).
    checked_op: bool = False


@dataclass(frozen=True)
class ProbsOps:
    """Class-probability targets: ``fwd`` is ce's ``fusedloss::<name>_soft_fwd`` (SOFT_FWD_SCHEMA),
    ``loss_fwd`` every loss's expected loss ``fusedloss::<name>_soft_loss_fwd`` (SOFT_LOSS_FWD_SCHEMA);
    their backwards are the ops' registered autograd. Absent (or ``loss_fwd`` None): the
    reference's op, on the same device."""
    fwd: Callable
    fused_grad: bool = False
    loss_fwd: Callable | None = None


@dataclass(frozen=True)
class SplitVocabOps:
    """bce of a vocabulary-parallel row given its global numbers (BCE_PARTIAL_SCHEMA,
    BCE_GLOBAL_BWD_SCHEMA). Absent: ``fusedloss.parallel``'s PyTorch passes."""
    bce_partial: Callable
    bce_global_bwd: Callable
