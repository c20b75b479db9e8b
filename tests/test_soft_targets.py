"""Class-probability (soft) targets for ``ce`` on every backend that runs here: against
``F.cross_entropy`` in float64 (PyTorch's semantics: weight, label smoothing, 'mean' over
rows, the targets' own gradient) and against a float64 evaluation for half dtypes, long
rows, extreme logits; the fused gradient and the backward op from the stats; opcheck.

Under ``TRITON_INTERPRET=1`` the triton backend joins (tests/test_triton_suite.py runs this
file with ``-k triton``)."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

import fusedloss as fl
from fusedloss import dispatch, ops
from fusedloss.variants import Reduction
from oracle import assert_close

BACKENDS = [b for b in ("reference", "cpu") if b in fl.available_backends()]
if os.environ.get("TRITON_INTERPRET") == "1" and dispatch.unavailable_reason("triton", torch.device("cpu")) is None:
    BACKENDS.append("triton")


def _data(n, c, dtype, seed=0, scale=3.0, extra=()):
    g = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn((n, c) + extra, generator=g)).to(dtype)
    y = torch.softmax(2 * torch.randn((n, c) + extra, generator=g), 1).to(dtype)
    w = torch.rand(c, generator=g) + 0.3
    return x, y, w


def _loss_and_grads(fn, x, y, go=None, **kw):
    xr, yr = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    out = fn(xr, yr, **kw)
    out.backward(torch.ones_like(out) if go is None else go)
    return out.detach(), xr.grad, yr.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_matches_pytorch_float64(backend, reduction, use_weight, eps):
    x, y, w = _data(7, 13, torch.float64, seed=1, extra=(2,))
    w = w.double() if use_weight else None
    go = torch.linspace(0.5, 2.0, 14, dtype=torch.float64).reshape(7, 2) if reduction == "none" else None
    ours = _loss_and_grads(fl.cross_entropy, x, y, go, weight=w, reduction=reduction, label_smoothing=eps,
                           backend=backend)
    ref = _loss_and_grads(F.cross_entropy, x, y, go, weight=w, reduction=reduction, label_smoothing=eps)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _oracle(x, y, w, eps, reduction, go):
    """float64 loss and the logits' gradient by autograd of PyTorch's own formula."""
    x64 = x.double().requires_grad_(True)
    out = F.cross_entropy(x64, y.double(), weight=None if w is None else w.double(), reduction=reduction,
                          label_smoothing=eps)
    out.backward(go.double() if go is not None else torch.ones_like(out))
    return out.detach(), x64.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("c", [5, 3001])
def test_half_and_long_rows_against_float64(backend, dtype, c):
    """c = 3001: more than one CPU block for 2-byte dtypes' halves, a ragged tail everywhere."""
    x, y, w = _data(6, c, dtype, seed=2, scale=5.0)
    for reduction in ("none", "mean"):
        go = torch.linspace(0.5, 1.5, 6) if reduction == "none" else None
        out, gx, _ = _loss_and_grads(fl.cross_entropy, x, y, go, weight=w, reduction=reduction,
                                     label_smoothing=0.1, backend=backend)
        ref, ref_g = _oracle(x, y, w, 0.1, reduction, go)
        assert_close(out, ref, dtype, "loss", reduction)  # returned in the logits' dtype
        assert_close(gx, ref_g, dtype, "grad", reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,big", [(torch.float32, 100.0), (torch.float64, 1e4)], ids=str)
def test_extreme_logits_and_masked_classes(backend, dtype, big):
    """Large logit offsets (the loss is a sum of non-negative terms, never S lse - sum w y x, which
    cancels; fp32 itself rounds lse to ulp(big), hence 100 there) and -inf logits that carry no
    target mass (0, not NaN)."""
    x = torch.tensor([[big, big - 1.0, -big, 0.0], [0.0, -math.inf, 2.0, -math.inf], [-big, 3.0, 3.5, big]],
                     dtype=dtype)
    y = torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.5, 0.0, 0.5, 0.0], [0.0, 0.2, 0.2, 0.6]], dtype=dtype)
    out, gx, _ = _loss_and_grads(fl.cross_entropy, x, y, None, reduction="none", backend=backend)
    # PyTorch's own formula gives 0 * inf = NaN for the masked classes: the oracle is the sum of
    # y_k (lse - x_k) over the classes with mass, by float64 autograd.
    x64 = x.double().requires_grad_(True)
    y64 = y.double()
    lse = torch.logsumexp(x64, 1, keepdim=True)
    ref = torch.where(y64 > 0, y64 * (lse - torch.where(y64 > 0, x64, 0.0)), 0.0).sum(1)
    (ref_g,) = torch.autograd.grad(ref.sum(), x64)
    assert torch.isfinite(out).all() and torch.isfinite(gx).all()
    assert_close(out, ref.detach(), dtype, "loss")
    assert_close(gx, ref_g, dtype, "grad")


