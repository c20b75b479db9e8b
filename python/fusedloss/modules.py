"""``nn.Module`` wrappers, with ``nn.CrossEntropyLoss``-style constructor arguments."""
from __future__ import annotations

from torch import Tensor, nn
from torch.nn import _reduction as _legacy_reduction

from .functional import softmax_loss
from .head import linear_softmax_loss
from .validation import check_z_loss_softcap
from .variants import variant_id


class SoftmaxLoss(nn.Module):
    """Module form of :func:`fusedloss.softmax_loss`: ``SoftmaxLoss(loss="crl", ...)(logits, target)``.

    ``weight`` is kept as a buffer, so it follows ``.to(device)`` and the state dict.
    """

    def __init__(self, loss: str = "ce", weight: Tensor | None = None, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0, alpha: float = 1.5,
                 beta: float = 1.0, gamma: float = 2.0, backend: str = "auto", z_loss: float = 0.0,
                 softcap: float | None = None) -> None:
        super().__init__()
        variant_id(loss)  # fail at construction, not at the first step
        check_z_loss_softcap(z_loss, softcap)
        self.loss = loss
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.backend = backend
        self.z_loss, self.softcap = z_loss, softcap

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        # The buffer from _buffers: Module.__getattr__ is the slow way to the same entry.
        return softmax_loss(logits, target, self.loss, weight=self._buffers["weight"], ignore_index=self.ignore_index,
                            reduction=self.reduction, label_smoothing=self.label_smoothing,
                            alpha=self.alpha, beta=self.beta, gamma=self.gamma, backend=self.backend,
                            z_loss=self.z_loss, softcap=self.softcap)

    def extra_repr(self) -> str:
        return _options_repr(self)


def _options_repr(module: nn.Module, *extra: str) -> str:
    """The loss options that differ from their defaults, for both modules' ``extra_repr``."""
    parts = [f"loss={module.loss!r}", f"reduction={module.reduction!r}"]
    if module.ignore_index != -100:
        parts.append(f"ignore_index={module.ignore_index}")
    if module.label_smoothing:
        parts.append(f"label_smoothing={module.label_smoothing}")
    if module.loss == "crl":
        parts.append(f"alpha={module.alpha}, beta={module.beta}")
    if module.loss == "focal":
        parts.append(f"gamma={module.gamma}")
    if module.z_loss:
        parts.append(f"z_loss={module.z_loss}")
    if module.softcap is not None:
        parts.append(f"softcap={module.softcap}")
    parts += extra
    if module.backend != "auto":
        parts.append(f"backend={module.backend!r}")
    return ", ".join(parts)


def _named(name: str, loss: str, formula: str) -> type[SoftmaxLoss]:
    # nn.CrossEntropyLoss's positional order, deprecated size_average / reduce included (they set
    # reduction with PyTorch's warning, as nn's losses do): a positional call written for it means
    # the same here. The options of the other losses are keyword-only.
    def __init__(self, weight: Tensor | None = None, size_average: bool | None = None, ignore_index: int = -100,
                 reduce: bool | None = None, reduction: str = "mean", label_smoothing: float = 0.0, *,
                 alpha: float = 1.5, beta: float = 1.0, gamma: float = 2.0, backend: str = "auto",
                 z_loss: float = 0.0, softcap: float | None = None) -> None:
        if size_average is not None or reduce is not None:
            reduction = _legacy_reduction.legacy_get_string(size_average, reduce)
        SoftmaxLoss.__init__(self, loss, weight, ignore_index, reduction, label_smoothing,
                             alpha, beta, gamma, backend, z_loss, softcap)

    doc = (f"``{loss}``: ``L = {formula}``. Arguments as :class:`torch.nn.CrossEntropyLoss`, in its order "
           f"(``weight``, ``size_average``, ``ignore_index``, ``reduce``, ``reduction``, ``label_smoothing``), "
           f"then, keyword-only, those of :func:`fusedloss.softmax_loss`.")
    return type(name, (SoftmaxLoss,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


CrossEntropyLoss = _named("CrossEntropyLoss", "ce", "-log p_c")
MultiClassBCELoss = _named("MultiClassBCELoss", "bce", "-log p_c - sum_{k!=c} log(1 - p_k)")
NLLRLoss = _named("NLLRLoss", "nllr", "log(1 - p_c) - log p_c")
CompetingRatioLoss = _named("CompetingRatioLoss", "crl", "beta * log(alpha + 1 - p_c) - log p_c")
LinearlyAdaptiveLoss = _named("LinearlyAdaptiveLoss", "lace", "-(1 - p_c) log p_c")
FocalLoss = _named("FocalLoss", "focal", "-(1 - p_c)^gamma log p_c")


class LinearSoftmaxLoss(nn.Module):
    """Module form of :func:`fusedloss.linear_softmax_loss`, the LLM head without the logits:
    ``LinearSoftmaxLoss("crl")(hidden, lm_head.weight, target, bias=None)``.

    It owns only the loss options (``class_weight`` as a buffer); the projection weight and
    bias belong to the model and are passed at each call."""

    def __init__(self, loss: str = "ce", class_weight: Tensor | None = None, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0, alpha: float = 1.5, beta: float = 1.0,
                 gamma: float = 2.0, z_loss: float = 0.0, softcap: float | None = None, return_lse: bool = False,
                 backend: str = "auto", chunk_rows: int | None = None) -> None:
        super().__init__()
        variant_id(loss)
        check_z_loss_softcap(z_loss, softcap)
        self.loss = loss
        self.register_buffer("class_weight", class_weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.z_loss, self.softcap, self.return_lse = z_loss, softcap, return_lse
        self.backend = backend
        self.chunk_rows = chunk_rows

    def forward(self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None):
        return linear_softmax_loss(hidden, weight, target, self.loss, bias=bias, class_weight=self.class_weight,
                                   ignore_index=self.ignore_index, reduction=self.reduction,
                                   label_smoothing=self.label_smoothing, alpha=self.alpha, beta=self.beta,
                                   gamma=self.gamma, z_loss=self.z_loss, softcap=self.softcap,
                                   return_lse=self.return_lse, backend=self.backend, chunk_rows=self.chunk_rows)

    def extra_repr(self) -> str:
        return _options_repr(self, *(["return_lse=True"] if self.return_lse else []))
