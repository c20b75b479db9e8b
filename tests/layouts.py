"""The input layouts users make, as small builders shared by the layout tests.

Every case starts from dense *base* tensors and builds the views a user would hand
the loss: sliced, strided, transposed or expanded logits, ``(N, C, d)`` inputs,
strided or int32 targets, strided or expanded weights, and the ways a per-row loss
reaches a scalar (``L.sum()`` and ``L.mean()`` give autograd an expanded
``grad_output`` of stride 0). The oracle rebuilds the same views from a float64 copy
of the bases, so gradients of expanded or overlapping views are accumulated by
autograd in both, and the comparison is on the bases' gradients.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

#: name -> (base shape from (N, C, d), view of the base: the logits the loss sees).
#: d > 0 only for the (N, C, d) layouts; the others ignore it.
LOGIT_LAYOUTS: dict[str, tuple[Callable, Callable]] = {
    "contiguous": (lambda n, c, d: (n, c), lambda b: b),
    "row_sliced": (lambda n, c, d: (n, c + 5), lambda b: b[:, : b.shape[1] - 5]),        # x[:, :C] of a wider tensor
    "col_offset": (lambda n, c, d: (n, c + 3), lambda b: b[:, 3:]),                       # rows start unaligned
    "row_strided": (lambda n, c, d: (2 * n, c), lambda b: b[::2]),                         # every other row
    "transposed": (lambda n, c, d: (c, n), lambda b: b.t()),                               # class stride N
    "expanded_rows": (lambda n, c, d: (1, c), None),                                       # one row, stride 0
    "ncd": (lambda n, c, d: (n, c, d), lambda b: b),                                       # class stride d
    "ncd_channels_last": (lambda n, c, d: (n, d, c), lambda b: b.permute(0, 2, 1)),       # class stride 1
    "vector": (lambda n, c, d: (c,), lambda b: b),                                         # (C,), target ()
    "vector_strided": (lambda n, c, d: (2 * c,), lambda b: b[::2]),
}

TARGET_LAYOUTS = ("contiguous", "strided", "int32", "int32_strided", "transposed", "expanded")
WEIGHT_LAYOUTS = (None, "contiguous", "strided", "expanded")
#: How the loss reaches the scalar that .backward() is called on.
REACH_NONE = ("sum", "mean", "weighted_sum", "subset", "backward_dense")
REACH_REDUCED = ("backward", "scaled", "expanded_sum", "negated")


def logits_view(layout: str, base: torch.Tensor, n: int) -> torch.Tensor:
    if layout == "expanded_rows":
        return base.expand(n, base.shape[1])
    return LOGIT_LAYOUTS[layout][1](base)


def target_shape(layout: str, n: int, d: int) -> tuple[int, ...]:
    if layout.startswith("vector"):
        return ()
    if layout.startswith("ncd"):
        return (n, d)
    return (n,)


def make_target(values: torch.Tensor, layout: str) -> torch.Tensor:
    """``values`` (int64, the wanted target) in the given memory layout; equal values."""
    if layout in ("int32", "int32_strided"):
        values = values.int()
    if values.dim() == 0 or values.numel() == 0:
        return values
    if layout in ("strided", "int32_strided"):
        big = torch.full(values.shape[:-1] + (2 * values.shape[-1],), -12345, dtype=values.dtype)
        big[..., ::2] = values
        return big[..., ::2]
    if layout == "expanded":  # one class for every row (stride 0): the values change to values[0]
        return values.reshape(-1)[:1].reshape((1,) * values.dim()).expand(values.shape)
    if layout == "transposed" and values.dim() == 2:
        return values.t().contiguous().t()
    return values


def make_weight(values: torch.Tensor | None, layout: str | None) -> torch.Tensor | None:
    if layout is None or values is None:
        return None
    if layout == "strided":
        big = torch.full((2 * values.shape[0],), -7.0, dtype=values.dtype)
        big[::2] = values
        return big[::2]
    if layout == "expanded":
        return values[:1].expand(values.shape[0])
    return values


def reach_scalar(out: torch.Tensor, how: str, seed: int = 0) -> torch.Tensor:
    """The scalar a user backpropagates from the loss ``out`` (float64 math for the oracle
    is the same expression on the float64 loss)."""
    g = torch.Generator().manual_seed(seed)
    if how in ("sum", "backward"):
        return out.sum()
    if how == "mean":
        return out.mean()
    if how == "weighted_sum":
        r = (0.25 + torch.rand(out.shape, generator=g)).to(out.dtype)
        return (out * r).sum()
    if how == "subset":
        flat = out.reshape(-1)
        idx = torch.randperm(flat.numel(), generator=g)[: max(1, flat.numel() // 2)]
        return flat[idx].sum()
    if how == "backward_dense":
        return (out * torch.ones_like(out)).sum()
    if how == "scaled":
        return out * 2.5
    if how == "expanded_sum":
        return out.expand(3).sum()
    if how == "negated":
        return -out
    raise ValueError(how)


def rows_of(view: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N * d, C) rows and their targets, as the oracle evaluates them."""
    if view.dim() == 1:
        return view[None, :], target.reshape(1)
    if view.dim() > 2:
        return view.movedim(1, -1).reshape(-1, view.shape[1]), target.reshape(-1)
    return view, target


@dataclass
class Case:
    loss: str
    dtype: torch.dtype
    reduction: str
    layout: str
    target_layout: str
    weight_layout: str | None
    reach: str
    n: int
    c: int
    d: int = 0
    scale: float = 3.0
    ignore_index: int = -100
    n_ignored: int = 0
    label_smoothing: float = 0.0
    alpha: float = 1.5
    beta: float = 1.0
    gamma: float = 2.0
    inplace: bool = False
    seed: int = 0

    def kwargs(self) -> dict:
        return dict(reduction=self.reduction, ignore_index=self.ignore_index,
                    label_smoothing=self.label_smoothing, alpha=self.alpha, beta=self.beta, gamma=self.gamma)

    def build(self):
        """(base logits in the case's dtype, target, weight or None) with fixed values."""
        g = torch.Generator().manual_seed(self.seed)
        shape = LOGIT_LAYOUTS[self.layout][0](self.n, self.c, self.d)
        base = (self.scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(self.dtype)
        tshape = target_shape(self.layout, self.n, self.d)
        values = torch.randint(0, self.c, tshape, generator=g)
        if self.n_ignored and values.numel():
            flat = values.reshape(-1)
            flat[torch.randperm(flat.numel(), generator=g)[: self.n_ignored]] = self.ignore_index
        w = (0.5 + 1.5 * torch.rand(self.c, generator=g)) if self.weight_layout else None
        return base, make_target(values, self.target_layout), make_weight(w, self.weight_layout)
