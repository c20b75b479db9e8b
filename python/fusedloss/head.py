"""The LLM head: ``linear_softmax_loss(hidden, weight, target)``, any of the six losses of
``hidden @ weight.T + bias`` without ever holding the ``(N, V)`` logits.

Design (docs/llm_head.md has the numbers):

* Two ``torch.library`` custom ops, ``fusedloss::linear_loss_fwd`` / ``fusedloss::linear_loss_bwd``,
  with fake and autograd registrations, so ``torch.compile(fullgraph=True)`` traces the head
  as one opaque node (no graph break).
* The forward walks blocks of rows. For each block it writes the block's logits into one
  reused buffer with torch's own GEMM (``addmm(bias, h, W.T, out=buf)``), runs the chosen
  backend's fused loss op on it (forward + gradient for grad_output = 1 in one call), and
  folds the block's gradient ``g`` at once: ``d_hidden[block] = g @ W``,
  ``d_weight += g.T @ h[block]``, ``d_bias += g.sum(0)``. Only one block of logits and its
  gradient are ever alive (the Triton backend writes the gradient over the logits block
  itself, so there only one block).
* ``reduction="mean"`` divides by a GLOBAL denominator (the number of non-ignored rows, or
  the sum of their class weights): every block runs with ``reduction="sum"`` and the sums,
  ``d_hidden``, ``d_weight`` and ``d_bias`` are divided once at the end by the denominator,
  computed on the device (no host synchronization).
* For ``"mean"``/``"sum"`` the forward returns the gradients for grad_output = 1 and the
  backward scales them by the scalar grad_output (in place in eager mode, not at all when it
  is exactly 1 on CPU) and hands them out; a later backward through the same graph
  (``retain_graph=True``) recomputes them from the saved inputs (one more forward pass).
  The backward is once differentiable. For ``"none"`` a per-row grad_output must weight the
  rows of ``g`` before they are folded into ``d_weight``, so the forward computes only the
  loss (and keeps the ``(N, 4)`` row statistics) and the backward runs the GEMM pass again:
  per block the logits, the backend's backward op from the saved statistics, and the same
  fold.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import dispatch, ops, reference, validation
from .ops import NAMESPACE, SCALARS, stats_dtype
from .validation import check_target_values, must_check_targets
from .variants import STATS_COLS, Reduction, Variant, reduction_id, variant_id

#: The largest logits block (logits + its gradient), and its largest share of the full logits.
#: Blocks of fewer than ~128 rows make the d weight update (a rank-rows update of the whole
#: V x D gradient per block) and the GEMMs memory-bound; 48 MiB is 192 rows at V = 32000 fp32,
#: which keeps N 4096, D 512, V 32000 within a quarter of the logits with d weight (an eighth
#: of them there) and d hidden counted.
CHUNK_BUDGET_BYTES = 48 * 2**20
CHUNK_SHARE = 1 / 10
#: Problems whose logits block budget is below this run in one block anyway.
MIN_CHUNK_BYTES = 2 * 2**20

_NEEDS = "int chunk_rows, bool need_hidden, bool need_weight, bool need_bias"
FWD_SCHEMA = (f"(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor? class_weight, str backend, "
              f"{SCALARS}, {_NEEDS}) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
BWD_SCHEMA = (f"(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor? bias, Tensor target, "
              f"Tensor? class_weight, Tensor stats, str backend, {SCALARS}, {_NEEDS}) -> (Tensor, Tensor, Tensor)")


def default_chunk_rows(n: int, v: int, element_size: int) -> int:
    """Rows per block: the block's logits and gradient within ``CHUNK_SHARE`` of the full logits
    and ``CHUNK_BUDGET_BYTES`` (whichever is smaller; at least ``MIN_CHUNK_BYTES``), a multiple
    of 32 rows when that is at least 32."""
    per_row = 2 * max(v, 1) * element_size  # the block's logits and their gradient
    budget = min(CHUNK_BUDGET_BYTES, max(MIN_CHUNK_BYTES, int(n * v * element_size * CHUNK_SHARE)))
    rows = max(1, budget // per_row)
    if rows >= 32:
        rows -= rows % 32
    return int(min(rows, max(n, 1)))


def _blocks(n: int, rows: int):
    for s in range(0, n, rows):
        yield s, min(n, s + rows)


def _logits_into(buf: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if bias is None:
        return torch.mm(h, weight.t(), out=buf)
    return torch.addmm(bias, h, weight.t(), out=buf)


def run_blocks(hidden: Tensor, weight: Tensor, bias: Tensor | None, chunk_rows: int, step,
               dh: Tensor | None, dw: "_WeightGrad | None", db: Tensor | None) -> None:
    """The block loop: per block of rows ``[s, e)``, its logits into one reused buffer,
    ``g = step(s, e, logits)``, and ``g`` (unless None) folded into ``dh[s:e]``, ``dw``, ``db``.
    (``fusedloss.parallel`` runs its vocabulary-parallel head through it too.)"""
    n = hidden.shape[0]
    rows = max(1, min(chunk_rows, n))
    buf = hidden.new_empty((rows, weight.shape[0])) if n else None
    for s, e in _blocks(n, rows):
        x = _logits_into(buf[: e - s], hidden[s:e], weight, bias)
        g = step(s, e, x)
        if g is not None:
            _fold(g, hidden[s:e], weight, dh[s:e] if dh is not None else None, dw, db)
        del g


class _WeightGrad:
    """d weight, summed over the blocks. float32/float64 weights: one buffer of the weight's
    dtype, updated by ``addmm_``. float16/bfloat16 weights: a float32 sum (in the 16-bit dtype
    every block's addition rounds the running sum: 1.9% off at 256 blocks) and one buffer of
    the weight's dtype that takes each block's product (a 16-bit GEMM, float32 inside) and at
    the end the sum, cast once. The result is contiguous whatever the weight's strides (the
    fake's ``new_empty``; ``zeros_like`` would copy a transposed weight's strides)."""

    def __init__(self, weight: Tensor):
        sixteen = weight.dtype in (torch.float16, torch.bfloat16)
        self.sum = torch.zeros(weight.shape, dtype=torch.float32 if sixteen else weight.dtype, device=weight.device)
        self.block = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if sixteen else None

    def add(self, g: Tensor, h: Tensor) -> None:
        if self.block is None:
            self.sum.addmm_(g.t(), h)
        else:
            self.sum.add_(torch.mm(g.t(), h, out=self.block))

    def result(self) -> Tensor:
        if self.block is None:
            return self.sum
        out = self.block.copy_(self.sum)
        self.sum = self.block = None
        return out


def _fold(g: Tensor, h: Tensor, weight: Tensor, dh: Tensor | None, dw: _WeightGrad | None,
          db: Tensor | None) -> None:
    """Fold one block's logits gradient into the parameter and input gradients."""
    if dh is not None:
        torch.mm(g, weight, out=dh)
    if dw is not None:
        dw.add(g, h)
    if db is not None:
        db.add_(g.sum(0, dtype=db.dtype))


