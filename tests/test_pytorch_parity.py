"""``fl.cross_entropy`` is a drop-in for ``F.cross_entropy``: PyTorch is the oracle here,
across reduction x weight x ignore_index x label_smoothing x soft targets x extra dims x dtypes."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

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
