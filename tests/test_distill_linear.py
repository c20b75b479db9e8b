"""fl.linear_distill_loss (issue 26, distillation from hidden states): the loss and the student's three
gradients (hidden, weight, bias) against float64 autograd of the oracle on the two projections
(tests/oracle_distill.py's divergence, tests/oracle.py's hard loss, the row combination and the mean
over the rows that count written here), every divergence, with and without a target and ignored rows,
blocks that do not divide N, (B, T, D) inputs, hidden sizes that differ, the teacher without gradient,
and the peak memory against one (N, V) logits tensor."""
from __future__ import annotations

import pytest
import torch

import fusedloss as fl
from fusedloss.memtrack import PeakMemory
from oracle import TOLERANCES, assert_close, oracle_loss
from oracle_distill import divergence_rows

DIVERGENCES = ("kl", "reverse_kl", "jsd")
BACKENDS = [b for b in ("reference", "cpu") if b in fl.available_backends()]


def oracle_distill(s64, t64, target, loss="ce", temperature=1.0, divergence="kl", jsd_beta=0.5, kd_weight=0.5,
                   reduction="mean", ignore_index=-100, **hard):
    """Float64 distillation loss of (N, V) logits: issue 26's row loss, mean over the rows that count."""
    d = divergence_rows(s64, t64, temperature, divergence, jsd_beta)
    if target is None:
        rows, count = d, s64.shape[0]
    else:
        keep = target != ignore_index
        h = oracle_loss(s64, target, loss, reduction="none", ignore_index=ignore_index, **hard)
        rows = torch.where(keep, (1 - kd_weight) * h + kd_weight * d, torch.zeros_like(d))
        count = keep.sum()
    if reduction == "none":
        return rows
    return rows.sum() / count if reduction == "mean" else rows.sum()


def _problem(n=29, ds=6, dt=9, v=37, dtype=torch.float32, seed=0, bias=True, ignore=True, lead=False):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, ds, generator=g, dtype=torch.float64)
    ws = torch.randn(v, ds, generator=g, dtype=torch.float64) * 0.8
    bs = torch.randn(v, generator=g, dtype=torch.float64) * 0.5 if bias else None
    ht = torch.randn(n, dt, generator=g, dtype=torch.float64)
    wt = torch.randn(v, dt, generator=g, dtype=torch.float64) * 0.8
    bt = torch.randn(v, generator=g, dtype=torch.float64) * 0.5 if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    if ignore:
        t[::5] = -100
    if lead and bias:  # teacher and student confident on different classes, leading by ~30
        bs[3] += 30.0
        bt[11] += 30.0
    cast = [a.to(dtype) if a is not None else None for a in (hs, ws, bs, ht, wt, bt)]
    return cast, t


