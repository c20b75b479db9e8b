"""Vocabulary-parallel losses: the classes of the logits split across the ranks of a process group.

Each rank holds ``local_logits (N, V_local)``, the classes ``[class_start, class_start + V_local)``
of every row, and the same global ``target (N,)``. Every loss depends on a row through sums over
its classes, so the split loss needs only per-row partial statistics from each rank and a few
collectives of ``O(N)`` floats (docs/parallel.md counts them):

* target-only losses (ce, nllr, crl, lace, focal) depend on a row only through
  ``d = lse_ex - x_c`` (docs/losses.md, "Four numbers per row"). Partial statistics: the rank's own
  fused forward kernel on its slice, with a local target (``c - class_start`` where the target lives
  on this rank, else the fake target ``K0``); its ``stats[:, 1]`` is then the local ``lse_ex`` (the
  owner's competitors), its ``stats[:, 0]`` the local ``lse`` over every local class. Combine:
  ``lse_ex = logsumexp_r(part_r)`` (all-reduce MAX, then SUM of ``exp(part_r - M)``), ``x_c`` in
  the same SUM. The row loss is the reference's per-variant function of ``d``
  (``reference.TARGET_ONLY_MATH``). Backward: the rank's own backward kernel on its slice, fed the
  global ``lse`` and ``lse_ex`` as its stats, writes the exact gradient of every local class (no
  collective);
* bce also needs the global arg-max ``w``, ``log(1 - p_w)`` from the log-sum-exp over the classes
  other than ``w``, then ``R = sum_{k != w} a_k`` and ``sum_{k != c} log(1 - p_k)`` given the global
  ``lse`` and ``w`` (docs/losses.md, "bce"). Round one: the rank's bce forward kernel on its slice
  gives the local ``lse``, ``lse_ex`` (of the local target), ``log(1 - p_w)`` and arg-max ``w_r``
  (its stats columns); one all-gather of those per-row numbers lets every rank form ``w`` (max value,
  lowest index among ties) and the three global log-sum-exps, each shifted by its own max.
  Round two: each rank's partial sums over its classes but ``c`` and ``w``, one all-reduce SUM. The
  gradient is local, from the global numbers. Both by the backend's ops given those numbers where it
  has them (``Backend.bce_partial``, ``bce_global_bwd``: the C++ CPU kernels, and Triton's), else by the
  reference's bce per-element functions on the slice, in blocks of rows.

Where a kernel would misread (the fake target of a row whose target is elsewhere, the global
class count and weight total of label smoothing) the difference is fixed in ``O(N)`` or one
elementwise pass; each place says why.

:func:`linear_softmax_loss` is the LLM head with its weight split by rows (a column-parallel
output projection): ``head.run_blocks`` computes one block of rows of the local logits at a time,
the block's loss as above (its collectives per block), and folds the block's local gradient into
``d hidden``, ``d weight``, ``d bias``; ``d hidden`` is all-reduced over the ranks in the backward.
"""
from __future__ import annotations

import math
import struct
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import dispatch, reference, validation
from ..head import (_blocks, _scale, _WeightGrad, check_chunk_rows, check_linear_inputs, check_loss_options,
                    default_chunk_rows, run_blocks)
from ..variants import Reduction, Variant

#: The local target of an ignored row. Local targets of kept rows lie in [0, V_local), so a
#: negative value never collides with one (the caller's ignore_index may be any int, even a
#: class id that is valid on some rank).
LOCAL_IGNORE = -1
#: The fake local target of a row whose target lives on another rank: any valid local class
#: would do (stats[:, 0], the local lse, does not depend on it); the backward fixes entry K0.
K0 = 0
#: bce's global arg-max travels as a float in the statistics' dtype: exact below 2^24 in float32.
BCE_MAX_CLASSES_FP32 = 2**24

_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


class Plan(NamedTuple):
    """Where this rank's classes sit, agreed by every rank of the group."""
    class_start: int
    num_classes: int   # V, the global number of classes
    world_size: int
    #: Whether some row of this rank's logits has ``-inf`` at local class ``K0`` (the fake target
    #: of the rows owned elsewhere), as the validation's exchange brought it to the host; None:
    #: not known without a host synchronization (``validate=False``, the head's blocks).
    k0_masked: bool | None = None


class _Config(NamedTuple):
    variant: int
    reduction: int
    ignore_index: int
    label_smoothing: float
    alpha: float
    beta: float
    gamma: float
    z_loss: float
    softcap: float     # 0.0: no cap


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

    Collectives per call, besides the validation all-gather: target-only losses, forward one
    all-reduce MAX of ``N`` floats and one all-reduce SUM of ``2N`` floats (``3N`` with label
    smoothing), backward none; ``bce``, forward one all-gather of ``6N`` floats per rank (``7N``
    with label smoothing) and one all-reduce SUM of ``2N`` floats (``N`` without a gradient),
    backward none.
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
    out = out.to(hidden.dtype)
    if return_lse:
        return out, lse.reshape(target.shape)
    return out


# ----------------------------------------------------------------------------
# Arguments: local checks, then one exchange that every rank judges alike
# ----------------------------------------------------------------------------

def _device_of(x) -> torch.device:
    return x.device if isinstance(x, Tensor) else torch.device("cpu")


