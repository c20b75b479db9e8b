"""Ahead-of-time compilation of the shipped kernel specializations, without a GPU: the driver.
Each form's ``aot_specs.py`` gives its kernels' configurations, signatures and spec lists (FORMS).

``triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", cc, 32))``
runs the whole pipeline down to a cubin (Triton's bundled ``ptxas``); the resource
usage then comes from the bundled ``cuobjdump -res-usage`` (registers, local memory:
LOCAL > 0 means spills) and ``ptxas -v`` on the PTX (spill store/load bytes).

A specialization is (kernel, variant, logits dtype, heuristic config, flags). The
flags that change the compiled code are HAS_WEIGHT, COMPUTE_GRAD and the options
HAS_SMOOTHING, HAS_ZLOSS and SOFTCAP; ``one_target/aot_specs.shipped_specs`` enumerates, for every
variant, dtype and config bucket the heuristic can return, the heaviest flags (gradient,
weight and all three options), whose register pressure bounds the lighter ones;
``full=True`` also enumerates weight x gradient x {no option, all options}.
"""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fusedloss.variants import Variant

from .heuristics import Config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ARCHS = (80, 90)

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


@dataclass(frozen=True)
class Spec:
    kernel: str               # a kernel of one form's KERNELS ("fwd", "soft_fwd", "mix_bwd", ...)
    variant: int              # Variant id (BCE selects the bce kernels)
    dtype: str                # key of DTYPES
    n_cols: int               # a C the heuristic maps to this config
    has_weight: bool = True
    smoothing: bool = False
    compute_grad: bool = True
    z_loss: bool = False
    softcap: bool = False
    go_per_row: bool = False
    row_align: int | None = None   # None: gcd(C, 16), as a contiguous (N, C) launch

    @property
    def align(self) -> int:
        import math
        return self.row_align if self.row_align is not None else math.gcd(int(self.n_cols), 16)

    @property
    def dtype_size(self) -> int:
        return DTYPES[self.dtype].itemsize

    @property
    def config(self) -> Config:
        """The launcher's configuration (its form's ``config``)."""
        return form_of(self.kernel).config(self)

    def label(self) -> str:
        v = Variant(self.variant).name.lower()
        c = self.config
        flags = "".join(f for f, on in (("W", self.has_weight), ("S", self.smoothing), ("Z", self.z_loss),
                                        ("K", self.softcap), ("G", self.compute_grad)) if on)
        return (f"{self.kernel}:{v}:{self.dtype}:C{self.n_cols}:{c.block_n}x{c.block_c}"
                f"{'' if c.single else 's'}:w{c.num_warps}:{flags or '-'}")


@dataclass
class Usage:
    spec: Spec
    arch: int
    registers: int
    spill_stores: int
    spill_loads: int
    local_bytes: int
    stack_bytes: int
    shared_bytes: int
    extra: dict = field(default_factory=dict)

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads + self.local_bytes


_TL = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def pointer_type(dtype: str) -> str:
    """The signature type of a logits pointer of ``dtype`` (a key of DTYPES)."""
    return "*" + _TL[DTYPES[dtype]]


#: The target forms whose kernels the driver compiles. Each ``<form>/aot_specs.py`` names its
#: ``KERNELS`` (values of ``Spec.kernel``) and gives ``config(spec)`` (the launcher's choice),
#: ``signature(spec)`` (kernel fn, argument types, constexprs), optionally ``num_warps(spec)``
#: (default: the config's), and ``ci_specs()``, the specializations the test suite compiles.
FORMS = ("one_target", "probs", "two_targets", "split_vocab", "distill")


@lru_cache(maxsize=None)
def form_of(kernel: str):
    """The ``aot_specs`` module of the form whose kernel is ``kernel``."""
    for form in FORMS:
        mod = importlib.import_module(f".{form}.aot_specs", __package__)
        if kernel in mod.KERNELS:
            return mod
    raise KeyError(f"no form has a kernel {kernel!r} (aot.FORMS: {FORMS})")


