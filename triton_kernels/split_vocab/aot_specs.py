"""Ahead-of-time compilation of the vocabulary-parallel bce kernels (bce_parallel_kernels.py) for
sm_80 / sm_90 without a GPU, as aot.py does for the other kernels: Triton's whole pipeline to a
cubin, then the bundled ``cuobjdump -res-usage`` (registers, LOCAL) and ``ptxas -v`` (spill bytes).

A specialization is (kernel, logits dtype, C, options): the launch configuration is
launch_bce_parallel's (``heuristics.bwd_config`` of bce), the flags SOFTCAP (both kernels) and
HAS_ZLOSS (the gradient).
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .. import aot
from ..heuristics import bwd_buckets, bwd_config
from . import kernels as bk
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
        return bwd_config(self.n_cols, aot.DTYPES[self.dtype].itemsize, FAMILY)

    @property
    def align(self) -> int:
        return math.gcd(int(self.n_cols), 16)

    def label(self) -> str:
        c = self.config
        opts = "ZK" if self.options else "-"
        return f"{self.kernel}:{self.dtype}:C{self.n_cols}:{c.block_n}x{c.block_c}:w{c.num_warps}:{opts}"


def _signature(spec: Spec):
    xt = "*" + {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}[spec.dtype]
    cfg = spec.config
    const = dict(SOFTCAP=spec.options, BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c, ROW_ALIGN=spec.align)
    if spec.kernel == "bce_partial":
        fn = bk.bce_partial_kernel
        sig = {"X": xt, "stride_x": "i32", "STATS": "*fp32", "IDX": "*i64", "OUT": "*fp32", "n_rows": "i32",
               "n_cols": "i32", "softcap": "fp32", "softcap_k": "fp32"}
    else:
        fn = bk.bce_global_bwd_kernel
        sig = {"GO": "*fp32", "X": xt, "stride_x": "i32", "STATS": "*fp32", "IDX": "*i64", "G": xt,
               "stride_g": "i32", "n_rows": "i32", "n_cols": "i32", "z_loss": "fp32", "softcap": "fp32",
               "softcap_k": "fp32"}
        const.update(HAS_ZLOSS=spec.options)
    for k in const:
        sig[k] = "constexpr"
    names = fn.arg_names
    div16 = [k for k, v in sig.items() if v.startswith("*")] + ["n_rows"]
    if spec.align == 16:
        div16 += [k for k in ("stride_x", "stride_g", "n_cols") if k in sig]
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in div16}
    return fn, sig, const, attrs


def compile_spec(spec: Spec, arch: int):
    fn, sig, const, attrs = _signature(spec)
    return triton.compile(ASTSource(fn, sig, const, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": spec.config.num_warps})


def resource_usage(spec: Spec, arch: int) -> aot.Usage:
    return _usage(spec, spec.config, arch)


@lru_cache(maxsize=None)
def _usage(spec: Spec, config, arch: int) -> aot.Usage:
    ck = compile_spec(spec, arch)
    with tempfile.TemporaryDirectory() as d:
        cubin, ptx = os.path.join(d, "k.cubin"), os.path.join(d, "k.ptx")
        with open(cubin, "wb") as f:
            f.write(ck.asm["cubin"])
        with open(ptx, "w") as f:
            f.write(ck.asm["ptx"])
        m = aot._RES.search(aot._run([os.path.join(aot._BIN, "cuobjdump"), "-res-usage", cubin]))
        reg, stack, shared, local = map(int, m.groups())
        ptxas_arch = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        pv = aot._run([os.path.join(aot._BIN, "ptxas"), "-v", f"-arch={ptxas_arch}", ptx, "-o",
                       os.path.join(d, "o.cubin")])
        stores = sum(int(a) for a, _ in aot._SPILL.findall(pv))
        loads = sum(int(b) for _, b in aot._SPILL.findall(pv))
    return aot.Usage(spec, arch, reg, stores, loads, local, stack, shared)


def ci_specs() -> list[Spec]:
    """Both kernels, fp32 and bf16, every C bucket of the launch heuristic (several rows per
    program up to one streamed 2048-column block), with and without the options."""
    return [Spec(k, dt, c, o) for k in KERNELS for dt in ("fp32", "bf16") for c in bwd_buckets(FAMILY)
            for o in (False, True)]
