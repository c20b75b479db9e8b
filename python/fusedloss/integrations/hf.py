"""Hugging Face causal LMs: train with any of the six losses through the fused head.

``patch_causal_lm(model, "crl")`` leaves the model's own forward in charge and changes two
things for the duration of a call with ``labels=``:

* ``model.loss_function`` (transformers' hook, ``ForCausalLMLoss`` by default) becomes our
  loss with ``ForCausalLMLoss``'s semantics: labels shifted left by one, ``ignore_index`` as
  the forward passes it (-100), mean over the counted tokens, or the sum divided by
  ``num_items_in_batch`` when the Trainer passes it (gradient accumulation). Everything the
  stock forward does around the loss stays as it is: the decoder call and its arguments,
  ``cache``/``past_key_values``, ``hidden_states``, ``attentions``, the router auxiliary loss
  of MoE models (``loss += router_aux_loss_coef * aux_loss``), the output type and
  ``return_dict=False`` tuples.
* On the fused path (training with labels, by default) the LM head found at that moment
  (``model.get_output_embeddings()``: after ``resize_token_embeddings``, or a PEFT
  ``ModulesToSaveWrapper`` whose active copy runs) is fed no rows; its input, the last
  hidden states, goes to :func:`fusedloss.linear_softmax_loss` with the head's weight and
  bias and the model's own logit post-processing (Gemma 2/3's final soft cap, Cohere's
  ``logit_scale``, Granite's ``logits_scaling``), so the ``(B, T, V)`` logits are never
  materialized and ``outputs.logits`` is ``None`` (in a tuple: ``None`` at its place).
  Elsewhere (evaluation, ``skip_logits=False``) the stock forward computes the logits and
  our loss is computed from them (:func:`fusedloss.softmax_loss`), so ``compute_metrics``
  gets its logits and ``eval_loss`` is our loss.

Only the model classes of :data:`FAMILIES` are patched: each one's forward was read, its
logit post-processing is written in the table, and tests/test_hf.py checks the patched ``ce``
loss and every gradient against the stock model. Any other class (or a config carrying a
logits attribute its class's entry does not honour) is refused at patch time, naming the
model and the attribute. Nothing here imports transformers at import time.
"""
from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..functional import softmax_loss
from ..head import linear_softmax_loss_float

__all__ = ["FAMILIES", "LOGIT_ATTRIBUTES", "Family", "FusedLossTrainer", "PatchError", "causal_lm_loss",
           "check_patchable", "patch_causal_lm",
           "patched_loss", "patched_teacher", "unpatch_causal_lm", "DistillationTrainer"]


# ----------------------------------------------------------------------------
# The allowlist: per model class, what its forward does to the head's output
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    """What a model class's forward does between ``lm_head`` and ``loss_function``.

    ``post(model)`` returns ``(softcap, scale)`` read at forward time as the stock forward
    reads them: logits = ``softcap * tanh(scale * lm_head(h) / softcap)`` (``scale`` 1 and
    ``softcap`` None where the family has none). ``honours``: the model/config attributes it
    reads (every name of :data:`LOGIT_ATTRIBUTES` outside it must be unset on the config).
    ``aux``: what else the stock forward adds to the loss (it still does, on our loss)."""
    classes: tuple[str, ...]
    logits: str
    post: Callable[[Any], tuple[float | None, float]] = lambda model: (None, 1.0)
    honours: tuple[str, ...] = ()
    aux: str = ""
    test: str = ""


def _gemma_cap(model):
    return model.config.final_logit_softcapping, 1.0


def _cohere_scale(model):
    return None, float(model.logit_scale)  # CohereForCausalLM.forward: logits * self.logit_scale


def _granite_scale(model):
    return None, 1.0 / float(model.config.logits_scaling)  # logits / self.config.logits_scaling


_MOE_AUX = "router_aux_loss_coef * aux_loss added to the loss when output_router_logits"

