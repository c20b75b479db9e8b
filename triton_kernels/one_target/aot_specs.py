"""AOT specializations of the one-target kernels (one_target/kernels.py): every shipped one
(:func:`shipped_specs`, ``report --all``) and the subset the test suite compiles (:func:`ci_specs`).
The compile driver and ``Spec`` are ``aot.py``'s."""
from __future__ import annotations

from fusedloss.variants import Variant

from ..aot import DTYPES, Spec, _dedup, _heaviest, _heaviest_plain
from ..heuristics import bwd_buckets, fwd_buckets


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
