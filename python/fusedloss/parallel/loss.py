"""The split loss on local logits: :func:`softmax_loss`, its autograd Function, and the rows of one call
(or one block of the head): the partial statistics, their collectives, the row losses and the state the
local gradient needs later (``O(N)`` tensors, no collective in the backward)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .. import dispatch, ops, reference, validation
from ..variants import Reduction, Variant
from .bce import _BceState, _bce_grad, _bce_rows
from .plan import Plan, _Config, _check_local, _device_of, _k0_masked, _plan, _unwrap_dtensors
from .target_only import _target_only_grad, _target_only_rows
from .terms import _row_losses, _zero


def softmax_loss(
    local_logits: Tensor,
    target: Tensor,
    loss: str = "ce",
    *,
    group: dist.ProcessGroup | None = None,
    class_start: int | None = None,
    num_classes: int | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    alpha: float = 1.5,
    beta: float = 1.0,
    gamma: float = 2.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> Tensor:
    """:func:`fusedloss.softmax_loss` of the logits whose classes are split across ``group``.

    Every rank calls it with its slice of the classes and gets the same loss: that of the
    single-process :func:`fusedloss.softmax_loss` on the concatenated ``(N, V)`` logits. The
    gradient flows to ``local_logits`` only (this rank's slice of the full gradient).

    Args:
        local_logits: ``(N, V_local)`` (or ``(V_local,)``), this rank's classes of every row; or a
            ``DTensor`` sharded on its last dimension (``Shard(-1)``) over a 1-D device mesh, whose
            local tensor and mesh group are used (``group`` and ``class_start`` must then be None).
        target: ``(N,)`` global class ids in ``[0, V)``, the same on every rank (a replicated
            DTensor is accepted).
        loss: ``"ce", "bce", "nllr", "crl", "lace", "focal"``.
        group: the process group the classes are split over (None: the default group).
        class_start: the global id of this rank's first class. None: the ranks' slices follow
            rank order, sized by each rank's ``V_local`` (uneven splits allowed).
        num_classes: ``V``; needed only with ``validate=False`` (else derived from the ranks).
        weight: the **global** ``(V,)`` class weights, the same on every rank (each rank reads
            its own slice and the target's weight from it).
        validate: exchange one row of metadata per rank first (one all-gather of 17 int64s and
            a host synchronization) and raise the same ``ValueError`` on every rank when the
            slices do not tile ``[0, V)``, the row counts, dtypes, loss options (the float ones
            bit for bit) or targets differ. ``False`` skips it (then ``class_start`` and ``num_classes`` are required
            and nothing is checked across ranks: a mismatch gives wrong results or a hang).

    Other keywords as :func:`fusedloss.softmax_loss` (label smoothing divides by the global
    ``V`` and uses the global weight total; z-loss and soft-capping per row as there).

    Label smoothing with every loss is the expected loss ``(1 - eps) w_c L(x, c) + (eps / V) sum_k
    w_k L(x, k)`` of the single-process function (docs/parallel.md, "Label smoothing with a loss
    other than ce").

    Collectives per call, besides the validation all-gather: target-only losses, forward one
    all-reduce MAX of ``N`` floats and one all-reduce SUM of ``2N`` floats (``ce`` with label
    smoothing: ``3N``); ``nllr, crl, lace, focal`` with label smoothing, one all-gather of ``6N``
    floats per rank and one all-reduce SUM of ``2N`` (``N`` without a gradient); ``bce``, forward
    one all-gather of ``6N`` floats per rank and one all-reduce SUM of ``2N`` floats (``N`` without
    a gradient; with label smoothing ``3N`` more, ``N`` without a gradient). Backward: none.
    """
    local_logits, target, group, class_start = _unwrap_dtensors(local_logits, target, group, class_start)
    error: Exception | None = None
    try:
        cfg, be = _check_local(local_logits, target, loss, weight, ignore_index, reduction, label_smoothing,
                               alpha, beta, gamma, z_loss, softcap, backend)
    except (TypeError, ValueError, NotImplementedError, dispatch.BackendUnavailableError) as e:
        if not validate:
            raise
        error, cfg = e, None
    ok = error is None
    shape = (local_logits.shape[0] if local_logits.dim() == 2 else 1, local_logits.shape[-1],
             local_logits.dtype) if ok else None
    plan = _plan(validate, _device_of(local_logits), shape, target, weight, class_start, num_classes, cfg, error,
                 group, {}, _k0_masked(local_logits, cfg) if ok and validate else None)
    if local_logits.dim() == 1:
        out = _VocabParallelSoftmaxLoss.apply(local_logits[None, :], target.reshape(1), weight, plan, be, cfg, group)
        return out.reshape(())
    if local_logits.shape[1] > 1 and local_logits.stride(1) != 1:  # the kernels read rows of unit class stride
        local_logits = local_logits.contiguous()
    return _VocabParallelSoftmaxLoss.apply(local_logits, target, weight, plan, be, cfg, group)


def _rows(x: Tensor, t: Tensor, weight, plan: Plan, be, cfg: _Config, group, need_grad: bool):
    """``(loss_rows, lse, state)`` of the rows of ``x``: weighted unreduced losses, the global ``lse``
    (0 on ignored rows) and the per-row numbers :func:`_grad` needs."""
    keep = t != cfg.ignore_index
    if cfg.variant == Variant.BCE:
        h, lse, wx_sum, state = _bce_rows(x, t, keep, weight, plan, be, cfg, group, need_grad)
    else:
        h, lse, wx_sum, state = _target_only_rows(x, t, keep, weight, plan, be, cfg, group, need_grad)
    lse = torch.where(keep, lse, _zero(lse.dtype, x.device))
    return _row_losses(h, lse, t, keep, weight, plan, cfg, wx_sum), lse, state


def _grad(x: Tensor, state, go: Tensor, weight, plan: Plan, be, cfg: _Config) -> Tensor:
    """This rank's slice of ``d loss / d x`` for the per-row ``go = d loss / d loss_row`` (0 on ignored
    rows): local, from the global numbers in ``state``; no collective."""
    if isinstance(state, _BceState):
        return _bce_grad(x, state, go, weight, plan, be, cfg)
    return _target_only_grad(x, state, go, weight, plan, be, cfg)


def _row_grad_output(grad_loss: Tensor, t: Tensor, weight, cfg: _Config, cdtype) -> Tensor:
    """``d loss / d loss_row`` per row: grad_output (expanded for a scalar), over the mean's
    denominator for ``'mean'``, 0 on ignored rows."""
    n = t.shape[0]
    go = grad_loss.to(cdtype)
    go = go.expand(n) if go.dim() == 0 else go.reshape(n)
    if cfg.reduction == Reduction.MEAN:
        go = go / reference.mean_denominator(t, weight, cfg.ignore_index, cdtype)
    return torch.where(t != cfg.ignore_index, go, _zero(cdtype, t.device))


def _reduce(loss_rows: Tensor, t: Tensor, weight, cfg: _Config) -> Tensor:
    if cfg.reduction == Reduction.NONE:
        return loss_rows
    out = loss_rows.sum()
    if cfg.reduction == Reduction.MEAN:
        out = out / reference.mean_denominator(t, weight, cfg.ignore_index, loss_rows.dtype)
    return out


def _check_targets(t: Tensor, device, plan: Plan, cfg: _Config) -> None:
    if validation.must_check_targets(device):
        validation.check_target_values(t, plan.num_classes, cfg.ignore_index)


class _VocabParallelSoftmaxLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, weight: Tensor | None, plan: Plan, be: dispatch.Backend,
                cfg: _Config, group) -> Tensor:
        t = target.long()
        _check_targets(t, x.device, plan, cfg)
        loss_rows, _lse, state = _rows(x, t, weight, plan, be, cfg, group, ctx.needs_input_grad[0])
        out = _reduce(loss_rows, t, weight, cfg)
        ctx.save_for_backward(x, weight, *state)
        ctx.state_type, ctx.plan, ctx.be, ctx.cfg = type(state), plan, be, cfg
        return out.to(ops.loss_dtype(x))

    @staticmethod
    @ops.first_order("fusedloss.parallel.softmax_loss")  # a double backward raises, never a silent 0
    def backward(ctx, grad_loss: Tensor):
        x, weight, *fields = ctx.saved_tensors
        state = ctx.state_type(*fields)
        go = _row_grad_output(grad_loss, state.t, weight, ctx.cfg, state.stats.dtype)
        g = _grad(x, state, go, weight, ctx.plan, ctx.be, ctx.cfg)
        return g, None, None, None, None, None, None
