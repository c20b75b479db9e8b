"""``fusedloss.hf``: an alias of :mod:`fusedloss.integrations.hf` (the README's import path)."""
from .integrations.hf import causal_lm_loss, patch_causal_lm, unpatch_causal_lm  # noqa: F401

__all__ = ["causal_lm_loss", "patch_causal_lm", "unpatch_causal_lm"]
