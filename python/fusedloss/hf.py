"""``fusedloss.hf``: an alias of :mod:`fusedloss.integrations.hf` (the README's import path)."""
from .integrations import hf as _hf
from .integrations.hf import (FAMILIES, LOGIT_ATTRIBUTES, Family, PatchError, causal_lm_loss,  # noqa: F401
                              check_patchable, patch_causal_lm, patched_loss, patched_teacher, unpatch_causal_lm)

__all__ = ["FAMILIES", "LOGIT_ATTRIBUTES", "Family", "FusedLossTrainer", "DistillationTrainer", "PatchError",
           "causal_lm_loss", "check_patchable", "patch_causal_lm", "patched_loss", "patched_teacher",
           "unpatch_causal_lm"]


def __getattr__(name):
    # built on first use: importing fusedloss.hf does not import transformers
    if name in ("FusedLossTrainer", "DistillationTrainer"):
        return getattr(_hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
