"""Knowledge distillation with the vocabulary split across processes: :func:`distill_loss` (each rank
holds its classes of the student's and the teacher's logits) and :func:`linear_distill_loss` (each
rank holds its rows of both heads' weights).

The divergence of a row depends on it through the global log-sum-exps of both rows at temperature
``T`` and then through one or two sums over the classes (docs/distillation.md):

1. each rank's row maxima of ``s / T`` and ``t / T``, one all-reduce MAX (``2N``): the global ``M``; the
   slice's ``sum exp(x / T - M)`` of both, one all-reduce SUM (``2N``): ``L = log`` of the total;
2. ``log q = (s / T - M_s) - L_s`` and ``log p = (t / T - M_t) - L_t`` on the slice (log space, never
   ``log(exp(.))``; ``torch.log_softmax``'s own order, so no rounding of an ``lse`` at the logits'
   magnitude), the slice's part of the divergence's sums and the pivot sum of step 3, one all-reduce
   SUM (``2N``; ``3N`` for jsd): ``kl: sum p (log p - log q)``, ``reverse_kl: sum q (log q - log p)``,
   ``jsd: sum p (log p - log m), sum q (log q - log m)``;
3. the backward is local, from the saved global numbers (distill/ops.py's gradients): ``kl:
   T (q - p)``, ``reverse_kl: T q (r - sum q r)``, ``jsd: T (1 - b) q (u - sum q u)``; the sums are
   those of step 2. At a dominant class ``w`` (``q_w > 1/2``) reverse_kl's and jsd's entry is formed
   about the pivot, ``r_w - sum q r = -sum_{k != w} q_k (r_k - r_w)`` (one more sum in step 2, and
   the teacher's logit at ``w`` in step 1's SUM), and kl's as ``q_w - p_w = -sum_{k != w} (q_k - p_k)``
   (one more sum in step 2: no difference of two numbers near 1 when the teacher is confident on ``w``
   too), as the single-process op forms them (:func:`_pivot`).

The hard loss (``target`` given) is ``fusedloss.parallel``'s own split loss (its rows and its local
gradient, :mod:`.loss`), inside the same autograd Function, with the validation exchange of this
call (one for both). Row ``i``: ``(1 - kd_weight) H_i + kd_weight D_i``, 0 where the target is
``ignore_index``; ``mean`` divides by the rows that count (all rows without a target).
"""
from __future__ import annotations

import math
import struct

import torch
import torch.distributed as dist
from torch import Tensor

from .. import dispatch, ops, validation
from ..distill.linear import check_without_target
from ..distill.ops import DIVERGENCES
from ..variants import Reduction, reduction_id
from .loss import _check_targets, _grad, _rows
from .plan import Plan, _config, _device_of, _k0_masked, _plan, _replicated_local, _sharded_local

_HARD_OPTIONS = ("label_smoothing", "alpha", "beta", "gamma", "z_loss", "softcap")
_DEFAULTS = {"label_smoothing": 0.0, "alpha": 1.5, "beta": 1.0, "gamma": 2.0, "z_loss": 0.0, "softcap": None}


def _bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _make_config(loss, temperature, divergence, jsd_beta, kd_weight, ignore_index, backend, loss_options):
    from ..distill.loss import make_config  # helper A's validation, shared with fl.distill_loss

    return make_config(loss, temperature=temperature, divergence=divergence, jsd_beta=jsd_beta, kd_weight=kd_weight,
                       ignore_index=ignore_index, backend=backend, **loss_options)


def _hard_config(dcfg, reduction: str):
    """The split loss's ``_Config`` of the hard loss (reduction ``none``; ours is applied here)."""
    reduction_id(reduction)  # ValueError naming reduction
    o = dict(_DEFAULTS, **dict(dcfg.loss_options))
    return _config(dcfg.loss, "none", dcfg.ignore_index, o["label_smoothing"], o["alpha"], o["beta"], o["gamma"],
                   o["z_loss"], o["softcap"])


