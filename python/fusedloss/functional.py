"""The functional API: ``softmax_loss`` and one named function per loss.

Shapes follow ``torch.nn.functional.cross_entropy``: logits ``(C,)``, ``(N, C)`` or
``(N, C, d1, ...)`` with targets ``()``, ``(N,)`` or ``(N, d1, ...)``. Every argument
is checked here, on metadata only, before any kernel runs; target values are
checked inside the ops (see ``validation.py``).
"""
from __future__ import annotations

import math
import os

import torch
from torch.nn import _reduction as _legacy_reduction
import torch.autograd.forward_ad as _fwAD
from torch import Tensor

from . import dispatch, mixup, ops, reference, validation
from .variants import Reduction, Variant, reduction_id, variant_id


def softmax_loss(
    logits: Tensor,
    target: Tensor,
    loss: str = "ce",
    *,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    alpha: float = 1.5,
    beta: float = 1.0,
    gamma: float = 2.0,
    backend: str = "auto",
    inplace_backward: bool = False,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""A softmax classification loss, fused and exact. With ``p = softmax(logits)`` and
    target class ``c``, the loss of a row is

    ============ ===============================================
    ``"ce"``     :math:`-\log p_c`
    ``"bce"``    :math:`-\log p_c - \sum_{k \ne c} \log(1 - p_k)`
    ``"nllr"``   :math:`\log(1 - p_c) - \log p_c`
    ``"crl"``    :math:`\beta \log(\alpha + 1 - p_c) - \log p_c`
    ``"lace"``   :math:`-(1 - p_c) \log p_c`
    ``"focal"``  :math:`-(1 - p_c)^\gamma \log p_c`
    ============ ===============================================

    Row ``i``'s loss and gradient are multiplied by ``weight[c_i]``; rows whose target is
    ``ignore_index`` give 0 and are not counted; ``reduction="mean"`` divides by the number
    of counted rows, or by the sum of their weights when ``weight`` is given.

    Args:
        logits: ``(C,)``, ``(N, C)`` or ``(N, C, d1, ...)``, float16/bfloat16/float32 (computed
            in float32) or float64 (computed in float64).
        target: int64/int32 class indices of shape ``logits.shape`` without dim 1; for
            ``loss="ce"`` also class probabilities of the logits' shape (soft targets); for every
            loss a mixup tuple ``(y_a, y_b, lam)`` of two such index targets and ``lam`` (a float,
            or a tensor of the targets' shape), meaning ``lam * L(y_a) + (1 - lam) * L(y_b)``
            with each part reduced on its own (``fusedloss.mixup``).
        loss: one of ``"ce", "bce", "nllr", "crl", "lace", "focal"``.
        weight: optional ``(C,)`` class weights.
        ignore_index: target value whose rows are ignored (class-index targets only).
        reduction: ``"none" | "mean" | "sum"``.
        label_smoothing: ``eps`` in ``[0, 1]``: the row loss becomes ``(1 - eps) L`` plus ``eps`` times
            the smoothed cross-entropy term ``(1 / C) sum_k w_k (lse - x_k)`` (PyTorch's definition
            for ``"ce"``; the same term beside every other loss, docs/losses.md).
        alpha, beta: ``"crl"`` parameters (the paper's; the CRL authors' code uses
            ``alpha_code = alpha + 1``), both ``>= 0``.
        gamma: ``"focal"`` exponent ``>= 0`` (``0`` is ``"ce"``, ``1`` is ``"lace"``).
        backend: ``"auto" | "reference" | "cpu" | "triton" | "cuda"``; ``"auto"`` can be
            overridden by the environment variable ``FUSEDLOSS_BACKEND``.
        inplace_backward: when the logits require grad, write the gradient into the logits'
            own storage during the forward (no (N, C) buffer is allocated): the logits are
            **consumed** and hold d loss/d logits afterwards, so nothing else may read them.
            Backends without it (only ``"triton"`` has it) raise ``NotImplementedError``.
        z_loss: PaLM's z-loss: ``z_loss * lse^2`` is added to each row's loss (then weighted by
            ``weight[c]`` and reduced with it), with ``lse`` the row's log-sum-exp.
        softcap: Gemma's logit soft-capping: every logit ``x`` is replaced by
            ``softcap * tanh(x / softcap)`` before the softmax (``None``: no cap), gradient included.
        return_lse: also return each row's ``logsumexp`` of the (capped) logits (float32, float64 for
            float64 logits; 0 on ignored rows; no gradient flows through it).

    Returns:
        The loss in the logits' dtype: a scalar, or the shape of ``target`` for ``"none"``;
        with ``return_lse``, the pair ``(loss, lse)``, ``lse`` of the shape of ``target``.

    Layouts: rows of any stride are read in place (``x[:, :C]`` of a wider tensor, ``x[::2]``,
    rows expanded with stride 0). Logits whose class dimension is not dense are copied once
    into rows of unit class stride: a transposed ``(C, N)`` buffer, and ``(N, C, d1, ...)``
    inputs unless their classes are the innermost dimension in memory (channels-last).
    ``target``, ``weight`` and the backward's ``grad_output`` may have any strides (an
    expanded ``grad_output`` from ``L.sum()`` or ``L.mean()`` included).

    Target values outside ``[0, C)`` (other than ``ignore_index``) raise ``IndexError`` on
    CPU. On a GPU that check would synchronize with the host every step, so there the
    row's loss is NaN instead (no memory is read with the bad index) unless
    ``FUSEDLOSS_STRICT=1``, which adds the raising check.
    """
    if (not torch.compiler.is_compiling() and type(logits) is Tensor and type(target) is Tensor
            and not inplace_backward and not return_lse):
        # The eager fast path: a backend whose op checks every argument itself (C++, before its
        # kernel) and carries its autograd (the C++ Autograd kernel) is called at once. Anything it
        # does not take, and any error, goes to the checked path below, which gives the same
        # result or raises the exception that names the argument.
        try:
            out = _eager_fast(logits, target, loss, weight, ignore_index, reduction, label_smoothing, alpha, beta,
                              gamma, backend, z_loss, softcap)
        except _ARGUMENT_ERRORS:  # the checked path raises the error that names the argument
            out = None
        if out is not None:
            return out
    variant = variant_id(loss)
    red = reduction_id(reduction)
    cap = validation.check_z_loss_softcap(z_loss, softcap)
    validation.check_logits(logits, allow_no_classes=True)
    validation.check_hyperparameters(alpha, beta, gamma, label_smoothing)
    ignore_index = validation.check_ignore_index(ignore_index)
    num_classes = logits.shape[1] if logits.dim() > 1 else logits.shape[0]
    weight = validation.check_weight(weight, num_classes, logits)
    composite = _composite_wanted(logits, target, weight)
    if isinstance(target, tuple):
        if composite:
            if inplace_backward or return_lse:
                raise NotImplementedError("inplace_backward and return_lse are not implemented for mixed targets")
            ya, yb, lam = mixup.check_mixed_target(logits, tuple(_index_dtype(t) for t in target[:2]) + target[2:])
            x2d, ta = _composite_rows(logits, ya)
            _check_values(ta, num_classes, ignore_index, x2d.device)
            _check_values(yb, num_classes, ignore_index, x2d.device)
            scalars = (int(variant), int(red), ignore_index, float(label_smoothing), float(alpha), float(beta),
                       float(gamma), float(z_loss), cap)
            out = mixup.composite_mixed_loss(x2d, ta, yb.reshape(ta.shape), _composite_lam(lam, ta, x2d), weight,
                                             scalars)
            return (out.reshape(ya.shape) if red == Reduction.NONE else out).to(ops.loss_dtype(logits))
        return _mixed(logits, target, weight, variant, red, ignore_index, label_smoothing, alpha, beta, gamma,
                      float(z_loss), cap, backend, inplace_backward, return_lse)
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor or a mixup tuple (y_a, y_b, lam); got "
                        f"{type(target).__name__}")
    if composite and inplace_backward:
        raise NotImplementedError(_COMPOSITE_WHY + "inplace_backward=True is not implemented there")

    if target.is_floating_point():
        validation.check_prob_target(logits, target)
        if target.dtype != logits.dtype:
            # PyTorch's type promotion (its soft cross-entropy multiplies the log-probabilities by the
            # targets): float32 targets with bfloat16 logits (timm's Mixup under autocast) give a
            # float32 loss of the float32 targets. Rounding the targets to the logits' dtype instead
            # would move the loss by up to ~2^-9 relative in bfloat16: the narrower tensor is cast
            # (differentiably; a copy of the logits when the targets are the wider: docs/usage.md).
            dt = torch.promote_types(logits.dtype, target.dtype)
            logits, target = logits.to(dt), target.to(dt)
        if ignore_index >= 0:
            # PyTorch refuses it too: a row of probabilities has no class index to ignore.
            raise ValueError(f"ignore_index={ignore_index} cannot be used with class-probability (soft) targets "
                             "(PyTorch raises as well); leave ignore_index at its default (-100)")
        if z_loss or softcap is not None:
            raise NotImplementedError("z_loss and softcap with class-probability (soft) targets are not implemented; "
                                      "use class-index targets (or the mixup tuple (y_a, y_b, lam)) for them")
        if inplace_backward:
            raise NotImplementedError("inplace_backward=True is not implemented for class-probability (soft) "
                                      "targets; leave it False")
        if num_classes == 0:
            return _no_classes(logits, target, weight, red, ignore_index, return_lse, soft=True)
        if composite:
            if variant == Variant.CE:
                return _composite_soft(logits, target, weight, red, label_smoothing, return_lse)
            return _composite_soft_loss(logits, target, weight, variant, red, label_smoothing, alpha, beta, gamma,
                                        return_lse)
        be = dispatch.resolve(backend, logits.device)
        if variant == Variant.CE:
            return _soft_cross_entropy(logits, target, weight, red, label_smoothing, return_lse, be)
        return _soft_loss(logits, target, weight, variant, red, label_smoothing, alpha, beta, gamma, return_lse, be)

    target = _index_dtype(target)
    validation.check_class_target(logits, target)
    if num_classes == 0:
        return _no_classes(logits, target, weight, red, ignore_index, return_lse, soft=False)
    if composite:
        x2d, t1d = _composite_rows(logits, target)
        _check_values(t1d, num_classes, ignore_index, x2d.device)
        out, lse = reference.differentiable_forward(x2d, t1d, weight, int(variant), int(red), ignore_index,
                                                    float(label_smoothing), float(alpha), float(beta), float(gamma),
                                                    float(z_loss), cap)
        if red == Reduction.NONE:
            out = out.reshape(target.shape)
        out = out.to(ops.loss_dtype(logits))
        if return_lse:
            lse = torch.where(t1d != ignore_index, lse.detach(), torch.zeros((), dtype=lse.dtype, device=lse.device))
            return out, lse.reshape(target.shape)
        return out
    be = dispatch.resolve(backend, logits.device)
    dispatch.check_smoothing(be, variant, label_smoothing)
    x2d, t1d = _rows_view(logits, target)
    one = be.one_target
    compute_grad = one.fused_grad and logits.requires_grad and torch.is_grad_enabled()
    if inplace_backward and one.fwd_inplace is None:
        raise NotImplementedError(f"inplace_backward=True is not implemented by backend {be.name!r}; use backend='triton'")
    scalars = (int(variant), int(red), ignore_index, float(label_smoothing), float(alpha), float(beta), float(gamma),
               float(z_loss), cap)
    if inplace_backward and compute_grad:
        if return_lse:
            raise NotImplementedError("return_lse=True with inplace_backward=True is not implemented")
        out = one.fwd_inplace(x2d, t1d, weight, *scalars)
    else:
        out, stats, _ = ops.call_eager(one.fwd, logits.requires_grad and torch.is_grad_enabled(), x2d, t1d, weight,
                                       *scalars, compute_grad)
    if red == Reduction.NONE:
        out = out.reshape(target.shape)
    out = out.to(ops.loss_dtype(logits))
    if return_lse:
        lse = torch.where(t1d != ignore_index, stats[:, 0], torch.zeros((), dtype=stats.dtype, device=stats.device))
        return out, lse.reshape(target.shape)
    return out


_VARIANT_IDS = {name: int(variant_id(name)) for name in ("ce", "bce", "nllr", "crl", "lace", "focal")}
_REDUCTION_IDS = {name: int(reduction_id(name)) for name in ("none", "mean", "sum")}
_ENV_KEY = os.environ.encodekey(dispatch.BACKEND_ENV)


#: The errors the fast path's checks and the op's own argument checks raise (TORCH_CHECK*: RuntimeError,
#: ValueError, IndexError, TypeError; NotImplementedError; LookupError covers IndexError and KeyError). Only these send a call to the checked
#: path: any other exception is the caller's and passes through untouched, e.g. the exception
#: ``torch.utils.checkpoint`` (non-reentrant, early stop) raises from a saved-tensor hook to end its
#: recomputation; retrying on the checked path after it would recompute past the stop and fail.
_ARGUMENT_ERRORS = (RuntimeError, ValueError, LookupError, TypeError, NotImplementedError)


def _eager_fast(logits: Tensor, target: Tensor, loss, weight, ignore_index, reduction, label_smoothing, alpha, beta,
                gamma, backend, z_loss, softcap) -> Tensor | None:
    """``softmax_loss`` for 2-D logits and class indices on a backend with a checked op
    (``OneTargetOps.checked_op``: the cpu and cuda extension), or None where the checked path must
    run: other target forms and shapes, the composite path's conditions (a ``torch.func``
    transform, forward AD, a ``weight`` that requires grad), Python scalars of other types than
    ``int``/``float`` (``True`` would pass the op's argument parser). The op raises for every bad
    value (shapes, dtypes, devices, ranges, target values) before its kernel runs; the caller then
    runs the checked path for the error that names the argument. Same op, same arguments, same
    result as the checked path."""
    if logits.dim() != 2 or (target.dtype is not torch.int64 and target.dtype is not torch.int32):
        return None
    if ops.transforms_active() or _fwAD._current_level >= 0:
        return None
    if not logits.is_cpu and validation.strict_mode():
        return None  # the checked path's host check of the target values (the op does not read them on a GPU)
    grad_mode = torch.is_grad_enabled()
    if weight is not None and (type(weight) is not Tensor or (grad_mode and weight.requires_grad)):
        return None
    if type(ignore_index) is not int:
        return None
    for value in (label_smoothing, alpha, beta, gamma, z_loss):
        if type(value) is not float and type(value) is not int:
            return None
    if softcap is None:
        cap = 0.0
    elif (type(softcap) is float or type(softcap) is int) and softcap > 0:
        cap = softcap
    else:
        return None
    key = (backend, "cpu" if logits.is_cpu else logits.device.type,
           os.environ._data.get(_ENV_KEY) if backend == "auto" else None)
    fast = dispatch.checked_one_target(key, logits)
    if fast is None:
        return None
    fwd, one = fast
    variant, red = _VARIANT_IDS.get(loss), _REDUCTION_IDS.get(reduction)
    if variant is None or red is None:
        return None  # the checked path names the unknown loss or reduction
    if label_smoothing > 0 and variant and not one.expected_smoothing:
        return None
    out = fwd(logits, target, weight, variant, red, ignore_index, label_smoothing, alpha, beta,
              gamma, z_loss, cap, one.fused_grad and grad_mode and logits.requires_grad)[0]
    dtype = ops.loss_dtype(logits)
    return out if out.dtype is dtype else out.to(dtype)


_COMPOSITE_WHY = ("the loss runs as differentiable PyTorch ops (a torch.func transform, forward AD or a weight "
                  "that requires grad is active; docs/autograd.md); ")


def _composite_wanted(logits: Tensor, target, weight: Tensor | None) -> bool:
    """Whether the call takes the composite path (``reference.differentiable_*``) instead of the
    backend's op: under a ``torch.func`` transform (vmap, grad, jvp: the ops have no batching or
    forward-AD rule), with forward-AD dual inputs, or when a gradient is asked of an input the
    ops do not differentiate (``weight``, a mixup ``lam`` tensor). Never while compiling: the
    traced graph takes the ops (docs/autograd.md)."""
    if torch.compiler.is_compiling():
        return False
    if ops.transforms_active():
        return True
    lam = target[2] if isinstance(target, tuple) and len(target) == 3 and isinstance(target[2], Tensor) else None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (weight, lam)):
        return True
    if _fwAD._current_level >= 0:  # a forward-AD level is open: is any input dual?
        probs = target if isinstance(target, Tensor) and target.is_floating_point() else None
        return any(t is not None and _fwAD.unpack_dual(t).tangent is not None
                   for t in (logits, probs, weight, lam))
    return False


def _plain(t: Tensor) -> Tensor:
    """The tensor under any ``torch.func`` wrappers (vmap's batch included): its values."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def _check_values(target: Tensor, num_classes: int, ignore_index: int, device: torch.device) -> None:
    """The ops' target-value check, for the composite path: on CPU always (on the values under
    the transforms' wrappers), elsewhere in strict mode; otherwise a bad row's loss is NaN."""
    if validation.must_check_targets(device):
        validation.check_target_values(_plain(target), num_classes, ignore_index)


def _index_dtype(target):
    """uint8 class indices (PyTorch takes them) as int32 for the kernels."""
    return target.to(torch.int32) if isinstance(target, Tensor) and target.dtype == torch.uint8 else target


def _composite_rows(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """``(N, C, d...)`` -> ``(rows, C)`` by reshapes alone (no stride is read: batched tensors
    have none)."""
    if logits.dim() == 1:
        return logits[None, :], target.reshape(1)
    if logits.dim() > 2:
        return logits.movedim(1, -1).reshape(-1, logits.shape[1]), target.reshape(-1)
    return logits, target


def _composite_lam(lam, ta: Tensor, x: Tensor) -> Tensor:
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if isinstance(lam, Tensor):
        return lam.to(dtype).reshape(-1).expand(ta.shape[0]) if lam.dim() == 0 else lam.reshape(-1).to(dtype)
    return torch.full((ta.shape[0],), float(lam), dtype=dtype, device=x.device)


def _composite_soft(logits: Tensor, probs: Tensor, weight, red: Reduction, eps: float,
                    return_lse: bool) -> Tensor | tuple[Tensor, Tensor]:
    if logits.dim() == 1:
        x, y = logits[None, :], probs[None, :]
    else:
        x = logits.movedim(1, -1).reshape(-1, logits.shape[1])
        y = probs.movedim(1, -1).reshape(-1, logits.shape[1])
    out, lse = reference.differentiable_soft_forward(x, y, weight, int(red), float(eps))
    row_shape = logits.shape[:1] + logits.shape[2:] if logits.dim() > 1 else ()
    if red == Reduction.NONE:
        out = out.reshape(row_shape)
    if return_lse:
        return out.to(ops.loss_dtype(logits)), lse.detach().reshape(row_shape)
    return out.to(ops.loss_dtype(logits))


def _composite_soft_loss(logits: Tensor, probs: Tensor, weight, variant, red: Reduction, eps: float, alpha,
                         beta, gamma, return_lse: bool) -> Tensor | tuple[Tensor, Tensor]:
    """Class probabilities for a loss other than ce on the composite path: the reference's expected
    loss in PyTorch ops, differentiable (docs/autograd.md)."""
    x, y = _soft_rows(logits, probs)
    out, stats = reference.soft_loss_forward(x, y, weight, int(variant), int(red), float(eps), float(alpha),
                                             float(beta), float(gamma), differentiable=True)
    row_shape = logits.shape[:1] + logits.shape[2:] if logits.dim() > 1 else ()
    if red == Reduction.NONE:
        out = out.reshape(row_shape)
    if return_lse:
        return out.to(ops.loss_dtype(logits)), stats[:, 0].detach().reshape(row_shape)
    return out.to(ops.loss_dtype(logits))


def _no_classes(logits: Tensor, target: Tensor, weight, red: Reduction, ignore_index: int, return_lse: bool,
                soft: bool) -> Tensor | tuple[Tensor, Tensor]:
    """``C = 0``, as PyTorch: a row's loss is an empty sum, 0 (only ignored rows are valid class
    targets: any other index is out of range); ``'mean'`` is NaN (PyTorch divides by the counted
    rows, none, or for probabilities by ``numel / C``); the gradient is the empty tensor."""
    cdtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    class_dim = 1 if logits.dim() > 1 else 0
    rows = logits.sum(class_dim).to(cdtype)  # zeros of the rows' shape, on the logits' graph
    if soft:
        rows = rows + target.sum(class_dim).to(cdtype)  # on the targets' graph too
    else:
        _check_values(target, 0, ignore_index, logits.device)
        rows = torch.where(target != ignore_index, torch.full_like(rows, math.nan), rows)
    if red == Reduction.NONE:
        out = rows
    elif red == Reduction.SUM:
        out = rows.sum()
    else:
        out = rows.sum() / 0.0
    out = out.to(ops.loss_dtype(logits))
    # lse of an empty row: -inf (probabilities); class targets' rows are all ignored: 0.
    return (out, torch.full_like(rows.detach(), -math.inf if soft else 0.0)) if return_lse else out


def _mixed(logits: Tensor, target: tuple, weight, variant, red, ignore_index, eps, alpha, beta, gamma, z_loss,
           cap, backend, inplace_backward, return_lse) -> Tensor:
    """``target = (y_a, y_b, lam)``: ``lam * L(y_a) + (1 - lam) * L(y_b)`` (fusedloss.mixup)."""
    if inplace_backward or return_lse:
        raise NotImplementedError("inplace_backward and return_lse are not implemented for mixed targets")
    ya, yb, lam = mixup.check_mixed_target(logits, tuple(_index_dtype(t) for t in target[:2]) + target[2:])
    if logits.shape[1 if logits.dim() > 1 else 0] == 0:
        raise ValueError(f"logits must have at least one class for mixed targets; got shape {tuple(logits.shape)}")
    be = dispatch.resolve(backend, logits.device)
    dispatch.check_smoothing(be, variant, eps)
    x2d, ta = _rows_view(logits, ya)
    tb = yb.reshape(ta.shape)
    lam_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    lam = mixup.lam_rows(lam, ta.shape[0], x2d, lam_dtype)
    compute_grad = be.one_target.fused_grad and logits.requires_grad and torch.is_grad_enabled()
    scalars = (int(variant), int(red), ignore_index, float(eps), float(alpha), float(beta), float(gamma), z_loss, cap)
    out = mixup.mixed_loss(be, x2d, ta, tb, lam, weight, scalars, compute_grad)
    if red == Reduction.NONE:
        out = out.reshape(ya.shape)
    return out.to(ops.loss_dtype(logits))


def _rows_view(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """``(N, C, d...)`` -> ``(N * prod(d), C)`` rows with unit class stride (kernels read rows
    of any stride, so an ``(N, C)`` slice is not copied; extra dims are moved last and copied)."""
    if logits.dim() == 1:
        logits, target = logits[None, :], target.reshape(1)
    elif logits.dim() > 2:
        logits = logits.movedim(1, -1).reshape(-1, logits.shape[1])
        target = target.reshape(-1)
    if logits.shape[1] > 1 and logits.stride(1) != 1:  # e.g. a transposed (C, N) buffer: one copy
        logits = logits.contiguous()
    return logits, target


def _soft_rows(logits: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
    if logits.dim() == 1:
        x, y = logits[None, :], probs[None, :]
    else:
        x = logits.movedim(1, -1).reshape(-1, logits.shape[1])
        y = probs.movedim(1, -1).reshape(-1, logits.shape[1])
    # One dtype for both (softmax_loss promoted them; the kernels read them side by side).
    if x.shape[1] > 1 and x.stride(1) != 1:
        x = x.contiguous()
    return x, y


def _soft_output(out: Tensor, stats: Tensor, logits: Tensor, red, return_lse: bool):
    row_shape = logits.shape[:1] + logits.shape[2:] if logits.dim() > 1 else ()
    if red == Reduction.NONE:
        out = out.reshape(row_shape)
    if return_lse:
        return out.to(ops.loss_dtype(logits)), stats[:, 0].reshape(row_shape)
    return out.to(ops.loss_dtype(logits))


def _soft_loss(logits: Tensor, probs: Tensor, weight, variant, red, eps: float, alpha, beta, gamma,
               return_lse: bool, be: dispatch.Backend) -> Tensor | tuple[Tensor, Tensor]:
    """Class probabilities for a loss other than ce: the expected loss ``sum_k w_k q'_k L(x, k)``."""
    x, y = _soft_rows(logits, probs)
    probs_ops = be.family(ops.ProbsOps)
    if probs_ops is not None and probs_ops.loss_fwd is not None:
        fwd, fused = probs_ops.loss_fwd, probs_ops.fused_grad
    else:  # no kernel for it in this backend: the reference's, on the same device
        fwd, fused = ops.reference_soft_loss_fwd, False
    grad_mode = torch.is_grad_enabled()
    compute_grad = fused and x.requires_grad and grad_mode
    out, stats, _ = ops.call_eager(fwd, grad_mode and (x.requires_grad or y.requires_grad), x, y, weight,
                                   int(variant), int(red), float(eps), float(alpha), float(beta), float(gamma),
                                   compute_grad)
    return _soft_output(out, stats, logits, red, return_lse)


def _soft_cross_entropy(logits: Tensor, probs: Tensor, weight, red: Reduction, eps: float,
                        return_lse: bool, be: dispatch.Backend) -> Tensor | tuple[Tensor, Tensor]:
    x, y = _soft_rows(logits, probs)
    probs_ops = be.family(ops.ProbsOps)
    if probs_ops is not None:
        fwd, fused = probs_ops.fwd, probs_ops.fused_grad
    else:  # no soft-target kernel in this backend: the reference's, on the same device
        fwd, fused = ops.reference_soft_fwd, False
    grad_mode = torch.is_grad_enabled()
    compute_grad = fused and x.requires_grad and grad_mode
    out, stats, _ = ops.call_eager(fwd, grad_mode and (x.requires_grad or y.requires_grad), x, y, weight, int(red),
                                   float(eps), compute_grad)
    return _soft_output(out, stats, logits, red, return_lse)


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    backend: str = "auto",
) -> Tensor:
    """Drop-in for :func:`torch.nn.functional.cross_entropy` (class indices or class
    probabilities, ``weight``, ``ignore_index``, ``reduction``, ``label_smoothing``), fused and
    computed in float32 for half inputs.

    Class indices ``c``: ``L = -log p_c`` (times ``weight[c]``), smoothed to
    ``(1 - eps) L + (eps / C) sum_k w_k (lse - x_k)``; ``'mean'`` divides by the counted rows'
    weights. Class probabilities ``y`` (a float target of the input's shape), smoothed to
    ``y' = (1 - eps) y + eps / C``: ``L = sum_k w_k y'_k (lse - x_k)``; ``'mean'`` divides by the
    number of rows (PyTorch's rule), and ``y`` gets its gradient when it requires one. Also the
    mixup pair ``(y_a, y_b, lam)``: ``lam L(y_a) + (1 - lam) L(y_b)``, each part reduced on its own.

    The positional order is PyTorch's, deprecated ``size_average`` and ``reduce`` included (they
    override ``reduction`` with PyTorch's warning, as there), so a call written for
    ``F.cross_entropy`` means the same here. Under ``torch.autocast`` a half-precision input gives a
    float32 loss, as PyTorch's."""
    if size_average is not None or reduce is not None:
        reduction = _legacy_reduction.legacy_get_string(size_average, reduce)
    return softmax_loss(input, target, "ce", weight=weight, ignore_index=ignore_index,
                        reduction=reduction, label_smoothing=label_smoothing, backend=backend)


def multiclass_bce(logits: Tensor, target: Tensor, **kwargs) -> Tensor:
    """Multi-class BCE on softmax outputs: ``L = -log p_c - sum_{k != c} log(1 - p_k)``.
    Keyword arguments as :func:`softmax_loss`."""
    return softmax_loss(logits, target, "bce", **kwargs)


def nllr(logits: Tensor, target: Tensor, **kwargs) -> Tensor:
    """Negative log likelihood ratio: ``L = log(1 - p_c) - log p_c`` (unbounded below by
    definition). Keyword arguments as :func:`softmax_loss`."""
    return softmax_loss(logits, target, "nllr", **kwargs)


def competing_ratio(logits: Tensor, target: Tensor, alpha: float = 1.5, beta: float = 1.0, **kwargs) -> Tensor:
    """Competing ratio loss: ``L = beta * log(alpha + 1 - p_c) - log p_c`` (paper's alpha;
    the authors' code uses ``alpha + 1``). Keyword arguments as :func:`softmax_loss`."""
    return softmax_loss(logits, target, "crl", alpha=alpha, beta=beta, **kwargs)


def linearly_adaptive(logits: Tensor, target: Tensor, **kwargs) -> Tensor:
    """Linearly adaptive cross entropy: ``L = -(1 - p_c) log p_c``. Keyword arguments as
    :func:`softmax_loss`."""
    return softmax_loss(logits, target, "lace", **kwargs)


def focal(logits: Tensor, target: Tensor, gamma: float = 2.0, **kwargs) -> Tensor:
    """Focal loss on softmax: ``L = -(1 - p_c)^gamma log p_c``. Keyword arguments as
    :func:`softmax_loss`."""
    return softmax_loss(logits, target, "focal", gamma=gamma, **kwargs)
