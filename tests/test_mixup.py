"""Mixup's two targets, ``target=(y_a, y_b, lam)``, for every loss: against a float64
evaluation of ``lam * L(y_a) + (1 - lam) * L(y_b)`` (each part reduced on its own), on the
reference (two passes) and the C++ CPU kernel (fused for ce/nllr/crl/lace/focal, two passes
for bce and with softcap); the fused op's opcheck and gradcheck; the errors.

Under ``TRITON_INTERPRET=1`` the triton backend joins (tests/test_triton_suite.py runs this
file with ``-k triton``)."""
from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

import fusedloss as fl
from fusedloss import dispatch, mixup
from fusedloss.variants import Reduction, variant_id
from oracle import assert_close, oracle_loss

BACKENDS = [b for b in ("reference", "cpu") if b in fl.available_backends()]
if os.environ.get("TRITON_INTERPRET") == "1" and dispatch.unavailable_reason("triton", torch.device("cpu")) is None:
    BACKENDS.append("triton")
OPTIONS = {"plain": {}, "smooth_z": dict(label_smoothing=0.1, z_loss=1e-2), "cap": dict(softcap=5.0)}


def oracle_mixed(x, ya, yb, lam, loss, reduction="mean", weight=None, ignore_index=-100, **kw):
    """float64: each part's rows from the oracle, the parts' own 'mean' denominators."""
    la = oracle_loss(x, ya, loss, weight=weight, ignore_index=ignore_index, reduction="none", **kw)
    lb = oracle_loss(x, yb, loss, weight=weight, ignore_index=ignore_index, reduction="none", **kw)
    lam = torch.as_tensor(lam, dtype=torch.float64).expand(la.shape)
    ra, rb = lam * la, (1 - lam) * lb
    if reduction == "none":
        return ra + rb
    if reduction == "sum":
        return ra.sum() + rb.sum()
    w = torch.ones(x.shape[1], dtype=torch.float64) if weight is None else weight.double()

    def denom(t):
        keep = t != ignore_index
        return torch.where(keep, w[torch.where(keep, t, 0)], 0.0).sum()

    return ra.sum() / denom(ya) + rb.sum() / denom(yb)


def oracle_mixed_and_grad(x, ya, yb, lam, loss, grad_output=None, **kw):
    x64 = x.detach().double().requires_grad_(True)
    out = oracle_mixed(x64, ya, yb, lam, loss, **kw)
    go = torch.ones_like(out) if grad_output is None else grad_output.double()
    (g,) = torch.autograd.grad(out, x64, go)
    return out.detach(), g


def _data(n, c, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(n, c, generator=g)).to(dtype)
    ya = torch.randint(0, c, (n,), generator=g)
    yb = torch.randint(0, c, (n,), generator=g)
    yb[0] = ya[0]              # both images of one class
    ya[2] = -100               # part a ignored
    yb[3] = -100               # part b ignored
    ya[4] = yb[4] = -100       # the whole row ignored
    lam = torch.rand(n, generator=g)
    lam[5] = 0.0               # a part that counts 0
    w = torch.rand(c, generator=g) + 0.5
    return x, ya, yb, lam, w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("loss", fl.LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_matches_float64(backend, option, loss, dtype):
    opts = OPTIONS[option]
    x, ya, yb, lam, w = _data(10, 23, dtype, seed=1)
    if dtype == torch.float64:
        w = w.double()
    for reduction in ("none", "mean", "sum"):
        for lam_arg in (lam, 0.3):
            xr = x.clone().requires_grad_(True)
            out = fl.softmax_loss(xr, (ya, yb, lam_arg), loss, weight=w, reduction=reduction, backend=backend,
                                  **opts)
            go = torch.linspace(0.5, 2.0, 10, dtype=out.dtype) if reduction == "none" else torch.tensor(1.3, dtype=out.dtype)
            out.backward(go)
            ref, ref_g = oracle_mixed_and_grad(x, ya, yb, lam_arg, loss, grad_output=go, weight=w,
                                               reduction=reduction, **opts)
            msg = f"{reduction} lam={'rows' if isinstance(lam_arg, torch.Tensor) else lam_arg}"
            assert_close(out, ref, dtype, "loss", msg)
            assert_close(xr.grad, ref_g, dtype, "grad", msg)


@pytest.mark.parametrize("loss", ["ce", "nllr", "crl", "lace", "focal"])
def test_cpu_fused_op_equals_two_passes(loss):
    """The fused kernel and the two-pass path agree (and the fused op is the one the cpu
    backend runs for these losses)."""
    if "cpu" not in BACKENDS:
        pytest.skip("C++ extension not built")
    be = dispatch.resolve("cpu", torch.device("cpu"))
    assert be.mix_fwd is not None
    two_pass = dataclasses.replace(be, mix_fwd=None)
    x, ya, yb, lam, w = _data(12, 4099, torch.float32, seed=2, scale=6.0)  # rows over one 8 KiB block
    for red in Reduction:
        scal = (int(variant_id(loss)), int(red), -100, 0.05, 1.5, 1.0, 2.0, 1e-3, 0.0)
        fused = mixup.mixed_loss(be, x, ya, yb, lam, w, scal, False)
        ref = mixup.mixed_loss(two_pass, x, ya, yb, lam, w, scal, False)
        assert_close(fused, ref, torch.float32, "loss", red.name)
        lo, stats, grad = torch.ops.fusedloss.ext_mix_fwd(x, ya, yb, lam, w, *scal, True)
        torch.testing.assert_close(lo, fused, rtol=0, atol=0)
        go = torch.ones_like(lo)
        g_bwd = torch.ops.fusedloss.ext_mix_bwd(go, x, ya, yb, lam, w, stats, *scal)
        _, ref_g = oracle_mixed_and_grad(x, ya, yb, lam, loss, weight=w, reduction=red.name.lower(),
                                         label_smoothing=0.05, z_loss=1e-3)
        assert_close(grad, ref_g, torch.float32, "grad", f"{red.name} fused")
        assert_close(g_bwd, ref_g, torch.float32, "grad", f"{red.name} backward op")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", fl.LOSSES)
def test_extreme_logits(backend, loss):
    """Either target leading by 200 (p = 1 in fp32: nllr's s overflows), or trailing."""
    x = torch.tensor([[200.0, 0.0, -3.0, 1.0], [0.0, 200.0, 1.0, 2.0], [-200.0, 0.0, 200.0, 1.0]])
    ya, yb = torch.tensor([0, 0, 0]), torch.tensor([1, 1, 2])
    lam = torch.tensor([0.3, 0.9, 0.5])
    xr = x.clone().requires_grad_(True)
    out = fl.softmax_loss(xr, (ya, yb, lam), loss, reduction="none", backend=backend, label_smoothing=0.1)
    out.sum().backward()
    ref, ref_g = oracle_mixed_and_grad(x, ya, yb, lam, loss, reduction="none", label_smoothing=0.1)
    assert torch.isfinite(xr.grad).all()
    assert_close(out, ref, torch.float32, "loss")
    assert_close(xr.grad, ref_g, torch.float32, "grad")


def test_cpu_mix_ops_opcheck_and_gradcheck():
    if "cpu" not in BACKENDS:
        pytest.skip("C++ extension not built")
    x, ya, yb, lam, w = _data(8, 6, torch.float64, seed=3)
    lam, w = lam.double(), w.double()
    fwd, bwd = torch.ops.fusedloss.ext_mix_fwd.default, torch.ops.fusedloss.ext_mix_bwd.default
    for loss in ("ce", "crl"):
        for red in Reduction:
            scal = (int(variant_id(loss)), int(red), -100, 0.1, 1.5, 1.0, 2.0, 1e-2, 0.0)
            for cg in (False, True):
                torch.library.opcheck(fwd, (x.clone().requires_grad_(True), ya, yb, lam, w, *scal, cg))
            lo, stats, _ = fwd(x, ya, yb, lam, w, *scal, False)
            torch.library.opcheck(bwd, (torch.rand_like(lo) + 0.5, x, ya, yb, lam, w, stats, *scal))
        xr = x.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda v: fl.softmax_loss(v, (ya, yb, lam), loss, weight=w, reduction="none", backend="cpu",
                                      label_smoothing=0.1).square().sum(), (xr,))


