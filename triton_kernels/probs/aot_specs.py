"""AOT specializations of the class-probability (soft-target) kernels (probs/kernels.py, ce) and
of the expected-loss kernels (probs/loss_kernels.py: probabilities for every loss, and class
indices with label smoothing for loss != ce): their signature for ``aot.py``'s compile driver and
the subset the test suite compiles."""
from __future__ import annotations

from fusedloss.variants import Variant

from ..aot import Spec, _dedup, pointer_type
from ..heuristics import Config, bwd_buckets, bwd_config, fwd_buckets, fwd_config
from ..launch_common import PARTIAL_BLOCK
from . import kernels, loss_kernels


#: The kernels of this form (``Spec.kernel``; kernels.py), launched by launch.py.
KERNELS = ("soft_fwd", "soft_bwd", "soft_loss_fwd", "soft_loss_bwd", "index_loss_fwd", "index_loss_bwd")
#: The expected-loss kernels (loss_kernels.py); ``Spec.go_per_row`` doubles as "two targets" for the
#: index forward (it has no grad_output), see :func:`_index_signature`.
LOSS_KERNELS = KERNELS[2:]


def config(spec: Spec) -> Config:
    """launch.py's configurations: the target-only family's (ce); bce's forward configuration for the
    expected-loss kernels (``launch.loss_config``)."""
    if spec.kernel in LOSS_KERNELS:
        from .launch import loss_config
        return loss_config(spec.kernel, spec.n_cols, spec.dtype_size)
    return (fwd_config if spec.kernel == "soft_fwd" else bwd_config)(spec.n_cols, spec.dtype_size, Variant.CE)


def signature(spec: Spec):
    if spec.kernel in ("soft_loss_fwd", "soft_loss_bwd"):
        return _soft_loss_signature(spec, pointer_type(spec.dtype), spec.config)
    if spec.kernel in ("index_loss_fwd", "index_loss_bwd"):
        return _index_signature(spec, pointer_type(spec.dtype), spec.config)
    return _soft_signature(spec, pointer_type(spec.dtype), spec.config)


def _soft_loss_signature(spec: Spec, xt: str, cfg: Config):
    """The expected loss of probability rows: the ce soft kernels' arguments plus alpha, beta, gamma."""
    rows = {"X": xt, "stride_x": "i32", "Y": xt, "stride_y": "i32", "W": "*fp32"}
    tail = {"n_rows": "i32", "n_cols": "i32", "smooth_own": "fp32", "smooth_class": "fp32", "alpha": "fp32",
            "beta": "fp32", "gamma": "fp32", "reduction": "i32"}
    flags = dict(VARIANT=spec.variant, HAS_WEIGHT=spec.has_weight, HAS_SMOOTHING=spec.smoothing, SINGLE=cfg.single,
                 BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c, ROW_ALIGN=spec.align)
    if spec.kernel == "soft_loss_fwd":
        sig = {**rows, "LOSS": "*fp32", "STATS": "*fp32", "G": xt, "stride_g": "i32", "DENOM": "*fp32",
               "PARTIAL": "*fp32", "COUNTER": "*i32", **tail}
        return loss_kernels.soft_loss_fwd_kernel, sig, dict(flags, COMPUTE_GRAD=spec.compute_grad,
                                                            PARTIAL_BLOCK=PARTIAL_BLOCK, NUM_STAGES=cfg.num_stages)
    sig = {"GO": "*fp32", **rows, "STATS": "*fp32", "G": xt, "stride_g": "i32", "DENOM": "*fp32", **tail}
    return loss_kernels.soft_loss_bwd_kernel, sig, dict(flags, GO_PER_ROW=True)