def _replicated_local(t, name: str):
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(t, DTensor):
        return t
    if not all(isinstance(p, Replicate) for p in t.placements):
        raise ValueError(f"a DTensor {name} must be replicated; got placements {t.placements}")
    return t.to_local()


def _sharded_local(t, dim: int, what: str):
    """``(local tensor, its mesh's group)`` of a DTensor sharded on ``dim`` over a 1-D mesh, else ``(t, None)``."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(t, DTensor):
        return t, None
    mesh, placements = t.device_mesh, t.placements
    dims = (dim, dim - t.dim()) if dim >= 0 else (dim, dim + t.dim())
    if mesh.ndim != 1 or not isinstance(placements[0], Shard) or placements[0].dim not in dims:
        raise ValueError(f"fusedloss.parallel needs {what} over a 1-D mesh; got placements {placements} on a "
                         f"{mesh.ndim}-D mesh")
    # DTensor's Shard splits like torch.chunk, contiguous in rank order: class_start=None derives it.
    return t.to_local(), mesh.get_group()


def _unwrap_dtensors(local_logits, target, group, class_start):
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without DTensor: nothing to unwrap
        return local_logits, target, group, class_start
    target = _replicated_local(target, "target")
    if not isinstance(local_logits, DTensor):
        return local_logits, target, group, class_start
    if group is not None or class_start is not None:
        raise ValueError("pass group and class_start only with a plain tensor; a DTensor carries its own")
    x, group = _sharded_local(local_logits, local_logits.dim() - 1,
                              "logits sharded on the class (last) dimension, Shard(-1),")
    return x, target, group, None


def _unwrap_head_dtensors(hidden, weight, bias, target, group, class_start):
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return hidden, weight, bias, target, group, class_start
    hidden, target = _replicated_local(hidden, "hidden"), _replicated_local(target, "target")
    if not isinstance(weight, DTensor):
        return hidden, weight, bias, target, group, class_start
    if group is not None or class_start is not None:
        raise ValueError("pass group and class_start only with a plain weight; a DTensor carries its own")
    weight, group = _sharded_local(weight, 0, "the head weight sharded on its rows (the classes), Shard(0),")
    if isinstance(bias, DTensor):
        bias, _ = _sharded_local(bias, 0, "the bias sharded like the weight, Shard(0),")
    return hidden, weight, bias, target, group, None


def _config(loss, reduction, ignore_index, eps, alpha, beta, gamma, z_loss, softcap) -> _Config:
    variant, red, ignore_index, cap = check_loss_options(loss, reduction, ignore_index, eps, alpha, beta, gamma,
                                                         z_loss, softcap)
    if eps > 0 and variant != Variant.CE:
        # The split losses still add the older smoothed-CE term beside loss != 'ce'; label smoothing is
        # now the expected loss (eps / V) sum_k w_k L(x, k) (docs/losses.md): refuse rather than differ.
        raise NotImplementedError(
            "label_smoothing > 0 with a loss other than 'ce' is not implemented by fusedloss.parallel yet "
            "(label smoothing is the expected loss (eps / V) sum_k w_k L(x, k) for every loss, docs/losses.md); "
            "use label_smoothing=0, or loss='ce'")
    return _Config(int(variant), int(red), ignore_index, float(eps), float(alpha), float(beta), float(gamma),
                   float(z_loss), cap)


def _check_global_weight(weight, device) -> None:
    if weight is None:
        return
    if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.dim() != 1:
        raise TypeError("weight must be a floating 1-D tensor: the global (V,) class weights")
    if weight.device != device:
        raise ValueError(f"weight is on {weight.device} but logits are on {device}")


def _check_local(x, target, loss, weight, ignore_index, reduction, eps, alpha, beta, gamma, z_loss, softcap,
                 backend) -> tuple[_Config, dispatch.Backend]:
    """Every check that needs only this rank's arguments (functional.py's, for 2-D logits)."""
    cfg = _config(loss, reduction, ignore_index, eps, alpha, beta, gamma, z_loss, softcap)
    validation.check_logits(x)
    if x.dim() > 2:
        raise ValueError(f"local_logits must be (N, V_local) or (V_local,); got shape {tuple(x.shape)} "
                         "(reshape (B, T, V_local) to (B * T, V_local))")
    if isinstance(target, Tensor) and target.is_floating_point():
        raise NotImplementedError("class-probability (soft) targets are not implemented by fusedloss.parallel")
    validation.check_class_target(x, target)
    _check_global_weight(weight, x.device)
    return cfg, dispatch.resolve(backend, x.device)


def _check_local_head(hidden, weight, bias, target, loss, class_weight, ignore_index, reduction, eps, alpha, beta,
                      gamma, z_loss, softcap, backend, chunk_rows) -> tuple[_Config, dispatch.Backend]:
    """The single-process head's checks (``head.check_linear_inputs``) with a global class weight."""
    cfg = _config(loss, reduction, ignore_index, eps, alpha, beta, gamma, z_loss, softcap)
    check_linear_inputs(hidden, weight, bias, target)
    _check_global_weight(class_weight, hidden.device)
    if chunk_rows is not None:
        check_chunk_rows(chunk_rows)
    return cfg, dispatch.resolve(backend, hidden.device)