def test_compile_fullgraph():
    x, ya, yb, lam, _ = _data(6, 9, torch.float32, seed=4)
    backend = BACKENDS[-1] if BACKENDS[-1] != "triton" else "cpu"
    fn = torch.compile(lambda v: fl.softmax_loss(v, (ya, yb, lam), "crl", backend=backend), fullgraph=True,
                       backend="aot_eager")
    xr = x.clone().requires_grad_(True)
    out = fn(xr)
    out.backward()
    ref, ref_g = oracle_mixed_and_grad(x, ya, yb, lam, "crl")
    assert_close(out, ref, torch.float32, "loss")
    assert_close(xr.grad, ref_g, torch.float32, "grad")


def test_extra_dims_and_scalar_tensor_lam():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 4, generator=g)
    ya, yb = torch.randint(0, 7, (3, 4), generator=g), torch.randint(0, 7, (3, 4), generator=g)
    out = fl.softmax_loss(x, (ya, yb, torch.tensor(0.25)), "focal", reduction="none")
    x2 = x.movedim(1, -1).reshape(-1, 7)
    ref = oracle_mixed(x2.double(), ya.reshape(-1), yb.reshape(-1), 0.25, "focal", reduction="none")
    assert out.shape == (3, 4)
    assert_close(out.reshape(-1), ref, torch.float32, "loss")


@pytest.mark.parametrize("target,exc,words", [
    (lambda ya, yb: (ya, yb), ValueError, "(y_a, y_b, lam)"),
    (lambda ya, yb: (ya, yb, 1.5), ValueError, "lam"),
    (lambda ya, yb: (ya, yb, math.nan), ValueError, "lam"),
    (lambda ya, yb: (ya, yb, torch.ones(2)), ValueError, "lam"),
    (lambda ya, yb: (ya, yb, torch.ones(5, dtype=torch.long)), TypeError, "lam"),
    (lambda ya, yb: (ya.float(), yb, 0.5), TypeError, "y_a"),
    (lambda ya, yb: (ya, yb[:3], 0.5), ValueError, "target"),
    (lambda ya, yb: (ya, yb, "half"), TypeError, "lam"),
])
def test_bad_mixed_targets_raise(target, exc, words):
    x = torch.randn(5, 4)
    ya, yb = torch.tensor([0, 1, 2, 3, 0]), torch.tensor([1, 1, 0, 2, 3])
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        fl.softmax_loss(x, target(ya, yb), "crl")


def test_bad_target_values_raise_on_cpu():
    x = torch.randn(3, 4)
    with pytest.raises(IndexError):
        fl.softmax_loss(x, (torch.tensor([0, 1, 2]), torch.tensor([0, 9, 2]), 0.5), "ce")
