"""Every backend right for every input layout users make, loss and gradient against float64.

Two kinds of test over the same builders (``layouts.py``):

* one explicit case per layout of each input (logits, target, weight, grad_output),
  per backend, so a regression names the layout it broke;
* a property-based test (hypothesis) drawing N, C (1..300), dtype, loss, reduction,
  weight, ignore_index, label smoothing, the layout of every input and how the loss
  reaches the scalar. CI runs a fixed, derandomized budget; ``HYPOTHESIS_PROFILE=thorough``
  runs many more examples (profiles: ``conftest.py``).

Backends: those this process can run on CPU tensors: ``reference`` and ``cpu`` here;
``triton`` when the file runs under ``TRITON_INTERPRET=1`` (``test_triton_suite.py``
runs ``-k triton`` in such a subprocess), with its launch heuristics drawn too, so that
rows span several column blocks.
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import fusedloss as fl
from layouts import (LOGIT_LAYOUTS, REACH_NONE, REACH_REDUCED, TARGET_LAYOUTS, WEIGHT_LAYOUTS, Case, logits_view,
                     reach_scalar, rows_of)
from oracle import TOLERANCES, assert_close, oracle_loss

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = [b for b in ("reference", "cpu", "triton") if b in fl.available_backends()
            and (b != "triton" or INTERPRETED)]
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
#: Triton launch regimes: heuristics overrides ("stream": 16-column blocks, persistent grid).
REGIMES = {"default": {}, "single": dict(min_tile=128),
           "stream": dict(single_max=32, stream_block=16, min_tile=128, stream_programs=3)}

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on masked lanes (interpreter)


def _regime(backend: str, regime: str):
    if backend != "triton":
        return contextlib.nullcontext()
    from fusedloss.triton_kernels import heuristics
    return heuristics.override(**REGIMES[regime])


def run_case(case: Case, backend: str, regime: str = "default") -> None:
    """fl.softmax_loss on the case's views vs the float64 oracle on the same views."""
    base, target, weight = case.build()
    leaf = base.clone().requires_grad_(True)
    # inplace_backward consumes the logits: hand it a model-output-like non-leaf view.
    src = leaf * 1.0 if case.inplace else leaf
    logits = logits_view(case.layout, src, case.n)
    with _regime(backend, regime):
        out = fl.softmax_loss(logits, target, case.loss, weight=weight, backend=backend,
                              inplace_backward=case.inplace, **case.kwargs())
        reach_scalar(out, case.reach, case.seed).backward()

    base64 = base.detach().double().requires_grad_(True)
    view64 = logits_view(case.layout, base64, case.n)
    rows64, trows = rows_of(view64, target)
    ref = oracle_loss(rows64, trows, case.loss, weight=weight, **case.kwargs())
    if case.reduction == "none":
        ref = ref.reshape(target.shape)
    (gref,) = torch.autograd.grad(reach_scalar(ref, case.reach, case.seed), base64)

    # What the output dtype can hold: a float16 gradient of 1e-17 is 0 (underflow), not an error.
    ref, gref = ref.detach().to(case.dtype).double(), gref.to(case.dtype).double()
    msg = f"{backend} {regime} {case}"
    assert out.dtype == case.dtype and out.shape == ref.shape, msg
    assert_close(out.detach(), ref, case.dtype, "loss", msg)
    assert leaf.grad is not None and leaf.grad.shape == base.shape, msg
    if gref.numel() and bool((gref == 0).all()):
        # C = 1 (or every row ignored): the gradient is exactly 0, but a kernel forms it from
        # O(weight) terms (p_c - 1, label smoothing's eps/C (W p - w)); allow their rounding.
        bound = TOLERANCES[case.dtype]["grad"][1]
        assert leaf.grad.abs().max().item() <= bound, f"{msg}\nnonzero gradient {leaf.grad}"
    else:
        assert_close(leaf.grad, gref, case.dtype, "grad", msg)


# ----------------------------------------------------------------------------
# One explicit case per layout
# ----------------------------------------------------------------------------

def _plain(**kw) -> Case:
    base = dict(loss="crl", dtype=torch.float32, reduction="none", layout="contiguous", target_layout="contiguous",
                weight_layout=None, reach="sum", n=6, c=37, d=3, n_ignored=1, seed=3)
    base.update(kw)
    return Case(**base)


EXPLICIT = (
    # (C,) logits are one row: ignoring it would make the case vacuous.
    [pytest.param(_plain(layout=lay, n_ignored=0 if lay.startswith("vector") else 1), id=f"logits-{lay}")
     for lay in LOGIT_LAYOUTS]
    + [pytest.param(_plain(target_layout=tl, n_ignored=0), id=f"target-{tl}") for tl in TARGET_LAYOUTS]
    + [pytest.param(_plain(layout="ncd", target_layout=tl), id=f"ncd-target-{tl}") for tl in TARGET_LAYOUTS]
    + [pytest.param(_plain(weight_layout=wl, reduction="mean", reach="backward"), id=f"weight-{wl}")
       for wl in WEIGHT_LAYOUTS if wl]
    + [pytest.param(_plain(reach=r), id=f"none-{r}") for r in REACH_NONE]
    + [pytest.param(_plain(reduction=red, reach=r), id=f"{red}-{r}") for red in ("mean", "sum") for r in REACH_REDUCED]
    + [pytest.param(_plain(loss=lo, reach="mean", weight_layout="strided", target_layout="int32_strided"),
                    id=f"loss-{lo}") for lo in fl.LOSSES]
    + [pytest.param(_plain(loss="ce", label_smoothing=0.2, weight_layout="strided", target_layout="strided"),
                    id="ce-smoothing-strided")]
    + [pytest.param(_plain(n=0, reduction=red, reach=r), id=f"empty-{red}")
       for red, r in (("none", "sum"), ("sum", "backward"))]
    + [pytest.param(_plain(layout="ncd", d=0, reduction="sum", reach="backward"), id="ncd-zero-d")]
)