def _target_checksum(target: Tensor) -> Tensor:
    """An int64 fingerprint of the targets (position-weighted sum; wraps around alike on every rank)."""
    t = target.reshape(-1).long()
    pos = torch.arange(t.numel(), device=t.device) % 1009 + 1
    return (t * pos).sum()


def _k0_masked(x: Tensor, cfg: _Config) -> Tensor | None:
    """Whether any row has ``-inf`` at local class ``K0``, on the device (None: it cannot matter,
    capped logits are finite). It rides on the validation's exchange to the host, so knowing it
    costs no host synchronization of its own."""
    if cfg.softcap or x.numel() == 0:
        return None
    return (x.reshape(-1, x.shape[-1])[:, K0] == -math.inf).any()


def _plan(validate: bool, device, shape, target, weight, class_start, num_classes, cfg: _Config | None,
          error: Exception | None, group, extra: dict[str, int], k0_masked: Tensor | None = None) -> Plan:
    if validate:
        plan = _agree(device, shape, target, weight, class_start, cfg, error, group, extra, k0_masked)
    else:
        plan = _unchecked_plan(class_start, num_classes, group, shape[1])
    if weight is not None and weight.shape[0] != plan.num_classes:
        raise ValueError(f"weight must be the global ({plan.num_classes},) class weights; got {tuple(weight.shape)}")
    if (cfg.variant == Variant.BCE and shape[2] != torch.float64 and plan.num_classes > BCE_MAX_CLASSES_FP32):
        raise ValueError(f"fusedloss.parallel: bce supports at most 2^24 classes with float32 statistics (its "
                         f"arg-max travels as a float32); got V = {plan.num_classes}")
    return plan


def _agree(device, shape, target, weight, class_start, cfg: _Config | None, error: Exception | None,
           group, extra: dict[str, int], k0_masked: Tensor | None = None) -> Plan:
    """One all-gather of a metadata row per rank, then the same verdict on every rank: either the
    plan or the same ``ValueError`` (a rank whose own arguments failed re-raises its own error).
    ``shape`` is ``(N, V_local, dtype)`` (None when this rank's arguments failed); every value of
    ``extra`` must agree across the ranks. ``k0_masked`` (this rank's own, a device bool or None)
    travels in the same row and comes back as ``Plan.k0_masked``."""
    world = dist.get_world_size(group)
    ok = error is None
    row = [
        0 if ok else 1,
        shape[0] if ok else -1,
        shape[1] if ok else -1,
        -1 if class_start is None else int(class_start),
        _DTYPE_CODES.get(shape[2], 0) if ok else -1,
        -1 if weight is None else int(weight.shape[0]),
        cfg.variant if ok else -1,
        cfg.reduction if ok else -1,
        cfg.ignore_index if ok else -1,
        0,
        -1,
        *extra.values(),
    ]
    row[11:11] = _float_option_bits(cfg) if ok else [-1] * len(_FLOAT_OPTIONS)
    meta = torch.tensor(row, dtype=torch.int64, device=device)
    if ok:
        meta[9] = _target_checksum(target)
    if k0_masked is not None:
        meta[10] = k0_masked.long()
    gathered = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(gathered, meta, group=group)
    rows = [g.tolist() for g in gathered]

    bad = [r for r, m in enumerate(rows) if m[0]]
    if bad:
        if error is not None:
            raise error
        raise ValueError(f"fusedloss.parallel: rank(s) {bad} of the group rejected their arguments; see their error")
    prefix = "fusedloss.parallel: every rank must pass"

    def differs(col: int) -> bool:
        return len({m[col] for m in rows}) > 1

    if differs(1):
        raise ValueError(f"{prefix} the same number of rows N; got {[m[1] for m in rows]} (rank order)")
    if differs(4):
        raise ValueError(f"{prefix} logits of one dtype; got dtype codes {[m[4] for m in rows]} (rank order)")
    if differs(6) or differs(7) or differs(8):
        raise ValueError(f"{prefix} the same loss, reduction and ignore_index; got (variant, reduction, "
                         f"ignore_index) {[tuple(m[6:9]) for m in rows]} (rank order)")
    if differs(9):
        raise ValueError(f"{prefix} the same global target; the targets differ across ranks")
    first_extra = 11 + len(_FLOAT_OPTIONS)
    if any(differs(i) for i in range(11, first_extra)):
        got = [tuple(struct.unpack("<d", struct.pack("<q", b))[0] for b in m[11:first_extra]) for m in rows]
        raise ValueError(f"{prefix} the same loss options ({', '.join(_FLOAT_OPTIONS)}); got {got} (rank order)")
    for i, name in enumerate(extra, start=first_extra):
        if differs(i):
            raise ValueError(f"{prefix} the same {name}; got {[m[i] for m in rows]} (rank order)")
    sizes = [m[2] for m in rows]
    total = sum(sizes)
    starts = [m[3] for m in rows]
    if all(s == -1 for s in starts):
        starts = [sum(sizes[:r]) for r in range(world)]
    elif any(s == -1 for s in starts):
        raise ValueError(f"{prefix} class_start or none of them pass it; got {starts} (rank order, -1: None)")
    else:
        spans = sorted(zip(starts, sizes))
        end = 0
        for s, v in spans:
            if s != end:
                raise ValueError(
                    f"fusedloss.parallel: the ranks' classes must tile [0, V) without gaps or overlaps; got slices "
                    f"{[(s, s + v) for s, v in zip(starts, sizes)]} (rank order, [class_start, class_start + "
                    f"V_local)): {'a gap' if s > end else 'an overlap'} at class {min(s, end)}")
            end = s + v
    weights = {m[5] for m in rows}
    if weights != {-1} and weights != {total}:
        raise ValueError(f"{prefix} the global ({total},) weight, or none; got weight sizes {[m[5] for m in rows]}")
    rank = dist.get_rank(group)
    mine = rows[rank][10]
    return Plan(starts[rank], total, world, None if mine < 0 else bool(mine))