def _inplace_triton(be) -> bool:
    return be.name == "triton" and be.one_target.fwd_inplace is not None


def _linear_loss_fwd(hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                     class_weight: Tensor | None, backend: str, variant: int, reduction: int, ignore_index: int,
                     label_smoothing: float, alpha: float, beta: float, gamma: float, z_loss: float,
                     softcap: float, chunk_rows: int,
                     need_hidden: bool, need_weight: bool, need_bias: bool):
    be = dispatch.resolve(backend, hidden.device)
    n, d = hidden.shape
    v = weight.shape[0]
    acc = stats_dtype(hidden)
    if must_check_targets(hidden.device):
        check_target_values(target, v, ignore_index)
    need_any = need_hidden or need_weight or need_bias
    fused = reduction != Reduction.NONE and need_any
    keep_stats = reduction == Reduction.NONE and need_any
    def empty():  # distinct tensors: an op's outputs may not alias each other
        return hidden.new_empty((0,))

    loss_rows = hidden.new_empty((n,), dtype=acc) if reduction == Reduction.NONE else None
    total = torch.zeros((), dtype=acc, device=hidden.device)
    lse = hidden.new_empty((n,), dtype=acc)
    stats = hidden.new_empty((n, STATS_COLS), dtype=acc) if keep_stats else hidden.new_empty((0,), dtype=acc)
    dh = hidden.new_empty((n, d)) if fused and need_hidden else None
    dw = _WeightGrad(weight) if fused and need_weight else None
    db = torch.zeros((v,), dtype=acc, device=hidden.device) if fused and need_bias else None
    red = Reduction.NONE if reduction == Reduction.NONE else Reduction.SUM
    scalars = (variant, int(red), ignore_index, label_smoothing, alpha, beta, gamma, z_loss, softcap)
    inplace = fused and _inplace_triton(be)

    def step(s, e, x):
        t = target[s:e]
        if inplace:  # the gradient overwrites the logits block: one (rows, V) buffer in all
            loss_c, st = torch.ops.fusedloss.triton_fwd_inplace(x, t, class_weight, *scalars)
            g = x
        else:
            loss_c, st, g = be.one_target.fwd(x, t, class_weight, *scalars, fused)
        lse[s:e] = st[:, 0]
        if keep_stats:
            stats[s:e] = st
        if loss_rows is not None:
            loss_rows[s:e] = loss_c
        else:
            total.add_(loss_c)
        return g if fused else None

    run_blocks(hidden, weight, bias, chunk_rows, step, dh, dw, db)
    lse = torch.where(target != ignore_index, lse, torch.zeros((), dtype=acc, device=hidden.device))
    if reduction == Reduction.NONE:
        loss = loss_rows
    elif reduction == Reduction.MEAN:
        denom = reference.mean_denominator(target, class_weight, ignore_index, acc)
        loss = total / denom  # 0 / 0 = NaN when no row counts (every row ignored, or N = 0), as PyTorch
        # ... but then every row's gradient is 0, and so are the sums (F.cross_entropy's too), not 0 / 0
        nonzero = torch.where(denom > 0, denom, torch.ones_like(denom))
        for t_ in (dh, dw.sum if dw is not None else None, db):
            if t_ is not None:
                t_.div_(nonzero)
    else:
        loss = total
    db_out = db.to(bias.dtype) if db is not None and bias is not None else db
    return (loss, lse, stats, dh if dh is not None else empty(), dw.result() if dw is not None else empty(),
            db_out if db_out is not None else empty())


