"""AOT specializations of the vocabulary-parallel bce kernels (split_vocab/kernels.py), compiled for
sm_80 / sm_90 without a GPU by ``aot.py``'s driver (``aot.compile_spec``, ``aot.resource_usage``).

A specialization is (kernel, logits dtype, C, options): the launch configuration is launch.py's
(``heuristics.bwd_config`` of bce), the flags SOFTCAP (both kernels) and HAS_ZLOSS (the gradient).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .. import aot
from ..heuristics import bwd_buckets, bwd_config
from . import kernels
from .launch import FAMILY

KERNELS = ("bce_partial", "bce_global_bwd")


@dataclass(frozen=True)
class Spec:
    kernel: str        # one of KERNELS
    dtype: str         # key of aot.DTYPES
    n_cols: int
    options: bool      # SOFTCAP (and HAS_ZLOSS for the gradient) on

    @property
    def config(self):
        return config(self)

    @property
    def align(self) -> int:
        return math.gcd(int(self.n_cols), 16)

    def label(self) -> str:
        c = self.config
        opts = "ZK" if self.options else "-"
        return f"{self.kernel}:{self.dtype}:C{self.n_cols}:{c.block_n}x{c.block_c}:w{c.num_warps}:{opts}"


def config(spec: Spec):
    """launch.py's configuration: ``heuristics.bwd_config`` of bce."""
    return bwd_config(spec.n_cols, aot.DTYPES[spec.dtype].itemsize, FAMILY)


def signature(spec: Spec):
    xt = aot.pointer_type(spec.dtype)
    cfg = spec.config
    const = dict(SOFTCAP=spec.options, BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c, ROW_ALIGN=spec.align)
    if spec.kernel == "bce_partial":
        fn = kernels.bce_partial_kernel
        sig = {"X": xt, "stride_x": "i32", "STATS": "*fp32", "IDX": "*i64", "OUT": "*fp32", "n_rows": "i32",
               "n_cols": "i32", "softcap": "fp32", "softcap_k": "fp32"}
    else:
        fn = kernels.bce_global_bwd_kernel
        sig = {"GO": "*fp32", "X": xt, "stride_x": "i32", "STATS": "*fp32", "IDX": "*i64", "G": xt,
               "stride_g": "i32", "n_rows": "i32", "n_cols": "i32", "z_loss": "fp32", "softcap": "fp32",
               "softcap_k": "fp32"}
        const.update(HAS_ZLOSS=spec.options)
    return fn, sig, const


def ci_specs() -> list[Spec]:
    """Both kernels, fp32 and bf16, every C bucket of the launch heuristic (several rows per
    program up to one streamed 2048-column block), with and without the options."""
    return [Spec(k, dt, c, o) for k in KERNELS for dt in ("fp32", "bf16") for c in bwd_buckets(FAMILY)
            for o in (False, True)]