_FLOAT_OPTIONS = ("label_smoothing", "alpha", "beta", "gamma", "z_loss", "softcap")


def _float_option_bits(cfg: _Config) -> list[int]:
    """The float options as int64 bit patterns: compared exactly, in the metadata's one int64 row."""
    return [struct.unpack("<q", struct.pack("<d", float(getattr(cfg, f))))[0] for f in _FLOAT_OPTIONS]


def _unchecked_plan(class_start, num_classes, group, v_local: int) -> Plan:
    if class_start is None or num_classes is None:
        raise ValueError("validate=False needs class_start and num_classes (nothing is exchanged to derive them)")
    start, total = int(class_start), int(num_classes)
    if start < 0 or start + v_local > total:  # what this rank can check alone, for free
        raise ValueError(f"fusedloss.parallel: this rank's classes [{start}, {start + v_local}) (class_start, "
                         f"class_start + V_local) must lie in [0, num_classes = {total})")
    return Plan(start, total, dist.get_world_size(group))


# ----------------------------------------------------------------------------
# Rows of one call (or one block of the head): the partial statistics, their collectives, the
# row losses and what the local gradient needs later (a state of O(N) tensors, no collective)
# ----------------------------------------------------------------------------

def _cap(x: Tensor, softcap: float) -> Tensor:
    return torch.tanh(x / softcap) * softcap if softcap else x


def _zero(cdtype, device) -> Tensor:
    return torch.zeros((), dtype=cdtype, device=device)


def _class_weight_of(t: Tensor, keep: Tensor, weight: Tensor | None, cdtype) -> Tensor:
    """``weight[c]`` per row (1 without weights; any value on ignored rows)."""
    if weight is None:
        return torch.ones((), dtype=cdtype, device=t.device)
    return weight.to(cdtype)[torch.where(keep, t, torch.zeros_like(t))]


def _weight_total(weight: Tensor | None, plan: Plan, cdtype):
    return float(plan.num_classes) if weight is None else weight.to(cdtype).sum()


def _weighted_x_sum(x: Tensor, weight: Tensor | None, plan: Plan, cap: float, cdtype) -> Tensor:
    """This rank's ``sum_k w_k x_k`` (capped) of the smoothing term, a sum over classes like the others."""
    xs = _cap(x.to(cdtype), cap)
    if weight is None:
        return xs.sum(1)
    return torch.mv(xs, weight[plan.class_start:plan.class_start + x.shape[1]].to(cdtype))


def _owner(t: Tensor, keep: Tensor, start: int, size: int) -> Tensor:
    return keep & (t >= start) & (t < start + size)


def _local_target(t: Tensor, keep: Tensor, owner: Tensor, start: int) -> Tensor:
    """``c - class_start`` where this rank owns the target, ``K0`` elsewhere, ``LOCAL_IGNORE`` on ignored rows."""
    local_t = torch.where(owner, t - start, torch.full_like(t, K0))
    return torch.where(keep, local_t, torch.full_like(t, LOCAL_IGNORE))


def _put(buf: Tensor, idx: Tensor, mask: Tensor, value) -> None:
    """``buf[i, idx[i]] = value[i]`` on the rows where ``mask`` (rows elsewhere write their own value back)."""
    j = idx.clamp(0, buf.shape[1] - 1)[:, None]
    if isinstance(value, Tensor):
        value = value[:, None]
    buf.scatter_(1, j, torch.where(mask[:, None], value, buf.gather(1, j)).to(buf.dtype))


def _row_losses(h: Tensor, lse: Tensor, t: Tensor, keep: Tensor, weight, plan: Plan, cfg: _Config,
                wx_sum: Tensor | None) -> Tensor:
    """Weighted row losses from the loss's own term ``h`` (unweighted): ``(1 - eps) w_c h + z w_c lse^2 +
    (eps / V)(W lse - sum_k w_k x_k)``, 0 on ignored rows (reference.forward's, with the global V, W)."""
    cdtype = h.dtype
    zero = _zero(cdtype, h.device)
    eps = cfg.label_smoothing
    scale = torch.where(keep, _class_weight_of(t, keep, weight, cdtype), zero)
    per_row = (1 - eps) * h if eps > 0 else h
    if cfg.z_loss:
        per_row = per_row + cfg.z_loss * lse.square()
    loss_rows = torch.where(scale == 0, torch.zeros_like(per_row), per_row * scale)
    if eps > 0:
        smooth = (eps / plan.num_classes) * (_weight_total(weight, plan, cdtype) * lse - wx_sum)
        loss_rows = loss_rows + torch.where(keep, smooth, zero)
    return loss_rows