def _linear_loss_bwd(grad_loss: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor,
                     class_weight: Tensor | None, stats: Tensor, backend: str, variant: int, reduction: int,
                     ignore_index: int, label_smoothing: float, alpha: float, beta: float, gamma: float,
                     z_loss: float, softcap: float, chunk_rows: int, need_hidden: bool, need_weight: bool, need_bias: bool):
    """Backward of ``reduction="none"``: the GEMM pass again, the backend's backward op per block."""
    be = dispatch.resolve(backend, hidden.device)
    n, d = hidden.shape
    v = weight.shape[0]
    acc = stats_dtype(hidden)
    def empty():  # distinct tensors: an op's outputs may not alias each other
        return hidden.new_empty((0,))

    dh = hidden.new_empty((n, d)) if need_hidden else None
    dw = _WeightGrad(weight) if need_weight else None
    db = torch.zeros((v,), dtype=acc, device=hidden.device) if need_bias else None
    scalars = (variant, reduction, ignore_index, label_smoothing, alpha, beta, gamma, z_loss, softcap)
    grad_loss = grad_loss.contiguous()
    run_blocks(hidden, weight, bias, chunk_rows,
               lambda s, e, x: be.one_target.bwd(grad_loss[s:e], x, target[s:e], class_weight, stats[s:e], *scalars),
               dh, dw, db)
    db_out = db.to(bias.dtype) if db is not None and bias is not None else db
    return (dh if dh is not None else empty(), dw.result() if dw is not None else empty(),
            db_out if db_out is not None else empty())


