"""Hugging Face causal LMs: train with any of the six losses through the fused head.

``patch_causal_lm(model, "crl")`` replaces ``model.forward`` so that a call with ``labels=``
(or ``shift_labels=``) runs the decoder, then :func:`fusedloss.linear_softmax_loss` on its
last hidden states with ``model.lm_head``'s weight: the ``(B, T, V)`` logits are never
materialized (``outputs.logits`` is ``None``). Calls without labels (generation, eval
logits) run the model's own forward unchanged. The loss follows transformers'
``ForCausalLMLoss``: labels shifted left by one, ``ignore_index=-100``, mean over the
counted tokens, or the sum divided by ``num_items_in_batch`` when the Trainer passes it
(gradient accumulation). Nothing here imports transformers.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..head import linear_softmax_loss_float


def causal_lm_loss(hidden_states: Tensor, lm_head: nn.Linear, labels: Tensor | None = None, loss: str = "ce", *,
                   shift_labels: Tensor | None = None, num_items_in_batch: Tensor | int | None = None,
                   ignore_index: int = -100, **opts) -> Tensor:
    """transformers' causal-LM loss of ``lm_head(hidden_states)`` against ``labels``, fused.

    ``hidden_states (B, T, D)``, ``labels (B, T)`` (predicting token t+1 from position t),
    or already shifted ``shift_labels (B, T)``. ``opts``: any keyword of
    :func:`fusedloss.linear_softmax_loss` but ``return_lse`` (``class_weight``, ``alpha``,
    ``gamma``, ``backend``, ...). The loss is float32 for 16-bit models (the sum and the
    division by ``num_items_in_batch`` too), as transformers' loss of ``logits.float()``.
    """
    if shift_labels is None:
        if labels is None:
            raise ValueError("causal_lm_loss needs labels or shift_labels")
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(hidden_states.device)
    bias = getattr(lm_head, "bias", None)
    reduction = "mean" if num_items_in_batch is None else "sum"
    value, _ = linear_softmax_loss_float(hidden_states, lm_head.weight, shift_labels, loss, bias=bias,
                                         ignore_index=ignore_index, reduction=reduction, **opts)
    if num_items_in_batch is None:
        return value
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(value.device)
    return value / num_items_in_batch


def patch_causal_lm(model: nn.Module, loss: str = "ce", **opts) -> nn.Module:
    """Make ``model(..., labels=labels).loss`` the fused ``loss`` (any of the six) of its LM head.

    Works for transformers' ``*ForCausalLM`` models that expose their decoder as
    ``getattr(model, model.base_model_prefix)`` and their head as
    ``model.get_output_embeddings()`` (Llama, Mistral, Qwen2, Gemma, ...). A model whose config
    asks for ``final_logit_softcapping`` passes it on as ``softcap``. Returns the model (patched
    in place); :func:`unpatch_causal_lm` restores it.
    """
    if hasattr(model, "_fusedloss_forward"):
        unpatch_causal_lm(model)
    original = model.forward
    decoder = getattr(model, model.base_model_prefix)
    head = model.get_output_embeddings()
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if softcap is not None and "softcap" not in opts:
        opts = dict(opts, softcap=softcap)

    def forward(*args, labels=None, shift_labels=None, num_items_in_batch=None, logits_to_keep=0, **kwargs):
        if labels is None and shift_labels is None:
            return original(*args, logits_to_keep=logits_to_keep, **kwargs)
        outputs = decoder(*args, **kwargs)
        hidden = outputs[0]
        value = causal_lm_loss(hidden, head, labels, loss, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **opts)
        from transformers.modeling_outputs import CausalLMOutputWithPast
        extra = {k: getattr(outputs, k) for k in ("hidden_states", "attentions") if hasattr(outputs, k)}
        return CausalLMOutputWithPast(loss=value, logits=None, **extra)

    model._fusedloss_forward = original
    model.forward = forward
    return model


def unpatch_causal_lm(model: nn.Module) -> nn.Module:
    original = model.__dict__.pop("_fusedloss_forward", None)
    if original is not None:
        model.__dict__.pop("forward", None)
    return model
