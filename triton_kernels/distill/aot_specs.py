"""AOT specializations of the distillation kernel (distill/kernels.py), compiled for sm_80 / sm_90
without a GPU by ``aot.py``'s driver (``aot.compile_spec``, ``aot.resource_usage``).

A specialization is (divergence, logits dtype, C, COMPUTE_GRAD, ACCUMULATE): the launch
configuration is launch.py's (``launch.config``: bce's family of ``heuristics.fwd_config``, 8 warps
streamed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .. import aot
from ..heuristics import fwd_buckets
from . import kernels
from .launch import FAMILY, config as launch_config

KERNELS = ("distill",)
DIVERGENCE_NAMES = ("kl", "reverse_kl", "jsd")


@dataclass(frozen=True)
class Spec:
    kernel: str            # "distill"
    divergence: int        # fusedloss.distill.ops.DIVERGENCES
    dtype: str             # key of aot.DTYPES
    n_cols: int
    compute_grad: bool = True
    accumulate: bool = True

    @property
    def config(self):
        return config(self)

    @property
    def align(self) -> int:
        return math.gcd(int(self.n_cols), 16)

    def label(self) -> str:
        c = self.config
        flags = "".join(f for f, on in (("G", self.compute_grad), ("A", self.accumulate)) if on) or "-"
        return (f"{self.kernel}:{DIVERGENCE_NAMES[self.divergence]}:{self.dtype}:C{self.n_cols}:"
                f"{c.block_n}x{c.block_c}{'' if c.single else 's'}:w{c.num_warps}:{flags}")


def config(spec: Spec):
    """launch.py's configuration."""
    return launch_config(spec.n_cols, aot.DTYPES[spec.dtype].itemsize)


def signature(spec: Spec):
    xt = aot.pointer_type(spec.dtype)
    cfg = spec.config
    sig = {"S": xt, "stride_x": "i32", "Tt": xt, "stride_y": "i32", "RS": "*fp32", "D": "*fp32", "G": xt,
           "stride_g": "i32", "n_rows": "i32", "n_cols": "i32", "t_inv": "fp32", "temperature": "fp32",
           "t2": "fp32", "beta": "fp32", "omb": "fp32", "coef": "fp32"}
    const = dict(DIV=spec.divergence, COMPUTE_GRAD=spec.compute_grad,
                 ACCUMULATE=spec.accumulate and spec.compute_grad, SINGLE=cfg.single, BLOCK_N=cfg.block_n,
                 BLOCK_C=cfg.block_c, ROW_ALIGN=spec.align, NUM_STAGES=cfg.num_stages)
    return kernels.distill_kernel, sig, const


def all_specs() -> list[Spec]:
    """Every configuration bucket of the launcher (C = 16 ... 2048 on chip, streamed), each
    divergence, fp32/bf16/fp16, with the accumulated gradient (the heaviest flags) and without a
    gradient: what ``report``-style sweeps compile."""
    return [Spec("distill", div, dt, c, grad, grad) for div in range(3) for dt in ("fp32", "bf16", "fp16")
            for c in fwd_buckets(FAMILY) for grad in (True, False)]


def ci_specs() -> list[Spec]:
    """The subset the test suite compiles: per divergence, the widest on-chip tile (2048 classes)
    and the streamed configuration in bf16 and fp32 with the accumulated gradient, C = 1000 bf16,
    and jsd streamed without a gradient (its middle pass alone)."""
    fb = fwd_buckets(FAMILY)
    specs = [Spec("distill", div, dt, c) for div in range(3) for dt in ("bf16", "fp32") for c in fb[-2:]]
    specs += [Spec("distill", div, "bf16", 1000) for div in range(3)]
    specs.append(Spec("distill", 2, "bf16", fb[-1], compute_grad=False, accumulate=False))
    return specs
