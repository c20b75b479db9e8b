"""fusedloss: fused, exact softmax classification losses for PyTorch.

``ce``, ``bce``, ``nllr``, ``crl``, ``lace`` and ``focal`` over ``p = softmax(logits)``,
computed from per-row log-sum-exp statistics so they stay finite where the textbook
formulas give inf or NaN. See :func:`softmax_loss`.
"""
# The first call of any torch.library op imports torch._dynamo; made while a torch.distributed
# process group exists, that import keeps references to the group, so destroy_process_group()
# leaves its gloo threads running until exit (where they can abort the process). Importing it
# here, at `import fusedloss` (before a script creates its group), moves that cost to import time.
import torch._dynamo  # noqa: F401,E402

from . import ops  # noqa: F401  (registers the torch.library ops)
from . import distill  # noqa: F401  (registers the distillation op)
from .distill.loss import DistillLoss, distill_loss
from .dispatch import BackendUnavailableError, available_backends
from .functional import (competing_ratio, cross_entropy, focal, linearly_adaptive, multiclass_bce, nllr,
                         softmax_loss)
from .head import linear_softmax_loss
from .distill.linear import LinearDistillLoss, linear_distill_loss  # issue 26: distillation from hidden states
from .modules import (CompetingRatioLoss, CrossEntropyLoss, FocalLoss, LinearlyAdaptiveLoss,
                      LinearSoftmaxLoss, MultiClassBCELoss, NLLRLoss, SoftmaxLoss)
from .variants import LOSSES

__version__ = "0.1.0"

from . import dispatch as _dispatch  # noqa: E402

_dispatch.preload()  # before any torch.compile traces a loss (dispatch.preload)


def __getattr__(name: str):
    # fusedloss.parallel (vocabulary-parallel losses over torch.distributed) on first use, so that
    # importing fusedloss never imports torch.distributed.
    if name == "parallel":
        import importlib

        return importlib.import_module(".parallel", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "LOSSES", "available_backends", "BackendUnavailableError",
    "softmax_loss", "cross_entropy", "multiclass_bce", "nllr", "competing_ratio", "linearly_adaptive", "focal",
    "SoftmaxLoss", "CrossEntropyLoss", "MultiClassBCELoss", "NLLRLoss", "CompetingRatioLoss",
    "LinearlyAdaptiveLoss", "FocalLoss", "linear_softmax_loss", "LinearSoftmaxLoss",
    "distill_loss", "DistillLoss",
    "linear_distill_loss", "LinearDistillLoss",
]
