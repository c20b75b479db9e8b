"""The one table of loss variants and reductions.

Every backend identifies a variant by its integer id (a kernel ``constexpr`` /
C++ ``switch``), so the ids here are part of the op ABI: append, never renumber.
The per-variant math lives in one function per language: ``reference.py``
(PyTorch), ``csrc/losses.h`` (C++/CUDA) and ``triton_kernels`` (Triton).
"""
from __future__ import annotations

from enum import IntEnum


class Variant(IntEnum):
    CE = 0      # -log p_c
    BCE = 1     # -log p_c - sum_{k != c} log(1 - p_k)
    NLLR = 2    # log(1 - p_c) - log p_c
    CRL = 3     # beta * log(alpha + 1 - p_c) - log p_c
    LACE = 4    # -(1 - p_c) * log p_c
    FOCAL = 5   # -(1 - p_c)^gamma * log p_c


class Reduction(IntEnum):
    NONE = 0
    MEAN = 1
    SUM = 2


#: Public short names, in id order.
LOSSES: tuple[str, ...] = tuple(v.name.lower() for v in Variant)

#: Width of the per-row statistics tensor every backend's forward returns.
#: Columns 0 and 1 are ``lse`` and ``lse_ex`` (log-sum-exp over all classes and
#: over the competitors of the target); columns 2 and 3 are backend-private
#: (``bce`` keeps its arg-max and ``log(1 - p_w)`` there).
STATS_COLS = 4

LOSS_FORMULAS: dict[str, str] = {
    "ce": "-log p_c",
    "bce": "-log p_c - sum_{k!=c} log(1 - p_k)",
    "nllr": "log(1 - p_c) - log p_c",
    "crl": "beta * log(alpha + 1 - p_c) - log p_c",
    "lace": "-(1 - p_c) * log p_c",
    "focal": "-(1 - p_c)^gamma * log p_c",
}


def variant_id(loss: str) -> Variant:
    """Map a public loss name to its :class:`Variant`, with a clear error."""
    if not isinstance(loss, str) or loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}; got {loss!r}")
    return Variant[loss.upper()]


def reduction_id(reduction: str) -> Reduction:
    if not isinstance(reduction, str) or reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum'; got {reduction!r}")
    return Reduction[reduction.upper()]
