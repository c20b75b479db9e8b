"""AOT specializations of the one-target kernels (one_target/kernels.py): every shipped one
(:func:`shipped_specs`, ``report --all``) and the subset the test suite compiles (:func:`ci_specs`).
The compile driver and ``Spec`` are ``aot.py``'s."""
from __future__ import annotations

from fusedloss.variants import Variant

from .. import rows
from ..aot import DTYPES, Spec, _dedup, _heaviest, _heaviest_plain, pointer_type
from ..heuristics import Config, bwd_buckets, bwd_config, fwd_buckets, fwd_config, scale_config
from ..launch_common import PARTIAL_BLOCK, PROLOGUE_BLOCK
from . import kernels

#: The kernels of this form (``Spec.kernel``): the forward and backward of the target-only
#: variants and of bce (``Spec.variant`` picks), the backward scale and the prologue.
KERNELS = ("fwd", "bwd", "scale", "prologue")


def config(spec: Spec) -> Config:
    """The launch configuration of ``spec`` (launch.py's choice)."""
    es = DTYPES[spec.dtype].itemsize
    if spec.kernel == "fwd":
        return fwd_config(spec.n_cols, es, spec.variant)
    if spec.kernel == "bwd":
        return bwd_config(spec.n_cols, es, spec.variant)
    return scale_config(spec.n_cols)


def num_warps(spec: Spec) -> int:
    return 4 if spec.kernel == "prologue" else spec.config.num_warps


def signature(spec: Spec):
    """(kernel fn, signature, constexprs) for ``spec``: types as a launch from ``launch.py``
    with int64 targets, float32 weights and 16-byte aligned tensors."""
    xt = pointer_type(spec.dtype)
    cfg = spec.config
    bce = spec.variant == Variant.BCE
    if spec.kernel == "fwd":
        fn = kernels.bce_fwd_kernel if bce else kernels.target_fwd_kernel
        sig = {"X": xt, "stride_x": "i32", "T": "*i64", "W": "*fp32", "LOSS": "*fp32", "STATS": "*fp32",
               "G": xt, "stride_g": "i32", "DENOM": "*fp32", "PARTIAL": "*fp32", "COUNTER": "*i32",
               "n_rows": "i32", "n_cols": "i32", "ignore_index": "i32"}
        sig.update(_option_signature(bce))
        sig.update({"reduction": "i32", "n_denom": "i32"})
        const = dict(HAS_WEIGHT=spec.has_weight, COMPUTE_GRAD=spec.compute_grad, SINGLE=cfg.single,
                     BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c, PARTIAL_BLOCK=PARTIAL_BLOCK, ROW_ALIGN=spec.align,
                     NUM_STAGES=cfg.num_stages, **_option_constexprs(spec))
        if not bce:
            const.update(VARIANT=spec.variant)
    elif spec.kernel == "bwd":
        fn = kernels.bce_bwd_kernel if bce else kernels.target_bwd_kernel
        sig = {"GO": "*fp32", "X": xt, "stride_x": "i32", "T": "*i64", "W": "*fp32", "STATS": "*fp32", "G": xt,
               "stride_g": "i32", "DENOM": "*fp32", "n_rows": "i32", "n_cols": "i32", "ignore_index": "i32"}
        sig.update(_option_signature(bce))
        sig.update({"reduction": "i32", "n_denom": "i32"})
        const = dict(HAS_WEIGHT=spec.has_weight, GO_PER_ROW=spec.go_per_row, BLOCK_N=cfg.block_n,
                     BLOCK_C=cfg.block_c, ROW_ALIGN=spec.align, **_option_constexprs(spec))
        if not bce:
            const.update(VARIANT=spec.variant)
    elif spec.kernel == "scale":
        fn = rows.scale_grad_kernel
        sig = {"G": xt, "stride_g": "i32", "GO": "*fp32", "n_rows": "i32", "n_cols": "i32"}
        const = dict(GO_PER_ROW=spec.go_per_row, BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c)
    else:
        fn = rows.prologue_kernel
        sig = {"T": "*i64", "W": "*fp32", "DENOM": "*fp32", "COUNTER": "*i32", "n_rows": "i32", "n_cols": "i32",
               "ignore_index": "i32", "rows_per_program": "i32"}
        const = dict(NEED_DENOM=True, HAS_WEIGHT=spec.has_weight, BLOCK=PROLOGUE_BLOCK)
    return fn, sig, const