def _unwrap(student, teacher, target, group, class_start):
    """DTensor logits sharded on the classes (``Shard(-1)``): the local tensors and the mesh's group."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return student, teacher, target, group, class_start
    if target is not None:
        target = _replicated_local(target, "target")
    if not isinstance(student, DTensor) and not isinstance(teacher, DTensor):
        return student, teacher, target, group, class_start
    if not (isinstance(student, DTensor) and isinstance(teacher, DTensor)):
        raise ValueError("student_logits and teacher_logits must both be DTensors or both plain tensors")
    if group is not None or class_start is not None:
        raise ValueError("pass group and class_start only with plain tensors; a DTensor carries its own")
    what = "logits sharded on the class (last) dimension, Shard(-1),"
    s, g = _sharded_local(student, student.dim() - 1, what)
    t, g_t = _sharded_local(teacher, teacher.dim() - 1, what)
    if teacher.device_mesh != student.device_mesh or tuple(teacher.shape) != tuple(student.shape):
        raise ValueError("teacher_logits must be sharded like student_logits (the same mesh and global shape)")
    return s, t, target, g, None


def _check_pair(student, teacher, target, name_s="student_logits", name_t="teacher_logits"):
    """Local shapes and dtypes (fl.distill_loss's checks on this rank's slices). Returns the math dtype
    pair (promoted dtype, N)."""
    for name, x in ((name_s, student), (name_t, teacher)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
        validation.check_logits(x)
        if x.dim() not in (2, 3):
            raise ValueError(f"{name} must be (N, V_local) or (B, T, V_local); got shape {tuple(x.shape)}")
    if tuple(student.shape) != tuple(teacher.shape):
        raise ValueError(f"{name_t} must have {name_s}'s shape {tuple(student.shape)}; got {tuple(teacher.shape)}")
    if teacher.device != student.device:
        raise ValueError(f"{name_t} is on {teacher.device} but {name_s} is on {student.device}")
    validation.check_distill_target(target, student.shape[:-1], student.device, name_s)


def distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None = None,
    loss: str = "ce",
    *,
    temperature: float = 1.0,
    divergence: str = "kl",
    jsd_beta: float = 0.5,
    kd_weight: float = 0.5,
    reduction: str = "mean",
    ignore_index: int = -100,
    backend: str = "auto",
    group: dist.ProcessGroup | None = None,
    class_start: int | None = None,
    num_classes: int | None = None,
    validate: bool = True,
    **loss_options,
) -> Tensor:
    """:func:`fusedloss.distill_loss` of logits whose classes are split across ``group``.

    Every rank passes its classes ``[class_start, class_start + V_local)`` of the student's and the
    teacher's logits (``(N, V_local)`` or ``(B, T, V_local)``, the same slice of both; uneven splits
    allowed) and the same global ``target``; every rank gets the loss of the single-process
    :func:`fusedloss.distill_loss` on the full logits, and the gradient of its own slice of the
    student's logits (the teacher's gets none).

    Args:
        student_logits, teacher_logits: this rank's slices; or DTensors sharded on the class
            dimension (``Shard(-1)``) over one 1-D mesh (their local tensors and the mesh's group are
            used; ``group`` and ``class_start`` must then be None).
        target: global class ids (``student_logits.shape[:-1]``), the same on every rank, or None
            (the divergence alone). A replicated DTensor is accepted.
        loss, temperature, divergence, jsd_beta, kd_weight, reduction, ignore_index, backend,
        loss_options: as :func:`fusedloss.distill_loss` (``weight`` the **global** ``(V,)`` class
            weights; the hard loss's options as :func:`fusedloss.parallel.softmax_loss` takes them).
        group, class_start, num_classes, validate: as :func:`fusedloss.parallel.softmax_loss`.

    Collectives per call, besides the validation all-gather: forward, all-reduce MAX of ``2N``,
    all-reduce SUM of ``2N`` (``3N`` for reverse_kl and jsd), all-reduce SUM of ``N`` (``2N`` for
    reverse_kl, ``3N`` for jsd), and with a target the split
    hard loss's own (MAX of ``N`` and SUM of ``2N`` for the target-only losses; bce's all-gather and
    SUM); backward none. ``O(N)`` floats, never the logits.
    """
    student_logits, teacher_logits, target, group, class_start = _unwrap(student_logits, teacher_logits, target,
                                                                         group, class_start)
    error: Exception | None = None
    dcfg = hcfg = be = None
    weight = None
    try:
        dcfg, weight = _make_config(loss, temperature, divergence, jsd_beta, kd_weight, ignore_index, backend,
                                    dict(loss_options))
        hcfg = _hard_config(dcfg, reduction)
        if target is None:
            check_without_target(dcfg, weight)
        _check_pair(student_logits, teacher_logits, target)
        if weight is not None:
            if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.dim() != 1:
                raise TypeError("weight must be a floating 1-D tensor: the global (V,) class weights")
            if weight.device != student_logits.device:
                raise ValueError(f"weight is on {weight.device} but the logits are on {student_logits.device}")
        be = dispatch.resolve(dcfg.backend, student_logits.device)
    except (TypeError, ValueError, NotImplementedError, dispatch.BackendUnavailableError) as e:
        if not validate:
            raise
        error = e
    ok = error is None
    dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype) if ok else None
    n = student_logits.numel() // max(student_logits.shape[-1], 1) if ok else -1
    shape = (n, student_logits.shape[-1], dtype) if ok else None
    tgt = target.reshape(-1) if ok and target is not None else (
        torch.zeros(max(n, 0), dtype=torch.long, device=_device_of(student_logits)) if ok else None)
    extra = {
        "target (given or None)": int(target is not None) if ok else -1,
        "reduction": int(reduction_id(reduction)) if ok else -1,
        "divergence": DIVERGENCES[dcfg.divergence] if ok else -1,
        "temperature": _bits(dcfg.temperature) if ok else -1,
        "jsd_beta": _bits(dcfg.jsd_beta) if ok else -1,
        "kd_weight": _bits(dcfg.kd_weight) if ok else -1,
    }
    x2 = student_logits.reshape(n, -1) if ok else None
    k0 = _k0_masked(x2, hcfg) if ok and validate and target is not None else None
    plan = _plan(validate, _device_of(student_logits), shape, tgt, weight, class_start, num_classes, hcfg, error,
                 group, extra, k0)
    s = x2.to(dtype)
    t = teacher_logits.reshape(n, -1).to(dtype)
    if s.shape[1] > 1 and s.stride(1) != 1:  # the kernels read rows of unit class stride
        s = s.contiguous()
    if t.shape[1] > 1 and t.stride(1) != 1:
        t = t.contiguous()
    red = reduction_id(reduction)
    out = _VocabParallelDistill.apply(s, t.detach(), None if target is None else target.reshape(-1), weight, plan,
                                      be, hcfg, dcfg, int(red), group)
    if red == Reduction.NONE:
        out = out.reshape(student_logits.shape[:-1])
    return out.to(ops.loss_dtype(s))


# ----------------------------------------------------------------------------------------------
# The divergence on a slice: global lse of both rows, the sums, the local gradient
# ----------------------------------------------------------------------------------------------

def _xlog(a: Tensor, log_a: Tensor, log_b: Tensor) -> Tensor:
    """``sum_k a_k (log a_k - log b_k)`` over the slice, ``0 log 0 = 0``."""
    return torch.where(a > 0, a * (log_a - log_b), 0).sum(-1)


def _logs(s: Tensor, t: Tensor, lse_s: Tensor, lse_t: Tensor, temperature: float, cd):
    """``log q``, ``log p`` on the slice from each row's global ``(M, L)`` (``lse_s``, ``lse_t``: ``(2, N)``;
    log space: ``(x / T - M) - L``)."""
    inv = 1.0 / temperature
    return ((s.to(cd) * inv - lse_s[0][:, None]) - lse_s[1][:, None],
            (t.to(cd) * inv - lse_t[0][:, None]) - lse_t[1][:, None])


def _log_m(log_p: Tensor, log_q: Tensor, b: float) -> Tensor:
    return torch.logaddexp(log_p + math.log(b), log_q + math.log1p(-b))


#: Rows per block of the slice's elementwise passes; None: ``head.default_chunk_rows`` (tests set it small).
BLOCK_ROWS: int | None = None


def _row_blocks(x: Tensor):
    """Blocks of rows of a slice for its elementwise passes (``head.default_chunk_rows``: the block's
    float32 temporaries within 48 MiB each), so that no ``(N, V_local)`` temporary is held."""
    from ..head import default_chunk_rows

    n = x.shape[0]
    rows = BLOCK_ROWS or default_chunk_rows(n, x.shape[1], 4)
    return [(i, min(n, i + rows)) for i in range(0, n, rows)]


def divergence_rows(s: Tensor, t: Tensor, temperature: float, divergence: int, jsd_beta: float, group):
    """``(D (N,), lse_s, lse_t, sums)`` of the slices ``s``, ``t`` (same dtype): D with the ``T^2``,
    in the math type; ``lse_s``, ``lse_t`` each row's global ``(M, L)`` at temperature T (``(2, N)``):
    ``M`` the row's max over every rank's classes (all-reduce MAX of the slices' maxima) and
    ``L = log sum_k exp(x_k / T - M)`` (all-reduce SUM of the slices' sums, every term <= 1), so that
    ``log q = (s / T - M) - L`` as ``torch.log_softmax`` forms it on one process (never ``s / T - lse``
    with ``lse`` rounded at the logits' magnitude); ``sums`` the divergence's global sums (``(k, N)``)
    the gradient reads, and one more row, the pivot sum about the student's arg-max ``w``: reverse_kl,
    jsd ``sum_{k != w} q_k (c_k - c_w)`` (``c = log q - log p``; jsd ``log q - log m``), kl
    ``sum_{k != w} (q_k - p_k)`` (see :func:`_pivot`). Three collectives of ``O(N)``; the slice is read in blocks
    of rows."""
    cd = torch.float64 if s.dtype == torch.float64 else torch.float32
    inv = 1.0 / temperature
    n = s.shape[0]
    blocks = _row_blocks(s)
    m = torch.full((2, n), -math.inf, dtype=cd, device=s.device)
    if s.shape[1]:
        for a, b in blocks:
            m[0, a:b] = s[a:b].amax(1).to(cd) * inv
            m[1, a:b] = t[a:b].amax(1).to(cd) * inv
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    m = torch.where(torch.isfinite(m), m, torch.zeros((), dtype=cd, device=s.device))  # all -inf: exp gives 0
    # reverse_kl, jsd: a third row, the teacher's (t / T - M_t) at the student's arg-max, from the rank
    # that holds it (0 from the others), for the pivot form of the dominant class (_pivot).
    pivot = divergence != DIVERGENCES["kl"]
    e = torch.zeros((3 if pivot else 2, n), dtype=cd, device=s.device)
    for a, b in blocks:
        e[0, a:b] = torch.exp(s[a:b].to(cd) * inv - m[0, a:b, None]).sum(1)
        e[1, a:b] = torch.exp(t[a:b].to(cd) * inv - m[1, a:b, None]).sum(1)
        if pivot and s.shape[1]:
            idx, owner = _argmax_here(s[a:b], m[0, a:b], inv)
            y = t[a:b].gather(1, idx).squeeze(1).to(cd) * inv - m[1, a:b]
            e[2, a:b] = torch.where(owner, y, torch.zeros((), dtype=cd, device=s.device))
    dist.all_reduce(e, op=dist.ReduceOp.SUM, group=group)
    log_sum = e[:2].log()
    lse_s, lse_t = torch.stack([m[0], log_sum[0]]), torch.stack([m[1], log_sum[1]])
    k = 2 if divergence == DIVERGENCES["jsd"] else 1
    sums = torch.zeros((k + 1, n), dtype=cd, device=s.device)
    if pivot:
        # The other ratio at the student's arg-max w, as the rank holding it forms it (_logs's order):
        # log q_w = (s_w / T - M_s) - L_s = -L_s, log p_w = (t_w / T - M_t) - L_t.
        log_q_w = -log_sum[0]
        log_p_w = e[2] - log_sum[1]
        c_w = log_q_w - (log_p_w if divergence == DIVERGENCES["reverse_kl"] else _log_m(log_p_w, log_q_w, jsd_beta))
    for a, b in blocks:
        log_q, log_p = _logs(s[a:b], t[a:b], lse_s[:, a:b], lse_t[:, a:b], temperature, cd)
        if divergence == DIVERGENCES["kl"]:
            sums[0, a:b] = _xlog(log_p.exp(), log_p, log_q)
        elif divergence == DIVERGENCES["reverse_kl"]:
            sums[0, a:b] = _xlog(log_q.exp(), log_q, log_p)
        else:
            log_m = _log_m(log_p, log_q, jsd_beta)
            sums[0, a:b] = _xlog(log_p.exp(), log_p, log_m)
            sums[1, a:b] = _xlog(log_q.exp(), log_q, log_m)
        if s.shape[1]:
            q = log_q.exp()
            if pivot:
                c = log_q - (log_p if divergence == DIVERGENCES["reverse_kl"] else log_m)
                terms = torch.where(q > 0, q * (c - c_w[a:b, None]), 0)
                del c
            else:
                terms = q - log_p.exp()
            idx, owner = _argmax_here(s[a:b], m[0, a:b], inv)
            terms = terms.scatter(1, idx, torch.where(owner[:, None], 0, terms.gather(1, idx)))  # k = w: none
            sums[k, a:b] = terms.sum(1)
            del q, terms
        del log_q, log_p
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    if divergence == DIVERGENCES["jsd"]:
        d = jsd_beta * sums[0] + (1 - jsd_beta) * sums[1]
    else:
        d = sums[0]
    return temperature * temperature * d, lse_s, lse_t, sums


def _divergence_grad_block(s: Tensor, t: Tensor, lse_s: Tensor, lse_t: Tensor, sums: Tensor, go: Tensor,
                           temperature: float, divergence: int, jsd_beta: float) -> Tensor:
    """``go_i dD_i / ds`` of a block of rows (math type), from the saved global numbers."""
    cd = lse_s.dtype
    log_q, log_p = _logs(s, t, lse_s, lse_t, temperature, cd)
    q = log_q.exp()
    if divergence == DIVERGENCES["kl"]:
        g = _pivot(q - log_p.exp(), s, q, lse_s, sums[-1], temperature, kl=True)
    else:
        if divergence == DIVERGENCES["reverse_kl"]:
            other, total, scale = log_p, sums[0], 1.0
        else:
            other, total, scale = _log_m(log_p, log_q, jsd_beta), sums[1], 1 - jsd_beta
        g = torch.where(q > 0, q * (log_q - other), 0) - q * total[:, None]
        g = _pivot(g, s, q, lse_s, sums[-1], temperature)
        if scale != 1.0:
            g = g * scale
    g = g * (temperature * go)[:, None]
    return torch.where((go != 0)[:, None], g, 0)


def _argmax_here(s: Tensor, m_s: Tensor, inv: float) -> tuple[Tensor, Tensor]:
    """Each row's arg-max on this slice (``(rows, 1)``) and whether it is the row's global one
    (``s_w / T == M_s``, the global max; a tie across ranks makes two owners, but then no class holds
    more than half of the mass and :func:`_pivot` leaves the row alone)."""
    idx = s.argmax(1, keepdim=True)
    return idx, s.gather(1, idx).squeeze(1).to(m_s.dtype) * inv == m_s


def _pivot(g: Tensor, s: Tensor, q: Tensor, lse_s: Tensor, pivot_sum: Tensor, temperature: float,
           kl: bool = False) -> Tensor:
    """At a dominant class ``w`` (``Q_w > 1/2``, on the rank that holds it), the entry of the textbook
    form subtracts two numbers within ``e^-lead`` of each other and loses that whole gradient to
    rounding. reverse_kl, jsd: ``q_w (c_w - sum_k q_k c_k)`` (the rounding of ``c_w``, about the lead);
    about the pivot, ``c_w - sum_k q_k c_k = -sum_{k != w} q_k (c_k - c_w)`` (``pivot_sum``, all-reduced
    in the forward) is the same number from differences that do not cancel (the single-process C++
    kernel's form; the reference op's minus the sum of the others). kl (``kl=True``): ``q_w - p_w``,
    both near 1 when the teacher is confident on ``w`` too, is ``-sum_{k != w} (q_k - p_k)``
    (``pivot_sum``: the reference op's and the C++ kernels' minus the sum of the others). Other entries
    keep the textbook form."""
    if s.shape[1] < 1:
        return g
    idx, owner = _argmax_here(s, lse_s[0], 1.0 / temperature)
    dominant = owner & (lse_s[1] < math.log(2.0)) & torch.isfinite(pivot_sum)
    fixed = -pivot_sum if kl else -q.gather(1, idx).squeeze(1) * pivot_sum
    at_w = torch.where(dominant, fixed.to(g.dtype), g.gather(1, idx).squeeze(1))
    return g.scatter(1, idx, at_w[:, None])


def divergence_grad(s: Tensor, t: Tensor, lse_s: Tensor, lse_t: Tensor, sums: Tensor, go: Tensor,
                    temperature: float, divergence: int, jsd_beta: float, into: Tensor | None = None) -> Tensor:
    """``go_i dD_i / ds`` on the slice, local (no collective), in ``s``'s dtype, block by block: added to
    ``into`` (the hard loss's gradient of the slice, updated in place, each entry rounded once) or
    written into a new buffer."""
    out = torch.empty(s.shape, dtype=s.dtype, device=s.device) if into is None else into
    for a, b in _row_blocks(s):
        g = _divergence_grad_block(s[a:b], t[a:b], lse_s[:, a:b], lse_t[:, a:b], sums[:, a:b], go[a:b],
                                   temperature, divergence, jsd_beta)
        if into is not None:
            g = g + into[a:b].to(g.dtype)
        out[a:b] = g
    return out


class _VocabParallelDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, target, weight, plan: Plan, be, hcfg, dcfg, red: int, group):
        cd = torch.float64 if s.dtype == torch.float64 else torch.float32
        n = s.shape[0]
        div = DIVERGENCES[dcfg.divergence]
        d, lse_s, lse_t, sums = divergence_rows(s, t, dcfg.temperature, div, dcfg.jsd_beta, group)
        need = ctx.needs_input_grad[0]
        state = None
        if target is None:
            keep = torch.ones(n, dtype=torch.bool, device=s.device)
            rows = d
        else:
            tl = target.long()
            _check_targets(tl, s.device, plan, hcfg)
            keep = tl != dcfg.ignore_index
            h, _lse, state = _rows(s, tl, weight, plan, be, hcfg, group, need)
            w = dcfg.kd_weight
            rows = torch.where(keep, (1 - w) * h.to(cd) + w * d, torch.zeros((), dtype=cd, device=s.device))
        count = keep.sum().to(cd)
        if red == Reduction.NONE:
            out = rows
        elif red == Reduction.SUM:
            out = rows.sum()
        else:
            out = rows.sum() / count  # 0 / 0 = NaN when no row counts, as fl.distill_loss
        ctx.save_for_backward(s, t, keep, lse_s, lse_t, sums, count, *(state or ()))
        ctx.state_type = None if state is None else type(state)
        ctx.args = (weight, plan, be, hcfg, dcfg, red)
        return out

    @staticmethod
    @ops.first_order("fusedloss.parallel.distill_loss")
    def backward(ctx, grad_out):
        s, t, keep, lse_s, lse_t, sums, count, *fields = ctx.saved_tensors
        weight, plan, be, hcfg, dcfg, red = ctx.args
        cd = lse_s.dtype
        n = s.shape[0]
        go = grad_out.to(cd)
        go = go.expand(n) if go.dim() == 0 else go.reshape(n)
        if red == Reduction.MEAN:
            go = go / torch.where(count > 0, count, torch.ones_like(count))
        zero = torch.zeros((), dtype=cd, device=s.device)
        go = torch.where(keep, go, zero)
        kd = 1.0 if ctx.state_type is None else dcfg.kd_weight
        hard = None
        if ctx.state_type is not None and dcfg.kd_weight < 1:
            state = ctx.state_type(*fields)
            hard = _grad(s, state, (1 - dcfg.kd_weight) * go, weight, plan, be, hcfg)
            if hard.dtype != s.dtype or not hard.is_contiguous():
                hard = hard.to(s.dtype).contiguous()
        g = divergence_grad(s, t, lse_s, lse_t, sums, kd * go, dcfg.temperature, DIVERGENCES[dcfg.divergence],
                            dcfg.jsd_beta, into=hard)
        return g, None, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# The split heads: linear_distill_loss
# ----------------------------------------------------------------------------------------------

def _unwrap_heads(hs, ws, bs, ht, wt, bt, target, group, class_start):
    """DTensor weights sharded on their rows (``Shard(0)``, both heads on one mesh), replicated hiddens."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return hs, ws, bs, ht, wt, bt, target, group, class_start
    hs, ht = _replicated_local(hs, "student_hidden"), _replicated_local(ht, "teacher_hidden")
    if target is not None:
        target = _replicated_local(target, "target")
    if not isinstance(ws, DTensor) and not isinstance(wt, DTensor):
        return hs, ws, bs, ht, wt, bt, target, group, class_start
    if not (isinstance(ws, DTensor) and isinstance(wt, DTensor)):
        raise ValueError("student_weight and teacher_weight must both be DTensors or both plain tensors")
    if group is not None or class_start is not None:
        raise ValueError("pass group and class_start only with plain weights; a DTensor carries its own")
    if ws.device_mesh != wt.device_mesh or ws.shape[0] != wt.shape[0]:
        raise ValueError("teacher_weight must be sharded like student_weight (the same mesh and number of classes)")
    what = "the head weight sharded on its rows (the classes), Shard(0),"
    ws, group = _sharded_local(ws, 0, what)
    wt, _ = _sharded_local(wt, 0, what)
    if isinstance(bs, DTensor):
        bs, _ = _sharded_local(bs, 0, "the bias sharded like the weight, Shard(0),")
    if isinstance(bt, DTensor):
        bt, _ = _sharded_local(bt, 0, "the bias sharded like the weight, Shard(0),")
    return hs, ws, bs, ht, wt, bt, target, group, None


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
    group: dist.ProcessGroup | None = None,
    class_start: int | None = None,
    num_classes: int | None = None,
    chunk_rows: int | None = None,
    reduce_hidden_grad: bool = True,
    validate: bool = True,
    **loss_options,
) -> Tensor:
    """:func:`fusedloss.linear_distill_loss` with both heads' weights split by rows across ``group``.

    Every rank holds the rows ``[class_start, class_start + V_local)`` of the student's ``(V, D_s)``
    and the teacher's ``(V, D_t)`` weight (and biases), the same hidden states and target, and gets
    the loss of the single-process :func:`fusedloss.linear_distill_loss` on the full weights; the
    student's ``local weight`` and ``bias`` get this rank's rows of their gradient, ``student_hidden``
    the full one (``sum_r g_r W_r``, one all-reduce of ``N x D_s`` in the backward;
    ``reduce_hidden_grad=False``: this rank's part). Neither model's ``(N, V_local)`` logits are held:
    blocks of rows as the single-process form, each block with its collectives (``O(rows)`` floats).

    ``chunk_rows`` must agree on every rank (default: :func:`default_linear_blocks`, the single-process
    rule, gradients counted, for ``ceil(V / world_size)`` classes). DTensor weights sharded on their rows (``Shard(0)``) are
    accepted, with ``Shard(0)`` biases. Other keywords as :func:`distill_loss`. Every rank must call
    it, and its backward, alike.
    """
    from ..distill.linear import check_linear_distill_inputs  # noqa: F811

    (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, target, group,
     class_start) = _unwrap_heads(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                  teacher_bias, target, group, class_start)
    error: Exception | None = None
    dcfg = hcfg = be = None
    weight = None
    try:
        dcfg, weight = _make_config(loss, temperature, divergence, jsd_beta, kd_weight, ignore_index, backend,
                                    dict(loss_options))
        hcfg = _hard_config(dcfg, reduction)
        if target is None:
            check_without_target(dcfg, weight)
        check_linear_distill_inputs(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                    teacher_bias, target)
        if weight is not None:
            if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.dim() != 1:
                raise TypeError("weight must be a floating 1-D tensor: the global (V,) class weights")
        if chunk_rows is not None:
            from ..head import check_chunk_rows
            check_chunk_rows(chunk_rows)
        be = dispatch.resolve(dcfg.backend, student_hidden.device)
    except (TypeError, ValueError, NotImplementedError, dispatch.BackendUnavailableError) as e:
        if not validate:
            raise
        error = e
    ok = error is None
    grad_on = torch.is_grad_enabled()
    need = (grad_on and student_hidden.requires_grad, grad_on and student_weight.requires_grad,
            grad_on and student_bias is not None and student_bias.requires_grad) if ok else (False, False, False)
    reduce_dh = bool(reduce_hidden_grad) and need[0]
    dtype = torch.promote_types(student_hidden.dtype, teacher_hidden.dtype) if ok else None
    n = student_hidden.numel() // max(student_hidden.shape[-1], 1) if ok else -1
    shape = (n, student_weight.shape[0], dtype) if ok else None
    tgt = target.reshape(-1) if ok and target is not None else (
        torch.zeros(max(n, 0), dtype=torch.long, device=_device_of(student_hidden)) if ok else None)
    extra = {
        "target (given or None)": int(target is not None) if ok else -1,
        "reduction": int(reduction_id(reduction)) if ok else -1,
        "divergence": DIVERGENCES[dcfg.divergence] if ok else -1,
        "temperature": _bits(dcfg.temperature) if ok else -1,
        "jsd_beta": _bits(dcfg.jsd_beta) if ok else -1,
        "kd_weight": _bits(dcfg.kd_weight) if ok else -1,
        "student hidden size D": student_hidden.shape[-1] if ok else -1,
        "teacher hidden size D": teacher_hidden.shape[-1] if ok else -1,
        "chunk_rows (None: 0)": (chunk_rows or 0) if ok else -1,
        "student_hidden.requires_grad and reduce_hidden_grad (the backward's all-reduce)": int(reduce_dh),
        # the default blocks count the gradients held (default_linear_blocks): the same on every rank
        "student hidden, weight, bias requiring grad (chunk_rows=None)": (
            (4 * need[0] + 2 * need[1] + need[2]) if chunk_rows is None else 0) if ok else -1,
    }
    plan = _plan(validate, _device_of(student_hidden), shape, tgt, weight, class_start, num_classes, hcfg, error,
                 group, extra)
    if chunk_rows is None:
        chunk_rows = default_linear_blocks(n, plan, dtype, student_hidden, student_weight, student_bias)
    red = reduction_id(reduction)
    out = _VocabParallelLinearDistill.apply(
        student_hidden.reshape(n, -1), student_weight, student_bias, teacher_hidden.detach().reshape(n, -1),
        teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach(),
        None if target is None else target.reshape(-1).long(), weight, plan, be, hcfg, dcfg, int(red), group,
        int(chunk_rows), reduce_dh)
    if red == Reduction.NONE:
        out = out.reshape(student_hidden.shape[:-1])
    return out.to(ops.loss_dtype(student_hidden, dtype))


def default_linear_blocks(n: int, plan: Plan, dtype: torch.dtype, hidden: Tensor, weight: Tensor,
                          bias: Tensor | None) -> int:
    """:func:`linear_distill_loss`'s rows per block when ``chunk_rows`` is None: the single-process
    form's rule (:func:`fusedloss.distill.linear.default_chunk_rows`: the blocks leave room for the
    gradients the op holds, ``d hidden`` and this rank's ``d weight`` / ``d bias``), for the largest
    slice (``V / world`` rounded up) rather than this rank's own. Every rank must cut the rows into the
    same blocks (each block's statistics are reduced across the ranks), and the plan has checked that
    the tensors requiring grad are the same on every rank, so every rank gets the same number. The
    divergence's passes over a block are PyTorch's here (float32 temporaries), not a fused kernel."""
    from ..distill.linear import default_chunk_rows, held_grad_bytes
    v_block = -(-plan.num_classes // plan.world_size)
    return default_chunk_rows(n, v_block, dtype.itemsize, fused=False,
                              grad_bytes=held_grad_bytes(hidden, weight, bias, weight_rows=v_block))


def _split_blocks(hs, ws, bs, ht, wt, bt, target, weight, plan, be, hcfg, dcfg, group, chunk_rows: int,
                  go: Tensor | None, need, rows_out: Tensor | None):
    """One pass of blocks over the local logits of both heads: per block the divergence's and the hard
    loss's collectives and rows; with ``go`` (d loss / d row, ``(N,)``) the block's local gradient
    folded into ``(d hidden (this rank's part), d weight_r, d bias_r)``."""
    from ..head import _fold, _logits_into, _WeightGrad

    n, d = hs.shape
    vl = ws.shape[0]
    dtype = torch.promote_types(hs.dtype, ht.dtype)
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    div = DIVERGENCES[dcfg.divergence]
    w = dcfg.kd_weight if target is not None else 1.0
    grads = go is not None
    dh = hs.new_empty((n, d)) if grads and need[0] else None
    dw = _WeightGrad(ws) if grads and need[1] else None
    db = torch.zeros((vl,), dtype=cd, device=hs.device) if grads and need[2] else None
    rows = max(1, min(chunk_rows, n))
    buf_s = hs.new_empty((rows, vl)) if n else None
    buf_t = ht.new_empty((rows, vl)) if n else None
    zero = torch.zeros((), dtype=cd, device=hs.device)
    for s in range(0, n, rows):
        e = min(n, s + rows)
        xs = _logits_into(buf_s[: e - s], hs[s:e], ws, bs).to(dtype)
        xt = _logits_into(buf_t[: e - s], ht[s:e], wt, bt).to(dtype)
        dd, lse_s, lse_t, sums = divergence_rows(xs, xt, dcfg.temperature, div, dcfg.jsd_beta, group)
        state = None
        if target is not None:
            tb = target[s:e]
            keep = tb != dcfg.ignore_index
            h, _lse, state = _rows(xs, tb, weight, plan, be, hcfg, group, grads)
            r = torch.where(keep, (1 - w) * h.to(cd) + w * dd, zero)
        else:
            keep = None
            r = dd
        if rows_out is not None:
            rows_out[s:e] = r
        if grads:
            gb = go[s:e] if keep is None else torch.where(keep, go[s:e], zero)
            hard_g = None
            if state is not None and w < 1:
                hard_g = _grad(xs, state, (1 - w) * gb, weight, plan, be, hcfg).to(xs.dtype).contiguous()
            g = divergence_grad(xs, xt, lse_s, lse_t, sums, w * gb, dcfg.temperature, div, dcfg.jsd_beta,
                                into=hard_g)
            _fold(g.to(hs.dtype), hs[s:e], ws, dh[s:e] if dh is not None else None, dw, db)
            del g
    if db is not None and bs is not None:
        db = db.to(bs.dtype)
    return dh, dw.result() if dw is not None else None, db


class _VocabParallelLinearDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, target, weight, plan: Plan, be, hcfg, dcfg, red: int, group,
                chunk_rows: int, reduce_dh: bool):
        from ..head import _scale  # noqa: F401  (used by backward)

        n = hs.shape[0]
        dtype = torch.promote_types(hs.dtype, ht.dtype)
        cd = torch.float64 if dtype == torch.float64 else torch.float32
        if target is not None:
            _check_targets(target, hs.device, plan, hcfg)
            count = (target != dcfg.ignore_index).sum().to(cd)
        else:
            count = torch.tensor(float(n), dtype=cd, device=hs.device)
        need = tuple(ctx.needs_input_grad[:3])
        fused = red != Reduction.NONE and any(need)
        go = _go(torch.ones((), dtype=cd, device=hs.device), n, red, count) if fused else None
        rows = torch.empty((n,), dtype=cd, device=hs.device)
        grads = _split_blocks(hs, ws, bs, ht, wt, bt, target, weight, plan, be, hcfg, dcfg, group, chunk_rows, go,
                              need, rows)
        out = rows if red == Reduction.NONE else (rows.sum() / count if red == Reduction.MEAN else rows.sum())
        ctx.set_materialize_grads(False)
        ctx.args = (plan, be, hcfg, dcfg, red, group, chunk_rows, need, reduce_dh)
        ctx.grads = grads if fused else None
        ctx.save_for_backward(hs, ws, bs, ht, wt, bt, target, weight, count)
        return out

    @staticmethod
    @ops.first_order("fusedloss.parallel.linear_distill_loss")
    def backward(ctx, grad_out):
        from ..head import _scale

        nones = (None,) * 13
        if grad_out is None:
            return (None, None, None) + nones
        plan, be, hcfg, dcfg, red, group, chunk_rows, need, reduce_dh = ctx.args
        grads, ctx.grads = ctx.grads, None
        if grads is not None:
            dh, dw, db = (_scale(g, grad_out) if g is not None else None for g in grads)
        else:  # 'none', or a second backward: the blocks again, collectives included
            hs, ws, bs, ht, wt, bt, target, weight, count = ctx.saved_tensors
            go = _go(grad_out, hs.shape[0], red, count)
            dh, dw, db = _split_blocks(hs, ws, bs, ht, wt, bt, target, weight, plan, be, hcfg, dcfg, group,
                                       chunk_rows, go, need, None)
        if dh is not None and reduce_dh:
            dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=group)
        return (dh if need[0] else None, dw if need[1] else None, db if need[2] else None) + nones


def _go(grad_out: Tensor, n: int, red: int, count: Tensor) -> Tensor:
    go = grad_out.to(count.dtype)
    go = go.expand(n) if go.dim() == 0 else go.reshape(n)
    if red == Reduction.MEAN:
        go = go / torch.where(count > 0, count, torch.ones_like(count))
    return go.contiguous()