def _index_signature(spec: Spec, xt: str, cfg: Config):
    """Class indices with label smoothing (TARGETS = 1, or 2 for mixup's pair where
    ``spec.go_per_row`` is set on the forward): int64 targets, lam float32 (one target: the
    launcher passes the target there, never read)."""
    two = spec.go_per_row
    head = {"X": xt, "stride_x": "i32", "TA": "*i64", "TB": "*i64", "LAM": "*fp32" if two else "*i64", "W": "*fp32"}
    tail = {"n_rows": "i32", "n_cols": "i32", "ignore_index": "i32", "smooth_own": "fp32", "smooth_class": "fp32",
            "alpha": "fp32", "beta": "fp32", "gamma": "fp32", "z_loss": "fp32", "softcap": "fp32",
            "softcap_k": "fp32", "reduction": "i32", "n_denom": "i32"}
    flags = dict(VARIANT=spec.variant, TARGETS=2 if two else 1, HAS_WEIGHT=spec.has_weight,
                 HAS_SMOOTHING=spec.smoothing, HAS_ZLOSS=spec.z_loss, SOFTCAP=spec.softcap, SINGLE=cfg.single,
                 BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c, ROW_ALIGN=spec.align)
    if spec.kernel == "index_loss_fwd":
        sig = {**head, "LOSS": "*fp32", "STATS": "*fp32", "G": xt, "stride_g": "i32", "DENOM": "*fp32",
               "DENOM_B": "*fp32", "PARTIAL": "*fp32", "COUNTER": "*i32", **tail}
        return loss_kernels.index_loss_fwd_kernel, sig, dict(flags, COMPUTE_GRAD=spec.compute_grad,
                                                             PARTIAL_BLOCK=PARTIAL_BLOCK, NUM_STAGES=cfg.num_stages)
    sig = {"GO": "*fp32", **head, "STATS": "*fp32", "G": xt, "stride_g": "i32", "DENOM": "*fp32",
           "DENOM_B": "*fp32", **tail}
    return loss_kernels.index_loss_bwd_kernel, sig, dict(flags, GO_PER_ROW=True)


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


def loss_ci_specs() -> list[Spec]:
    """The subset of :func:`loss_all_specs` the test suite compiles (about 5 s each): per variant the
    probability forward streamed in bf16 and fp32 and on chip at its widest tile in fp32, the backward
    streamed in bf16; per loss other than ce the class-index forward (every option) streamed in fp32
    with two targets and on chip at its widest tile in bf16 with one."""
    keep = []
    for s in loss_all_specs():
        single = s.config.single
        if s.kernel == "soft_loss_fwd" and s.n_cols != 1000 and (not single or s.dtype == "fp32"):
            keep.append(s)
        elif s.kernel == "soft_loss_bwd" and not single:
            keep.append(s)
        elif s.kernel == "index_loss_fwd" and ((not single and s.dtype == "fp32" and s.go_per_row) or
                                                (single and s.dtype == "bf16" and not s.go_per_row)):
            keep.append(s)
    return keep


def loss_all_specs() -> list[Spec]:
    """The expected-loss kernels, per variant, at their heaviest flags (weight, smoothing, gradient; the
    index kernels also z-loss and soft cap, one and two targets): the forward's widest on-chip tile
    (bce's limit, 2048) and its streamed configuration in bf16 and fp32, C = 1000 in bf16; the
    backward (the same row function from the stats) on chip and streamed in bf16."""
    fb = fwd_buckets(Variant.BCE)
    specs = []
    for v in Variant:
        for dt in ("bf16", "fp32"):
            for c in fb[-2:]:
                specs.append(Spec("soft_loss_fwd", int(v), dt, c, smoothing=True))
        specs.append(Spec("soft_loss_fwd", int(v), "bf16", 1000, smoothing=True))
        specs += [Spec("soft_loss_bwd", int(v), "bf16", c, smoothing=True) for c in fb[-2:]]
        if v == Variant.CE:
            continue
        for dt in ("bf16", "fp32"):
            for c in fb[-2:]:
                for two in (False, True):
                    specs.append(Spec("index_loss_fwd", int(v), dt, c, smoothing=True, z_loss=True, softcap=True,
                                      go_per_row=two))
        specs += [Spec("index_loss_bwd", int(v), "bf16", c, smoothing=True, z_loss=True, softcap=True)
                  for c in fb[-2:]]
    return specs
