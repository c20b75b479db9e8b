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
  has them (``ops.SplitVocabOps``: the C++ CPU kernels, and Triton's), else by the
  reference's bce per-element functions on the slice, in blocks of rows.

Where a kernel would misread (the fake target of a row whose target is elsewhere, the global
class count and weight total of label smoothing) the difference is fixed in ``O(N)`` or one
elementwise pass; each place says why.

:func:`linear_softmax_loss` is the LLM head with its weight split by rows (a column-parallel
output projection): ``head.run_blocks`` computes one block of rows of the local logits at a time,
the block's loss as above (its collectives per block), and folds the block's local gradient into
``d hidden``, ``d weight``, ``d bias``; ``d hidden`` is all-reduced over the ranks in the backward.

Modules: ``plan`` (each rank's checks, the one exchange that agrees on the :class:`Plan`, DTensor
arguments), ``loss`` (:func:`softmax_loss`: the rows of a call and the autograd Function),
``target_only`` and ``bce`` (each family's rounds and gradient), ``terms`` (the per-row pieces both
share: weights, label smoothing, z-loss), ``smoothing`` (label smoothing's expected term for the
losses other than ce), ``head`` (:func:`linear_softmax_loss`).
"""
from .distill import distill_loss, linear_distill_loss
from .head import linear_softmax_loss
from .loss import softmax_loss
from .plan import BCE_MAX_CLASSES_FP32, K0, LOCAL_IGNORE, Plan  # noqa: F401  (the module's constants, as before)

__all__ = ["softmax_loss", "linear_softmax_loss", "distill_loss", "linear_distill_loss", "Plan"]
