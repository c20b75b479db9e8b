"""Vocabulary-parallel losses: the classes of the logits split across the ranks of a process group.

Each rank holds ``local_logits (N, V_local)``, the classes ``[class_start, class_start + V_local)``
of every row, and the same global ``target (N,)``. A target-only loss (ce, nllr, crl, lace,
focal) depends on a row only through ``d = lse_ex - x_c`` (docs/losses.md, "Four numbers per
row"), and both numbers are sums over classes, so the split loss needs only per-row partial
statistics from each rank and two all-reduces of ``N`` floats (docs/parallel.md counts them):

* partial statistics: the rank's own fused forward kernel on its slice, with a local target
  (``c - class_start`` where the target lives on this rank, else the fake target ``K0``). Its
  ``stats[:, 1]`` is then the local ``lse_ex`` (the owner's competitors), its ``stats[:, 0]`` the
  local ``lse`` over every local class (another rank's target: every local class competes);
* combine: ``lse_ex = logsumexp_r(part_r)`` (all-reduce MAX, then SUM of ``exp(part_r - M)``),
  ``x_c`` by all-reduce SUM (0 from the ranks that do not own it), ``lse = logaddexp(lse_ex, x_c)``;
  the row loss is the reference's per-variant function of ``d`` (``reference.TARGET_ONLY_MATH``);
* finish with global statistics: the rank's own backward kernel on its slice, fed the global
  ``lse`` and ``lse_ex`` as its stats, writes the exact gradient of every local class. The backward
  needs no collective at all.

Where the kernel would misread (the fake target of a row whose target is elsewhere, the global
class count and weight total of label smoothing) the difference is fixed in ``O(N)`` or one
elementwise pass; each place says why.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import dispatch, reference, validation
from .variants import Reduction, Variant, reduction_id, variant_id

#: The local target of an ignored row. Local targets of kept rows lie in [0, V_local), so a
#: negative value never collides with one (the caller's ignore_index may be any int, even a
#: class id that is valid on some rank).
LOCAL_IGNORE = -1
#: The fake local target of a row whose target lives on another rank: any valid local class
#: would do (stats[:, 0], the local lse, does not depend on it); the backward fixes entry K0.
K0 = 0

_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


class Plan(NamedTuple):
    """Where this rank's classes sit, agreed by every rank of the group."""
    class_start: int
    num_classes: int   # V, the global number of classes
    world_size: int


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
        loss: ``"ce", "nllr", "crl", "lace", "focal"``; ``"bce"`` raises ``NotImplementedError``
            (its second reduction needs a kernel change, docs/parallel.md).
        group: the process group the classes are split over (None: the default group).
        class_start: the global id of this rank's first class. None: the ranks' slices follow
            rank order, sized by each rank's ``V_local`` (uneven splits allowed).
        num_classes: ``V``; needed only with ``validate=False`` (else derived from the ranks).
        weight: the **global** ``(V,)`` class weights, the same on every rank (each rank reads
            its own slice and the target's weight from it).
        validate: exchange one row of metadata per rank first (one all-gather of 10 int64s and
            a host synchronization) and raise the same ``ValueError`` on every rank when the
            slices do not tile ``[0, V)``, the row counts, dtypes, loss options or targets
            differ. ``False`` skips it (then ``class_start`` and ``num_classes`` are required
            and nothing is checked across ranks: a mismatch gives wrong results or a hang).

    Other keywords as :func:`fusedloss.softmax_loss` (label smoothing divides by the global
    ``V`` and uses the global weight total; z-loss and soft-capping per row as there).

    Collectives per call: forward one all-reduce MAX of ``N`` floats and one all-reduce SUM of
    ``2N`` floats (``3N`` with label smoothing), plus the validation all-gather; backward none.
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
    if validate:
        plan = _agree(local_logits, target, weight, class_start, cfg, error, group)
    else:
        plan = _unchecked_plan(class_start, num_classes, group)
    if weight is not None and weight.shape[0] != plan.num_classes:
        raise ValueError(f"weight must be the global ({plan.num_classes},) class weights; got {tuple(weight.shape)}")
    if local_logits.dim() == 1:
        out = _VocabParallelSoftmaxLoss.apply(local_logits[None, :], target.reshape(1), weight, plan, be, cfg, group)
        return out.reshape(())
    if local_logits.shape[1] > 1 and local_logits.stride(1) != 1:  # the kernels read rows of unit class stride
        local_logits = local_logits.contiguous()
    return _VocabParallelSoftmaxLoss.apply(local_logits, target, weight, plan, be, cfg, group)


# ----------------------------------------------------------------------------
# Arguments: local checks, then one exchange that every rank judges alike
# ----------------------------------------------------------------------------

def _unwrap_dtensors(local_logits, target, group, class_start):
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # a torch without DTensor: nothing to unwrap
        return local_logits, target, group, class_start
    if isinstance(target, DTensor):
        if not all(isinstance(p, Replicate) for p in target.placements):
            raise ValueError(f"a DTensor target must be replicated; got placements {target.placements}")
        target = target.to_local()
    if not isinstance(local_logits, DTensor):
        return local_logits, target, group, class_start
    mesh, placements = local_logits.device_mesh, local_logits.placements
    last = local_logits.dim() - 1
    if mesh.ndim != 1 or not isinstance(placements[0], Shard) or placements[0].dim not in (last, -1):
        raise ValueError("fusedloss.parallel needs logits sharded on the class (last) dimension over a 1-D "
                         f"mesh, Shard(-1); got placements {placements} on a {mesh.ndim}-D mesh")
    if group is not None or class_start is not None:
        raise ValueError("pass group and class_start only with a plain tensor; a DTensor carries its own")
    # DTensor's Shard splits like torch.chunk, contiguous in rank order: class_start=None derives it.
    return local_logits.to_local(), target, mesh.get_group(), None


def _check_local(x, target, loss, weight, ignore_index, reduction, eps, alpha, beta, gamma, z_loss, softcap,
                 backend) -> tuple[_Config, dispatch.Backend]:
    """Every check that needs only this rank's arguments (functional.py's, for 2-D logits)."""
    variant = variant_id(loss)
    red = reduction_id(reduction)
    cap = validation.check_z_loss_softcap(z_loss, softcap)
    validation.check_hyperparameters(alpha, beta, gamma, eps)
    ignore_index = validation.check_ignore_index(ignore_index)
    validation.check_logits(x)
    if x.dim() > 2:
        raise ValueError(f"local_logits must be (N, V_local) or (V_local,); got shape {tuple(x.shape)} "
                         "(reshape (B, T, V_local) to (B * T, V_local))")
    if isinstance(target, Tensor) and target.is_floating_point():
        raise NotImplementedError("class-probability (soft) targets are not implemented by fusedloss.parallel")
    validation.check_class_target(x, target)
    if weight is not None:
        if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.dim() != 1:
            raise TypeError("weight must be a floating 1-D tensor: the global (V,) class weights")
        if weight.device != x.device:
            raise ValueError(f"weight is on {weight.device} but logits are on {x.device}")
    if variant == Variant.BCE:
        raise NotImplementedError(
            "bce is not implemented by fusedloss.parallel: its second reduction (sum_k log(1 - p_k) and "
            "R = sum_{k != w} p_k / (1 - p_k)) needs the global lse and the global arg-max before a second "
            "pass over every slice, which the op kernels cannot run on a slice (docs/parallel.md)")
    be = dispatch.resolve(backend, x.device)
    return _Config(int(variant), int(red), ignore_index, float(eps), float(alpha), float(beta), float(gamma),
                   float(z_loss), cap), be


def _target_checksum(target: Tensor) -> Tensor:
    """An int64 fingerprint of the targets (position-weighted sum; wraps around alike on every rank)."""
    t = target.reshape(-1).long()
    pos = torch.arange(t.numel(), device=t.device) % 1009 + 1
    return (t * pos).sum()


def _agree(x, target, weight, class_start, cfg: _Config | None, error: Exception | None,
           group) -> Plan:
    """One all-gather of a metadata row per rank, then the same verdict on every rank: either the
    plan or the same ``ValueError`` (a rank whose own arguments failed re-raises its own error)."""
    world = dist.get_world_size(group)
    ok = error is None
    n = x.shape[0] if ok and x.dim() == 2 else 1
    row = [
        0 if ok else 1,
        n if ok else -1,
        (x.shape[-1] if ok else -1),
        -1 if class_start is None else int(class_start),
        _DTYPE_CODES.get(x.dtype, 0) if ok else -1,
        -1 if weight is None else int(weight.shape[0]),
        cfg.variant if ok else -1,
        cfg.reduction if ok else -1,
        cfg.ignore_index if ok else -1,
        0,
    ]
    meta = torch.tensor(row, dtype=torch.int64, device=x.device if isinstance(x, Tensor) else "cpu")
    if ok:
        meta[9] = _target_checksum(target)
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
    return Plan(starts[rank], total, world)


def _unchecked_plan(class_start, num_classes, group) -> Plan:
    if class_start is None or num_classes is None:
        raise ValueError("validate=False needs class_start and num_classes (nothing is exchanged to derive them)")
    return Plan(int(class_start), int(num_classes), dist.get_world_size(group))


# ----------------------------------------------------------------------------
# The loss: partial statistics, two all-reduces, the row loss; backward from global statistics
# ----------------------------------------------------------------------------

def _cap(x: Tensor, softcap: float) -> Tensor:
    return torch.tanh(x / softcap) * softcap if softcap else x


def _avoid_masked_fake_targets(x: Tensor, local_t: Tensor, absent: Tensor, cap: float) -> Tensor | None:
    """Move the fake target of a row owned elsewhere off a masked (-inf) logit, in place.

    The backward kernel gets ``lse_ex = d + x_k`` for the fake target ``k`` so that its
    ``lse_ex - x_k`` is the global ``d``; at ``x_k = -inf`` that is ``-inf - (-inf) = NaN``. Such rows
    take their local arg-max instead (a pass over those rows only), and a row whose whole slice is
    masked is left out of the kernels (its local gradient is 0 but for label smoothing's term,
    added outside them). Capped logits are finite (``-softcap``): nothing to do. Returns the rows
    whose slice is entirely masked, or None. The ``any()`` is a host synchronization (a no-op on
    the CPU; on a GPU it comes after the validation's own)."""
    if cap:
        return None
    bad = absent & (x[:, K0] == -math.inf)
    if not bool(bad.any()):
        return None
    rows = bad.nonzero()[:, 0]
    xa = x[rows]
    k = xa.argmax(1)
    dead = xa.gather(1, k[:, None])[:, 0] == -math.inf
    local_t[rows] = torch.where(dead, torch.full_like(k, LOCAL_IGNORE), k)
    masked = torch.zeros_like(absent)
    masked[rows] = dead
    return masked


class _VocabParallelSoftmaxLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor, weight: Tensor | None, plan: Plan, be: dispatch.Backend,
                cfg: _Config, group) -> Tensor:
        n, vl = x.shape
        cs, num_classes = plan.class_start, plan.num_classes
        cdtype = reference.compute_dtype(x)
        eps, cap = cfg.label_smoothing, cfg.softcap
        t = target.long()
        if validation.must_check_targets(x.device):
            validation.check_target_values(t, num_classes, cfg.ignore_index)
        keep = t != cfg.ignore_index
        owner = keep & (t >= cs) & (t < cs + vl)
        local_t = torch.where(owner, t - cs, torch.full_like(t, K0))
        local_t = torch.where(keep, local_t, torch.full_like(t, LOCAL_IGNORE))
        w_local = None if weight is None else weight[cs:cs + vl]

        masked = _avoid_masked_fake_targets(x, local_t, keep & ~owner, cap)
        # Partial statistics of the slice (the kernel's stats are of the capped logits).
        # Variant and options do not change stats[:, :2]: ce, no smoothing, the cheapest pass.
        _, stats, _ = be.fwd(x, local_t, None, int(Variant.CE), int(Reduction.NONE), LOCAL_IGNORE, 0.0,
                             cfg.alpha, cfg.beta, cfg.gamma, 0.0, cap, False)
        part = torch.where(owner, stats[:, 1], stats[:, 0]).to(cdtype)
        x_t = _cap(x.gather(1, local_t.clamp(min=0)[:, None])[:, 0].to(cdtype), cap)
        if masked is not None:  # every local class at -inf: the slice adds nothing to the row's sums
            part = torch.where(masked, torch.full_like(part, -math.inf), part)
            x_t = torch.where(masked, torch.zeros_like(x_t), x_t)
        zero = torch.zeros((), dtype=cdtype, device=x.device)
        # log-sum-exp over ranks: MAX, then SUM of exp(part - M) (each term <= 1, the max rank's is 1).
        m = part.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        shift = torch.where(torch.isfinite(m), m, zero)  # every class masked (-inf): exp gives 0, not NaN
        sums = [torch.exp(part - shift), torch.where(owner, x_t, zero)]
        if eps > 0:  # sum_k w_k x_k (capped) of the smoothing term, a sum over classes like the others
            xs = _cap(x.to(cdtype), cap)
            sums.append(xs.sum(1) if w_local is None else torch.mv(xs, w_local.to(cdtype)))
        buf = torch.stack(sums)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        lse_ex = shift + buf[0].log()
        x_c = buf[1]
        lse = torch.logaddexp(lse_ex, x_c)
        d = lse_ex - x_c
        # Ignored rows: neutral numbers (their loss and gradient are 0 by select below).
        lse = torch.where(keep, lse, zero)
        d = torch.where(keep, d, zero)

        h, log_s = reference.TARGET_ONLY_MATH[Variant(cfg.variant)](d, reference.Params(cfg.alpha, cfg.beta, cfg.gamma))
        safe_t = torch.where(keep, t, torch.zeros_like(t))
        w_c = torch.ones((), dtype=cdtype, device=x.device) if weight is None else weight.to(cdtype)[safe_t]
        scale = torch.where(keep, w_c, zero)
        per_row = (1 - eps) * h if eps > 0 else h
        if cfg.z_loss:
            per_row = per_row + cfg.z_loss * lse.square()
        loss_rows = torch.where(scale == 0, torch.zeros_like(per_row), per_row * scale)
        w_total = float(num_classes) if weight is None else weight.to(cdtype).sum()
        if eps > 0:
            smooth = (eps / num_classes) * (w_total * lse - buf[2])
            loss_rows = loss_rows + torch.where(keep, smooth, zero)
        if cfg.reduction == Reduction.NONE:
            out = loss_rows
        else:
            out = loss_rows.sum()
            if cfg.reduction == Reduction.MEAN:
                out = out / reference.mean_denominator(t, weight, cfg.ignore_index, cdtype)

        # Global statistics for the backward kernel. A row whose target is on another rank is
        # read by the kernel at the fake target K0: lse_ex = d + x_K0 makes its d = lse_ex - x_K0
        # the global d, so its s, and every entry j != K0, are exact (entry K0 is fixed in backward).
        stats_g = torch.zeros((n, 4), dtype=cdtype, device=x.device)
        stats_g[:, 0] = lse
        stats_g[:, 1] = torch.where(owner, lse_ex, torch.where(keep & (local_t >= 0), d + x_t, zero))
        ctx.save_for_backward(x, t, local_t, weight, stats_g, log_s, x_t)
        ctx.plan, ctx.be, ctx.cfg, ctx.w_total = plan, be, cfg, w_total
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        x, t, local_t, weight, stats_g, log_s, x_t = ctx.saved_tensors
        cfg, be, plan = ctx.cfg, ctx.be, ctx.plan
        n, vl = x.shape
        cs = plan.class_start
        cdtype = stats_g.dtype
        eps, cap, z = cfg.label_smoothing, cfg.softcap, cfg.z_loss
        keep = t != cfg.ignore_index
        zero = torch.zeros((), dtype=cdtype, device=x.device)
        go = grad_loss.to(cdtype).expand(n) if grad_loss.dim() == 0 else grad_loss.to(cdtype)
        if cfg.reduction == Reduction.MEAN:
            go = go / reference.mean_denominator(t, weight, cfg.ignore_index, cdtype)
        go = torch.where(keep, go, zero)
        safe_t = torch.where(keep, t, torch.zeros_like(t))
        w_c = torch.ones((), dtype=cdtype, device=x.device) if weight is None else weight.to(cdtype)[safe_t]
        rs = torch.where(keep, w_c * go, zero)   # w_c go, the row's own scale
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
            idx = local_t.clamp(min=0)[:, None]
            log_p = x_t - lse
            val = torch.exp(log_p + log_s) * go_k
            if z_k:
                val = val + torch.exp(log_p) * (2 * z_k * lse * go_k)
            if cap:
                val = val * reference.softcap_slope(x.gather(1, idx)[:, 0], cap, cdtype)
            g.scatter_(1, idx, torch.where(absent, val.to(g.dtype), g.gather(1, idx)[:, 0])[:, None])
        else:
            g = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
        if eps > 0:
            # (eps / V) go (W p_j - w_j) with the global V and W (and 2 z lse w_c go p_j when
            # eps = 1 left the kernel out): one elementwise pass over the slice.
            per_class = (eps / plan.num_classes) * go
            extra = per_class * ctx.w_total
            if eps >= 1 and z:
                extra = extra + 2 * z * lse * rs
            xc = _cap(x.to(cdtype), cap)
            add = torch.exp(xc - lse[:, None]).mul_(extra[:, None])
            w_loc = (torch.ones((vl,), dtype=cdtype, device=x.device) if weight is None
                     else weight[cs:cs + vl].to(cdtype))
            add.sub_(per_class[:, None] * w_loc[None, :])
            if cap:
                add.mul_(reference.softcap_slope(x, cap, cdtype))
            g = (g.to(cdtype) + add).to(x.dtype)
        return g, None, None, None, None, None, None


__all__ = ["softmax_loss", "Plan"]
