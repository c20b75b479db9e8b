"""``fl.cross_entropy`` is a drop-in for ``F.cross_entropy``: PyTorch is the oracle here,
across reduction x weight x ignore_index x label_smoothing x soft targets x extra dims x dtypes."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedloss as fl

TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 2e-6)}

GRID = list(itertools.product(
    ["none", "mean", "sum"],      # reduction
    [False, True],                # weight
    [-100, 1],                    # ignore_index (1 is a real class: some rows ignored)
    [0.0, 0.1, 1.0],              # label_smoothing
    [(), (3,), (2, 3)],           # extra dims
))


def _both(fn_args, x, **kw):
    outs, grads = [], []
    for f in (fl.cross_entropy, F.cross_entropy):
        xx = x.detach().clone().requires_grad_(True)
        out = f(xx, *fn_args, **kw)
        go = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
        out.backward(go)
        outs.append(out.detach())
        grads.append(xx.grad)
    return outs, grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("reduction,use_weight,ignore_index,eps,extra", GRID)
def test_class_index_targets(reduction, use_weight, ignore_index, eps, extra, dtype):
    g = torch.Generator().manual_seed(hash((reduction, use_weight, ignore_index, eps, extra)) % 2**31)
    n, c = 6, 5
    x = torch.randn((n, c) + extra, generator=g, dtype=dtype)
    t = torch.randint(0, c, (n,) + extra, generator=g)
    w = torch.rand(c, generator=g, dtype=dtype) + 0.2 if use_weight else None
    (a, b), (ga, gb) = _both((t,), x, weight=w, ignore_index=ignore_index, reduction=reduction, label_smoothing=eps)
    rtol, atol = TOL[dtype]
    assert a.shape == b.shape and a.dtype == b.dtype
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    torch.testing.assert_close(ga, gb, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("extra", [(), (4,)])
def test_probability_targets(reduction, use_weight, eps, extra, dtype):
    """Soft targets (mixup/cutmix), including the gradient with respect to the target."""
    g = torch.Generator().manual_seed(7)
    n, c = 5, 6
    x = torch.randn((n, c) + extra, generator=g, dtype=dtype)
    y = torch.softmax(torch.randn((n, c) + extra, generator=g, dtype=dtype), 1)
    w = torch.rand(c, generator=g, dtype=dtype) + 0.2 if use_weight else None
    results = []
    for f in (fl.cross_entropy, F.cross_entropy):
        xx, yy = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        out = f(xx, yy, weight=w, reduction=reduction, label_smoothing=eps)
        out.backward(torch.ones_like(out))
        results.append((out.detach(), xx.grad, yy.grad))
    rtol, atol = TOL[dtype]
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_inputs_close_to_pytorch_in_float32(dtype):
    """Half logits are computed in float32 (more exact than PyTorch's half path), returned in
    the logits' dtype: compare against PyTorch run on the float32 upcast."""
    x = torch.randn(64, 300, dtype=dtype)
    t = torch.randint(0, 300, (64,))
    ours = fl.cross_entropy(x, t, reduction="none")
    ref = F.cross_entropy(x.float(), t, reduction="none")
    assert ours.dtype == dtype
    torch.testing.assert_close(ours.float(), ref, rtol=1e-2, atol=1e-2)


def test_empty_batch_matches_pytorch():
    x = torch.randn(0, 4)
    t = torch.zeros(0, dtype=torch.long)
    assert fl.cross_entropy(x, t, reduction="none").shape == (0,)
    assert torch.isnan(fl.cross_entropy(x, t)) and torch.isnan(F.cross_entropy(x, t))
    assert fl.cross_entropy(x, t, reduction="sum") == 0


def test_all_rows_ignored_mean_is_nan_like_pytorch():
    x = torch.randn(3, 4)
    t = torch.full((3,), -100)
    assert torch.isnan(fl.cross_entropy(x, t)) and torch.isnan(F.cross_entropy(x, t))


def test_int32_targets():
    x = torch.randn(5, 4, dtype=torch.float64)
    t = torch.randint(0, 4, (5,))
    torch.testing.assert_close(fl.cross_entropy(x, t.int()), F.cross_entropy(x, t))


# --- the user's real paths around the call (found by a new-user review) ---------------------------

CPU_BACKENDS = [b for b in ("cpu", "reference") if b in fl.available_backends()]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("form", ["index", "soft", "mixup"])
@pytest.mark.parametrize("early_stop", [True, False])
def test_non_reentrant_checkpoint_around_the_loss(backend, form, early_stop):
    """``torch.utils.checkpoint(use_reentrant=False)`` (the default recommendation; early stop on)
    ends its recomputation by raising from a saved-tensor hook: that exception must pass through
    the loss untouched (the eager fast path once caught it and ran the loss a second time, which
    failed the backward with checkpoint's AssertionError)."""
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

    g = torch.Generator().manual_seed(3)
    h = torch.randn(5, 3, generator=g, dtype=torch.float64)
    w0 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 4, (5,), generator=g)
    target = {"index": t, "soft": torch.softmax(torch.randn(5, 4, generator=g, dtype=torch.float64), 1),
              "mixup": (t, t.flip(0), 0.3)}[form]

    def stock(x):
        if form == "mixup":
            return 0.3 * F.cross_entropy(x, t) + 0.7 * F.cross_entropy(x, t.flip(0))
        return F.cross_entropy(x, target)

    grads, losses = [], []
    for f in (lambda x: fl.cross_entropy(x, target, backend=backend), stock):
        w = w0.clone().requires_grad_(True)
        with set_checkpoint_early_stop(early_stop):
            out = checkpoint(lambda w: f(h @ w), w, use_reentrant=False)
            out.backward()
        losses.append(out.detach())
        grads.append(w.grad)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_positional_arguments_mean_what_they_mean_in_pytorch():
    """``F.cross_entropy``'s 4th positional argument is the deprecated ``size_average`` (then
    ``ignore_index``, ``reduce``), ``nn.CrossEntropyLoss``'s 2nd too: the same call means the same
    here, with PyTorch's deprecation warning for the legacy arguments."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 4, (6,), generator=g)
    w = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    calls = [(w,), (None, None, 1), (w, None, 2, None, "sum"), (None, None, -100, None, "none", 0.1)]
    for args in calls:
        torch.testing.assert_close(fl.cross_entropy(x, t, *args), F.cross_entropy(x, t, *args))
        torch.testing.assert_close(fl.CrossEntropyLoss(*args)(x, t), nn.CrossEntropyLoss(*args)(x, t))
    for legacy in [(None, False), (None, None, -100, False), (w, False, 1, True)]:
        with pytest.warns(UserWarning, match="deprecated"):
            expected = F.cross_entropy(x, t, *legacy)
        with pytest.warns(UserWarning, match="deprecated"):
            got = fl.cross_entropy(x, t, *legacy)
        torch.testing.assert_close(got, expected)
        with pytest.warns(UserWarning, match="deprecated"):
            module = fl.CrossEntropyLoss(*legacy)
        with pytest.warns(UserWarning, match="deprecated"):
            stock = nn.CrossEntropyLoss(*legacy)
        assert module.reduction == stock.reduction
        torch.testing.assert_close(module(x, t), stock(x, t))
    with pytest.raises(TypeError):  # the other losses' options are keyword-only
        fl.FocalLoss(None, None, -100, None, "mean", 0.0, 2.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_autocast_gives_a_float32_loss_like_pytorch(dtype, backend):
    """Under ``torch.autocast`` PyTorch's losses run in float32 and return float32 (a float16
    ``sum`` of 40000 rows is finite there); ours compute in float32 from the half logits, as
    always, and now return float32 too: the value of the float64 math on the same half logits.
    The gradient keeps the logits' dtype, as PyTorch's."""
    g = torch.Generator().manual_seed(11)
    n, c = 40000, 8
    lin = nn.Linear(16, c)
    h = torch.randn(n, 16, generator=g) * 3
    t = torch.randint(0, c, (n,), generator=g)
    q = torch.softmax(torch.randn(n, c, generator=g), 1)
    for target in (t, q, (t, t.flip(0), 0.3)):
        for red in ("mean", "sum"):
            with torch.autocast("cpu", dtype=dtype):
                x = lin(h)
                ours = fl.cross_entropy(x, target, reduction=red, backend=backend)
                if isinstance(target, tuple):
                    stock = 0.3 * F.cross_entropy(x, t, reduction=red) + 0.7 * F.cross_entropy(x, t.flip(0),
                                                                                                reduction=red)
                else:
                    stock = F.cross_entropy(x, target, reduction=red)
            assert x.dtype == dtype and stock.dtype == torch.float32 and ours.dtype == torch.float32, (ours.dtype,)
            x64 = x.detach().double()
            if isinstance(target, tuple):
                exact = 0.3 * F.cross_entropy(x64, t, reduction=red) + 0.7 * F.cross_entropy(x64, t.flip(0),
                                                                                             reduction=red)
            else:
                exact = F.cross_entropy(x64, target.double() if target.is_floating_point() else target,
                                        reduction=red)
            assert torch.isfinite(ours)
            torch.testing.assert_close(ours.double(), exact, rtol=2e-6, atol=0)
    with torch.autocast("cpu", dtype=dtype):
        x = lin(h[:64]).detach().requires_grad_(True)
        fl.cross_entropy(x, t[:64], backend=backend).backward()
        out = fl.distill_loss(x, x.detach().flip(0), temperature=2.0, backend=backend)
    assert x.grad.dtype == dtype and out.dtype == torch.float32
    # outside autocast, the loss keeps the logits' dtype (PyTorch's rule there too)
    assert fl.cross_entropy(x.detach(), t[:64], backend=backend).dtype == dtype


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_soft_targets_of_another_dtype_are_promoted_like_pytorch(backend):
    """Class probabilities wider than the logits are not rounded to the logits' dtype: PyTorch's
    type promotion gives the loss of the wider targets in the wider dtype (float32 targets from
    timm's Mixup beside half logits), and narrower targets are widened."""
    g = torch.Generator().manual_seed(13)
    for x_dt, q_dt in ((torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                       (torch.float32, torch.float64), (torch.float32, torch.bfloat16)):
        x = (3 * torch.randn(64, 50, generator=g)).to(x_dt).requires_grad_(True)
        q = torch.softmax(torch.randn(64, 50, generator=g, dtype=torch.float64), 1).to(q_dt).requires_grad_(True)
        for eps in (0.0, 0.1):
            out = fl.cross_entropy(x, q, label_smoothing=eps, backend=backend)
            dt = torch.promote_types(x_dt, q_dt)
            assert out.dtype == F.cross_entropy(x, q, label_smoothing=eps).dtype == dt
            exact = F.cross_entropy(x.detach().double(), q.detach().double(), label_smoothing=eps)
            tol = 1e-12 if dt == torch.float64 else 2e-6
            torch.testing.assert_close(out.double(), exact, rtol=tol, atol=0)
            gx, gq = torch.autograd.grad(out, (x, q))
            assert gx.dtype == x_dt and gq.dtype == q_dt


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_with_dynamic_shapes(backend):
    """``torch.compile(fullgraph=True, dynamic=True)`` traces the loss as it traces
    ``F.cross_entropy`` (the argument checks once called ``math.isfinite``, which Dynamo cannot
    trace with dynamic shapes); three batch sizes through one compiled function."""
    torch._dynamo.reset()
    f = torch.compile(lambda x, t: fl.cross_entropy(x, t, label_smoothing=0.1, backend=backend), fullgraph=True,
                      dynamic=True, backend="aot_eager")
    for n in (6, 9, 3):
        g = torch.Generator().manual_seed(n)
        x = torch.randn(n, 4, generator=g, dtype=torch.float64, requires_grad=True)
        t = torch.randint(0, 4, (n,), generator=g)
        out = f(x, t)
        (gx,) = torch.autograd.grad(out, x)
        xx = x.detach().requires_grad_(True)
        ref = F.cross_entropy(xx, t, label_smoothing=0.1)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(gx, torch.autograd.grad(ref, xx)[0])