def _soft_bwd_op(backend):
    if backend == "reference":
        return ops.reference_soft_bwd
    if backend == "cpu":
        return torch.ops.fusedloss.ext_soft_bwd.default
    return torch.ops.fusedloss.triton_soft_bwd.default


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_op_and_fused_forward(backend):
    """The forward's fused gradient (grad_output 1) and the backward op from the stats (any
    grad_output), each against float64; the loss and stats do not change with compute_grad."""
    be = dispatch.resolve(backend, torch.device("cpu"))
    x, y, w = _data(9, 40, torch.float32, seed=3)
    for red in Reduction:
        name = red.name.lower()
        out, stats, grad = be.family(ops.ProbsOps).fwd(x, y, w, int(red), 0.05, True)
        out2, stats2, empty = be.family(ops.ProbsOps).fwd(x, y, w, int(red), 0.05, False)
        assert empty.numel() == 0
        torch.testing.assert_close(out, out2, rtol=0, atol=0)
        torch.testing.assert_close(stats, stats2, rtol=0, atol=0)
        _, ref_g = _oracle(x, y, w, 0.05, name, None)
        if be.family(ops.ProbsOps).fused_grad:
            assert_close(grad, ref_g, torch.float32, "grad", f"{name} fused")
        go = torch.linspace(0.5, 2.0, 9) if red == Reduction.NONE else torch.tensor(1.7)
        g_bwd = _soft_bwd_op(backend)(go, x, y, w, stats, int(red), 0.05)
        _, ref_g = _oracle(x, y, w, 0.05, name, go)
        assert_close(g_bwd, ref_g, torch.float32, "grad", f"{name} backward op")


def test_cpu_kernel_ops_opcheck():
    if "cpu" not in BACKENDS:
        pytest.skip("C++ extension not built")
    x, y, w = _data(5, 7, torch.float64, seed=4)
    fwd, bwd = torch.ops.fusedloss.ext_soft_fwd.default, torch.ops.fusedloss.ext_soft_bwd.default
    for red in Reduction:
        for cg in (False, True):
            torch.library.opcheck(fwd, (x.clone().requires_grad_(True), y, w.double(), int(red), 0.1, cg))
        lo, stats, _ = fwd(x, y, w.double(), int(red), 0.1, False)
        torch.library.opcheck(bwd, (torch.rand_like(lo) + 0.5, x, y, w.double(), stats, int(red), 0.1))


def test_probs_of_another_dtype_and_layout():
    """float32 targets with bfloat16 logits (cast once), transposed targets (copied once)."""
    x, y, _ = _data(8, 6, torch.bfloat16, seed=5)
    y32 = y.float().t().contiguous().t()
    for backend in BACKENDS:
        out = fl.cross_entropy(x, y32, backend=backend)
        ref, _ = _oracle(x, y32, None, 0.0, "mean", None)
        assert_close(out, ref, torch.bfloat16, "loss", backend)
