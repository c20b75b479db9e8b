"""Registers the pure-PyTorch reference as a backend: it runs on every device."""
from . import dispatch, ops
from .distill import ops as distill_ops

# Mixup and the vocabulary-parallel bce have no op here: their PyTorch paths (mixup's two passes,
# parallel's passes) run on the reference's one-target ops.
dispatch.register(dispatch.Backend(
    name="reference",
    supports=lambda device: True,
    families=(
        ops.OneTargetOps(fwd=ops.reference_fwd, bwd=ops.reference_bwd, fused_grad=False, expected_smoothing=True),
        ops.ProbsOps(fwd=ops.reference_soft_fwd, fused_grad=False, loss_fwd=ops.reference_soft_loss_fwd),
        distill_ops.DistillOps(fwd=distill_ops.reference_distill),
    ),
))
