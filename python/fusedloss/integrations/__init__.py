"""Integrations of fusedloss into other libraries' models and trainers.

``fusedloss.integrations.hf``: Hugging Face transformers causal LMs (``patch_causal_lm``),
also importable as ``fusedloss.hf``. Nothing here imports the other library at import time.
"""
