"""Registers the pure-PyTorch reference as a backend: it runs on every device."""
from . import dispatch, ops

dispatch.register(dispatch.Backend(
    name="reference",
    fwd=ops.reference_fwd,
    bwd=ops.reference_bwd,
    supports=lambda device: True,
    fused_grad=False,
    soft_fwd=ops.reference_soft_fwd,
    soft_loss_fwd=ops.reference_soft_loss_fwd,
    expected_smoothing=True,
))