#: Every patchable class. Keyed by transformers class name; the class must be transformers' own
#: (``transformers.models.*``, not a subclass).
FAMILIES: dict[str, Family] = {}
for _fam in (
    Family(("LlamaForCausalLM",), "lm_head(h)", test="llama, tied llama"),
    Family(("MistralForCausalLM",), "lm_head(h)", test="mistral"),
    Family(("Qwen2ForCausalLM",), "lm_head(h)", test="qwen2"),
    Family(("Qwen3ForCausalLM",), "lm_head(h)", test="qwen3"),
    Family(("Phi3ForCausalLM",), "lm_head(h)", test="phi3"),
    Family(("PhiForCausalLM",), "lm_head(h) (with bias)", test="phi"),
    Family(("GemmaForCausalLM",), "lm_head(h)", test="gemma"),
    Family(("Gemma2ForCausalLM",), "softcap * tanh(lm_head(h) / softcap), softcap = config.final_logit_softcapping",
           _gemma_cap, ("final_logit_softcapping",), test="gemma2 (cap 30)"),
    Family(("Gemma3ForCausalLM",), "softcap * tanh(lm_head(h) / softcap), softcap = config.final_logit_softcapping",
           _gemma_cap, ("final_logit_softcapping",), test="gemma3 text (cap 30)"),
    Family(("CohereForCausalLM",), "lm_head(h) * model.logit_scale", _cohere_scale, ("logit_scale",),
           test="cohere (logit_scale 0.0625)"),
    Family(("GraniteForCausalLM",), "lm_head(h) / config.logits_scaling", _granite_scale, ("logits_scaling",),
           test="granite (logits_scaling 8)"),
    Family(("MixtralForCausalLM",), "lm_head(h)", aux=_MOE_AUX, test="mixtral, output_router_logits"),
    Family(("Qwen2MoeForCausalLM",), "lm_head(h)", aux=_MOE_AUX, test="qwen2_moe, output_router_logits"),
    Family(("Qwen3MoeForCausalLM",), "lm_head(h)", aux=_MOE_AUX, test="qwen3_moe, output_router_logits"),
    Family(("GPT2LMHeadModel",), "lm_head(h)", test="gpt2"),
    Family(("OPTForCausalLM",), "lm_head(h)", test="opt"),
):
    for _name in _fam.classes:
        FAMILIES[_name] = _fam

#: Config attributes that change the logits in some transformers family. A patched model's
#: config may carry one only if its family's entry honours it (a value the stock forward of
#: another class would ignore is refused too: the user set it for a reason we cannot check).
LOGIT_ATTRIBUTES = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier",
                    "output_multiplier_scale", "logit_softcapping", "scale_width", "dim_model_base",
                    "mup_width_multiplier", "width_multiplier")

#: Keywords of the fused head a patch does not take: the model or the forward sets them.
_REFUSED_OPTS = {
    "softcap": "the model's own final soft cap (if any) is applied from its config",
    "bias": "the head's bias is read from the head",
    "reduction": "mean, or sum / num_items_in_batch, as transformers' ForCausalLMLoss",
    "ignore_index": "the forward's own ignore_index (-100) is used",
    "return_lse": "the forward returns one loss",
}


class PatchError(ValueError):
    """A model (or its head) the patch cannot honour exactly."""


# ----------------------------------------------------------------------------
# The loss with ForCausalLMLoss's semantics
# ----------------------------------------------------------------------------

def _shift(labels: Tensor | None, shift_labels: Tensor | None, ignore_index: int) -> Tensor:
    if shift_labels is not None:
        return shift_labels
    if labels is None:
        raise ValueError("the causal-LM loss needs labels or shift_labels")
    return nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _reduce(value_sum_or_mean: Tensor, num_items_in_batch) -> Tensor:
    if num_items_in_batch is None:
        return value_sum_or_mean
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(value_sum_or_mean.device)
    return value_sum_or_mean / num_items_in_batch


