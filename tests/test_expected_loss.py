"""Class probabilities for every loss (the expected loss sum_k w_k q'_k L(x, k)) and label
smoothing as the expected loss under the uniform part, on every backend that runs here, against
the float64 oracle (tests/oracle.py, written independently): all six losses x reductions x weight x
smoothing x fp32/bf16 on a batch whose rows are Dirichlet draws, one-hot, two-hot, timm's
mixup_target with smoothing, rows with zeros, a class leading by 30 and by 200; one-hot ==
class index and two-hot == the two-target form row by row; timm's Mixup output fed to every loss;
the backward ops from the stats; the errors where a backend is not updated."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import fusedloss as fl
from fusedloss import dispatch, ops, parallel
from fusedloss.variants import LOSSES, Reduction, variant_id
from oracle import (TOLERANCES, assert_close, oracle_loss_and_grad, oracle_soft_loss,
                    oracle_soft_loss_and_grad)

timm_mixup = pytest.importorskip("timm.data.mixup")

BACKENDS = [b for b in ("reference", "cpu") if b in fl.available_backends()]
if torch.cuda.is_available() and "cuda" in fl.available_backends():
    BACKENDS.append("cuda")  # the CUDA kernels (compile-checked on machines without a GPU)
C = 37


def _dev(backend: str) -> str:
    return "cuda" if backend == "cuda" else "cpu"


def _batch(dtype, seed=0, c=C):
    """Logits and probability rows of every kind the issue names, 14 rows."""
    g = torch.Generator().manual_seed(seed)
    n = 14
    x = 3 * torch.randn(n, c, generator=g, dtype=torch.float64)
    q = torch.zeros(n, c, dtype=torch.float64)
    # Dirichlet rows
    q[0:3] = torch.distributions.Dirichlet(torch.full((c,), 0.5, dtype=torch.float64)).sample((3,))
    # one-hot, two-hot
    q[3, 5] = 1.0
    q[4, 2], q[4, 9] = 0.3, 0.7
    # timm's mixup_target with smoothing (y_b = the flipped batch)
    t = torch.tensor([1, 4, 7, 30])
    q[5:9] = timm_mixup.mixup_target(t, c, lam=0.35, smoothing=0.1).double()
    # rows with zeros (half the classes have no mass)
    z = torch.rand(2, c, generator=g, dtype=torch.float64)
    z[:, ::2] = 0
    q[9:11] = z / z.sum(1, keepdim=True)
    # a class leading by 30 and by 200: mass on it, and mass elsewhere
    for r, lead in ((11, 30.0), (12, 200.0), (13, 200.0)):
        x[r, 3] = x[r].max() + lead
        q[r] = torch.softmax(torch.randn(c, generator=g, dtype=torch.float64), 0)
    q[12] = 0
    q[12, 3] = 0.9
    q[12, 10] = 0.1
    x = x.to(dtype)
    return x, q.to(dtype)


def _run(fn, x, q, go=None, **kw):
    xr = x.clone().requires_grad_(True)
    qr = q.clone().requires_grad_(True)
    out = fn(xr, qr, **kw)
    out.backward(torch.ones_like(out) if go is None else go)
    return out.detach(), xr.grad, qr.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_soft_targets_against_float64(backend, loss, reduction, use_weight, eps, dtype):
    x, q = _batch(dtype, seed=1)
    w = (torch.rand(C, generator=torch.Generator().manual_seed(3)) + 0.3) if use_weight else None
    go = torch.linspace(0.5, 2.0, x.shape[0]) if reduction == "none" else None
    kw = dict(weight=w, reduction=reduction, label_smoothing=eps)
    d = _dev(backend)
    kw_d = dict(kw, weight=None if w is None else w.to(d))
    out, gx, gq = _run(lambda a, b, **k: fl.softmax_loss(a, b, loss, backend=backend, **k), x.to(d), q.to(d),
                       None if go is None else go.to(d), **kw_d)
    ref, rgx, rgq = oracle_soft_loss_and_grad(x, q, loss, go, **kw)
    assert_close(out.cpu(), ref, dtype, "loss", f"{backend} {loss}")
    assert_close(gx.cpu(), rgx, dtype, "grad", f"{backend} {loss} d/dx")
    assert_close(gq.cpu(), rgq, dtype, "grad", f"{backend} {loss} d/dq")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_minus_inf_logits_without_mass(backend, loss, use_weight, dtype):
    """A -inf logit whose class has no target mass adds 0 (not 0 * inf = NaN) to the loss and
    gets a 0 gradient: the same numbers as a logit so low that its p is 0 in float64 (the oracle
    on that stand-in). The CPU kernel's pass 2 takes m h as one multiply-add and redoes the row
    with the 0 where the sum came out NaN: this is the row that takes that path."""
    x, q = _batch(dtype, seed=5)
    x, q = x[:4].clone(), q[:4].clone()
    for r, cols in ((0, [1, 7]), (1, [0]), (2, [36]), (3, list(range(0, C, 3)))):
        x[r, cols] = -math.inf
        q[r, cols] = 0
    q = (q / q.sum(1, keepdim=True)).to(dtype)
    w = (torch.rand(C, generator=torch.Generator().manual_seed(6)) + 0.3) if use_weight else None
    d = _dev(backend)
    out, gx, _ = _run(lambda a, b, **k: fl.softmax_loss(a, b, loss, backend=backend, **k), x.to(d), q.to(d),
                      reduction="none", weight=None if w is None else w.to(d))
    stand_in = torch.where(torch.isinf(x), torch.full_like(x, -1e4), x)
    ref, rgx, _ = oracle_soft_loss_and_grad(stand_in, q, loss, None, weight=w, reduction="none",
                                            label_smoothing=0.0)
    assert torch.isfinite(out).all() and torch.isfinite(gx).all(), (loss, out, gx)
    assert_close(out.cpu(), ref, dtype, "loss", f"{backend} {loss}")
    assert_close(gx.cpu(), rgx, dtype, "grad", f"{backend} {loss} d/dx")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_hot_is_class_index_and_two_hot_is_two_targets(backend, loss, use_weight, eps, dtype):
    x, _ = _batch(dtype, seed=2)
    n = x.shape[0]
    g = torch.Generator().manual_seed(4)
    w = (torch.rand(C, generator=g, dtype=dtype) + 0.3) if use_weight else None
    ta = torch.randint(0, C, (n,), generator=g)
    ta[11] = ta[12] = 3  # the leading class is the target
    tb = torch.randint(0, C, (n,), generator=g)
    tb[13] = 3           # ... or the second target
    lam = torch.rand(n, generator=g, dtype=dtype)
    tol = TOLERANCES[dtype]["loss"]
    d = _dev(backend)
    x, ta, tb, lam = x.to(d), ta.to(d), tb.to(d), lam.to(d)
    w = None if w is None else w.to(d)
    kw = dict(weight=w, reduction="none", label_smoothing=eps, backend=backend)
    one_hot = torch.nn.functional.one_hot(ta, C).to(dtype)
    a = fl.softmax_loss(x, ta, loss, **kw)
    b = fl.softmax_loss(x, one_hot, loss, **kw)
    torch.testing.assert_close(b, a, rtol=tol[0], atol=tol[1])
    two_hot = lam[:, None] * torch.nn.functional.one_hot(ta, C).to(dtype) + \
        (1 - lam)[:, None] * torch.nn.functional.one_hot(tb, C).to(dtype)
    a = fl.softmax_loss(x, (ta, tb, lam), loss, **kw)
    b = fl.softmax_loss(x, two_hot, loss, **kw)
    torch.testing.assert_close(b, a, rtol=tol[0], atol=tol[1])
    # ... and the class-index forms against the float64 oracle (smoothing as the expected loss)
    ref = oracle_loss_and_grad(x.cpu(), ta.cpu(), loss, weight=None if w is None else w.cpu(), reduction="none",
                               label_smoothing=eps)[0]
    assert_close(fl.softmax_loss(x, ta, loss, **kw).cpu(), ref, dtype, "loss", loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_class_index_smoothing_gradient_against_float64(backend, loss, reduction):
    """With weight, ignored rows and mixup's two targets (fused on cpu), fp32."""
    x, _ = _batch(torch.float32, seed=5)
    n = x.shape[0]
    g = torch.Generator().manual_seed(6)
    w = torch.rand(C, generator=g) + 0.3
    t = torch.randint(0, C, (n,), generator=g)
    # the target leading by 30; rows 12-13 have a wrong class leading by 200 (a target leading by 200
    # costs the float32 class-index nllr/crl gradient ~2.5e-6 of its max without smoothing already)
    t[11] = 3
    t[12] = 4
    t[0] = -100
    go = torch.linspace(0.5, 2.0, n) if reduction == "none" else None
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.2)
    xr = x.clone().requires_grad_(True)
    out = fl.softmax_loss(xr, t, loss, backend=backend, **kw)
    out.backward(torch.ones_like(out) if go is None else go)
    ref, rg = oracle_loss_and_grad(x, t, loss, go, **kw)
    assert_close(out.detach(), ref, torch.float32, "loss", loss)
    assert_close(xr.grad, rg, torch.float32, "grad", loss)
    # mixup's two targets with smoothing: lam L(a) + (1 - lam) L(b), each part reduced on its own
    tb = t.flip(0)
    lam = torch.rand(n, generator=g)
    xr = x.clone().requires_grad_(True)
    out = fl.softmax_loss(xr, (t, tb, lam), loss, backend=backend, **kw)
    out.backward(torch.ones_like(out) if go is None else go)
    x64 = x.double().requires_grad_(True)
    from oracle import oracle_loss
    ra = oracle_loss(x64, t, loss, **kw)
    rb = oracle_loss(x64, tb, loss, **kw)
    ref = lam.double() * ra + (1 - lam.double()) * rb if reduction == "none" else \
        (lam.double() * oracle_loss(x64, t, loss, **{**kw, "reduction": "none"})).sum() / (w[t.clamp(min=0)] * (t >= 0)).sum().double() \
        + ((1 - lam.double()) * oracle_loss(x64, tb, loss, **{**kw, "reduction": "none"})).sum() / (w[tb.clamp(min=0)] * (tb >= 0)).sum().double()
    (rg,) = torch.autograd.grad(ref, x64, torch.ones_like(ref) if go is None else go.double())
    assert_close(out.detach(), ref.detach(), torch.float32, "loss", loss)
    assert_close(xr.grad, rg, torch.float32, "grad", loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_timm_mixup_output_every_loss(backend, loss, mode):
    """timm's train.py defaults (--mixup 0.2 --cutmix 1.0 --smoothing 0.1): its Mixup's targets
    fed to every loss give the expected loss."""
    torch.manual_seed(7)
    n = 8
    mix = timm_mixup.Mixup(mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=C, mode=mode)
    images = torch.randn(n, 3, 8, 8)
    target = torch.randint(0, C, (n,))
    _, soft = mix(images, target)
    logits = 2 * torch.randn(n, C)
    out, gx, _ = _run(lambda a, b: fl.softmax_loss(a, b, loss, backend=backend), logits, soft)
    ref, rg, _ = oracle_soft_loss_and_grad(logits, soft, loss)
    assert_close(out, ref, torch.float32, "loss", loss)
    assert_close(gx, rg, torch.float32, "grad", loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_timm_targets_equal_two_targets_with_label_smoothing(backend):
    """timm folds --smoothing into its targets: mixup_target(t, C, lam, eps) gives, row by row, what
    (t, t.flip(0), lam) with label_smoothing=eps gives, for every loss."""
    x, _ = _batch(torch.float64, seed=8)
    t = torch.randint(0, C, (x.shape[0],), generator=torch.Generator().manual_seed(9))
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # timm builds its targets in the default dtype
    try:
        soft = timm_mixup.mixup_target(t, C, lam=0.3, smoothing=0.1)
    finally:
        torch.set_default_dtype(old)
    assert soft.dtype == torch.float64
    for loss in LOSSES:
        a = fl.softmax_loss(x, soft, loss, reduction="none", backend=backend)
        b = fl.softmax_loss(x, (t, t.flip(0), 0.3), loss, reduction="none", label_smoothing=0.1, backend=backend)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=loss)


def test_soft_ce_smoothed_mass_long_row():
    """The smoothed mass S = (1 - eps) sum w y + (eps / C) W, not C sums of eps / C: at C = 40000
    the fp32 gradient stays within the float32 tolerance of float64."""
    for backend in BACKENDS:
        g = torch.Generator().manual_seed(10)
        x = torch.randn(3, 40000, generator=g)
        q = torch.softmax(torch.randn(3, 40000, generator=g), 1)
        for loss in ("ce", "crl"):
            out, gx, _ = _run(lambda a, b: fl.softmax_loss(a, b, loss, label_smoothing=0.1, backend=backend), x, q)
            ref, rg, _ = oracle_soft_loss_and_grad(x, q, loss, label_smoothing=0.1)
            assert_close(out, ref, torch.float32, "loss", loss)
            assert (gx.double() - rg).abs().max().item() <= 2e-6 * rg.abs().max().item(), (backend, loss)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
@pytest.mark.parametrize("loss", LOSSES)
def test_cpu_backward_ops_from_stats(loss):
    """The non-fused backward ops (from the stats) equal the fused forward's gradient: soft targets
    and class indices with smoothing (one target and two)."""
    x, q = _batch(torch.float32, seed=11)
    v = variant_id(loss)
    be = dispatch.resolve("cpu", x.device)
    w = torch.rand(C) + 0.3
    for red in (Reduction.NONE, Reduction.MEAN):
        go = torch.linspace(0.5, 2.0, x.shape[0]) if red == Reduction.NONE else torch.tensor(1.5)
        args = (v, int(red), 0.1, 1.5, 1.0, 2.0)
        loss_fwd = be.family(ops.ProbsOps).loss_fwd
        loss_f, stats, grad = loss_fwd(x, q, w, *args, True)
        loss_n, stats_n, _ = loss_fwd(x, q, w, *args, False)
        torch.testing.assert_close(loss_n, loss_f, rtol=0, atol=0)
        g = torch.ops.fusedloss.ext_soft_loss_bwd(go, x, q, w, stats_n, *args)
        torch.testing.assert_close(g, grad * (go[:, None] if go.dim() else go), rtol=1e-5, atol=1e-7)
        t = torch.randint(0, C, (x.shape[0],))
        scalars = (v, int(red), -100, 0.1, 1.5, 1.0, 2.0, 0.01, 0.0)
        lf, st, gf = be.one_target.fwd(x, t, w, *scalars, True)
        g = be.one_target.bwd(go, x, t, w, st, *scalars)
        torch.testing.assert_close(g, gf * (go[:, None] if go.dim() else go), rtol=1e-5, atol=1e-7)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
def test_cpu_soft_loss_ops_opcheck():
    x, q = _batch(torch.float64, seed=12)
    x.requires_grad_(True)
    for loss in ("bce", "focal"):
        args = (variant_id(loss), int(Reduction.MEAN), 0.1, 1.5, 1.0, 2.0)
        for cg in (False, True):
            torch.library.opcheck(torch.ops.fusedloss.ext_soft_loss_fwd.default, (x, q, None, *args, cg))
        torch.library.opcheck(ops.reference_soft_loss_fwd, (x, q, None, *args, False))


def test_soft_targets_with_ignore_index_raise():
    x, q = _batch(torch.float32)
    with pytest.raises(ValueError, match="ignore_index"):
        fl.softmax_loss(x, q, "crl", ignore_index=0)
    with pytest.raises(NotImplementedError, match="z_loss"):
        fl.softmax_loss(x, q, "crl", z_loss=1e-4)


def test_backend_not_updated_raises_for_smoothing():
    """A backend whose kernels give the older smoothed-CE term refuses label_smoothing > 0 for loss != ce
    (the Triton and CUDA kernels, until updated); ce and eps = 0 pass."""
    ref = dispatch.resolve("reference", torch.device("cpu"))
    old_one = dataclasses.replace(ref.one_target, expected_smoothing=False)
    be = dataclasses.replace(ref, name="old", families=(old_one,) + tuple(f for f in ref.families
                                                                         if not isinstance(f, ops.OneTargetOps)))
    with pytest.raises(NotImplementedError, match="label_smoothing"):
        dispatch.check_smoothing(be, variant_id("focal"), 0.1)
    dispatch.check_smoothing(be, variant_id("ce"), 0.1)
    dispatch.check_smoothing(be, variant_id("focal"), 0.0)
    # fusedloss.parallel computes the expected term itself (tests/test_parallel.py): no refusal there.
    for loss in ("ce", "crl", "bce"):
        parallel.plan._config(loss, "mean", -100, 0.1, 1.5, 1.0, 2.0, 0.0, None)
