"""Knowledge distillation for :mod:`fusedloss.hf`: a student causal LM patched with a teacher.

``patch_causal_lm(student, loss, teacher=teacher, temperature=T, divergence=..., kd_weight=W)``
makes the student's labelled loss the distillation loss of :func:`fusedloss.distill_loss`
(docs/distillation.md), with ``ForCausalLMLoss``'s semantics for the rows: labels shifted left by
one, tokens whose label is -100 count for nothing (neither hard loss nor divergence), mean over
the counted tokens or the sum divided by ``num_items_in_batch``. Per counted token::

    (1 - W) H + W T^2 divergence(softmax(teacher / T), softmax(student / T))

with ``H`` the hard loss (``loss``, with the patch's options) against the next token.

The teacher runs inside the student's patched forward, before it, on the same ``input_ids``,
``attention_mask``, ``position_ids`` and ``logits_to_keep``, without gradients (its outputs and
its head are constants: the gradient reaches the student only). On the fused path (training) its
LM head is fed no rows either: both models' last hidden states go to the fused linear
distillation, so neither ``(B, T, V)`` logits is built; on the logits path (evaluation) both
models' stock logits go to :func:`fusedloss.distill_loss`.

Both models must be of :data:`fusedloss.hf.FAMILIES` and share the vocabulary (their heads have the
same number of rows). A final logit soft cap (Gemma 2/3) cannot go through the fused linear form;
such a model is refused unless ``skip_logits=False``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

#: The distillation keywords of ``patch_causal_lm`` and their defaults (those of ``fl.distill_loss``).
DISTILL_DEFAULTS = {"temperature": 1.0, "divergence": "kl", "jsd_beta": 0.5, "kd_weight": 0.5}
#: The student's forward arguments handed to the teacher; anything else that changes what the
#: decoder sees (``inputs_embeds``: the student's embedding, ``past_key_values``: its cache) is refused.
TEACHER_INPUTS = ("input_ids", "attention_mask", "position_ids", "logits_to_keep")
REFUSED_INPUTS = ("inputs_embeds", "past_key_values")


def linear_distill(student_hidden: Tensor, student_weight: Tensor, student_bias: Tensor | None,
                   teacher_hidden: Tensor, teacher_weight: Tensor, teacher_bias: Tensor | None, target: Tensor,
                   loss: str, **kw) -> Tensor:
    """The fused linear distillation of the two models' last hidden states: :func:`fusedloss.linear_distill_loss`
    (blocks of rows of both projections, neither ``(N, V)`` logits held).

    The loss comes back in the promoted dtype of the two models (``linear_distill_loss``'s contract): for a
    16-bit pair it is computed in float32 and rounded once to that dtype, where the stock loss and this
    patch's logits path give float32.
    """
    from ..distill.linear import linear_distill_loss

    return linear_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, target, loss,
                               student_bias=student_bias, teacher_bias=teacher_bias, **kw)


@dataclass
class Teacher:
    """The teacher of a patched student: its model (as given: a PEFT model runs its adapters), the
    transformers model inside, its family, and the distillation keywords."""

    model: nn.Module
    base: nn.Module
    family: Any
    options: dict

    def inputs(self, names: list[str], args: tuple, kwargs: dict, student: nn.Module) -> dict:
        """The teacher's keyword arguments from the student's call."""
        given = dict(zip(names, args))
        given.update(kwargs)
        from .hf import PatchError, _name
        for key in REFUSED_INPUTS:
            if given.get(key) is not None:
                raise PatchError(f"{_name(student)} is distilled from a teacher, and the call passes {key}=: the "
                                 f"teacher cannot be given the student's {key}; pass input_ids")
        if given.get("input_ids") is None:
            raise PatchError(f"{_name(student)} is distilled from a teacher: the call must pass input_ids")
        return {k: given[k] for k in TEACHER_INPUTS if given.get(k) is not None}

    @torch.no_grad()
    def hidden(self, inputs: dict) -> tuple[Tensor, Tensor, Tensor | None]:
        """The teacher's last hidden states and its head's weight and bias (its logit scale folded into the
        hidden states and the bias), the head fed no rows."""
        from .hf import PatchError, _HeadCapture, _name
        head = self.base.get_output_embeddings()
        if head is None:
            raise PatchError(f"teacher {_name(self.base)}: get_output_embeddings() is None")
        with _HeadCapture(self.base, head) as capture:
            self.model(**inputs, use_cache=False, return_dict=True)
        weight, bias = capture.weight_and_bias()
        hidden = capture.hidden
        _, scale = self.family.post(self.base)
        if scale != 1.0:
            hidden = hidden * scale
            bias = None if bias is None else bias * scale
        return hidden.detach(), weight.detach(), None if bias is None else bias.detach()

    @torch.no_grad()
    def logits(self, inputs: dict) -> Tensor:
        """The teacher's stock (post-processed) logits."""
        return self.model(**inputs, use_cache=False, return_dict=True).logits.detach()


def make_teacher(student: nn.Module, teacher: nn.Module, loss: str, opts: dict, skip_logits: bool | None,
                 distill: dict) -> Teacher:
    """Check the pair and the keywords; the :class:`Teacher` of a patch."""
    from ..distill.loss import make_config
    from .hf import PatchError, _name, _unwrap, check_patchable

    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be a transformers causal LM (an nn.Module); got {type(teacher).__name__}")
    base = _unwrap(teacher)
    if base is student or teacher is student:
        raise PatchError("the teacher is the student itself; pass a separate teacher model")
    family = check_patchable(base)
    s_rows = student.get_output_embeddings().weight.shape[0]
    t_rows = base.get_output_embeddings().weight.shape[0]
    if s_rows != t_rows:
        raise PatchError(f"teacher {_name(base)} has a vocabulary of {t_rows} (its LM head's rows), the student "
                         f"{_name(student)} {s_rows}: distillation compares the two distributions token by token, "
                         f"so they must share the tokenizer and the vocabulary size")
    if skip_logits is not False:
        from .hf import FAMILIES
        for who, model, fam in (("student", student, FAMILIES[type(student).__name__]), ("teacher", base, family)):
            softcap, _ = fam.post(model)
            if softcap is not None:
                raise PatchError(f"{who} {_name(model)} caps its logits (final_logit_softcapping={softcap}); the fused "
                                 f"linear distillation has no soft cap: pass skip_logits=False (the stock logits of "
                                 f"both models then go to fl.distill_loss)")
    options = {**DISTILL_DEFAULTS, **distill}
    hard = {k: v for k, v in hard_options(opts).items() if k != "chunk_rows"}
    make_config(loss, **options, **hard)  # ValueError naming the argument
    return Teacher(teacher, base, family, options)


def hard_options(opts: dict) -> dict:
    """The patch's hard-loss options as ``fl.distill_loss`` names them."""
    hard = dict(opts)
    if "class_weight" in hard:
        hard["weight"] = hard.pop("class_weight")
    return hard


def fused_loss(teacher: Teacher, teacher_out: tuple, hidden: Tensor, weight: Tensor, bias: Tensor | None,
               shift: Tensor, loss: str, opts: dict, ignore_index: int, reduction: str) -> Tensor:
    """The fused path's loss: the two models' hidden states through :func:`linear_distill`."""
    t_hidden, t_weight, t_bias = teacher_out
    if t_hidden.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(f"the teacher's hidden states {tuple(t_hidden.shape)} do not align with the student's "
                         f"{tuple(hidden.shape)}")
    return linear_distill(hidden, weight, bias, t_hidden.to(hidden.device), t_weight.to(hidden.device),
                          None if t_bias is None else t_bias.to(hidden.device), shift, loss, **teacher.options,
                          reduction=reduction, ignore_index=ignore_index, **hard_options(opts))


def logits_loss(teacher: Teacher, teacher_logits: Tensor, logits: Tensor, shift: Tensor, loss: str, opts: dict,
                ignore_index: int, reduction: str) -> Tensor:
    """The logits path's loss: both models' stock logits through :func:`fusedloss.distill_loss`, in
    float32 (float64 for float64 models), as the stock loss of ``logits.float()``."""
    from ..distill.loss import distill_loss

    if teacher_logits.shape != logits.shape:
        raise ValueError(f"the teacher's logits {tuple(teacher_logits.shape)} do not align with the student's "
                         f"{tuple(logits.shape)}")
    acc = torch.promote_types(torch.promote_types(logits.dtype, teacher_logits.dtype), torch.float32)
    v = logits.shape[-1]
    hard = {k: val for k, val in hard_options(opts).items() if k != "chunk_rows"}
    return distill_loss(logits.to(acc).view(-1, v), teacher_logits.to(device=logits.device, dtype=acc).view(-1, v),
                        shift.reshape(-1).to(logits.device), loss, **teacher.options, reduction=reduction,
                        ignore_index=ignore_index, **hard)
