"""Distillation from hidden states: :func:`linear_distill_loss`, :func:`fusedloss.distill_loss` of the
student's and the teacher's projections ``h_s W_s^T + b_s`` and ``h_t W_t^T + b_t`` without ever
holding either ``(N, V)`` logits (docs/distillation.md, "From hidden states").

Blocks of rows, as the LLM head (head.py): per block the student's and the teacher's logits go into
two reused buffers (torch's GEMM), ``distill_rows(..., grad_scale)`` gives the block's rows and the ONE
gradient buffer of the block (the hard loss's fused gradient and the divergence's in one), folded at
once into ``d hidden[block] = g W_s``, ``d weight += g^T h[block]``, ``d bias += sum g``. The teacher
gets no gradient (its GEMM runs without autograd). For ``'mean'``/``'sum'`` the forward computes the
gradients for grad_output = 1 and the backward scales them (a later backward through the same graph
recomputes them); for ``'none'`` the forward computes the rows only and the backward runs the blocks
again with the per-row grad_output as ``grad_scale``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import dispatch, functional, ops, validation
from ..head import MIN_CHUNK_BYTES, _fold, _logits_into, _scale, _WeightGrad, check_chunk_rows
from ..variants import Reduction, reduction_id
from .ops import DistillOps

#: The largest block, and its largest share of one full (N, V) logits tensor: the block's buffers (the
#: student's and the teacher's logits and the block's gradient) and, where the backend has no fused
#: distillation kernel, the reference op's float32 temporaries (``REFERENCE_TEMPORARIES`` block-sized
#: rows: it holds log-probabilities, probabilities and products of both rows). A seventh: at N 2048,
#: V 32000 float32, 96 rows with the fused kernel, whose blocks take 0.14x of the logits; smaller
#: blocks make the skinny GEMMs slow on the CPU (each block reads both weights and reads and writes
#: d weight once, whatever its rows).
CHUNK_BUDGET_BYTES = 48 * 2**20
CHUNK_SHARE = 1 / 7
REFERENCE_TEMPORARIES = 7
#: The issue's goal for the whole op: the blocks plus the gradients it hands back (``d weight``,
#: ``d hidden``, ``d bias``) within this share of one logits tensor. Where the gradients leave less than
#: ``CHUNK_SHARE`` for the blocks, the blocks get what is left, but never less than ``MIN_SHARE`` of
#: the logits (where the gradients alone reach the goal, smaller blocks would cost time for nothing).
TOTAL_SHARE = 0.3
MIN_SHARE = 1 / 32
#: O(N + V) bytes per row and class kept aside from the blocks' budget: the rows, the row scales, the
#: ops' row statistics, ``d bias``'s block sum.
SMALL_BYTES = 16


def default_chunk_rows(n: int, v: int, element_size: int, fused: bool = True, grad_bytes: int = 0) -> int:
    """Rows per block: the block's three ``(rows, V)`` buffers (plus the reference op's float32
    temporaries when ``fused`` is False) within ``CHUNK_SHARE`` of one logits tensor and
    ``CHUNK_BUDGET_BYTES`` (at least ``MIN_CHUNK_BYTES``), a multiple of 32 rows when that is at
    least 32; and, with ``grad_bytes`` (the gradients the op holds: ``d weight``, ``d hidden``,
    ``d bias``), within what they leave of ``TOTAL_SHARE`` of the logits, but at least ``MIN_SHARE``
    of them."""
    per_row = max(v, 1) * (3 * element_size + (0 if fused else 4 * REFERENCE_TEMPORARIES))
    logits = n * v * element_size
    budget = min(CHUNK_BUDGET_BYTES, max(MIN_CHUNK_BYTES, int(logits * CHUNK_SHARE)))
    if grad_bytes:
        left = int(logits * TOTAL_SHARE) - grad_bytes - SMALL_BYTES * (n + v)
        budget = min(budget, max(left, int(logits * MIN_SHARE), MIN_CHUNK_BYTES))
    rows = max(1, budget // per_row)
    if rows >= 32:
        rows -= rows % 32
    return int(min(rows, max(n, 1)))


def held_grad_bytes(hidden: Tensor, weight: Tensor, bias: Tensor | None, weight_rows: int | None = None) -> int:
    """The bytes of the gradients :func:`linear_distill_loss` holds for the student's tensors that
    require grad (``_blocks_pass``): ``d hidden`` in the hidden's dtype, ``d weight`` in the weight's
    dtype (plus a float32 sum for 16-bit weights, ``head._WeightGrad``), ``d bias`` (float32 sum).
    ``weight_rows``: the weight's rows to count instead of its own (the vocabulary-parallel form counts
    every rank's largest slice, so that every rank picks the same blocks)."""
    if not torch.is_grad_enabled():
        return 0
    rows = weight.shape[0] if weight_rows is None else weight_rows
    total = 0
    if hidden.requires_grad:
        total += hidden.numel() * hidden.element_size()
    if weight.requires_grad:
        sixteen = weight.dtype in (torch.float16, torch.bfloat16)
        total += rows * weight.shape[1] * (weight.element_size() + (4 if sixteen else 0))
    if bias is not None and bias.requires_grad:
        total += rows * (bias.element_size() + 4)
    return total


