"""The arguments of a vocabulary-parallel call: the checks each rank makes alone, then one exchange
that every rank judges alike (:func:`_agree`) into the :class:`Plan`; DTensor arguments unwrapped."""
from __future__ import annotations

import math
import struct
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import dispatch, validation
from ..head import check_chunk_rows, check_linear_inputs, check_loss_options
from ..variants import Variant


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