INPLACE = [pytest.param(_plain(layout=lay, reach=r, inplace=True), id=f"inplace-{lay}-{r}")
           for lay in ("contiguous", "row_sliced", "col_offset", "ncd") for r in ("sum", "mean", "subset")]
#: (backend, case): inplace_backward only exists on triton.
EXPLICIT_RUNS = [pytest.param(b, *p.values, id=f"{b}-{p.id}") for b in BACKENDS
                 for p in EXPLICIT + (INPLACE if b == "triton" else [])]


@pytest.mark.parametrize("backend,case", EXPLICIT_RUNS)
def test_layout(backend, case):
    run_case(case, backend, "stream")


@pytest.mark.parametrize("loss", fl.LOSSES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_over_no_counted_row(backend, loss):
    """Every row ignored, 'mean': 0/0 = NaN loss and a zero gradient, as F.cross_entropy
    (the property test leaves this convention out: autograd of 0/0 in the oracle is NaN)."""
    x = torch.randn(4, 7, requires_grad=True)
    target = torch.full((4,), -100)
    out = fl.softmax_loss(x, target, loss, reduction="mean", backend=backend)
    out.backward()
    x_torch = x.detach().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(x_torch, target).backward()
    assert torch.isnan(out) and torch.equal(x.grad, x_torch.grad) and not x.grad.any()


if "triton" in BACKENDS:  # inplace_backward is triton's; defined only where it runs (no skipped test)
    def test_triton_inplace_refuses_overlapping_rows():
        logits = (torch.randn(1, 9, requires_grad=True) * 1.0).expand(4, 9)
        with pytest.raises(ValueError, match="rows do not overlap"):
            fl.softmax_loss(logits, torch.zeros(4, dtype=torch.long), backend="triton", inplace_backward=True)


# ----------------------------------------------------------------------------
# The property: any combination
# ----------------------------------------------------------------------------

@st.composite
def cases(draw, backend: str):
    loss = draw(st.sampled_from(fl.LOSSES))
    layout = draw(st.sampled_from(sorted(LOGIT_LAYOUTS)))
    reduction = draw(st.sampled_from(("none", "mean", "sum")))
    n = 1 if layout.startswith("vector") else draw(st.integers(0, 12))
    d = draw(st.integers(0, 3)) if layout.startswith("ncd") else 0
    rows = n * (d if layout.startswith("ncd") else 1)
    ignore_index = draw(st.sampled_from((-100, 0, 2)))
    case = Case(
        loss=loss,
        dtype=draw(st.sampled_from(DTYPES)),
        reduction=reduction,
        layout=layout,
        target_layout=draw(st.sampled_from(TARGET_LAYOUTS)),
        weight_layout=draw(st.sampled_from(WEIGHT_LAYOUTS)),
        reach=draw(st.sampled_from(REACH_NONE if reduction == "none" else REACH_REDUCED)),
        n=n, d=d,
        c=draw(st.one_of(st.integers(1, 40), st.integers(41, 300))),
        scale=draw(st.sampled_from((0.1, 3.0, 30.0))),
        ignore_index=ignore_index,
        n_ignored=draw(st.integers(0, rows)),
        # Not eps = 1: there every gradient entry is p_j - 1/C, a difference of O(1/C) terms whose
        # float32 rounding (~1e-8, F.cross_entropy's too) exceeds a tolerance relative to the
        # tiny result; test_pytorch_parity.py checks eps = 1 against PyTorch.
        label_smoothing=draw(st.sampled_from((0.0, 0.1, 0.5))) if loss == "ce" else 0.0,
        alpha=draw(st.sampled_from((0.0, 1.5))), beta=draw(st.sampled_from((0.0, 1.0))),
        gamma=draw(st.sampled_from((0.0, 0.5, 2.0))),
        inplace=backend == "triton" and layout in ("contiguous", "row_sliced", "col_offset", "ncd")
        and draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )
    regime = draw(st.sampled_from(sorted(REGIMES))) if backend == "triton" else "default"
    return case, regime


def _degenerate(case: Case) -> bool:
    """Cases whose answer is a convention, not a layout question (tested in test_reference.py):
    'mean' over no counted row is 0/0 = NaN, as PyTorch; with C = 1, nllr (and crl with
    alpha = 0, where log(alpha + 1 - p_c) = log(0)) is the constant -inf (beta * -inf), whose
    gradient is undefined."""
    unbounded = case.loss == "nllr" or (case.loss == "crl" and case.alpha == 0 and case.beta > 0)
    if case.c == 1 and unbounded:
        return True
    if case.reduction != "mean":
        return False
    _, target, _ = case.build()
    return target.numel() == 0 or bool((target == case.ignore_index).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_any_layout_matches_float64(backend):
    @given(cases(backend))
    def check(drawn):
        case, regime = drawn
        assume(not _degenerate(case))
        run_case(case, backend, regime)

    check()