def _option_signature(bce: bool) -> dict:
    """The float arguments between ignore_index and reduction (launch._option_scalars)."""
    sig = {"smooth_own": "fp32", "smooth_class": "fp32"}
    if not bce:
        sig.update({"alpha": "fp32", "beta": "fp32", "gamma": "fp32"})
    sig.update({"z_loss": "fp32", "softcap": "fp32", "softcap_k": "fp32"})
    return sig


def _option_constexprs(spec: Spec) -> dict:
    return dict(HAS_SMOOTHING=spec.smoothing, HAS_ZLOSS=spec.z_loss, SOFTCAP=spec.softcap)


def shipped_specs(full: bool = False) -> list[Spec]:
    """Every (kernel, variant, dtype, config bucket) the launchers can pick, at its
    heaviest flags (``full``: the forward also at weight x gradient x {no option, all options})."""
    specs = []
    for dt in DTYPES:
        for v in Variant:
            for c in fwd_buckets(v):
                if full:
                    for w in (False, True):
                        for opt in (False, True):
                            for g in (False, True):
                                specs.append(Spec("fwd", int(v), dt, c, has_weight=w, smoothing=opt, z_loss=opt,
                                                  softcap=opt, compute_grad=g))
                else:
                    specs.append(_heaviest("fwd", v, dt, c))
            for c in bwd_buckets(v):
                specs.append(_heaviest("bwd", v, dt, c))
        for c in bwd_buckets(Variant.CE):
            specs.append(Spec("scale", 0, dt, c, go_per_row=True))
    specs.append(Spec("prologue", 0, "fp32", 1))
    return _dedup(specs)


def ci_specs() -> list[Spec]:
    """The subset the test suite compiles for both architectures (the full set takes
    ~10 minutes on two cores; ``report --all`` runs it): per variant the register-
    heaviest configurations -- the widest on-chip tile and the streamed one in bf16 and
    fp32, the widest on-chip tile in fp16, ImageNet's C = 1000 -- plus the standalone
    backward's widest tile, the scale and prologue kernels. The widest tile of a regime
    holds the most values per thread and so bounds the narrower ones' registers.

    Flags: all options on (weight, gradient, smoothing, z-loss, soft cap), except bce's
    streamed forward, compiled at the plain loss's heaviest flags. With options on, ptxas
    (its occupancy heuristic) spills 8-36 bytes in 13 of bce's 42 streamed-forward option
    specializations on sm_90 (none on sm_80; none in the target-only family): scalars that
    live across a row's three passes in the persistent loop (the running partial sum, the
    mean denominator's pointer, row terms), one local load per row, none in the per-element
    loops, to fit one more program per SM. 4-warp, 8-warp and 1024-column configurations
    each leave some; which combinations spill moves with any change of the code, so they
    are listed by ``report --all`` rather than asserted here."""
    specs = []
    for v in Variant:
        fb = fwd_buckets(v)
        widest, streamed = fb[-2], fb[-1]
        for dt in ("bf16", "fp32"):
            stream = _heaviest_plain if v == Variant.BCE else _heaviest
            specs += [_heaviest("fwd", v, dt, widest), stream("fwd", v, dt, streamed)]
            specs.append(_heaviest("bwd", v, dt, bwd_buckets(v)[-1]))
        specs += [_heaviest("fwd", v, "fp16", widest), _heaviest("fwd", v, "bf16", 1000)]
    specs += [Spec("scale", 0, "bf16", 4096, go_per_row=True), Spec("scale", 0, "fp32", 4096, go_per_row=False),
              Spec("prologue", 0, "fp32", 1)]
    return _dedup(specs)