def _signature(spec):
    """(kernel fn, signature, constexprs, attrs) for ``spec``: its form's types and constexprs,
    and the divisibility hints Triton's launcher would specialize."""
    fn, sig, const = form_of(spec.kernel).signature(spec)
    for k in const:
        sig[k] = "constexpr"
    names = fn.arg_names
    # What Triton's launcher specializes at run time: 16-byte aligned pointers, and ints
    # divisible by 16 (a contiguous (N, C) launch: strides = C; N assumed a multiple of 16).
    div16 = [k for k, v in sig.items() if v.startswith("*")]
    if spec.align == 16:
        div16 += [k for k in ("stride_x", "stride_y", "stride_g", "n_cols") if k in sig]
    div16 += [k for k in ("n_rows",) if k in sig]
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in div16}
    return fn, sig, const, attrs




def _num_warps(spec) -> int:
    form = form_of(spec.kernel)
    return form.num_warps(spec) if hasattr(form, "num_warps") else spec.config.num_warps


def compile_spec(spec, arch: int):
    fn, sig, const, attrs = _signature(spec)
    src = ASTSource(fn, sig, const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": _num_warps(spec)})


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _run(args) -> str:
    p = subprocess.run(args, check=True, capture_output=True, text=True)
    return p.stdout + p.stderr


def resource_usage(spec, arch: int) -> Usage:
    """Compile ``spec`` for sm_<arch> and read its registers and spills."""
    # keyed on the config too: a Spec's config follows the heuristics (tests override them)
    return _resource_usage_cached(spec, spec.config, arch)


@lru_cache(maxsize=None)
def _resource_usage_cached(spec, config, arch: int) -> Usage:
    ck = compile_spec(spec, arch)
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        ptx = os.path.join(d, "k.ptx")
        with open(cubin, "wb") as f:
            f.write(ck.asm["cubin"])
        with open(ptx, "w") as f:
            f.write(ck.asm["ptx"])
        res = _run([os.path.join(_BIN, "cuobjdump"), "-res-usage", cubin])
        m = _RES.search(res)
        if m is None:
            raise RuntimeError(f"cannot parse cuobjdump -res-usage output:\n{res}")
        reg, stack, shared, local = map(int, m.groups())
        ptxas_arch = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        pv = _run([os.path.join(_BIN, "ptxas"), "-v", f"-arch={ptxas_arch}", ptx, "-o", os.path.join(d, "o.cubin")])
        stores = loads = 0
        for a, b in _SPILL.findall(pv):
            stores += int(a)
            loads += int(b)
    return Usage(spec, arch, reg, stores, loads, local, stack, shared)


def _dedup(specs: list[Spec]) -> list[Spec]:
    """Drop specs that compile to the same kernel (same config and flags)."""
    seen, out = set(), []
    for s in specs:
        key = (s.kernel, s.variant if s.kernel in ("fwd", "bwd") else 0, s.dtype, s.config, s.has_weight,
               s.smoothing, s.z_loss, s.softcap, s.compute_grad, s.go_per_row)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def _heaviest(kernel: str, v: Variant, dt: str, c: int) -> Spec:
    return Spec(kernel, int(v), dt, c, has_weight=True, smoothing=True, z_loss=True, softcap=True, compute_grad=True)


def _heaviest_plain(kernel: str, v: Variant, dt: str, c: int) -> Spec:
    """The heaviest flags without z-loss and soft cap (label smoothing for ce only): the
    kernels as they were before the options."""
    return Spec(kernel, int(v), dt, c, has_weight=True, smoothing=v == Variant.CE, compute_grad=True)


def as_row(u: Usage) -> dict:
    d = asdict(u.spec)
    d.update(label=u.spec.label(), arch=f"sm_{u.arch}", registers=u.registers, spill_stores=u.spill_stores,
             spill_loads=u.spill_loads, local=u.local_bytes, stack=u.stack_bytes, shared=u.shared_bytes)
    return d
