"""AOT specializations of mixup's two-target kernels (two_targets/kernels.py): their signature
for ``aot.py``'s compile driver and the subset the test suite compiles."""
from __future__ import annotations

from dataclasses import replace

from fusedloss.variants import Variant

from ..aot import Spec, _heaviest, _heaviest_plain
from ..heuristics import Config, bwd_buckets, bwd_config, fwd_buckets
from ..one_target import aot_specs as one_target
from . import kernels
from .launch import fwd_config


#: The kernels of this form (``Spec.kernel``; kernels.py), launched by launch.py.
KERNELS = ("mix_fwd", "mix_bwd")


def config(spec: Spec) -> Config:
    """launch.py's configurations: the one-target kernels' (bce's streamed forward: 8 warps)."""
    return (fwd_config if spec.kernel == "mix_fwd" else bwd_config)(spec.n_cols, spec.dtype_size, spec.variant)


def signature(spec: Spec):
    """(kernel fn, signature, constexprs) of a two-target kernel: the one-target kernel's argument
    types by name, plus the second target, lam (float32), part b's denominator and the total's
    reduction."""
    _, sig, const = one_target.signature(replace(spec, kernel=spec.kernel[len("mix_"):]))
    fwd = spec.kernel == "mix_fwd"
    if spec.variant == Variant.BCE:
        fn = kernels.bce_mix_fwd_kernel if fwd else kernels.bce_mix_bwd_kernel
    else:
        fn = kernels.mix_fwd_kernel if fwd else kernels.mix_bwd_kernel
    types = dict(sig, **dict.fromkeys(const, "constexpr"), TA=sig["T"], TB=sig["T"], LAM="*fp32",
                 DENOM_A=sig["DENOM"], DENOM_B=sig["DENOM"], total_reduction="i32")
    return fn, {k: types[k] for k in fn.arg_names}, const


def ci_specs() -> list[Spec]:
    """The two-target kernels at their heaviest flags (weight, gradient, smoothing, z-loss, soft cap),
    per variant (bce's own kernel pair included): the forward's widest on-chip tile and its streamed
    configuration in bf16 and fp32, C = 1000 in bf16, the backward's widest tile in bf16 and fp32
    (ci_specs' choice; ``_dedup`` is not used: it keys the variant on the one-target kernels' names).

    bce's streamed forward (1x2048 blocks, three passes per row) also at the plain flags (weight,
    gradient), which spilled before: with the one-target bce's 4 warps ptxas capped it at 168
    registers and spilled 28-44 bytes in bf16 or fp32 on sm_80 or sm_90 (fp32 all options:
    44/40 B on sm_80, 28/24 B on sm_90). It now runs 8 warps (``launch.fwd_config``) and forms
    the targets' row terms after pass 2: 80-126 registers, no spills (docs/triton.md, "Registers",
    for what else was measured)."""
    specs = []
    for v in Variant:
        fb = fwd_buckets(v)
        for dt in ("bf16", "fp32"):
            specs += [_heaviest("mix_fwd", v, dt, fb[-1]), _heaviest("mix_fwd", v, dt, fb[-2]),
                      _heaviest("mix_bwd", v, dt, bwd_buckets(v)[-1])]
            if v == Variant.BCE:
                specs.append(_heaviest_plain("mix_fwd", v, dt, fb[-1]))
        specs.append(_heaviest("mix_fwd", v, "bf16", 1000))
    return specs