linear_loss_fwd = torch.library.custom_op(f"{NAMESPACE}::linear_loss_fwd", _linear_loss_fwd, mutates_args=(),
                                          schema=FWD_SCHEMA)
linear_loss_bwd = torch.library.custom_op(f"{NAMESPACE}::linear_loss_bwd", _linear_loss_bwd, mutates_args=(),
                                          schema=BWD_SCHEMA)


@linear_loss_fwd.register_fake
def _(hidden, weight, bias, target, class_weight, backend, variant, reduction, ignore_index, label_smoothing,
      alpha, beta, gamma, z_loss, softcap, chunk_rows, need_hidden, need_weight, need_bias):
    n, d = hidden.shape
    v = weight.shape[0]
    acc = stats_dtype(hidden)
    need_any = need_hidden or need_weight or need_bias
    fused = reduction != Reduction.NONE and need_any
    keep_stats = reduction == Reduction.NONE and need_any
    loss = hidden.new_empty((n,) if reduction == Reduction.NONE else (), dtype=acc)
    lse = hidden.new_empty((n,), dtype=acc)
    stats = hidden.new_empty((n, STATS_COLS) if keep_stats else (0,), dtype=acc)
    dh = hidden.new_empty((n, d) if fused and need_hidden else (0,))
    dw = weight.new_empty((v, d) if fused and need_weight else (0,))
    if fused and need_bias:
        db = hidden.new_empty((v,), dtype=bias.dtype if bias is not None else acc)
    else:
        db = hidden.new_empty((0,))
    return loss, lse, stats, dh, dw, db


@linear_loss_bwd.register_fake
def _(grad_loss, hidden, weight, bias, target, class_weight, stats, backend, variant, reduction, ignore_index,
      label_smoothing, alpha, beta, gamma, z_loss, softcap, chunk_rows, need_hidden, need_weight, need_bias):
    n, d = hidden.shape
    v = weight.shape[0]
    dh = hidden.new_empty((n, d) if need_hidden else (0,))
    dw = weight.new_empty((v, d) if need_weight else (0,))
    if need_bias:
        db = hidden.new_empty((v,), dtype=bias.dtype if bias is not None else stats_dtype(hidden))
    else:
        db = hidden.new_empty((0,))
    return dh, dw, db


def _setup(ctx, inputs, output):
    (hidden, weight, bias, target, class_weight, backend, variant, reduction, ignore_index, label_smoothing,
     alpha, beta, gamma, z_loss, softcap, chunk_rows, need_hidden, need_weight, need_bias) = inputs
    _loss, lse, stats, dh, dw, db = output
    ctx.mark_non_differentiable(lse, stats, dh, dw, db)
    ctx.set_materialize_grads(False)
    ctx.none = reduction == Reduction.NONE
    ctx.needs = (need_hidden, need_weight, need_bias)
    ctx.args = (backend, variant, reduction, ignore_index, label_smoothing, alpha, beta, gamma, z_loss, softcap,
                chunk_rows)
    if ctx.none:
        ctx.save_for_backward(hidden, weight, bias, target, class_weight, stats)
    else:
        # The gradients for grad_output = 1, which the first backward hands out (scaled in place)
        # and drops; the inputs, from which a later backward through the same graph
        # (retain_graph=True) recomputes them. Not saved tensors: the first backward must not
        # check the versions of inputs it does not read, nor a later one those of the handed out
        # (and scaled) gradients; none of them has a grad_fn, so no reference cycle.
        ctx.grads = (dh, dw, db)
        ctx.save_for_backward(hidden, weight, bias, target, class_weight)


def _scale(grad: Tensor, grad_loss: Tensor) -> Tensor:
    """``grad * grad_output`` for a scalar grad_output. Eager: in place on the saved gradient
    (no second V x D buffer), skipped when grad_output is exactly 1 on CPU (a memory read, not
    a device synchronization). Traced: the product."""
    if torch.compiler.is_compiling() or type(grad_loss) is not Tensor or type(grad) is not Tensor:
        return (grad * grad_loss).to(grad.dtype)
    if grad.device.type == "cpu" and bool(grad_loss == 1):
        return grad
    return grad.mul_(grad_loss.to(grad.dtype) if grad.dtype != torch.float64 else grad_loss)