def _rows(x: Tensor, t: Tensor, weight, plan: Plan, be, cfg: _Config, group, need_grad: bool):
    """``(loss_rows, lse, state)`` of the rows of ``x``: weighted unreduced losses, the global ``lse``
    (0 on ignored rows) and the per-row numbers :func:`_grad` needs."""
    keep = t != cfg.ignore_index
    if cfg.variant == Variant.BCE:
        h, lse, wx_sum, state = _bce_rows(x, t, keep, weight, plan, be, cfg, group, need_grad)
    else:
        h, lse, wx_sum, state = _target_only_rows(x, t, keep, weight, plan, be, cfg, group)
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


def _p_and_class_terms(x: Tensor, lse: Tensor, extra: Tensor, per_class: Tensor | None, w_loc: Tensor | None,
                       cdtype) -> Tensor:
    """``p_j extra - per_class w_j`` per entry (a new buffer, capped-logit space): the gradient terms of
    z-loss (``2 z lse w_c go p_j``) and label smoothing (``(eps / V) go (W p_j - w_j)``)."""
    add = reference.shifted(x, lse, cdtype).exp_().mul_(extra[:, None])
    if per_class is not None:
        w_row = torch.ones((), dtype=cdtype, device=x.device) if w_loc is None else w_loc.to(cdtype)[None, :]
        add.sub_(per_class[:, None] * w_row)
    return add


# ---- target-only losses ----------------------------------------------------------------

class _TargetOnlyState(NamedTuple):
    t: Tensor          # global targets
    local_t: Tensor    # the kernels' local target (K0 or the local arg-max where owned elsewhere)
    stats: Tensor      # (N, 4): global lse and lse_ex as the backward kernel reads them
    log_s: Tensor      # log s of the variant (docs/losses.md)
    x_t: Tensor        # the (capped) logit at the local target


def _sync_free(device: torch.device) -> bool:
    """Whether a host check of device data would be a synchronization (tests force True on the CPU)."""
    return device.type != "cpu"


def _avoid_masked_fake_targets(x: Tensor, local_t: Tensor, absent: Tensor, cap: float,
                               k0_masked: bool | None) -> Tensor | None:
    """Move the fake target of a row owned elsewhere off a masked (-inf) logit, in place.

    The backward kernel gets ``lse_ex = d + x_k`` for the fake target ``k`` so that its
    ``lse_ex - x_k`` is the global ``d``; at ``x_k = -inf`` that is ``-inf - (-inf) = NaN``. Such rows
    take their local arg-max instead, and a row whose whole slice is masked is left out of the
    kernels (its local gradient is 0 but for label smoothing's term, added outside them). Capped
    logits are finite (``-softcap``): nothing to do. Returns the rows whose slice is entirely
    masked, or None.

    No host synchronization on an accelerator: ``k0_masked`` came to the host with the
    validation, and where it is False there is nothing to do; where it is True or unknown (None:
    ``validate=False``, the head's blocks) every row's arg-max is taken on the device, one more
    read of the slice. On the CPU the check costs nothing and only the rows that need it are read."""
    if cap or k0_masked is False:
        return None
    bad = absent & (x[:, K0] == -math.inf)
    if _sync_free(x.device):
        k = x.argmax(1)
        dead = bad & (x.gather(1, k[:, None])[:, 0] == -math.inf)
        local_t.copy_(torch.where(bad, torch.where(dead, torch.full_like(k, LOCAL_IGNORE), k), local_t))
        return dead
    if not bool(bad.any()):  # on the CPU: not a synchronization
        return None
    rows = bad.nonzero()[:, 0]
    xa = x[rows]
    k = xa.argmax(1)
    dead = xa.gather(1, k[:, None])[:, 0] == -math.inf
    local_t[rows] = torch.where(dead, torch.full_like(k, LOCAL_IGNORE), k)
    masked = torch.zeros_like(absent)
    masked[rows] = dead
    return masked


