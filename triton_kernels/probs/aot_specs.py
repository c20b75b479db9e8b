"""AOT specializations of the class-probability (soft-target) kernels (probs/kernels.py): their
signature for ``aot.py``'s compile driver and the subset the test suite compiles."""
from __future__ import annotations

from fusedloss.variants import Variant

from ..aot import Spec, _dedup, pointer_type
from ..heuristics import Config, bwd_buckets, bwd_config, fwd_buckets, fwd_config
from ..launch_common import PARTIAL_BLOCK
from . import kernels


#: The kernels of this form (``Spec.kernel``; kernels.py), launched by launch.py.
KERNELS = ("soft_fwd", "soft_bwd")


def config(spec: Spec) -> Config:
    """launch.py's configurations: the target-only family's."""
    return (fwd_config if spec.kernel == "soft_fwd" else bwd_config)(spec.n_cols, spec.dtype_size, Variant.CE)


def signature(spec: Spec):
    return _soft_signature(spec, pointer_type(spec.dtype), spec.config)


def _soft_signature(spec: Spec, xt: str, cfg: Config):
    """(kernel fn, signature, constexprs) of a soft-target kernel: targets in the logits' dtype,
    float32 weights, the options (1 - eps, eps / C) as float32."""
    rows = {"X": xt, "stride_x": "i32", "Y": xt, "stride_y": "i32", "W": "*fp32"}
    tail = {"n_rows": "i32", "n_cols": "i32", "smooth_own": "fp32", "smooth_class": "fp32", "reduction": "i32"}
    flags = dict(HAS_WEIGHT=spec.has_weight, HAS_SMOOTHING=spec.smoothing, BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c,
                 ROW_ALIGN=spec.align)
    if spec.kernel == "soft_fwd":
        sig = {**rows, "LOSS": "*fp32", "STATS": "*fp32", "G": xt, "stride_g": "i32", "DENOM": "*fp32",
               "PARTIAL": "*fp32", "COUNTER": "*i32", **tail}
        return kernels.soft_fwd_kernel, sig, dict(flags, COMPUTE_GRAD=spec.compute_grad, SINGLE=cfg.single,
                                                         PARTIAL_BLOCK=PARTIAL_BLOCK, NUM_STAGES=cfg.num_stages)
    sig = {"GO": "*fp32", **rows, "STATS": "*fp32", "G": xt, "stride_g": "i32", "DENOM": "*fp32", **tail}
    return kernels.soft_bwd_kernel, sig, dict(flags, GO_PER_ROW=spec.go_per_row)


def ci_specs() -> list[Spec]:
    """The soft-target kernels at their heaviest flags (weight, smoothing, gradient): the forward's
    widest on-chip tile and its streamed configuration in bf16 and fp32, the widest tile in fp16,
    C = 1000; the backward's widest tile (per-row grad_output) in bf16 and fp32."""
    fb = fwd_buckets(Variant.CE)
    specs = [Spec("soft_fwd", 0, dt, c, smoothing=True) for dt in ("bf16", "fp32") for c in fb[-2:]]
    specs += [Spec("soft_fwd", 0, "fp16", fb[-2], smoothing=True), Spec("soft_fwd", 0, "bf16", 1000, smoothing=True)]
    specs += [Spec("soft_bwd", 0, dt, bwd_buckets(Variant.CE)[-1], smoothing=True, go_per_row=True)
              for dt in ("bf16", "fp32")]
    return _dedup(specs)
