"""Registers the C++ extension's ops (``fusedloss._C``) as the "cpu" and "cuda" backends.

Importing ``fusedloss._C`` runs its ``TORCH_LIBRARY`` initializers, which define
``fusedloss::ext_fwd`` / ``fusedloss::ext_bwd`` (schemas ``ops.FWD_SCHEMA`` /
``ops.BWD_SCHEMA``) with CPU kernels, and CUDA kernels when they were compiled in.
If the extension was not built, the import fails and ``dispatch`` falls back to
the reference backend (with a one-time warning).
"""
from __future__ import annotations

import torch

import fusedloss._C as _C  # noqa: F401  (ImportError: backend unavailable, handled by dispatch)

from . import dispatch, mixup, ops
from .distill import ops as distill_ops

ops.register_fakes("ext_fwd", "ext_bwd")
ops.register_soft_fakes("ext_soft_fwd", "ext_soft_bwd")
ops.register_soft_loss_fakes("ext_soft_loss_fwd", "ext_soft_loss_bwd")
ops.register_bce_parallel_fakes("ext_bce_partial", "ext_bce_global_bwd")
distill_ops.register_distill_fake("ext_distill")


# ext_fwd's autograd is the C++ Autograd kernel of csrc/autograd.cpp (no Python in the eager step); it
# calls this formula for every other backward (a double backward, vmap over it, torch.compile's trace).
# Every fused gradient here is scaled by ops.scale_fused_grad_reusing: with grad_output 1 (CPU, eager)
# it returns the forward's buffer itself, no copy.
_EXT_BWD = torch.ops.fusedloss.ext_bwd.default


def _ext_fwd_backward(grad_loss, logits, target, weight, saved, fused, *scalars):
    return ops.one_target_backward(grad_loss, logits, target, weight, saved, fused, scalars, _EXT_BWD,
                                   ops.scale_fused_grad_reusing)


_C._set_ext_fwd_backward(_ext_fwd_backward)

ops.register_soft_autograd("ext_soft_fwd", torch.ops.fusedloss.ext_soft_bwd.default,
                           scale_grad=ops.scale_fused_grad_reusing)
ops.register_soft_loss_autograd("ext_soft_loss_fwd", torch.ops.fusedloss.ext_soft_loss_bwd.default,
                                scale_grad=ops.scale_fused_grad_reusing)

mixup.register_mix_op("ext_mix_fwd", torch.ops.fusedloss.ext_mix_bwd.default,
                      scale_grad=ops.scale_fused_grad_reusing)

# The extension's op families, one per target form (csrc/cpu/ops_cpu*.cpp, csrc/cuda/ops_cuda.cu).
# The two-target op fuses every loss, with or without the soft cap, on both devices. The
# vocabulary-parallel bce ops have CPU kernels only.
_ONE_TARGET = ops.OneTargetOps(fwd=torch.ops.fusedloss.ext_fwd.default, bwd=torch.ops.fusedloss.ext_bwd.default,
                               fused_grad=True, expected_smoothing=True, checked_op=True)
_PROBS = ops.ProbsOps(fwd=torch.ops.fusedloss.ext_soft_fwd.default, fused_grad=True,
                      loss_fwd=torch.ops.fusedloss.ext_soft_loss_fwd.default)
_TWO_TARGETS = mixup.TwoTargetOps(fwd=torch.ops.fusedloss.ext_mix_fwd.default, fuses=lambda variant, softcap: True)
# Distillation (teacher logits as the target): csrc/cpu/ops_cpu_distill.cpp, csrc/cuda/ops_cuda_distill.cu.
_DISTILL = distill_ops.DistillOps(fwd=torch.ops.fusedloss.ext_distill.default)
_SPLIT_VOCAB = ops.SplitVocabOps(bce_partial=torch.ops.fusedloss.ext_bce_partial.default,
                                 bce_global_bwd=torch.ops.fusedloss.ext_bce_global_bwd.default)

dispatch.register(dispatch.Backend(
    name="cpu", supports=lambda device: device.type == "cpu",
    families=(_ONE_TARGET, _PROBS, _TWO_TARGETS, _SPLIT_VOCAB, _DISTILL),
))


def cuda_compiled() -> bool:
    """Whether this build of the extension has the CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("fusedloss::ext_fwd", "CUDA")


if cuda_compiled():
    dispatch.register(dispatch.Backend(
        name="cuda", supports=lambda device: device.type == "cuda",
        families=(_ONE_TARGET, _PROBS, _TWO_TARGETS, _DISTILL),
    ))