@ops.first_order("linear_softmax_loss (the LLM head)")  # the gradients carry no graph back to the inputs
def _backward(ctx, grad_loss, *_):
    nones = (None,) * 16
    if grad_loss is None:
        return (None, None, None) + nones
    need = tuple(n and ctx.needs_input_grad[i] for i, n in enumerate(ctx.needs))
    if ctx.none:
        hidden, weight, bias, target, class_weight, stats = ctx.saved_tensors
        dh, dw, db = linear_loss_bwd(grad_loss, hidden, weight, bias, target, class_weight, stats, *ctx.args,
                                     *need)
    else:
        grads, ctx.grads = ctx.grads, None
        if grads is None:  # a second backward through the same graph: the first handed them out
            hidden, weight, bias, target, class_weight = ctx.saved_tensors
            _, _, _, *grads = linear_loss_fwd(hidden, weight, bias, target, class_weight, *ctx.args, *need)
        dh, dw, db = (_scale(t, grad_loss) if n else None for t, n in zip(grads, need))
    return (dh if need[0] else None, dw if need[1] else None, db if need[2] else None) + nones


linear_loss_fwd.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------
# The functional API
# ----------------------------------------------------------------------------

def linear_softmax_loss(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    loss: str = "ce",
    *,
    bias: Tensor | None = None,
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
) -> Tensor | tuple[Tensor, Tensor]:
    """``softmax_loss(hidden @ weight.T + bias, target, loss, ...)`` without the ``(N, V)`` logits.

    The value and the gradients w.r.t. ``hidden``, ``weight`` and ``bias`` are those of
    :func:`fusedloss.softmax_loss` on the logits ``hidden @ weight.T + bias``; the logits are
    computed, used and dropped one block of rows at a time, so the extra memory is one block
    (``chunk_rows`` x V, at most ``CHUNK_BUDGET_BYTES`` for the block and its gradient by
    default) plus the gradients themselves.

    Args:
        hidden: ``(N, D)`` or ``(B, T, D)`` (any leading dims), float32/bfloat16/float16/float64.
        weight: ``(V, D)``, the output projection as in ``nn.Linear`` (the model's, e.g.
            ``lm_head.weight``), same dtype and device as ``hidden``.
        target: int64/int32 class indices of shape ``hidden.shape[:-1]``.
        loss: one of ``"ce", "bce", "nllr", "crl", "lace", "focal"``.
        bias: optional ``(V,)``.
        class_weight: optional ``(V,)`` class weights: ``softmax_loss``'s ``weight`` (renamed:
            ``weight`` is the projection here).
        ignore_index, reduction, label_smoothing, alpha, beta, gamma, backend: as
            :func:`fusedloss.softmax_loss`.
        z_loss, softcap: PaLM's z-loss ``z_loss * lse^2`` added to each row's loss, and Gemma's
            logit soft-capping ``softcap * tanh(x / softcap)`` before the softmax (None: no cap),
            as :func:`fusedloss.softmax_loss`.
        return_lse: also return the per-row ``logsumexp`` of the logits (float32, float64 for
            float64 inputs; 0 on ignored rows; no gradient flows through it).
        chunk_rows: rows per block (default: ``default_chunk_rows``).

    Returns:
        The loss in ``hidden``'s dtype (a scalar, or ``hidden.shape[:-1]`` for ``"none"``),
        and with ``return_lse`` the pair ``(loss, lse)``.
    """
    out, lse = linear_softmax_loss_float(hidden, weight, target, loss, bias=bias, class_weight=class_weight,
                                         ignore_index=ignore_index, reduction=reduction,
                                         label_smoothing=label_smoothing, alpha=alpha, beta=beta, gamma=gamma,
                                         z_loss=z_loss, softcap=softcap, backend=backend, chunk_rows=chunk_rows)
    out = out.to(ops.loss_dtype(hidden))
    if return_lse:
        return out, lse
    return out