def _check_head(name: str, hidden, weight, bias) -> int:
    """``hidden (..., D)``, ``weight (V, D)``, ``bias (V,)`` of one model. Returns V."""
    h_name, w_name, b_name = f"{name}_hidden", f"{name}_weight", f"{name}_bias"
    for n_, t in ((h_name, hidden), (w_name, weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{n_} must be a torch.Tensor; got {type(t).__name__}")
    if hidden.dtype not in validation.LOGIT_DTYPES or hidden.dim() < 1:
        raise TypeError(f"{h_name} must be a floating tensor (..., D) of float16/bfloat16/float32/float64; "
                        f"got {hidden.dtype} of shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{w_name} must have shape (V, D) with D = {h_name}.shape[-1] = {hidden.shape[-1]}; "
                         f"got {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError(f"{w_name} must have at least one class (row)")
    for n_, t in ((w_name, weight), (b_name, bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{n_} must be a torch.Tensor or None; got {type(t).__name__}")
        if t.dtype != hidden.dtype:
            raise TypeError(f"{n_} must have {h_name}'s dtype {hidden.dtype}; got {t.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"{n_} is on {t.device} but {h_name} is on {hidden.device}; move them to one device")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{b_name} must have shape ({weight.shape[0]},); got {tuple(bias.shape)}")
    return weight.shape[0]


def check_linear_distill_inputs(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                teacher_bias, target) -> int:
    """Both heads' checks, then the pair's: the same V, the same leading dims, one device; the target's
    shape. Returns V."""
    v = _check_head("student", student_hidden, student_weight, student_bias)
    v_t = _check_head("teacher", teacher_hidden, teacher_weight, teacher_bias)
    if v_t != v:
        raise ValueError(f"teacher_weight must have student_weight's number of classes V = {v}; got {v_t}")
    if tuple(teacher_hidden.shape[:-1]) != tuple(student_hidden.shape[:-1]):
        raise ValueError(f"teacher_hidden must have student_hidden's leading dims {tuple(student_hidden.shape[:-1])} "
                         f"(hidden sizes may differ); got {tuple(teacher_hidden.shape)}")
    if teacher_hidden.device != student_hidden.device:
        raise ValueError(f"teacher_hidden is on {teacher_hidden.device} but student_hidden is on "
                         f"{student_hidden.device}; move them to one device")
    validation.check_distill_target(target, student_hidden.shape[:-1], student_hidden.device, "student_hidden")
    return v


def check_without_target(cfg, weight) -> None:
    """``fl.distill_loss``'s rules for ``target=None`` (the row loss is the divergence alone): ``kd_weight
    = 0`` leaves nothing, and a hard-loss option away from its default would be silently ignored."""
    if cfg.kd_weight == 0.0:
        raise ValueError("kd_weight=0 with target=None: the loss would be empty (without a target the row loss "
                         "is the divergence alone); pass a target or kd_weight > 0")
    used = cfg.hard_loss_used(weight)
    if used:
        raise ValueError(f"target=None: the row loss is the divergence alone, so {', '.join(used)} (options of the "
                         "hard loss) would be silently ignored; pass a target or leave them out")


def _blocks_pass(hs, ws, bs, ht, wt, bt, target, cfg, weight, chunk_rows: int, grad_scale: Tensor | None,
                 need: tuple[bool, bool, bool], rows_out: Tensor | None):
    """One pass of blocks: per block both logits, ``distill_rows``, and (``grad_scale`` given) the
    block's gradient folded into ``(d hidden, d weight, d bias)``. Writes the rows into ``rows_out``."""
    from .loss import distill_rows

    n, d = hs.shape
    v = ws.shape[0]
    dtype = torch.promote_types(hs.dtype, ht.dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    grads = grad_scale is not None
    dh = hs.new_empty((n, d)) if grads and need[0] else None
    dw = _WeightGrad(ws) if grads and need[1] else None
    db = torch.zeros((v,), dtype=acc, device=hs.device) if grads and need[2] else None
    rows = max(1, min(chunk_rows, n))
    buf_s = hs.new_empty((rows, v)) if n else None
    buf_t = ht.new_empty((rows, v)) if n else None
    for s in range(0, n, rows):
        e = min(n, s + rows)
        xs = _logits_into(buf_s[: e - s], hs[s:e], ws, bs)
        xt = _logits_into(buf_t[: e - s], ht[s:e], wt, bt)
        r, g = distill_rows(xs.to(dtype), xt.to(dtype), None if target is None else target[s:e], cfg, weight,
                            grad_scale[s:e] if grads else None)
        if rows_out is not None:
            rows_out[s:e] = r
        del xs, xt, r
        if g is not None:
            _fold(g.to(hs.dtype), hs[s:e], ws, dh[s:e] if dh is not None else None, dw, db)
        del g
    if db is not None and bs is not None:
        db = db.to(bs.dtype)
    return dh, dw.result() if dw is not None else None, db


class _LinearDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, target, weight, cfg, red: int, chunk_rows: int):
        from .loss import counted_rows

        n = hs.shape[0]
        dtype = torch.promote_types(hs.dtype, ht.dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        need = tuple(ctx.needs_input_grad[:3])
        fused = red != Reduction.NONE and any(need)
        count = counted_rows(target, n, cfg.ignore_index).to(device=hs.device, dtype=acc)
        rows = torch.empty((n,), dtype=acc, device=hs.device)
        grad_scale = (_row_scale(torch.ones((), dtype=acc, device=hs.device), n, red, count, target, cfg.ignore_index)
                      if fused else None)
        grads = _blocks_pass(hs, ws, bs, ht, wt, bt, target, cfg, weight, chunk_rows, grad_scale, need, rows)
        if red == Reduction.NONE:
            out = rows
        else:
            out = rows.sum()
            if red == Reduction.MEAN:
                out = out / count  # 0 / 0 = NaN when no row counts (the gradients are 0), as fl.distill_loss
        ctx.set_materialize_grads(False)
        ctx.args = (cfg, red, chunk_rows, need)
        ctx.grads = grads if fused else None
        ctx.save_for_backward(hs, ws, bs, ht, wt, bt, target, weight, count)
        return out

    @staticmethod
    @ops.first_order("linear_distill_loss")
    def backward(ctx, grad_out):
        nones = (None,) * 8
        if grad_out is None:
            return (None, None, None) + nones
        cfg, red, chunk_rows, need = ctx.args
        grads, ctx.grads = ctx.grads, None
        if grads is not None:  # the forward's gradients for grad_output = 1: scaled and handed out
            dh, dw, db = (_scale(g, grad_out) if g is not None else None for g in grads)
        else:  # 'none', or a second backward through the same graph: the blocks again
            hs, ws, bs, ht, wt, bt, target, weight, count = ctx.saved_tensors
            scale = _row_scale(grad_out, hs.shape[0], red, count, target, cfg.ignore_index)
            dh, dw, db = _blocks_pass(hs, ws, bs, ht, wt, bt, target, cfg, weight, chunk_rows, scale, need, None)
        return (dh if need[0] else None, dw if need[1] else None, db if need[2] else None) + nones


def _row_scale(grad_out: Tensor, n: int, red: int, count: Tensor, target: Tensor | None,
               ignore_index: int) -> Tensor:
    """d loss / d row_i for grad_output ``grad_out`` (a scalar, or ``(N,)`` for ``'none'``), 0 on the rows
    whose target is ``ignore_index`` (``distill_rows`` adds the divergence's gradient of every row it is
    given a scale for, as ``fl.distill_loss``'s own ``_row_grad_scale`` expects)."""
    go = grad_out.to(count.dtype)
    go = go.expand(n) if go.dim() == 0 else go.reshape(n)
    if red == Reduction.MEAN:
        go = go / torch.where(count > 0, count, torch.ones_like(count))
    if target is not None:
        go = torch.where(target != ignore_index, go, torch.zeros((), dtype=go.dtype, device=go.device))
    return go.contiguous()


def linear_distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    target: Tensor | None = None,
    loss: str = "ce",
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    temperature: float = 1.0,
    divergence: str = "kl",
    jsd_beta: float = 0.5,
    kd_weight: float = 0.5,
    reduction: str = "mean",
    ignore_index: int = -100,
    backend: str = "auto",
    chunk_rows: int | None = None,
    **loss_options,
) -> Tensor:
    """:func:`fusedloss.distill_loss` of ``student_hidden @ student_weight.T + student_bias`` and
    ``teacher_hidden @ teacher_weight.T + teacher_bias`` without either ``(N, V)`` logits.

    Value and gradients (w.r.t. ``student_hidden``, ``student_weight``, ``student_bias``) are those
    of :func:`fusedloss.distill_loss` on the two projections; the teacher's tensors get no gradient,
    even if they require it. The logits are computed, used and dropped one block of rows at a time.

    Args:
        student_hidden: ``(N, D_s)`` or ``(B, T, D_s)``; student_weight ``(V, D_s)`` (``nn.Linear``'s
            layout, e.g. the student's ``lm_head.weight``) and student_bias ``(V,)`` or None, of
            student_hidden's dtype and device.
        teacher_hidden: ``(N, D_t)`` or ``(B, T, D_t)`` (the same leading dims; ``D_t`` may differ
            from ``D_s``); teacher_weight ``(V, D_t)``, teacher_bias ``(V,)`` or None, of
            teacher_hidden's dtype. Student and teacher dtypes may differ: both logits blocks are
            promoted to ``torch.promote_types`` of the two (as :func:`fusedloss.distill_loss`).
        target: class ids of shape ``student_hidden.shape[:-1]``, or None (the divergence alone).
        loss, temperature, divergence, jsd_beta, kd_weight, reduction, ignore_index, backend,
        loss_options: as :func:`fusedloss.distill_loss` (``weight`` = the hard loss's class weights).
        chunk_rows: rows per block (default :func:`default_chunk_rows`: the blocks and the gradients
            within 0.3x of one logits tensor where a block of 1/32 of it allows, docs/distillation.md).

    Returns:
        The loss in the promoted dtype: a scalar, or ``student_hidden.shape[:-1]`` for ``'none'``.
    """
    from .loss import make_config

    cfg, weight = make_config(loss, temperature=temperature, divergence=divergence, jsd_beta=jsd_beta,
                              kd_weight=kd_weight, ignore_index=ignore_index, backend=backend, **loss_options)
    red = reduction_id(reduction)
    if target is None:
        check_without_target(cfg, weight)
    v = check_linear_distill_inputs(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                    teacher_bias, target)
    if weight is not None:
        weight = validation.check_weight(weight, v, student_hidden)
    dtype = torch.promote_types(student_hidden.dtype, teacher_hidden.dtype)
    n = student_hidden.numel() // max(student_hidden.shape[-1], 1)
    if chunk_rows is None:
        fused = dispatch.resolve(cfg.backend, student_hidden.device).family(DistillOps) is not None
        chunk_rows = default_chunk_rows(n, v, dtype.itemsize, fused,
                                        held_grad_bytes(student_hidden, student_weight, student_bias))
    else:
        check_chunk_rows(chunk_rows)
    if target is not None and validation.must_check_targets(student_hidden.device):
        validation.check_target_values(target, v, cfg.ignore_index)
    hs = student_hidden.reshape(n, student_hidden.shape[-1])
    ht = teacher_hidden.detach().reshape(n, teacher_hidden.shape[-1])
    out = _LinearDistill.apply(hs, student_weight, student_bias, ht, teacher_weight.detach(),
                               None if teacher_bias is None else teacher_bias.detach(),
                               None if target is None else functional._index_dtype(target).reshape(-1), weight, cfg,
                               int(red), int(chunk_rows))
    if red == Reduction.NONE:
        out = out.reshape(student_hidden.shape[:-1])
    return out.to(ops.loss_dtype(student_hidden, dtype))


class LinearDistillLoss(nn.Module):
    """:func:`linear_distill_loss` as a module: owns the options, takes both heads' tensors.

    ``LinearDistillLoss("focal", temperature=2.0, kd_weight=0.7, gamma=2.0)(h_s, W_s, h_t, W_t, target)``.
    """

    def __init__(self, loss: str = "ce", *, temperature: float = 1.0, divergence: str = "kl", jsd_beta: float = 0.5,
                 kd_weight: float = 0.5, reduction: str = "mean", ignore_index: int = -100, backend: str = "auto",
                 chunk_rows: int | None = None, **loss_options):
        super().__init__()
        from .loss import make_config

        _, weight = make_config(loss, temperature=temperature, divergence=divergence, jsd_beta=jsd_beta,
                                kd_weight=kd_weight, ignore_index=ignore_index, backend=backend,
                                **dict(loss_options))  # fail at construction
        reduction_id(reduction)
        if chunk_rows is not None:
            check_chunk_rows(chunk_rows)
        self.loss = loss
        loss_options.pop("weight", None)
        self.options = dict(temperature=temperature, divergence=divergence, jsd_beta=jsd_beta, kd_weight=kd_weight,
                            reduction=reduction, ignore_index=ignore_index, backend=backend, chunk_rows=chunk_rows,
                            **loss_options)
        self.register_buffer("weight", weight)  # the hard loss's class weights: follow .to(device), state dict

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
                target: Tensor | None = None, *, student_bias: Tensor | None = None,
                teacher_bias: Tensor | None = None) -> Tensor:
        extra = {} if self.weight is None else {"weight": self.weight}
        return linear_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, target, self.loss,
                                   student_bias=student_bias, teacher_bias=teacher_bias, **self.options, **extra)

    def extra_repr(self) -> str:
        return f"loss={self.loss!r}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())
