"""The split LLM head: :func:`linear_softmax_loss` with the head's weight split by rows across the
ranks; ``head.run_blocks`` computes one block of rows of the local logits at a time, the block's loss as
:mod:`.loss` does (its collectives per block); ``d hidden`` is all-reduced over the ranks in the backward."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .. import dispatch, ops, reference
from ..head import _scale, _WeightGrad, default_chunk_rows, run_blocks
from ..variants import Reduction
from .loss import _check_targets, _grad, _reduce, _row_grad_output, _rows
from .plan import Plan, _Config, _check_local_head, _device_of, _plan, _unwrap_head_dtensors
from .terms import _zero


def linear_softmax_loss(
    hidden: Tensor,
    local_weight: Tensor,
    target: Tensor,
    loss: str = "ce",
    *,
    bias: Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    class_start: int | None = None,
    num_classes: int | None = None,
    class_weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    alpha: float = 1.5,
    beta: float = 1.0,
    gamma: float = 2.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    chunk_rows: int | None = None,
    reduce_hidden_grad: bool = True,
    validate: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`fusedloss.linear_softmax_loss` with the head's weight split by rows across ``group``.

    Every rank holds ``local_weight (V_local, D)``, the rows ``[class_start, class_start + V_local)``
    of the ``(V, D)`` output projection (a column-parallel head), the same ``hidden`` and ``target``,
    and gets the loss of the single-process :func:`fusedloss.linear_softmax_loss` on the full weight.
    The gradients are those of the single-process head: ``local_weight`` and ``bias`` get this
    rank's rows, ``hidden`` the full ``d hidden = sum_r g_r W_r``, summed over the ranks by one
    all-reduce of ``N x D`` in the backward. Neither the full nor the local ``(N, V_local)`` logits are
    ever held: one block of rows at a time, as in the single-process head.

    Args:
        hidden: ``(N, D)`` or ``(B, T, D)``, the same on every rank (a replicated DTensor is accepted).
        local_weight: ``(V_local, D)``, this rank's rows of the head weight; or a DTensor sharded on
            its rows (``Shard(0)``) over a 1-D mesh (its local tensor and mesh group are used;
            ``group`` and ``class_start`` must then be None; ``bias`` may be a ``Shard(0)`` DTensor).
        target: class ids of shape ``hidden.shape[:-1]``, global, the same on every rank.
        bias: this rank's ``(V_local,)`` slice of the bias, or None.
        class_weight: the **global** ``(V,)`` class weights, the same on every rank.
        group, class_start, num_classes, validate: as :func:`softmax_loss`.
        return_lse: also return each row's global log-sum-exp (0 on ignored rows, no gradient).
        chunk_rows: rows per block, the same on every rank (each block costs its own collectives:
            2 for target-only losses, 2 for bce). Default: ``head.default_chunk_rows`` of ``N`` and
            ``ceil(V / world_size)`` classes, so every rank derives the same.
        reduce_hidden_grad: all-reduce ``d hidden`` over ``group`` in the backward (default). A model
            that already sums the input gradient of its column-parallel layers (Megatron-LM's
            ``copy_to_tensor_model_parallel_region`` before the head, whose backward all-reduces)
            passes ``False`` and gets this rank's partial ``g_r W_r``.

    Other keywords as :func:`fusedloss.linear_softmax_loss`. Every rank must call it, and call the
    backward, alike (the backward's all-reduce pairs up across the ranks; ``hidden.requires_grad``
    is checked to agree). Not traced by ``torch.compile`` as one node (the single-process head is).
    """
    hidden, local_weight, bias, target, group, class_start = _unwrap_head_dtensors(
        hidden, local_weight, bias, target, group, class_start)
    error: Exception | None = None
    try:
        cfg, be = _check_local_head(hidden, local_weight, bias, target, loss, class_weight, ignore_index, reduction,
                                    label_smoothing, alpha, beta, gamma, z_loss, softcap, backend, chunk_rows)
    except (TypeError, ValueError, NotImplementedError, dispatch.BackendUnavailableError) as e:
        if not validate:
            raise
        error, cfg = e, None
    ok = error is None
    grad_on = torch.is_grad_enabled()
    need = (grad_on and hidden.requires_grad, grad_on and local_weight.requires_grad,
            grad_on and bias is not None and bias.requires_grad) if ok else (False, False, False)
    reduce_dh = bool(reduce_hidden_grad) and need[0]
    n = hidden.numel() // max(hidden.shape[-1], 1) if ok else -1
    shape = (n, local_weight.shape[0], hidden.dtype) if ok else None
    extra = {"hidden size D": hidden.shape[-1] if ok else -1,
             "chunk_rows (None: 0)": (chunk_rows or 0) if ok else -1,
             "hidden.requires_grad and reduce_hidden_grad (the backward's all-reduce)": int(reduce_dh)}
    plan = _plan(validate, _device_of(hidden), shape, target, class_weight, class_start, num_classes, cfg, error,
                 group, extra)
    if chunk_rows is None:
        v_block = -(-plan.num_classes // plan.world_size)
        chunk_rows = default_chunk_rows(n, v_block, hidden.element_size())
    out, lse = _VocabParallelLinearLoss.apply(hidden.reshape(n, hidden.shape[-1]), local_weight, bias,
                                              target.reshape(-1), class_weight, plan, be, cfg, group,
                                              int(chunk_rows), reduce_dh)
    if cfg.reduction == Reduction.NONE:
        out = out.reshape(target.shape)
    out = out.to(ops.loss_dtype(hidden))
    if return_lse:
        return out, lse.reshape(target.shape)
    return out


def _head_forward(hidden, weight, bias, t, class_weight, plan: Plan, be, cfg: _Config, group, chunk_rows: int,
                  need: tuple[bool, bool, bool]):
    """Per block of rows: the local logits (``head.run_blocks``), the block's row losses and global
    statistics (its collectives), and for ``'mean'``/``'sum'`` the block's gradient for
    grad_output = 1 folded into ``d hidden`` (this rank's part), ``d weight``, ``d bias``. For
    ``'none'`` the per-row states instead (the backward recomputes the logits)."""
    n, d = hidden.shape
    vl = weight.shape[0]
    cdtype = reference.compute_dtype(hidden)
    need_any = any(need)
    fused = cfg.reduction != Reduction.NONE and need_any
    dh = hidden.new_empty((n, d)) if fused and need[0] else None
    dw = _WeightGrad(weight) if fused and need[1] else None
    db = torch.zeros((vl,), dtype=cdtype, device=hidden.device) if fused and need[2] else None
    loss_rows = torch.empty((n,), dtype=cdtype, device=hidden.device)
    lse = torch.empty((n,), dtype=cdtype, device=hidden.device)
    states = []
    go = None
    if fused:
        keep = t != cfg.ignore_index
        go = torch.where(keep, torch.ones((), dtype=cdtype, device=hidden.device), _zero(cdtype, hidden.device))
        if cfg.reduction == Reduction.MEAN:  # all rows ignored: 0 / 0 loss, but 0 gradients (as fl's head)
            denom = reference.mean_denominator(t, class_weight, cfg.ignore_index, cdtype)
            go = go / torch.where(denom > 0, denom, torch.ones_like(denom))

    def step(s, e, x):
        rows, lse[s:e], st = _rows(x, t[s:e], class_weight, plan, be, cfg, group, need_any)
        loss_rows[s:e] = rows
        if not fused:
            if need_any:
                states.append(st)
            return None
        return _grad(x, st, go[s:e], class_weight, plan, be, cfg)

    run_blocks(hidden, weight, bias, chunk_rows, step, dh, dw, db)
    loss = _reduce(loss_rows, t, class_weight, cfg)
    state = type(states[0])(*(torch.cat(f) for f in zip(*states))) if states else None
    if db is not None and bias is not None:
        db = db.to(bias.dtype)
    return loss, lse, (dh, dw.result() if dw is not None else None, db), state


class _VocabParallelLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, t, class_weight, plan: Plan, be, cfg: _Config, group, chunk_rows: int,
                reduce_dh: bool):
        t = t.long()
        _check_targets(t, hidden.device, plan, cfg)
        need = tuple(ctx.needs_input_grad[:3])
        loss, lse, grads, state = _head_forward(hidden, weight, bias, t, class_weight, plan, be, cfg, group,
                                                chunk_rows, need)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        ctx.args = (plan, be, cfg, group, chunk_rows)
        ctx.need, ctx.reduce_dh = need, reduce_dh
        if state is not None:  # 'none': the logits are recomputed from the inputs, block by block
            ctx.state_type = type(state)
            ctx.save_for_backward(hidden, weight, bias, t, class_weight, *state)
        else:
            # The gradients for grad_output = 1, handed out (scaled in place) by the first backward;
            # a second one (retain_graph=True) recomputes them, collectives included.
            ctx.grads = grads
            ctx.save_for_backward(hidden, weight, bias, t, class_weight)
        return loss, lse

    @staticmethod
    @ops.first_order("fusedloss.parallel.linear_softmax_loss")
    def backward(ctx, grad_loss, _grad_lse):
        nones = (None,) * 8
        if grad_loss is None:
            return (None, None, None) + nones
        plan, be, cfg, group, chunk_rows = ctx.args
        hidden, weight, bias, t, class_weight, *fields = ctx.saved_tensors
        need = ctx.need
        if fields:
            state = ctx.state_type(*fields)
            go = _row_grad_output(grad_loss, t, class_weight, cfg, state.stats.dtype)
            dh = hidden.new_empty(hidden.shape) if need[0] else None
            dw = _WeightGrad(weight) if need[1] else None
            db = torch.zeros((weight.shape[0],), dtype=state.stats.dtype, device=hidden.device) if need[2] else None
            run_blocks(hidden, weight, bias, chunk_rows,
                       lambda s, e, x: _grad(x, type(state)(*(f[s:e] for f in state)), go[s:e], class_weight, plan,
                                             be, cfg), dh, dw, db)
            dw = dw.result() if dw is not None else None
            if db is not None and bias is not None:
                db = db.to(bias.dtype)
        else:
            grads, ctx.grads = ctx.grads, None
            if grads is None:
                _, _, grads, _ = _head_forward(hidden, weight, bias, t, class_weight, plan, be, cfg, group,
                                               chunk_rows, need)
            dh, dw, db = (_scale(g, grad_loss) if g is not None else None for g in grads)
        if dh is not None and ctx.reduce_dh:
            dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=group)
        return (dh if need[0] else None, dw if need[1] else None, db if need[2] else None) + nones