def linear_softmax_loss_float(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    loss: str = "ce",
    *,
    bias: Tensor | None = None,
    class_weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    alpha: float = 1.5,
    beta: float = 1.0,
    gamma: float = 2.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    backend: str = "auto",
    chunk_rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`linear_softmax_loss` (same arguments but ``return_lse``), returning ``(loss, lse)``
    with the loss as the kernels compute it: float32 (float64 for float64 inputs), not rounded
    to ``hidden``'s dtype. A bfloat16 model's loss in float32, as transformers computes it
    from ``logits.float()``; ``fusedloss.hf`` uses it."""
    variant, red, ignore_index, cap = check_loss_options(loss, reduction, ignore_index, label_smoothing, alpha, beta,
                                                         gamma, z_loss, softcap)
    v = check_linear_inputs(hidden, weight, bias, target)
    class_weight = validation.check_weight(class_weight, v, hidden)
    be = dispatch.resolve(backend, hidden.device)
    dispatch.check_smoothing(be, variant, label_smoothing)
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(hidden.numel() // max(hidden.shape[-1], 1), v, hidden.element_size())
    else:
        check_chunk_rows(chunk_rows)

    h2d = hidden.reshape(-1, hidden.shape[-1])
    t1d = target.reshape(-1)
    grad_on = torch.is_grad_enabled()
    need = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
            grad_on and bias is not None and bias.requires_grad)
    out, lse, *_ = linear_loss_fwd(h2d, weight, bias, t1d, class_weight, be.name, int(variant), int(red),
                                   ignore_index, float(label_smoothing), float(alpha), float(beta), float(gamma),
                                   float(z_loss), cap, int(chunk_rows), *need)
    if red == Reduction.NONE:
        out = out.reshape(target.shape)
    return out, lse.reshape(target.shape)


def check_loss_options(loss, reduction, ignore_index, label_smoothing, alpha, beta, gamma, z_loss,
                       softcap) -> tuple[Variant, Reduction, int, float]:
    """The checks of the loss options every entry point shares (the head, ``fusedloss.parallel``):
    returns ``(variant, reduction, ignore_index, cap)``, the cap as the ops take it (0.0: none)."""
    variant = variant_id(loss)
    red = reduction_id(reduction)
    cap = validation.check_z_loss_softcap(z_loss, softcap)
    validation.check_hyperparameters(alpha, beta, gamma, label_smoothing)
    return variant, red, validation.check_ignore_index(ignore_index), cap


def check_chunk_rows(chunk_rows) -> None:
    if not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int; got {chunk_rows!r}")


def check_linear_inputs(hidden, weight, bias, target) -> int:
    """``hidden (..., D)``, ``weight (V, D)``, ``bias (V,)``, ``target hidden.shape[:-1]``: types, dtypes,
    shapes and devices. Returns ``V``."""
    for name, t in (("hidden", hidden), ("weight", weight), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if not hidden.is_floating_point() or hidden.dim() < 1:
        raise TypeError(f"hidden must be a floating tensor (..., D); got {hidden.dtype} of shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape (V, D) with D = hidden.shape[-1] = {hidden.shape[-1]}; "
                         f"got {tuple(weight.shape)}")
    v = weight.shape[0]
    if v < 1:
        raise ValueError("weight must have at least one class (row)")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != hidden.dtype:
            raise TypeError(f"{name} must have hidden's dtype {hidden.dtype}; got {t.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}; move them to one device")
    if bias is not None and tuple(bias.shape) != (v,):
        raise ValueError(f"bias must have shape ({v},); got {tuple(bias.shape)}")
    if target.is_floating_point():
        raise NotImplementedError("linear_softmax_loss takes class-index targets only")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must be int64 or int32 class indices; got {target.dtype}")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"target must have shape {tuple(hidden.shape[:-1])} (hidden's without D); "
                         f"got {tuple(target.shape)}")
    if target.device != hidden.device:
        raise ValueError(f"target is on {target.device} but hidden is on {hidden.device}; move them to one device")
    return v