def _target_only_rows(x, t, keep, weight, plan: Plan, be, cfg: _Config, group):
    vl = x.shape[1]
    cs = plan.class_start
    cdtype = reference.compute_dtype(x)
    cap = cfg.softcap
    owner = _owner(t, keep, cs, vl)
    local_t = _local_target(t, keep, owner, cs)
    masked = _avoid_masked_fake_targets(x, local_t, keep & ~owner, cap, plan.k0_masked)
    # Partial statistics of the slice (the kernel's stats are of the capped logits).
    # Variant and options do not change stats[:, :2]: ce, no smoothing, the cheapest pass.
    _, stats, _ = be.fwd(x, local_t, None, int(Variant.CE), int(Reduction.NONE), LOCAL_IGNORE, 0.0,
                         cfg.alpha, cfg.beta, cfg.gamma, 0.0, cap, False)
    part = torch.where(owner, stats[:, 1], stats[:, 0]).to(cdtype)
    x_t = _cap(x.gather(1, local_t.clamp(min=0)[:, None])[:, 0].to(cdtype), cap)
    if masked is not None:  # every local class at -inf: the slice adds nothing to the row's sums
        part = torch.where(masked, torch.full_like(part, -math.inf), part)
        x_t = torch.where(masked, torch.zeros_like(x_t), x_t)
    zero = _zero(cdtype, x.device)
    # log-sum-exp over ranks: MAX, then SUM of exp(part - M) (each term <= 1, the max rank's is 1).
    m = part.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    shift = torch.where(torch.isfinite(m), m, zero)  # every class masked (-inf): exp gives 0, not NaN
    sums = [torch.exp(part - shift), torch.where(owner, x_t, zero)]
    if cfg.label_smoothing > 0:
        sums.append(_weighted_x_sum(x, weight, plan, cap, cdtype))
    buf = torch.stack(sums)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    lse_ex = shift + buf[0].log()
    x_c = buf[1]
    lse = torch.logaddexp(lse_ex, x_c)
    d = lse_ex - x_c
    # Ignored rows: neutral numbers (their loss and gradient are 0 by select).
    lse = torch.where(keep, lse, zero)
    d = torch.where(keep, d, zero)
    h, log_s = reference.TARGET_ONLY_MATH[Variant(cfg.variant)](d, reference.Params(cfg.alpha, cfg.beta, cfg.gamma))

    # Global statistics for the backward kernel. A row whose target is on another rank is
    # read by the kernel at the fake target K0: lse_ex = d + x_K0 makes its d = lse_ex - x_K0
    # the global d, so its s, and every entry j != K0, are exact (entry K0 is fixed in _grad).
    stats_g = torch.zeros((x.shape[0], 4), dtype=cdtype, device=x.device)
    stats_g[:, 0] = lse
    stats_g[:, 1] = torch.where(owner, lse_ex, torch.where(keep & (local_t >= 0), d + x_t, zero))
    wx_sum = buf[2] if cfg.label_smoothing > 0 else None
    return h, lse, wx_sum, _TargetOnlyState(t, local_t, stats_g, log_s, x_t)


def _target_only_grad(x, st: _TargetOnlyState, go, weight, plan: Plan, be, cfg: _Config) -> Tensor:
    t, local_t, stats_g, log_s, x_t = st
    vl = x.shape[1]
    cs = plan.class_start
    cdtype = stats_g.dtype
    eps, cap, z = cfg.label_smoothing, cfg.softcap, cfg.z_loss
    keep = t != cfg.ignore_index
    rs = torch.where(keep, _class_weight_of(t, keep, weight, cdtype) * go, _zero(cdtype, x.device))  # w_c go
    lse = stats_g[:, 0]

    if eps < 1:
        # The kernel gets the weight folded into the row's grad_output and no weight of its own:
        # it would read w at the *local* target, the fake K0 for rows owned elsewhere. Label
        # smoothing stays out of it (it would use the local class count and weight total); z is
        # rescaled so its 2 z lse w_c go term is exact with own = (1 - eps) w_c go.
        go_k = (1 - eps) * rs
        z_k = z / (1 - eps) if eps > 0 else z
        g = be.bwd(go_k.contiguous(), x, local_t, None, stats_g, cfg.variant, int(Reduction.NONE),
                   LOCAL_IGNORE, 0.0, cfg.alpha, cfg.beta, cfg.gamma, z_k, cap)
        # The fake target's entry of a row owned elsewhere holds the kernel's target formula; it
        # is a competitor: g = p_k (own s + extra) = exp(x_k - lse + log s) own + exp(x_k - lse) 2 z lse own
        # (p_k s <= 1 + beta for every variant, so the product form cannot overflow).
        absent = keep & ((t < cs) | (t >= cs + vl)) & (local_t >= 0)
        idx = local_t.clamp(min=0)
        log_p = x_t - lse
        val = torch.exp(log_p + log_s) * go_k
        if z_k:
            val = val + torch.exp(log_p) * (2 * z_k * lse * go_k)
        if cap:
            val = val * reference.softcap_slope(x.gather(1, idx[:, None])[:, 0], cap, cdtype)
        _put(g, idx, absent, val)
    else:
        g = None
    return _add_smoothing(g, x, lse, go, rs, keep, weight, plan, cfg)


def _add_smoothing(g: Tensor | None, x: Tensor, lse, go, rs, keep, weight, plan: Plan, cfg: _Config) -> Tensor:
    """A kernel's gradient ``g``, run without label smoothing (None: eps = 1 left the kernel out), plus
    smoothing's ``(eps / V) go (W p_j - w_j)`` with the global V and W (and z-loss's
    ``2 z lse w_c go p_j`` when eps = 1): one elementwise pass over the slice, 0 on ignored rows."""
    eps, cap, z = cfg.label_smoothing, cfg.softcap, cfg.z_loss
    if g is None:
        g = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    if eps == 0:
        return g
    cdtype = lse.dtype
    cs, vl = plan.class_start, x.shape[1]
    per_class = (eps / plan.num_classes) * go
    extra = per_class * _weight_total(weight, plan, cdtype)
    if eps >= 1 and z:
        extra = extra + 2 * z * lse * rs
    w_loc = None if weight is None else weight[cs:cs + vl]
    add = _p_and_class_terms(_cap(x.to(cdtype), cap), lse, extra, per_class, w_loc, cdtype)
    if cap:
        add.mul_(reference.softcap_slope(x, cap, cdtype))
    # An ignored row's lse is 0, so its p_j may overflow: 0 * inf would be NaN.
    add.masked_fill_(~keep[:, None], 0.0)
    return (g.to(cdtype) + add).to(x.dtype)