def causal_lm_loss(hidden_states: Tensor, lm_head: nn.Linear, labels: Tensor | None = None, loss: str = "ce", *,
                   shift_labels: Tensor | None = None, num_items_in_batch: Tensor | int | None = None,
                   ignore_index: int = -100, **opts) -> Tensor:
    """transformers' causal-LM loss of ``lm_head(hidden_states)`` against ``labels``, fused.

    ``hidden_states (B, T, D)``, ``labels (B, T)`` (predicting token t+1 from position t),
    or already shifted ``shift_labels (B, T)``. ``opts``: any keyword of
    :func:`fusedloss.linear_softmax_loss` but ``return_lse`` (``class_weight``, ``alpha``,
    ``gamma``, ``softcap``, ``backend``, ...). The loss is float32 for 16-bit models (the sum
    and the division by ``num_items_in_batch`` too), as transformers' loss of ``logits.float()``.
    """
    shift = _shift(labels, shift_labels, ignore_index).to(hidden_states.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    value, _ = linear_softmax_loss_float(hidden_states, lm_head.weight, shift, loss,
                                         bias=getattr(lm_head, "bias", None), ignore_index=ignore_index,
                                         reduction=reduction, **opts)
    return _reduce(value, num_items_in_batch)


# ----------------------------------------------------------------------------
# Finding the head's weight when the forward runs
# ----------------------------------------------------------------------------

class _HeadCapture:
    """Hooks on the head for one fused call: its input (the last hidden states) is kept and
    replaced by zero rows; the leaf module that computes its output is identified."""

    def __init__(self, model: nn.Module, head: nn.Module):
        self.model, self.head = model, head
        self.hidden: Tensor | None = None
        self.empty: Tensor | None = None
        self.calls = 0
        self.leaf_calls: list[tuple[nn.Module, bool, Any]] = []
        self.output = None
        self.handles: list = []

    def __enter__(self):
        self.handles.append(self.head.register_forward_pre_hook(self._pre, with_kwargs=True))
        self.handles.append(self.head.register_forward_hook(self._post))
        for m in self.head.modules():
            if m is not self.head and next(m.children(), None) is None:
                self.handles.append(m.register_forward_hook(self._leaf))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        return False

    def _pre(self, module, args, kwargs):
        self.calls += 1
        if self.calls > 1:
            raise PatchError(f"{_name(self.model)}: the LM head ({type(self.head).__name__}) ran twice in one "
                             f"forward; fusedloss does not know which call the loss reads")
        hidden = args[0] if args else kwargs.get("input")
        if not torch.is_tensor(hidden) or hidden.dim() < 2:
            raise PatchError(f"{_name(self.model)}: the LM head got {type(hidden).__name__} input; "
                             f"expected the hidden states (..., T, D)")
        self.hidden = hidden
        self.empty = hidden.narrow(-2, 0, 0)  # no rows: the stock forward's logits are (..., 0, V)
        if args:
            return (self.empty,) + tuple(args[1:]), kwargs
        return args, dict(kwargs, input=self.empty)

    def _leaf(self, module, args, out):
        self.leaf_calls.append((module, bool(args) and args[0] is self.empty, out))

    def _post(self, module, args, out):
        self.output = out

    def weight_and_bias(self) -> tuple[Tensor, Tensor | None]:
        """The weight and bias the head's call applied to its input, or a PatchError."""
        name, head = _name(self.model), self.head
        if self.calls == 0:
            raise PatchError(f"{name}: the forward did not call its LM head ({type(head).__name__}, "
                             f"get_output_embeddings()) before its loss_function; cannot fuse it")
        if next(head.children(), None) is None:
            if type(head) is not nn.Linear:
                raise PatchError(f"{name}: the LM head is a {type(head).__module__}.{type(head).__name__}, not a "
                                 f"torch.nn.Linear; fusedloss cannot reproduce its output exactly")
            return head.weight, head.bias
        # A wrapper (e.g. PEFT's ModulesToSaveWrapper): exactly one plain Linear must have run, on
        # the head's own input, and its output must be the head's output.
        if (len(self.leaf_calls) == 1 and type(self.leaf_calls[0][0]) is nn.Linear and self.leaf_calls[0][1]
                and self.leaf_calls[0][2] is self.output):
            leaf = self.leaf_calls[0][0]
            return leaf.weight, leaf.bias
        ran = ", ".join(type(m).__name__ for m, _, _ in self.leaf_calls) or "no leaf module"
        raise PatchError(f"{name}: the LM head is a {type(head).__name__} wrapper whose output is not one "
                         f"torch.nn.Linear applied to its input (it ran: {ran}); fusedloss cannot identify the "
                         f"weight it applies (a LoRA adapter on lm_head, a quantized head, mixed adapter batches "
                         f"are not supported; modules_to_save=['lm_head'] is)")


def _name(model) -> str:
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    return f"{type(model).__name__}" + (f" (model_type {mt!r})" if mt else "")


# ----------------------------------------------------------------------------
# The patch
# ----------------------------------------------------------------------------

@dataclass
class _Call:
    mode: str                      # "fused" or "logits"
    capture: _HeadCapture | None
    loss_calls: int = 0
    teacher_out: Any = None        # with a teacher: (hidden, weight, bias) on the fused path, else its logits


@dataclass
class _Patch:
    model: nn.Module
    family: Family
    loss: str
    opts: dict
    skip_logits: bool | None
    original_forward: Callable
    had_loss_function: bool
    old_loss_function: Any
    call: _Call | None = None
    labels_index: int | None = None
    teacher: Any = None            # hf_distill.Teacher when distilling
    arg_names: tuple = ()          # the stock forward's positional parameter names

    # The model's loss_function while patched: transformers calls it as
    # loss_function(logits, labels, vocab_size, **kwargs) (ForCausalLMLoss's signature).
    def loss_function(self, logits=None, labels=None, vocab_size=None, num_items_in_batch=None, ignore_index=-100,
                      shift_labels=None, **kwargs):
        call = self.call
        name = _name(self.model)
        if call is None:
            raise RuntimeError(f"{name}: the loss_function of a model patched by fusedloss was called outside its "
                               f"forward; call the model (or unpatch_causal_lm it) instead")
        call.loss_calls += 1
        shift = _shift(labels, shift_labels, ignore_index)
        reduction = "mean" if num_items_in_batch is None else "sum"
        if call.mode == "fused":
            weight, bias = call.capture.weight_and_bias()
            if vocab_size is not None and weight.shape[0] != vocab_size:
                raise ValueError(f"{name}: the LM head has {weight.shape[0]} rows but the forward passes "
                                 f"vocab_size={vocab_size} (the stock loss's logits.view(-1, vocab_size) would "
                                 f"fail too)")
            softcap, scale = self.family.post(self.model)
            hidden = call.capture.hidden
            if scale != 1.0:  # (s h) W^T + s b = s (h W^T + b)
                hidden = hidden * scale
                bias = None if bias is None else bias * scale
            shift = shift.to(hidden.device)
            if self.teacher is not None:
                from .hf_distill import fused_loss
                value = fused_loss(self.teacher, call.teacher_out, hidden, weight, bias, shift, self.loss, self.opts,
                                   ignore_index, reduction)
                return _reduce(value, num_items_in_batch)
            value, _ = linear_softmax_loss_float(hidden, weight, shift, self.loss, bias=bias,
                                                 ignore_index=ignore_index, reduction=reduction, softcap=softcap,
                                                 **self.opts)
            return _reduce(value, num_items_in_batch)
        # The logits path: the stock forward computed (and post-processed) the logits.
        if self.teacher is not None:
            from .hf_distill import logits_loss
            value = logits_loss(self.teacher, call.teacher_out, logits, shift, self.loss, self.opts, ignore_index,
                                reduction)
            return _reduce(value, num_items_in_batch)
        v = vocab_size if vocab_size is not None else logits.shape[-1]
        flat = logits.float().view(-1, v)
        shift = shift.reshape(-1).to(flat.device)
        opts = {k: val for k, val in self.opts.items() if k != "chunk_rows"}
        if "class_weight" in opts:
            opts["weight"] = opts.pop("class_weight")
        value = softmax_loss(flat, shift, self.loss, ignore_index=ignore_index, reduction=reduction, **opts)
        return _reduce(value, num_items_in_batch)

    def fused(self) -> bool:
        if self.skip_logits is None:
            return self.model.training
        return bool(self.skip_logits)


def _has_labels(patch: _Patch, args, kwargs) -> bool:
    """Whether the stock forward will compute a loss: ``labels`` given (``shift_labels`` alone
    gives no loss in the stock forward, so not here either)."""
    labels = kwargs.get("labels")
    if labels is None and patch.labels_index is not None and len(args) > patch.labels_index:
        labels = args[patch.labels_index]
    return labels is not None


def _check_no_outside_loss(patch: _Patch) -> None:
    """A call without labels from a transformers Trainer that computes the loss from the logits
    itself (``label_smoothing_factor``, ``compute_loss_func``) would train the Trainer's loss,
    not the patched one: refuse it."""
    frame = sys._getframe(2)
    for _ in range(40):
        if frame is None:
            return
        if frame.f_code.co_name == "compute_loss":
            trainer = frame.f_locals.get("self")
            if trainer is not None and any(c.__name__ == "Trainer" and c.__module__.startswith("transformers.")
                                           for c in type(trainer).__mro__):
                if getattr(trainer, "label_smoother", None) is not None:
                    raise PatchError(
                        f"{_name(patch.model)} is patched with fusedloss ({patch.loss!r}) but the Trainer's "
                        f"label_smoothing_factor={trainer.args.label_smoothing_factor} pops the labels and applies "
                        f"its own label-smoothed cross-entropy to the logits, so the patched loss would not be "
                        f"trained. Use fusedloss.hf.FusedLossTrainer (it gives label_smoothing_factor to the fused "
                        f"loss), or patch_causal_lm(model, {patch.loss!r}, label_smoothing=...) with "
                        f"label_smoothing_factor=0")
                if getattr(trainer, "compute_loss_func", None) is not None:
                    raise PatchError(
                        f"{_name(patch.model)} is patched with fusedloss ({patch.loss!r}) but the Trainer has a "
                        f"compute_loss_func, which pops the labels and computes its own loss from the logits; "
                        f"drop one of the two")
                return
        frame = frame.f_back


def _output_without_logits(out, return_dict: bool):
    """The stock output with logits None; for ``return_dict=False`` its tuple with ``None`` at
    the logits' place (the other entries where the stock tuple has them)."""
    items = {k: v for k, v in out.items() if k != "logits"}
    new = type(out)(**items)
    if return_dict:
        return new
    return tuple(getattr(new, f.name) for f in fields(new) if f.name == "logits" or getattr(new, f.name) is not None)


class _PatchedForward:
    """The patched ``model.forward``: an object, not a closure, so ``copy.deepcopy`` of a
    patched model gives a copy whose forward runs the copy (its patch, bound method and model
    are copied with it). ``__wrapped__`` is the stock forward: ``inspect.signature`` shows the
    stock signature (Trainer's ``remove_unused_columns`` reads it)."""

    def __init__(self, patch: _Patch):
        self.patch = patch
        functools.update_wrapper(self, patch.original_forward)

    def __call__(self, *args, **kwargs):
        patch = self.patch
        model, original = patch.model, patch.original_forward
        if not _has_labels(patch, args, kwargs):
            _check_no_outside_loss(patch)
            return original(*args, **kwargs)
        if patch.call is not None:
            raise RuntimeError(f"{_name(model)}: a patched forward was re-entered")
        teacher_out = None
        if patch.teacher is not None:  # before the student: the teacher's run holds no graph
            inputs = patch.teacher.inputs(list(patch.arg_names), args, kwargs, model)
            teacher_out = patch.teacher.hidden(inputs) if patch.fused() else patch.teacher.logits(inputs)
        if not patch.fused():
            patch.call = _Call("logits", None, teacher_out=teacher_out)
            try:
                out = original(*args, **kwargs)
            finally:
                call, patch.call = patch.call, None
            _check_loss_called(patch, call)
            return out
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(model.config, "return_dict", True)
        head = model.get_output_embeddings()
        if head is None:
            raise PatchError(f"{_name(model)}: get_output_embeddings() is None; no LM head to fuse")
        with _HeadCapture(model, head) as capture:
            patch.call = _Call("fused", capture, teacher_out=teacher_out)
            try:
                out = original(*args, return_dict=True, **kwargs)
            finally:
                call, patch.call = patch.call, None
        _check_loss_called(patch, call)
        return _output_without_logits(out, return_dict)


def _check_loss_called(patch: _Patch, call: _Call) -> None:
    if call.loss_calls != 1:
        raise RuntimeError(f"{_name(patch.model)}: its forward called loss_function {call.loss_calls} times with "
                           f"labels (expected once); the patched loss cannot be guaranteed")


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT model (``PeftModel.get_base_model()``), or the model."""
    if type(model).__module__.startswith("peft.") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def check_patchable(model: nn.Module) -> Family:
    """The :class:`Family` of ``model``, or a :class:`PatchError` naming the model and what
    cannot be honoured."""
    cls = type(model)
    fam = FAMILIES.get(cls.__name__)
    import transformers
    if fam is None or getattr(transformers, cls.__name__, None) is not cls:
        known = [k.__name__ for k in cls.__mro__[1:] if k.__name__ in FAMILIES]
        where = f" (a subclass of {known[0]} from {cls.__module__}: its forward is not the one read)" if known else ""
        raise PatchError(f"{_name(model)}{where}: not a model class fusedloss.hf knows; its forward may change the "
                         f"logits before the loss. Patchable: {', '.join(sorted(FAMILIES))}")
    cfg = getattr(model, "config", None)
    for attr in LOGIT_ATTRIBUTES:
        if attr in fam.honours:
            continue
        value = getattr(cfg, attr, None)
        if value is not None:
            raise PatchError(f"{_name(model)}: its config sets {attr}={value!r}, which changes the logits in other "
                             f"families but which {cls.__name__}'s forward does not apply; fusedloss refuses "
                             f"rather than guess")
    if model.get_output_embeddings() is None:
        raise PatchError(f"{_name(model)}: get_output_embeddings() is None; no LM head to fuse")
    if not hasattr(type(model), "loss_function"):
        raise PatchError(f"{_name(model)}: no loss_function hook to route the loss through")
    return fam


def patch_causal_lm(model: nn.Module, loss: str = "ce", *, skip_logits: bool | None = None,
                    teacher: nn.Module | None = None, temperature: float | None = None, divergence: str | None = None,
                    jsd_beta: float | None = None, kd_weight: float | None = None, **opts) -> nn.Module:
    """Make the model's labelled loss the fused ``loss`` (any of the six), everything else stock.

    Args:
        model: a transformers causal LM of a class in :data:`FAMILIES` (or a PEFT model around one:
            its base model is patched). Other classes raise :class:`PatchError` naming the model.
        loss: ``"ce", "bce", "nllr", "crl", "lace", "focal"``.
        skip_logits: ``None`` (default): with labels, the fused head (no logits) while
            ``model.training``, the stock logits and our loss computed from them in eval mode (so
            ``Trainer.evaluate`` gets logits for ``compute_metrics``). ``True``: always fused when
            labels are given (``logits`` None, in eval too). ``False``: never fused (logits always).
        opts: keywords of :func:`fusedloss.linear_softmax_loss`: ``class_weight``,
            ``label_smoothing``, ``alpha``, ``beta``, ``gamma``, ``z_loss``, ``backend``,
            ``chunk_rows``. Not ``softcap``, ``bias``, ``reduction``, ``ignore_index``,
            ``return_lse``: the model and the forward set them.
        teacher: a causal LM of :data:`FAMILIES` (or a PEFT model around one) with the student's
            vocabulary: the labelled loss becomes knowledge distillation from it,
            ``(1 - kd_weight) H + kd_weight T^2 divergence`` per counted token
            (:func:`fusedloss.distill_loss`; :mod:`fusedloss.integrations.hf_distill`). The teacher runs
            in the patched forward on the same ``input_ids``/``attention_mask``/``position_ids``, without
            gradients, in whatever mode it is in (put it in eval mode: :class:`DistillationTrainer` does).
        temperature, divergence, jsd_beta, kd_weight: the distillation's keywords (defaults 1.0, ``"kl"``,
            0.5, 0.5, those of :func:`fusedloss.distill_loss`); only with ``teacher``.

    Returns the model, patched in place (its ``forward`` wrapped with the stock signature, its
    ``loss_function`` replaced); :func:`unpatch_causal_lm` restores it. Patching again replaces
    the earlier patch.
    """
    target = _unwrap(model)
    for k, why in _REFUSED_OPTS.items():
        if k in opts:
            raise ValueError(f"patch_causal_lm does not take {k}=: {why}")
    if skip_logits not in (None, True, False):
        raise ValueError(f"skip_logits must be None, True or False; got {skip_logits!r}")
    from ..variants import variant_id
    variant_id(loss)
    fam = check_patchable(target)
    _check_opts(loss, opts)
    distill = {k: v for k, v in dict(temperature=temperature, divergence=divergence, jsd_beta=jsd_beta,
                                     kd_weight=kd_weight).items() if v is not None}
    teacher_state = None
    if teacher is not None:
        from .hf_distill import make_teacher
        teacher_state = make_teacher(target, teacher, loss, opts, skip_logits, distill)
    elif distill:
        raise ValueError(f"patch_causal_lm got {', '.join(f'{k}=' for k in distill)} without teacher=: "
                         f"distillation needs a teacher model")
    if "_fusedloss_patch" in target.__dict__:
        unpatch_causal_lm(target)
    original = target.forward
    sig = inspect.signature(original)
    names = [p.name for p in sig.parameters.values()
             if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    patch = _Patch(target, fam, loss, dict(opts), skip_logits, original,
                   "_loss_function" in target.__dict__, target.__dict__.get("_loss_function"),
                   labels_index=names.index("labels") if "labels" in names else None, teacher=teacher_state,
                   arg_names=tuple(names))
    target._fusedloss_patch = patch
    target.forward = _PatchedForward(patch)
    target.loss_function = patch.loss_function
    return model


_OPTS = ("class_weight", "label_smoothing", "alpha", "beta", "gamma", "z_loss", "backend", "chunk_rows")


def _check_opts(loss: str, opts: dict) -> None:
    """The options through the head's own checks (the class weight is checked at the first call,
    against the head's vocabulary)."""
    for k in opts:
        if k not in _OPTS:
            raise TypeError(f"patch_causal_lm got an unexpected keyword {k!r}; it takes {', '.join(_OPTS)}")
    from ..head import check_chunk_rows, check_loss_options
    check_loss_options(loss, "mean", -100, opts.get("label_smoothing", 0.0), opts.get("alpha", 1.5),
                       opts.get("beta", 1.0), opts.get("gamma", 2.0), opts.get("z_loss", 0.0), None)
    if opts.get("chunk_rows") is not None:
        check_chunk_rows(opts["chunk_rows"])


