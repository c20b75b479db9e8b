"""Registers the Triton kernels as the ``"triton"`` backend of ``fusedloss``.

Imported lazily by ``fusedloss.dispatch`` on first use; an import error here (no
triton) makes the backend "unavailable" with the reason. It runs on CUDA tensors,
and on CPU tensors when ``TRITON_INTERPRET=1`` (Triton's interpreter: how the
tests run on a machine without a GPU).
"""
import os

from fusedloss import dispatch

from .one_target import launch
from .probs import launch as launch_soft
from .two_targets import launch as launch_mix
from .split_vocab import launch as launch_bce_parallel


def _supports(device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


dispatch.register(dispatch.Backend(
    name="triton",
    fwd=launch.triton_fwd,
    bwd=launch.triton_bwd,
    supports=_supports,
    fused_grad=True,
    # label smoothing for loss != 'ce' is the expected loss (probs/loss_kernels.py, index_loss_*)
    expected_smoothing=True,
    fwd_inplace=launch.forward_inplace,
    soft_fwd=launch_soft.triton_soft_fwd,
    # every loss's class probabilities: the expected loss (probs/loss_kernels.py)
    soft_loss_fwd=launch_soft.triton_soft_loss_fwd,
    mix_fwd=launch_mix.triton_mix_fwd,
    mix_fuses=launch_mix.fuses,
    # fusedloss.parallel's bce given global numbers (ops.BCE_PARTIAL_SCHEMA)
    bce_partial=launch_bce_parallel.triton_bce_partial,
    bce_global_bwd=launch_bce_parallel.triton_bce_global_bwd,
))