# ---- bce -------------------------------------------------------------------------------

class _BceState(NamedTuple):
    t: Tensor          # global targets
    w: Tensor          # the global arg-max (int64)
    stats: Tensor      # (N, 4): lse, R = sum_{k != w} a_k, log(1 - p_w), x_w (capped)
    slice_idx: Tensor  # (N, 3) int64: local c, local w (-1: elsewhere), w == c (1, 0; -1: ignored row)


def _bce_kernels(be) -> bool:
    """Whether the backend has the bce ops given global numbers (ops.BCE_PARTIAL_SCHEMA)."""
    return be.bce_partial is not None and be.bce_global_bwd is not None


def _row_blocks(x: Tensor, cdtype):
    """Blocks of rows for the elementwise passes over the slice: two compute-dtype buffers per block,
    at most ``head.default_chunk_rows`` of them (bounded memory whatever N)."""
    n, vl = x.shape
    return _blocks(n, default_chunk_rows(n, vl, torch.finfo(cdtype).bits // 8))


def _bce_rows(x, t, keep, weight, plan: Plan, be, cfg: _Config, group, need_grad: bool):
    n, vl = x.shape
    cs = plan.class_start
    cdtype = reference.compute_dtype(x)
    cap = cfg.softcap
    zero = _zero(cdtype, x.device)
    owner = _owner(t, keep, cs, vl)
    local_t = _local_target(t, keep, owner, cs)
    # Round one, local: the bce forward kernel on the slice. Its stats: the local lse, lse_ex of the
    # local target, log(1 - p_w) of the local arg-max w_r, and w_r (a local class; ties with the
    # target go to the target). Its loss is the slice's, not needed.
    _, st, _ = be.fwd(x, local_t, None, int(Variant.BCE), int(Reduction.NONE), LOCAL_IGNORE, 0.0,
                      cfg.alpha, cfg.beta, cfg.gamma, 0.0, cap, False)
    st = st.to(cdtype)
    w_r = st[:, 3].long().clamp(0, vl - 1)
    m_r = _cap(x.gather(1, w_r[:, None])[:, 0].to(cdtype), cap)
    lse_r = st[:, 0]
    x_t = _cap(x.gather(1, local_t.clamp(min=0)[:, None])[:, 0].to(cdtype), cap)
    cols = [m_r, (w_r + cs).to(cdtype), lse_r,
            lse_r + st[:, 2],                         # log sum_{local k != w_r} exp(x_k)
            torch.where(owner, st[:, 1], lse_r),      # log sum_{local k != c} exp(x_k)
            torch.where(owner, x_t, zero)]
    if cfg.label_smoothing > 0:
        cols.append(_weighted_x_sum(x, weight, plan, cap, cdtype))
    # One all-gather: every rank forms the arg-max (the max value, the lowest index among ties) and
    # three log-sum-exps over different sets of classes, each shifted by its own max (torch.logsumexp),
    # so log(1 - p_w) stays exact when a wrong class leads by 100 or 1000.
    mine = torch.stack(cols)
    parts = [torch.empty_like(mine) for _ in range(plan.world_size)]
    dist.all_gather(parts, mine, group=group)
    allr = torch.stack(parts)                         # (P, k, N)
    m_all, idx_all = allr[:, 0], allr[:, 1]
    x_w = m_all.max(0).values
    cand = m_all == x_w[None]
    w_f = torch.where(cand, idx_all, torch.full_like(idx_all, math.inf)).min(0).values
    holds_w = cand & (idx_all == w_f[None])           # the one rank whose slice holds w
    w = torch.where(torch.isfinite(w_f), w_f, torch.zeros_like(w_f)).long()  # a NaN row: any index, its loss is NaN
    lse = torch.logsumexp(allr[:, 2], 0)
    lse_ex_w = torch.logsumexp(torch.where(holds_w, allr[:, 3], allr[:, 2]), 0)
    lse_ex = torch.logsumexp(allr[:, 4], 0)
    x_c = allr[:, 5].sum(0)
    wx_sum = allr[:, 6].sum(0) if cfg.label_smoothing > 0 else None
    log1m_pw = lse_ex_w - lse
    w_is_c = w == t
    c_loc, w_loc = t - cs, w - cs
    holds_c, holds_w = owner, keep & (w_loc >= 0) & (w_loc < vl)
    none = torch.full_like(t, -1)
    slice_idx = torch.stack([torch.where(holds_c, c_loc, none), torch.where(holds_w, w_loc, none),
                             torch.where(keep, w_is_c.long(), none)], 1)
    stats = torch.stack([lse, torch.zeros_like(lse), log1m_pw, x_w], 1)  # column 1: R, below

    # Round two: this rank's sum_{k not in {c, w}} log(1 - p_k) and R_r = sum_{k not in {c, w}} a_k
    # (every p_k <= 1/2 there): the kernel's second pass given the global lse and w, or the
    # reference's per-element functions, one block of rows at a time.
    if _bce_kernels(be):
        sums = be.bce_partial(x, stats, slice_idx, cap).T[:2 if need_grad else 1].contiguous()
    else:
        sums = torch.zeros((2 if need_grad else 1, n), dtype=cdtype, device=x.device)
        for s, e in _row_blocks(x, cdtype):
            p = reference.shifted(reference.capped(x[s:e], cap), lse[s:e], cdtype).exp_()
            odds = [reference.bce_odds(p)] if need_grad else []   # a new buffer, before p becomes log(1 - p)
            for k, buf in enumerate([reference.bce_log1m(p)] + odds):
                _put(buf, c_loc[s:e], holds_c[s:e], 0.0)
                _put(buf, w_loc[s:e], holds_w[s:e], 0.0)
                sums[k, s:e] = buf.sum(1)
            del p, odds, buf
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    h = reference.softplus(lse_ex - x_c) - (sums[0] + torch.where(w_is_c, zero, log1m_pw))
    if need_grad:
        stats[:, 1] = sums[1] - torch.where(w_is_c, zero, torch.ones_like(zero))  # a_c = -1
    return h, lse, wx_sum, _BceState(t, w, stats, slice_idx)


def _bce_grad(x, st: _BceState, go, weight, plan: Plan, be, cfg: _Config) -> Tensor:
    """docs/losses.md's three-case form from the global ``lse``, ``w``, ``R``, ``log(1 - p_w)`` on this
    rank's slice: the backend's kernel given those numbers, or the reference's per-element functions,
    one block of rows at a time."""
    t, w, stats, slice_idx = st
    vl = x.shape[1]
    cs = plan.class_start
    cdtype = stats.dtype
    eps, cap, z = cfg.label_smoothing, cfg.softcap, cfg.z_loss
    lse, r, log1m_pw, x_w = stats.unbind(1)
    keep = t != cfg.ignore_index
    rs = torch.where(keep, _class_weight_of(t, keep, weight, cdtype) * go, _zero(cdtype, x.device))  # w_c go
    if _bce_kernels(be):
        # As for the target-only losses: the class weight rides in the row's coefficient, z is
        # rescaled so that 2 z lse w_c go comes out exact with own = (1 - eps) w_c go, and label
        # smoothing (global V and W) is added outside the kernel.
        g = None
        if eps < 1:
            z_k = z / (1 - eps) if eps > 0 else z
            g = be.bce_global_bwd(((1 - eps) * rs).contiguous(), x, stats, slice_idx, z_k, cap)
        return _add_smoothing(g, x, lse, go, rs, keep, weight, plan, cfg)
    holds_c = _owner(t, keep, cs, vl)
    w_loc = w - cs
    holds_w = keep & (w_loc >= 0) & (w_loc < vl)
    w_is_c = w == t
    own = (1 - eps) * rs
    log_pw = x_w - lse
    log_aw = reference.bce_log_aw(log_pw, log1m_pw, w_is_c)
    g_w = reference.bce_grad_argmax(log_pw, log1m_pw, r, w_is_c)
    # z-loss 2 z lse w_c go p_j and smoothing (eps / V) go (W p_j - w_j): p_j extra - per_class w_j.
    extra = 2 * z * lse * rs if z else None
    per_class = w_loc_weight = None
    if eps > 0:
        per_class = (eps / plan.num_classes) * go
        smooth = per_class * _weight_total(weight, plan, cdtype)
        extra = smooth if extra is None else extra + smooth
        w_loc_weight = None if weight is None else weight[cs:cs + vl]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    for s, e in _row_blocks(x, cdtype):
        xc = reference.capped(x[s:e], cap)
        if eps < 1:
            p = reference.shifted(xc, lse[s:e], cdtype).exp_()
            a = reference.bce_odds(p)
            _put(a, t[s:e] - cs, holds_c[s:e], -1.0)  # a_c = -1
            g = reference.bce_grad_off_argmax(xc, p, a, r[s:e], lse[s:e], log_aw[s:e], w_is_c[s:e])
            _put(g, w_loc[s:e], holds_w[s:e], g_w[s:e])
            g.mul_(own[s:e, None])
            del p
        else:
            g = torch.zeros((e - s, vl), dtype=cdtype, device=x.device)
        if extra is not None:
            g.add_(_p_and_class_terms(xc, lse[s:e], extra[s:e], None if per_class is None else per_class[s:e],
                                      w_loc_weight, cdtype))
        if cap:
            g.mul_(reference.softcap_slope(x[s:e], cap, cdtype))
        out[s:e] = g.masked_fill_(~keep[s:e, None], 0.0)  # ignored rows: 0 (their numbers are arbitrary)
        del g
    return out


# ----------------------------------------------------------------------------
# Autograd: the loss on local logits, and the head
# ----------------------------------------------------------------------------

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
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        x, weight, *fields = ctx.saved_tensors
        state = ctx.state_type(*fields)
        go = _row_grad_output(grad_loss, state.t, weight, ctx.cfg, state.stats.dtype)
        g = _grad(x, state, go, weight, ctx.plan, ctx.be, ctx.cfg)
        return g, None, None, None, None, None, None


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
    @torch.autograd.function.once_differentiable
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


__all__ = ["softmax_loss", "linear_softmax_loss", "Plan"]