def patched_loss(model: nn.Module) -> tuple[str, dict] | None:
    """``(loss, options)`` of a patched model (or of the model inside a PEFT model), else None."""
    p = _unwrap(model).__dict__.get("_fusedloss_patch")
    return None if p is None else (p.loss, dict(p.opts))


def patched_teacher(model: nn.Module) -> tuple[nn.Module, dict] | None:
    """``(teacher, distillation keywords)`` of a model patched with a teacher, else None."""
    p = _unwrap(model).__dict__.get("_fusedloss_patch")
    return None if p is None or p.teacher is None else (p.teacher.model, dict(p.teacher.options))


def unpatch_causal_lm(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_causal_lm` (the stock forward and loss_function back)."""
    target = _unwrap(model)
    patch = target.__dict__.pop("_fusedloss_patch", None)
    if patch is not None:
        target.__dict__.pop("forward", None)
        if patch.had_loss_function:
            target._loss_function = patch.old_loss_function
        else:
            target.__dict__.pop("_loss_function", None)
    return model


# ----------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------

def _make_trainer_class():
    import transformers

    class FusedLossTrainer(transformers.Trainer):
        """``transformers.Trainer`` training the fused loss: ``FusedLossTrainer(model, args, ...,
        loss="crl", loss_options={"alpha": 1.5})``.

        Patches the model (:func:`patch_causal_lm`) unless it already is (then ``loss`` /
        ``loss_options``, when given, must match). ``args.label_smoothing_factor`` becomes the
        fused loss's ``label_smoothing`` (the Trainer's own label smoother, which would apply
        cross-entropy to the logits, is switched off). A ``compute_loss_func`` is refused.
        """

        def __init__(self, *args, loss: str | None = None, loss_options: dict | None = None,
                     skip_logits: bool | None = None, **kwargs):
            self._fusedloss = (loss, None if loss_options is None else dict(loss_options), skip_logits)
            super().__init__(*args, **kwargs)  # a model_init's model is patched in call_model_init
            if self.compute_loss_func is not None:
                raise PatchError("FusedLossTrainer computes the loss with fusedloss; compute_loss_func is refused")
            if self.model is not None:
                self._fusedloss_patch(self.model)
            self.label_smoother = None  # label_smoothing_factor is the fused loss's label_smoothing

        def call_model_init(self, trial=None):
            model = super().call_model_init(trial)
            self._fusedloss_patch(model)
            return model

        #: DistillationTrainer: (teacher, distillation keywords); None for FusedLossTrainer.
        _fusedloss_teacher: tuple | None = None

        def _fusedloss_patch(self, model) -> None:
            loss, options, skip_logits = self._fusedloss
            eps = float(self.args.label_smoothing_factor)
            current = patched_loss(model)
            teacher = self._fusedloss_teacher
            if current is not None and teacher is not None:
                have = patched_teacher(model)
                if have is None or have[0] is not teacher[0] or have[1] != {**_distill_defaults(), **teacher[1]}:
                    raise PatchError("the model is already patched (with another or no teacher); DistillationTrainer "
                                     "patches the student itself: pass it unpatched")
            if current is None:
                options = dict(options or {})
                have = float(options.get("label_smoothing", 0.0))
                if eps != 0.0 and have not in (0.0, eps):
                    raise PatchError(f"label_smoothing_factor={eps} but loss_options has label_smoothing={have}")
                if eps != 0.0:
                    options["label_smoothing"] = eps
                distill = {} if teacher is None else dict(teacher=teacher[0], **teacher[1])
                patch_causal_lm(model, loss or "ce", skip_logits=skip_logits, **distill, **options)
                return
            if (loss is not None and loss != current[0]) or (options is not None and options != current[1]):
                raise PatchError(f"the model is already patched with {current[0]!r} {current[1]}; FusedLossTrainer "
                                 f"got loss={loss!r} loss_options={options}")
            if skip_logits is not None:
                raise PatchError("the model is already patched; pass skip_logits to patch_causal_lm")
            if eps != 0.0:
                patch = _unwrap(model).__dict__["_fusedloss_patch"]
                have = float(patch.opts.get("label_smoothing", 0.0))
                if have not in (0.0, eps):
                    raise PatchError(f"label_smoothing_factor={eps} but the patched loss has "
                                     f"label_smoothing={have}")
                patch.opts["label_smoothing"] = eps

    class DistillationTrainer(FusedLossTrainer):
        """``FusedLossTrainer`` distilling the model (the student) from ``teacher_model``:
        ``DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
        temperature=2.0, divergence="kl", kd_weight=0.5, loss="ce")``.

        ``teacher_model`` is TRL's keyword (``GKDTrainer``); the loss per counted token is
        ``(1 - kd_weight) H + kd_weight T^2 divergence`` (:func:`fusedloss.distill_loss`, through the
        fused linear form while training: :func:`patch_causal_lm` with ``teacher=``). The teacher is
        put in eval mode and moved to ``args.device``; it is not a submodule of the student (the
        Trainer neither trains nor saves it). ``loss``, ``loss_options``, ``skip_logits`` and
        ``label_smoothing_factor`` as :class:`FusedLossTrainer` (they configure the hard loss ``H``).
        """

        def __init__(self, *args, teacher_model: nn.Module, temperature: float = 1.0, divergence: str = "kl",
                     jsd_beta: float = 0.5, kd_weight: float = 0.5, **kwargs):
            if not isinstance(teacher_model, nn.Module):
                raise TypeError(f"teacher_model must be a transformers causal LM (an nn.Module, loaded by the "
                                f"caller); got {type(teacher_model).__name__}")
            self._fusedloss_teacher = (teacher_model, dict(temperature=temperature, divergence=divergence,
                                                            jsd_beta=jsd_beta, kd_weight=kd_weight))
            teacher_model.eval()
            super().__init__(*args, **kwargs)
            teacher_model.to(self.args.device)
            self.teacher_model = teacher_model

    return FusedLossTrainer, DistillationTrainer


def _distill_defaults() -> dict:
    from .hf_distill import DISTILL_DEFAULTS
    return dict(DISTILL_DEFAULTS)


_TRAINERS: dict = {}


def __getattr__(name):
    if name in ("FusedLossTrainer", "DistillationTrainer"):
        if not _TRAINERS:
            _TRAINERS["FusedLossTrainer"], _TRAINERS["DistillationTrainer"] = _make_trainer_class()
        return _TRAINERS[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
