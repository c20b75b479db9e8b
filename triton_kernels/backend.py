"""Registers the Triton kernels as the ``"triton"`` backend of ``fusedloss``.

Imported lazily by ``fusedloss.dispatch`` on first use; an import error here (no
triton) makes the backend "unavailable" with the reason. It runs on CUDA tensors,
and on CPU tensors when ``TRITON_INTERPRET=1`` (Triton's interpreter: how the
tests run on a machine without a GPU).
"""
import os

from fusedloss import dispatch, mixup, ops
from fusedloss.distill import ops as distill_ops

from .distill import launch as distill
from .one_target import launch as one_target
from .probs import launch as probs
from .split_vocab import launch as split_vocab
from .two_targets import launch as two_targets


def _supports(device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


# One op family per target form, each from its folder.
dispatch.register(dispatch.Backend(
    name="triton",
    supports=_supports,
    families=(
        # label smoothing for loss != 'ce' is the expected loss (probs/loss_kernels.py, index_loss_*)
        ops.OneTargetOps(fwd=one_target.triton_fwd, bwd=one_target.triton_bwd, fused_grad=True,
                         fwd_inplace=one_target.forward_inplace, expected_smoothing=True),
        # ce's class probabilities (probs/kernels.py) and every loss's: the expected loss (probs/loss_kernels.py)
        ops.ProbsOps(fwd=probs.triton_soft_fwd, fused_grad=True, loss_fwd=probs.triton_soft_loss_fwd),
        mixup.TwoTargetOps(fwd=two_targets.triton_mix_fwd, fuses=two_targets.fuses),
        # fusedloss.parallel's bce given global numbers (ops.BCE_PARTIAL_SCHEMA)
        ops.SplitVocabOps(bce_partial=split_vocab.triton_bce_partial,
                          bce_global_bwd=split_vocab.triton_bce_global_bwd),
        # knowledge distillation: the teacher's logits as the target (distill/, DISTILL_SCHEMA)
        distill_ops.DistillOps(fwd=distill.triton_distill),
    ),
))