def _check(args, t, dtype, chunk_rows, backend, reduction="mean", **kw):
    hs, ws, bs, ht, wt, bt = args
    leaves = [a.clone().requires_grad_() if a is not None else None for a in (hs, ws, bs)]
    teacher = [a.clone().requires_grad_() if a is not None else None for a in (ht, wt, bt)]  # must get no grad
    out = fl.linear_distill_loss(leaves[0], leaves[1], teacher[0], teacher[1], t, student_bias=leaves[2],
                                 teacher_bias=teacher[2], reduction=reduction, backend=backend,
                                 chunk_rows=chunk_rows, **kw)
    go = torch.rand(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5
    out.backward(go.to(out.dtype))
    o_leaves = [a.detach().double().requires_grad_() if a is not None else None for a in (hs, ws, bs)]
    s64 = o_leaves[0].reshape(-1, hs.shape[-1]) @ o_leaves[1].T
    t64 = ht.double().reshape(-1, ht.shape[-1]) @ wt.double().T
    if bs is not None:
        s64, t64 = s64 + o_leaves[2], t64 + bt.double()
    ref = oracle_distill(s64, t64, None if t is None else t.reshape(-1), reduction=reduction, **kw)
    if reduction == "none":
        ref = ref.reshape(hs.shape[:-1])
    ref.backward(go)
    assert out.dtype == dtype
    assert_close(out, ref.detach(), dtype, "loss", "loss")
    for name, mine, theirs in zip(("d hidden", "d weight", "d bias"), leaves, o_leaves):
        if mine is not None:
            assert mine.grad is not None and mine.grad.dtype == mine.dtype, name
            assert_close(mine.grad, theirs.grad, dtype, "grad", name)
    assert all(a is None or a.grad is None for a in teacher), "the teacher got a gradient"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("loss", [None, "ce", "bce", "focal"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_distill_matches_float64(backend, divergence, loss, reduction):
    """Blocks of 8 over 29 rows (ragged last block), every fifth row ignored, T = 2."""
    args, t = _problem(seed=len(divergence) * 7 + len(loss or "") * 3 + len(reduction))
    kw = dict(temperature=2.0, divergence=divergence, kd_weight=0.3)
    if loss is None:
        _check(args, None, torch.float32, 8, backend, reduction, **kw)
    else:
        _check(args, t, torch.float32, 8, backend, reduction, loss=loss, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_linear_distill_float64_options(backend, divergence):
    """float64 end to end, hard loss options (class weights, z-loss, crl's alpha/beta), T = 4, one-row
    blocks, jsd_beta 0.3; teacher and student confident on different classes (biases leading by 30)."""
    args, t = _problem(n=11, dtype=torch.float64, seed=3, lead=True)
    w = torch.rand(37, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    beta = {"jsd_beta": 0.3} if divergence == "jsd" else {}
    _check(args, t, torch.float64, 1, backend, "mean", loss="crl", temperature=4.0, divergence=divergence,
           kd_weight=0.6, weight=w, z_loss=1e-2, alpha=1.2, beta=0.5, **beta)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_distill_bfloat16(backend):
    args, t = _problem(n=40, dtype=torch.bfloat16, seed=4)
    _check(args, t, torch.bfloat16, 16, backend, "mean", loss="ce", temperature=2.0, divergence="kl")


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_distill_3d_no_bias_default_blocks(backend):
    """(B, T, D) hidden states, no biases, the default block size; 'none' keeps the shape (B, T)."""
    (hs, ws, _, ht, wt, _), t = _problem(n=24, bias=False, seed=6)
    args = (hs.reshape(4, 6, -1), ws, None, ht.reshape(4, 6, -1), wt, None)
    _check(args, t.reshape(4, 6), torch.float32, None, backend, "none", loss="nllr", divergence="jsd")
    _check(args, t.reshape(4, 6), torch.float32, None, backend, "mean", loss="nllr", divergence="kl")


def test_linear_distill_block_size_invariance_and_retain_graph():
    """Every block size gives the same loss; a second backward through the same graph adds the same
    gradients (the forward's handed out first, then recomputed)."""
    args, t = _problem(seed=8)
    hs, ws, bs, ht, wt, bt = args
    outs = []
    for rows in (1, 3, 8, 29, 100):
        outs.append(fl.linear_distill_loss(hs, ws, ht, wt, t, student_bias=bs, teacher_bias=bt, chunk_rows=rows))
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-6, atol=1e-6)
    h = hs.clone().requires_grad_()
    out = fl.linear_distill_loss(h, ws, ht, wt, t, "focal", student_bias=bs, teacher_bias=bt, chunk_rows=8,
                                 divergence="reverse_kl")
    out.backward(retain_graph=True)
    first = h.grad.clone()
    out.backward(torch.tensor(2.0))
    torch.testing.assert_close(h.grad, 3 * first, rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match="first order"):
        g, = torch.autograd.grad(fl.linear_distill_loss(h, ws, ht, wt, t, chunk_rows=8), h, create_graph=True)
        g.sum().backward()


def test_linear_distill_all_rows_ignored_and_module():
    args, t = _problem(n=9, seed=9)
    hs, ws, bs, ht, wt, bt = args
    h = hs.clone().requires_grad_()
    out = fl.linear_distill_loss(h, ws, ht, wt, torch.full_like(t, -100), chunk_rows=4)
    out.backward()
    assert torch.isnan(out) and not h.grad.any()
    cw = torch.rand(37, generator=torch.Generator().manual_seed(3)) + 0.5
    crit = fl.LinearDistillLoss("ce", temperature=2.0, divergence="jsd", kd_weight=0.25, weight=cw)
    assert crit.state_dict()["weight"] is not None
    assert "jsd" in repr(crit)
    torch.testing.assert_close(crit(hs, ws, ht, wt, t, student_bias=bs, teacher_bias=bt),
                               fl.linear_distill_loss(hs, ws, ht, wt, t, student_bias=bs, teacher_bias=bt,
                                                      temperature=2.0, divergence="jsd", kd_weight=0.25, weight=cw))


def test_linear_distill_bad_input():
    args, t = _problem(n=6, seed=10)
    hs, ws, bs, ht, wt, bt = args
    with pytest.raises(ValueError, match="teacher_weight"):
        fl.linear_distill_loss(hs, ws, ht, wt[:-1], t)
    with pytest.raises(ValueError, match="teacher_hidden"):
        fl.linear_distill_loss(hs, ws, ht[:-1], wt, t)
    with pytest.raises(ValueError, match="student_weight"):
        fl.linear_distill_loss(hs, ws[:, :-1], ht, wt, t)
    with pytest.raises(ValueError, match="target"):
        fl.linear_distill_loss(hs, ws, ht, wt, t[:-1])
    # One target check for every distillation form (validation.check_distill_target): class
    # probabilities are refused with fl.distill_loss's TypeError, not a form-specific error.
    with pytest.raises(TypeError, match="target must be int64, int32 \\(or uint8\\) class indices or None"):
        fl.linear_distill_loss(hs, ws, ht, wt, t.float())
    with pytest.raises(ValueError, match="temperature"):
        fl.linear_distill_loss(hs, ws, ht, wt, t, temperature=0.0)
    with pytest.raises(ValueError, match="divergence"):
        fl.linear_distill_loss(hs, ws, ht, wt, t, divergence="tv")
    with pytest.raises(ValueError, match="kd_weight"):
        fl.linear_distill_loss(hs, ws, ht, wt, t, kd_weight=1.5)
    with pytest.raises(ValueError, match="jsd_beta"):
        fl.linear_distill_loss(hs, ws, ht, wt, t, jsd_beta=1.0)
    with pytest.raises(ValueError, match="chunk_rows"):
        fl.linear_distill_loss(hs, ws, ht, wt, t, chunk_rows=0)
    with pytest.raises(TypeError, match="student_bias"):
        fl.linear_distill_loss(hs, ws, ht, wt, t, student_bias=bs.double())
    with pytest.raises(ValueError, match="kd_weight=0 with target=None"):
        fl.linear_distill_loss(hs, ws, ht, wt, None, kd_weight=0.0)
    with pytest.raises(ValueError, match="would be silently ignored"):
        fl.linear_distill_loss(hs, ws, ht, wt, None, "focal")
    with pytest.raises(IndexError):
        fl.linear_distill_loss(hs, ws, ht, wt, torch.full_like(t, 37))


@pytest.mark.parametrize("ds", [64, 256])
@pytest.mark.parametrize("target", [False, True])
def test_linear_distill_peak_memory(target, ds):
    """Forward + backward, everything counted (d weight and d hidden included), default blocks, the
    cpu backend: below the issue's goal of 0.3x one (N, V) float32 logits tensor. At D 256 the
    gradients alone take 0.19x (``d weight`` is V x D): the default blocks take what they leave."""
    torch.manual_seed(0)
    n, dt, v = 2048, 96, 4000
    hs = torch.randn(n, ds, requires_grad=True)
    ws = (0.1 * torch.randn(v, ds)).requires_grad_(True)
    ht, wt = torch.randn(n, dt), 0.1 * torch.randn(v, dt)
    t = torch.randint(0, v, (n,)) if target else None
    backend = "cpu" if "cpu" in fl.available_backends() else "reference"
    with PeakMemory() as m:
        out = fl.linear_distill_loss(hs, ws, ht, wt, t, backend=backend)
        out.backward()
    logits_bytes = n * v * 4
    assert m.peak_bytes < 0.3 * logits_bytes, f"peak {m.peak_bytes / logits_bytes:.3f}x the logits"


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_distill_equals_distill_loss_of_the_projections(divergence, reduction):
    """The same loss and student gradients as fl.distill_loss on the materialized logits (float32, the
    same backend), hidden sizes that differ, a mixed-dtype teacher (float64 hidden and weight: both
    promoted to float64, as fl.distill_loss promotes)."""
    args, t = _problem(n=21, seed=12)
    hs, ws, bs, ht, wt, bt = args
    for teacher_dtype in (torch.float32, torch.float64):
        ht_, wt_, bt_ = (a.to(teacher_dtype) for a in (ht, wt, bt))
        mine = [a.clone().requires_grad_() for a in (hs, ws, bs)]
        out = fl.linear_distill_loss(mine[0], mine[1], ht_, wt_, t, "focal", student_bias=mine[2], teacher_bias=bt_,
                                     chunk_rows=6, divergence=divergence, temperature=2.0, reduction=reduction)
        theirs = [a.clone().requires_grad_() for a in (hs, ws, bs)]
        ref = fl.distill_loss(theirs[0] @ theirs[1].T + theirs[2], ht_ @ wt_.T + bt_, t, "focal",
                              divergence=divergence, temperature=2.0, reduction=reduction)
        go = torch.rand(out.shape, generator=torch.Generator().manual_seed(2)).to(out.dtype) + 0.5
        out.backward(go)
        ref.backward(go)
        assert out.dtype == ref.dtype == torch.promote_types(torch.float32, teacher_dtype)
        torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-6)
        for a, b in zip(mine, theirs):
            assert a.grad.dtype == torch.float32
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    for dtype in (torch.int32, torch.uint8):  # the target dtypes fl.distill_loss takes
        torch.testing.assert_close(fl.linear_distill_loss(hs, ws, ht, wt, t.clamp(min=0).to(dtype), chunk_rows=6),
                                   fl.distill_loss(hs @ ws.T, ht @ wt.T, t.clamp(min=0).to(dtype)), rtol=1e-5, atol=1e-6)
