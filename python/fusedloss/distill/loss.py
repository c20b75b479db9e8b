"""Knowledge distillation from teacher logits: ``fl.distill_loss`` and ``fl.DistillLoss``
(docs/distillation.md).

Layers, outermost first:

* :func:`distill_loss`: argument checks, ``(B, T, V) -> (N, V)``, dtype promotion, the teacher
  detached, then either the autograd Function below (the ops: eager and ``torch.compile``) or
  the composite path (differentiable PyTorch ops: ``torch.func`` transforms, forward AD, a class
  ``weight`` that requires grad; docs/autograd.md);
* :class:`_DistillFunction`: the forward computes the rows and, when the student requires grad,
  the fused gradient already scaled by the reduction (:func:`distill_rows`); the backward
  multiplies it by ``grad_output``, or differentiates the composite formula when a graph is built
  through it (``create_graph=True``) or a vmap wraps it;
* :func:`distill_rows`: the rows and the ONE ``(N, V)`` gradient buffer from the backend's ops:
  the hard loss's backward op writes ``(1 - kd_weight) dH`` into it, the distillation op
  (``DistillOps``, the reference's where the backend has none) adds ``kd_weight dD``.

The internal interface (:class:`DistillConfig`, :func:`make_config`, :func:`distill_rows`,
:func:`counted_rows`) is shared with ``fl.linear_distill_loss`` and the parallel forms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import dispatch, functional, ops, reference, validation
from ..variants import Reduction, reduction_id, variant_id
from . import ops as distill_ops
from .ops import DIVERGENCES, DistillOps

#: The hard loss's keywords of ``fl.softmax_loss`` that ``distill_loss`` passes on, with their defaults.
HARD_LOSS_OPTIONS = {"weight": None, "label_smoothing": 0.0, "alpha": 1.5, "beta": 1.0, "gamma": 2.0,
                     "z_loss": 0.0, "softcap": None}

#: Options that only one loss reads: passing a non-default value with another loss raises.
_OPTION_LOSSES = {"alpha": ("crl",), "beta": ("crl",), "gamma": ("focal",)}


@dataclass(frozen=True)
class DistillConfig:
    """Everything but the tensors, validated once (:func:`make_config`)."""
    loss: str                  # the hard loss, a name of fl.LOSSES
    temperature: float
    divergence: str            # "kl" | "reverse_kl" | "jsd"
    jsd_beta: float
    kd_weight: float
    ignore_index: int
    backend: str               # "auto" | a backend name
    loss_options: tuple        # sorted (key, value) pairs of softmax_loss's keywords (weight excluded: a tensor)

    @property
    def variant(self) -> int:
        return int(variant_id(self.loss))

    @property
    def divergence_id(self) -> int:
        return DIVERGENCES[self.divergence]

    @property
    def options(self) -> dict:
        """``loss_options`` with every hard-loss keyword but ``weight`` filled in (defaults)."""
        opts = {k: v for k, v in HARD_LOSS_OPTIONS.items() if k != "weight"}
        opts.update(self.loss_options)
        return opts

    def hard_scalars(self, reduction: int = int(Reduction.NONE)) -> tuple:
        """The one-target ops' scalars ``(variant, reduction, ignore_index, label_smoothing, alpha,
        beta, gamma, z_loss, softcap)`` (softcap 0.0: none)."""
        o = self.options
        cap = 0.0 if o["softcap"] is None else float(o["softcap"])
        return (self.variant, int(reduction), self.ignore_index, float(o["label_smoothing"]), float(o["alpha"]),
                float(o["beta"]), float(o["gamma"]), float(o["z_loss"]), cap)

    def hard_loss_used(self, weight: Tensor | None) -> list[str]:
        """The arguments that only the hard loss reads and that differ from their defaults (what a
        call without ``target`` would silently ignore)."""
        used = [f"loss={self.loss!r}"] if self.loss != "ce" else []
        used += [f"{k}={v!r}" for k, v in self.loss_options if v != HARD_LOSS_OPTIONS[k]]
        return used + (["weight"] if weight is not None else [])


def _check_float(name: str, value, lo: float, hi: float, lo_open: bool, hi_open: bool) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a float; got {value!r}")
    value = float(value)
    ok = validation.finite(value) and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be in {interval}; got {value!r}")
    return value


def make_config(loss: str = "ce", *, temperature: float = 1.0, divergence: str = "kl", jsd_beta: float = 0.5,
                kd_weight: float = 0.5, ignore_index: int = -100, backend: str = "auto",
                **loss_options) -> tuple[DistillConfig, Tensor | None]:
    """Validate the options (``ValueError`` naming the argument; ``TypeError`` for a keyword
    ``fl.softmax_loss``'s hard loss does not take) and return ``(config, weight)``.

    A non-default ``jsd_beta`` with a divergence other than ``"jsd"``, or ``alpha``/``beta``
    (``gamma``) with a loss other than ``"crl"`` (``"focal"``) raise ``ValueError``: they would be
    ignored."""
    variant_id(loss)  # ValueError naming loss
    temperature = _check_float("temperature", temperature, 0.0, math.inf, True, True)
    if not isinstance(divergence, str) or divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(map(repr, DIVERGENCES))}; got {divergence!r}")
    jsd_beta = _check_float("jsd_beta", jsd_beta, 0.0, 1.0, True, True)
    if divergence != "jsd" and jsd_beta != 0.5:
        raise ValueError(f"jsd_beta={jsd_beta} is used by divergence='jsd' only; got divergence={divergence!r}")
    kd_weight = _check_float("kd_weight", kd_weight, 0.0, 1.0, False, False)
    ignore_index = validation.check_ignore_index(ignore_index)
    if not isinstance(backend, str) or backend not in ("auto",) + dispatch.BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(('auto',) + dispatch.BACKENDS)}; got {backend!r}")
    unknown = sorted(set(loss_options) - set(HARD_LOSS_OPTIONS))
    if unknown:
        raise TypeError(f"distill_loss() got unexpected keyword argument(s) {', '.join(unknown)}; the hard loss "
                        f"takes {', '.join(HARD_LOSS_OPTIONS)}")
    weight = loss_options.pop("weight", None)
    opts = {k: v for k, v in HARD_LOSS_OPTIONS.items() if k != "weight"}
    opts.update(loss_options)
    validation.check_hyperparameters(opts["alpha"], opts["beta"], opts["gamma"], opts["label_smoothing"])
    validation.check_z_loss_softcap(opts["z_loss"], opts["softcap"])
    for key, losses in _OPTION_LOSSES.items():
        if key in loss_options and loss not in losses and float(loss_options[key]) != HARD_LOSS_OPTIONS[key]:
            raise ValueError(f"{key}={loss_options[key]!r} is used by loss={' or '.join(map(repr, losses))} only; "
                             f"got loss={loss!r}")
    if weight is not None and not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor or None; got {type(weight).__name__}")
    norm = tuple(sorted((k, None if v is None else float(v)) for k, v in loss_options.items()))
    return DistillConfig(loss, temperature, divergence, jsd_beta, kd_weight, ignore_index, backend, norm), weight


def counted_rows(target: Tensor | None, n: int, ignore_index: int) -> Tensor:
    """What ``'mean'`` divides by: the number of rows whose target is not ``ignore_index`` (all
    ``n`` rows when ``target`` is None), an int64 tensor (0-d; on the target's device), computed
    without a host synchronization. Not the sum of class weights: the divergence has no class."""
    if target is None:
        return torch.tensor(n, dtype=torch.int64)
    return (target != ignore_index).sum()


def _row_grad_scale(target: Tensor | None, n: int, cfg: DistillConfig, red: int, md: torch.dtype,
                    device) -> Tensor:
    """d(reduced loss)/d(row_i): 1/counted (mean) or 1 (sum, none) on rows that count, 0 on ignored rows
    (also when every row is ignored and 'mean' is 0/0 = NaN: PyTorch's zero gradient)."""
    if target is None:
        return torch.full((n,), 1.0 / n if (red == Reduction.MEAN and n) else 1.0, dtype=md, device=device)
    one = torch.ones((), dtype=md, device=device)
    keep = target != cfg.ignore_index
    if red == Reduction.MEAN:
        scale = one / counted_rows(target, n, cfg.ignore_index).to(md)
    else:
        scale = one
    return torch.where(keep, scale, torch.zeros((), dtype=md, device=device))


def _call(fn, *args):
    """An op without its autograd wrapper in eager mode (it is called under no_grad anyway); the op
    itself while compiling."""
    if torch.compiler.is_compiling():
        return fn(*args)
    return ops.call_below_autograd(fn, *args)


def distill_rows(student: Tensor, teacher: Tensor, target: Tensor | None, cfg: DistillConfig,
                 weight: Tensor | None, grad_scale: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The rows and, when ``grad_scale`` is given, the gradient, from the backend's ops.

    ``student``, ``teacher``: ``(N, V)`` of one dtype, unit class stride; ``target`` ``(N,)`` int or
    None. Returns ``rows`` ``(N,)`` in the math type (float32; float64 for float64): ``D_i`` without
    target, else ``(1 - kd_weight) H_i + kd_weight D_i`` on the rows that count and 0 on rows whose
    target is ``ignore_index``; and ``grad`` ``(N, V)`` in the student's dtype,
    ``grad_scale_i * d rows_i / d student_i``: ONE buffer, the hard loss's backward op writes
    ``grad_scale_i (1 - kd_weight) dH_i`` into it, the distillation op adds ``grad_scale_i kd_weight dD_i``
    (``accumulate=True``). No autograd inside, no host synchronization.

    The hard loss's gradient comes from the backend's backward op with ``grad_loss`` =
    ``(1 - kd_weight) grad_scale`` per row (reduction ``none``), not from the forward's fused gradient:
    the fused gradient is for ``grad_output = 1`` and would need a second pass to scale rows (and a
    second rounding for half logits), while the backward reads the forward's row statistics and writes
    the scaled rows once."""
    be = dispatch.resolve(cfg.backend, student.device)
    md = ops.stats_dtype(student)
    n = student.shape[0]
    kd = cfg.kd_weight
    grad = None
    if target is None and cfg.hard_loss_used(weight):
        raise ValueError(f"target=None: the row loss is the divergence alone, so "
                         f"{', '.join(cfg.hard_loss_used(weight))} (options of the hard loss) would be ignored; "
                         "pass a target or leave them out")
    hard = target is not None and kd < 1.0
    use_d = target is None or kd > 0.0
    if target is not None:
        dispatch.check_smoothing(be, cfg.variant, cfg.options["label_smoothing"])
        one = be.one_target
        scalars = cfg.hard_scalars(int(Reduction.NONE))
        if hard:
            h, stats, _ = _call(one.fwd, student, target, weight, *scalars, False)
            if grad_scale is not None:
                grad = _call(one.bwd, ((1.0 - kd) * grad_scale).to(md), student, target, weight, stats, *scalars)
                grad = grad.contiguous()
        else:  # kd_weight = 1: the hard loss counts for nothing; its target values are still checked
            if validation.must_check_targets(student.device) and not torch.compiler.is_compiling():
                validation.check_target_values(target, student.shape[1], cfg.ignore_index)
            h = None
    if use_d:
        fam = be.family(DistillOps)
        fwd = fam.fwd if fam is not None else distill_ops.reference_distill
        if grad_scale is not None:
            row_scale = (grad_scale if target is None else kd * grad_scale).to(md)
            accumulate = grad is not None
            if grad is None:
                grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
        else:
            row_scale = torch.zeros((n,), dtype=md, device=student.device)
            accumulate = False
        d = _call(fwd, student, teacher, row_scale, cfg.temperature, cfg.divergence_id, cfg.jsd_beta, grad,
                  accumulate)
    if target is None:
        return d, grad
    keep = target != cfg.ignore_index
    if h is None:
        rows = d
    elif not use_d:
        rows = h
    else:
        rows = (1.0 - kd) * h + kd * d
    return torch.where(keep, rows, torch.zeros((), dtype=rows.dtype, device=rows.device)), grad


# ----------------------------------------------------------------------------
# The composite path: the same rows in differentiable PyTorch ops (docs/autograd.md)
# ----------------------------------------------------------------------------

def _xlogratio(a: Tensor, log_a: Tensor, log_b: Tensor) -> Tensor:
    """sum_k a_k (log a_k - log b_k), 0 log 0 = 0, with a gradient that is 0 (not NaN) where a_k
    underflows to 0: the where is inside the product."""
    return (a * torch.where(a > 0, log_a - log_b, torch.zeros((), dtype=a.dtype, device=a.device))).sum(-1)


def composite_divergence(student: Tensor, teacher: Tensor, temperature: float, divergence: str,
                         jsd_beta: float) -> Tensor:
    """``D_i`` (T^2 included) in the math type, differentiable to any order in ``student`` (the
    log-space forms of ``distill.ops.distill_rows``); the teacher is a constant."""
    md = ops.stats_dtype(student)
    t_inv = 1.0 / temperature
    log_q = torch.log_softmax(student.to(md) * t_inv, -1)
    log_p = torch.log_softmax(teacher.detach().to(md) * t_inv, -1)
    p, q = log_p.exp(), log_q.exp()
    if divergence == "kl":
        d = _xlogratio(p, log_p, log_q)
    elif divergence == "reverse_kl":
        d = _xlogratio(q, log_q, log_p)
    else:
        log_m = torch.logaddexp(log_p + math.log(jsd_beta), log_q + math.log1p(-jsd_beta))
        d = jsd_beta * _xlogratio(p, log_p, log_m) + (1 - jsd_beta) * _xlogratio(q, log_q, log_m)
    return (temperature * temperature) * d


def composite_rows(student: Tensor, teacher: Tensor, target: Tensor | None, cfg: DistillConfig,
                   weight: Tensor | None) -> Tensor:
    """:func:`distill_rows`'s rows in differentiable PyTorch ops (the hard loss by
    ``reference.differentiable_forward``), for the composite path."""
    kd = cfg.kd_weight
    if target is None:
        return composite_divergence(student, teacher, cfg.temperature, cfg.divergence, cfg.jsd_beta)
    rows = None
    if kd < 1.0:
        h = reference.differentiable_forward(student, target, weight, *cfg.hard_scalars(int(Reduction.NONE)))[0]
        rows = (1.0 - kd) * h
    if kd > 0.0:
        d = kd * composite_divergence(student, teacher, cfg.temperature, cfg.divergence, cfg.jsd_beta)
        rows = d if rows is None else rows + d
    keep = target != cfg.ignore_index
    return torch.where(keep, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))


def _reduce(rows: Tensor, target: Tensor | None, cfg: DistillConfig, red: int) -> Tensor:
    if red == Reduction.NONE:
        return rows
    total = rows.sum()
    if red == Reduction.SUM:
        return total
    return total / counted_rows(target, rows.shape[0], cfg.ignore_index).to(rows.dtype)


def _composite_loss(student, teacher, target, cfg, weight, red) -> Tensor:
    return _reduce(composite_rows(student, teacher, target, cfg, weight), target, cfg, red)


# ----------------------------------------------------------------------------
# The autograd Function over the ops
# ----------------------------------------------------------------------------

class _DistillFunction(torch.autograd.Function):
    """(student, teacher, target, weight) -> the reduced loss (math type); the gradient to the
    student only. ``cfg`` and ``red`` ride along as constants."""

    @staticmethod
    def forward(ctx, student, teacher, target, weight, cfg, red):
        need = ctx.needs_input_grad[0]
        n = student.shape[0]
        md = ops.stats_dtype(student)
        grad_scale = _row_grad_scale(target, n, cfg, red, md, student.device) if need else None
        rows, grad = distill_rows(student, teacher, target, cfg, weight, grad_scale)
        ctx.cfg, ctx.red = cfg, red
        ctx.set_materialize_grads(False)
        # The student is saved beside the fused gradient: a double backward differentiates the
        # composite formula through it (a reference, not a copy; docs/autograd.md).
        ctx.save_for_backward(student, teacher, target, weight, grad)
        return _reduce(rows, target, cfg, red)

    @staticmethod
    def backward(ctx, grad_loss):
        if grad_loss is None or not ctx.needs_input_grad[0]:
            return (None,) * 6
        student, teacher, target, weight, grad = ctx.saved_tensors
        cfg, red = ctx.cfg, ctx.red
        if ops.composite_backward_needed(grad_loss):
            (gs,) = ops.composite_vjp(lambda s: _composite_loss(s, teacher, target, cfg, weight, red), grad_loss,
                                      (student,), (True,))
            return (gs.to(student.dtype),) + (None,) * 5
        return (ops.scale_fused_grad_reusing(grad, grad_loss),) + (None,) * 5


class _CompiledDistillFunction(_DistillFunction):
    """The Function ``torch.compile`` traces: Dynamo traces the backward itself, and the composite
    path's checks (functorch state) are not traceable; a compiled region runs first order (as the
    one-target ops under compile, docs/autograd.md), so its backward is the product alone."""

    @staticmethod
    def backward(ctx, grad_loss):
        if grad_loss is None or not ctx.needs_input_grad[0]:
            return (None,) * 6
        grad = ctx.saved_tensors[4]
        return (ops.scale_fused_grad(grad, grad_loss),) + (None,) * 5


# ----------------------------------------------------------------------------
# The public API
# ----------------------------------------------------------------------------

def _check_inputs(student, teacher, target) -> None:
    for name, t in (("student_logits", student), ("teacher_logits", teacher)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dtype not in validation.LOGIT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64; got {t.dtype}")
    if student.dim() not in (2, 3):
        raise ValueError(f"student_logits must have shape (N, V) or (B, T, V); got {tuple(student.shape)}")
    if teacher.shape != student.shape:
        raise ValueError(f"teacher_logits must have the student_logits' shape {tuple(student.shape)}; "
                         f"got {tuple(teacher.shape)}")
    if student.shape[-1] == 0:
        raise ValueError(f"student_logits must have at least one class; got shape {tuple(student.shape)}")
    if teacher.device != student.device:
        raise ValueError(f"teacher_logits is on {teacher.device} but student_logits is on {student.device}")
    validation.check_distill_target(target, student.shape[:-1], student.device, "student_logits")


def distill_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None, loss: str = "ce", *,
                 temperature: float = 1.0, divergence: str = "kl", jsd_beta: float = 0.5, kd_weight: float = 0.5,
                 reduction: str = "mean", ignore_index: int = -100, backend: str = "auto",
                 **loss_options) -> Tensor:
    r"""Knowledge distillation: the divergence of the student's softmax at temperature ``T`` from the
    teacher's, optionally combined with a hard loss on class targets, fused (docs/distillation.md).

    With ``P = softmax(teacher / T)``, ``Q = softmax(student / T)``, per row:

    ================ =============================================================================
    ``"kl"``         ``D = T^2 KL(P || Q)``
    ``"reverse_kl"`` ``D = T^2 KL(Q || P)``
    ``"jsd"``        ``D = T^2 (b KL(P || M) + (1 - b) KL(Q || M))``, ``M = b P + (1 - b) Q``, ``b = jsd_beta``
    ================ =============================================================================

    The row loss is ``D_i`` when ``target`` is None, else ``(1 - kd_weight) H_i + kd_weight D_i`` with
    ``H_i`` the hard loss ``fl.softmax_loss(student, target, loss, reduction="none", **loss_options)``
    at temperature 1 (with ``weight``, ``H_i`` is that function's weighted row ``w_c L_i``). Rows whose
    target is ``ignore_index`` count for nothing. ``"mean"`` divides by the number of rows that count
    (all rows without target): **not** by the sum of the class weights as ``softmax_loss``'s mean does
    with ``weight``, since the divergence has no class to weigh.

    The gradient flows to the student only: the teacher is a constant, even if it requires grad.

    Args:
        student_logits, teacher_logits: ``(N, V)`` or ``(B, T, V)`` of the same shape; float16,
            bfloat16, float32 or float64; different dtypes are promoted to ``torch.promote_types`` of the
            two (as ``F.kl_div``), math in float32 (float64 for float64).
        target: None, or class indices of shape ``(N,)`` / ``(B, T)`` (int64, int32, uint8).
        loss: the hard loss, one of ``fl.LOSSES``.
        temperature: ``T > 0``; ``D`` includes the ``T^2`` factor (Hinton et al.'s convention).
        divergence: ``"kl" | "reverse_kl" | "jsd"``.
        jsd_beta: ``b`` in ``(0, 1)``, for ``"jsd"`` only (another value with another divergence raises).
        kd_weight: in ``[0, 1]``, the divergence's share beside the hard loss; without target the row loss
            is ``D_i`` and ``kd_weight = 0`` raises (nothing would be left).
        reduction: ``"none" | "mean" | "sum"``; ``"none"`` gives the rows' shape ``(N,)`` / ``(B, T)``.
        ignore_index: target value whose rows count for nothing.
        backend: ``"auto" | "reference" | "cpu" | "triton" | "cuda"``.
        loss_options: the hard loss's keywords of ``fl.softmax_loss``: ``weight``, ``label_smoothing``,
            ``alpha``, ``beta`` (``"crl"``), ``gamma`` (``"focal"``), ``z_loss``, ``softcap`` (the soft cap
            applies to the hard loss's logits only; the divergence reads the raw logits). Without target,
            any of them that is not its default (and a ``loss`` other than ``"ce"``) raises ``ValueError``:
            it would be silently ignored. ``alpha``/``beta``/``gamma`` with a loss that does not read
            them raise too.

    Returns:
        The loss in the (promoted) logits' dtype: a scalar, or the rows' shape for ``"none"``.

    Raises ``ValueError`` naming the argument for shapes that differ, ``temperature <= 0``, an unknown
    divergence, ``kd_weight`` outside ``[0, 1]``, ``jsd_beta`` outside ``(0, 1)``. Target values are
    checked as ``softmax_loss`` checks them (``IndexError`` on CPU)."""
    cfg, weight = make_config(loss, temperature=temperature, divergence=divergence, jsd_beta=jsd_beta,
                              kd_weight=kd_weight, ignore_index=ignore_index, backend=backend, **loss_options)
    red = int(reduction_id(reduction))
    return _distill(student_logits, teacher_logits, target, cfg, weight, red)


def _distill(student: Tensor, teacher: Tensor, target: Tensor | None, cfg: DistillConfig, weight: Tensor | None,
             red: int) -> Tensor:
    _check_inputs(student, teacher, target)
    if target is None:
        if cfg.kd_weight == 0.0:
            raise ValueError("kd_weight=0 with target=None: the loss would be empty (without a target the row loss "
                             "is the divergence alone); pass a target or kd_weight > 0")
        used = cfg.hard_loss_used(weight)
        if used:
            raise ValueError(f"target=None: the row loss is the divergence alone, so {', '.join(used)} (options of "
                             "the hard loss) would be silently ignored; pass a target or leave them out")
    v = student.shape[-1]
    row_shape = student.shape[:-1]
    dtype = torch.promote_types(student.dtype, teacher.dtype)
    s = student.to(dtype).reshape(-1, v)
    t = teacher.detach().to(dtype).reshape(-1, v)
    y = None
    if target is not None:
        y = functional._index_dtype(target).reshape(-1)
        weight = validation.check_weight(weight, v, s)
    dispatch.resolve(cfg.backend, s.device)  # loads the backend here, not inside the Function (a traced import)
    if functional._composite_wanted(s, y, weight):
        if y is not None:
            functional._check_values(y, v, cfg.ignore_index, s.device)
        out = _composite_loss(s, t, y, cfg, weight, red)
    else:
        # the ops read rows of any stride but unit class stride (batched tensors have no strides:
        # this is the ops' path only)
        if v > 1 and s.stride(1) != 1:
            s = s.contiguous()
        if v > 1 and t.stride(1) != 1:
            t = t.contiguous()
        fn = _CompiledDistillFunction if torch.compiler.is_compiling() else _DistillFunction
        out = fn.apply(s, t, y, weight, cfg, red)
    if red == Reduction.NONE:
        out = out.reshape(row_shape)
    return out.to(ops.loss_dtype(s))


class DistillLoss(nn.Module):
    """Module form of :func:`fusedloss.distill_loss`:
    ``DistillLoss("ce", temperature=2.0, kd_weight=0.9)(student_logits, teacher_logits, target)``.

    The options are validated at construction; ``weight`` is kept as a buffer (it follows
    ``.to(device)`` and the state dict)."""

    def __init__(self, loss: str = "ce", *, temperature: float = 1.0, divergence: str = "kl", jsd_beta: float = 0.5,
                 kd_weight: float = 0.5, reduction: str = "mean", ignore_index: int = -100, backend: str = "auto",
                 **loss_options) -> None:
        super().__init__()
        cfg, weight = make_config(loss, temperature=temperature, divergence=divergence, jsd_beta=jsd_beta,
                                  kd_weight=kd_weight, ignore_index=ignore_index, backend=backend, **loss_options)
        self.reduction_id = int(reduction_id(reduction))
        self.reduction = reduction
        self.config = cfg
        self.register_buffer("weight", weight)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None) -> Tensor:
        return _distill(student_logits, teacher_logits, target, self.config, self.weight, self.reduction_id)

    def extra_repr(self) -> str:
        c = self.config
        parts = [f"loss={c.loss!r}", f"temperature={c.temperature}", f"divergence={c.divergence!r}"]
        if c.divergence == "jsd":
            parts.append(f"jsd_beta={c.jsd_beta}")
        parts += [f"kd_weight={c.kd_weight}", f"reduction={self.reduction!r}"]
        if c.ignore_index != -100:
            parts.append(f"ignore_index={c.ignore_index}")
        parts += [f"{k}={v!r}" for k, v in c.loss_options]
        if c.backend != "auto":
            parts.append(f"backend={c.backend!r}")
        return ", ".join(parts)


__all__ = ["DistillConfig", "make_config", "distill_rows", "counted_rows", "distill_loss", "DistillLoss",
           "composite_rows", "HARD_LOSS_OPTIONS"]
