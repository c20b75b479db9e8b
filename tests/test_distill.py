"""``fl.distill_loss`` / ``fl.DistillLoss`` (python/fusedloss/distill/loss.py) against the float64
oracles: ``tests/oracle_distill.py`` for the divergences and ``tests/oracle.py`` for the hard losses,
never the code under test.

Every divergence x T in {1, 2, 4} x (no target, each of the six hard losses with ignored rows) x the
three reductions x fp32/bf16 on every backend that runs on CPU tensors here (``reference``, ``cpu``;
``triton`` under Triton's interpreter in a subprocess, ``test_interpreter_cases_in_a_subprocess``,
on a smaller grid: T = 2). Then: V up to 50000, ``(B, T, V)``, extreme rows, the hard loss's
options, the teacher's (absent) gradient, dtype promotion, bad input, the autograd paths
(gradcheck/gradgradcheck with forward AD and batched gradients, jvp, vmap per-sample gradients),
``torch.compile(fullgraph=True)`` and ``opcheck`` of the reference op.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import fusedloss as fl
from fusedloss.distill import loss as dl
from fusedloss.distill import ops as distill_ops
import oracle
import oracle_distill as od
from oracle import assert_close

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# In the interpreter's subprocess only triton runs (the parent runs reference and cpu).
BACKENDS = ("triton",) if INTERPRET else tuple(b for b in ("reference", "cpu") if b in fl.available_backends())
#: The in-process backends, for the tests that do not run under the interpreter (large shapes, the
#: float64 autograd paths): their ids never contain "triton", so the subprocess deselects them.
CPU_BACKENDS = tuple(b for b in ("reference", "cpu") if b in fl.available_backends())
DIVERGENCES = ("kl", "reverse_kl", "jsd")
TEMPERATURES = (2.0,) if INTERPRET else (1.0, 2.0, 4.0)
TARGETS = (None,) + fl.LOSSES
REDUCTIONS = ("none", "mean", "sum")
DTYPES = (torch.float32, torch.bfloat16)
IGNORE = -100
N, V = 9, 37
JSD_BETA = 0.3  # not the default: the tests would not see a beta that is dropped


def _data(n=N, v=V, dtype=torch.float32, seed=0, scale=3.0, ignored=(1, 5)):
    g = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(n, v, generator=g)).to(dtype)
    t = (scale * torch.randn(n, v, generator=g)).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    for i in ignored:
        if i < n:
            y[i] = IGNORE
    return s, t, y


def _go(reduction, shape, seed=3):
    g = torch.Generator().manual_seed(seed)
    return 0.5 + torch.rand(shape if reduction == "none" else (), generator=g)


def _beta(divergence):
    return JSD_BETA if divergence == "jsd" else 0.5


def _oracle(s, t, y, loss, *, temperature=1.0, divergence="kl", jsd_beta=0.5, kd_weight=0.5, reduction="mean", go=None,
            **opts):
    """(loss, d loss / d student) in float64 from the definitions: D by oracle_distill, H by
    oracle.oracle_loss (reduction none: its weighted rows w_c L_i), mean over the counted rows."""
    x = s.detach().double().reshape(-1, s.shape[-1]).requires_grad_(True)
    tt = t.detach().double().reshape(-1, s.shape[-1])
    d = od.divergence_rows(x, tt, temperature, divergence, jsd_beta)
    if y is None:
        rows, counted = d, torch.tensor(float(x.shape[0]), dtype=torch.float64)
    else:
        yy = y.reshape(-1)
        keep = yy != IGNORE
        h = oracle.oracle_loss(x, yy, loss, ignore_index=IGNORE, reduction="none", **opts)
        rows = torch.where(keep, (1 - kd_weight) * h + kd_weight * d, torch.zeros_like(d))
        counted = keep.sum().double()
    out = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / counted}[reduction]
    if reduction == "none":
        out = out.reshape(s.shape[:-1])
    g = torch.ones_like(out) if go is None else go.double()
    (grad,) = torch.autograd.grad(out, x, g)
    return out.detach(), grad.reshape(s.shape)


def _ours(s, t, y, loss="ce", *, go=None, **kw):
    x = s.detach().clone().requires_grad_(True)
    out = fl.distill_loss(x, t, y, loss, **kw)
    out.backward(torch.ones_like(out) if go is None else go.to(out.dtype))
    return out.detach(), x.grad


def _check(s, t, y, loss="ce", *, reduction="mean", msg="", **kw):
    go = _go(reduction, s.shape[:-1])
    out, grad = _ours(s, t, y, loss, reduction=reduction, go=go, **kw)
    kw.pop("backend", None)
    ref, ref_grad = _oracle(s, t, y, loss, reduction=reduction, go=go, **kw)
    assert out.dtype == s.dtype and grad.dtype == s.dtype
    assert out.shape == ref.shape
    assert_close(out, ref, s.dtype, "loss", msg)
    assert_close(grad, ref_grad, s.dtype, "grad", msg)


# ----------------------------------------------------------------------------
# The grid: divergence x T x target x reduction x dtype x backend
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target", TARGETS, ids=lambda t: "no_target" if t is None else t)
@pytest.mark.parametrize("temperature", TEMPERATURES, ids=lambda t: f"T{t:g}")
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_grid_matches_float64(divergence, temperature, target, dtype, backend):
    s, t, y = _data(dtype=dtype, seed=hash((divergence, temperature, target)) % 1000)
    kd = 0.5 if target is None else 0.7
    for reduction in REDUCTIONS:
        _check(s, t, None if target is None else y, target or "ce", reduction=reduction, temperature=temperature,
               divergence=divergence, jsd_beta=_beta(divergence), kd_weight=kd, backend=backend,
               msg=f"{reduction}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kd_weight", (0.0, 0.25, 1.0))
def test_kd_weight_ends(kd_weight, backend):
    """kd_weight 0 is the hard loss alone (mean over counted rows), 1 the divergence alone on the
    counted rows (ignored rows still count for nothing)."""
    s, t, y = _data(seed=4)
    for reduction in REDUCTIONS:
        _check(s, t, y, "nllr", reduction=reduction, temperature=2.0, divergence="kl", kd_weight=kd_weight,
               backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kd_weight_zero_is_softmax_loss_rows(backend):
    """H_i is fl.softmax_loss's row: with kd_weight 0 and reduction none the rows are equal."""
    s, t, y = _data(seed=5)
    w = 0.5 + torch.rand(V, generator=torch.Generator().manual_seed(1))
    a = fl.distill_loss(s, t, y, "crl", kd_weight=0.0, reduction="none", backend=backend, weight=w, alpha=0.7,
                        beta=2.0, label_smoothing=0.1)
    b = fl.softmax_loss(s, y, "crl", reduction="none", backend=backend, weight=w, alpha=0.7, beta=2.0,
                        label_smoothing=0.1)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------
# Shapes: V up to 50000, (B, T, V), edge sizes
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_large_vocabulary(divergence, dtype, backend):
    s, t, y = _data(n=3, v=50000, dtype=dtype, seed=7, ignored=(1,))
    _check(s, t, y, "ce", reduction="mean", temperature=2.0, divergence=divergence, jsd_beta=_beta(divergence),
           backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target", (None, "focal"), ids=str)
def test_batch_time_vocab(target, backend):
    """(B, T, V) logits with (B, T) targets: 'none' gives (B, T); equal to the flattened rows."""
    g = torch.Generator().manual_seed(8)
    s, t = 2 * torch.randn(2, 5, V, generator=g), 2 * torch.randn(2, 5, V, generator=g)
    y = torch.randint(0, V, (2, 5), generator=g)
    y[0, 1] = y[1, 4] = IGNORE
    yy = None if target is None else y
    for reduction in REDUCTIONS:
        _check(s, t, yy, target or "ce", reduction=reduction, temperature=2.0, divergence="jsd", jsd_beta=JSD_BETA,
               backend=backend)
    out = fl.distill_loss(s, t, yy, target or "ce", reduction="none", backend=backend)
    assert out.shape == (2, 5)
    flat = fl.distill_loss(s.reshape(10, V), t.reshape(10, V), None if yy is None else yy.reshape(10),
                           target or "ce", reduction="none", backend=backend)
    torch.testing.assert_close(out.reshape(10), flat, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_one_class(backend):
    """A column slice of a wider tensor (rows of stride > V), a transposed buffer (class stride > 1),
    and V = 1 (every divergence 0, the gradient 0 but the hard loss's)."""
    g = torch.Generator().manual_seed(9)
    wide = 2 * torch.randn(N, V + 5, generator=g)
    s = wide[:, :V]
    t = (2 * torch.randn(V, N, generator=g)).t()
    y = torch.randint(0, V, (N,), generator=g)
    _check(s, t, y, "bce", reduction="sum", temperature=2.0, divergence="reverse_kl", backend=backend)
    s1, t1 = torch.randn(4, 1), torch.randn(4, 1)
    _check(s1, t1, None, reduction="mean", divergence="kl", backend=backend)
    out, grad = _ours(s1, t1, None, divergence="jsd", backend=backend)
    assert out.item() == 0 and not grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_row_ignored(backend):
    """As PyTorch: 'mean' over no counted row is 0/0 = NaN with a zero gradient; 'sum' is 0."""
    s, t, _ = _data(n=3)
    y = torch.full((3,), IGNORE)
    out, grad = _ours(s, t, y, backend=backend)
    assert math.isnan(out.item()) and not grad.any()
    out, grad = _ours(s, t, y, reduction="sum", backend=backend)
    assert out.item() == 0 and not grad.any()
    out, grad = _ours(s[:0], t[:0], None, reduction="sum", backend=backend)
    assert out.item() == 0 and grad.shape == (0, V)


# ----------------------------------------------------------------------------
# Extreme rows: exact in log space
# ----------------------------------------------------------------------------

def _extreme(lead, n=8, v=V, dtype=torch.float32):
    """Rows 0-5: teacher and student confident on different classes (each leading by ``lead``; rows
    0, 3 the same two classes swapped); row 6 both confident on the same class; row 7 ordinary."""
    g = torch.Generator().manual_seed(int(lead))
    s, t = 0.5 * torch.randn(n, v, generator=g), 0.5 * torch.randn(n, v, generator=g)
    for i in range(6):
        a, b = (2 * i) % v, (2 * i + 1) % v
        if i == 3:
            a, b = 1, 0
        s[i, a] += lead
        t[i, b] += lead
    s[6, 4] += lead
    t[6, 4] += lead
    s[7], t[7] = 2 * torch.randn(v, generator=g), 2 * torch.randn(v, generator=g)
    y = torch.arange(n) % v
    y[2] = IGNORE
    return s.to(dtype), t.to(dtype), y


def _assert_grad_rows(grad, ref, d_rows, temperature, dtype, msg):
    """Per row: |g - g_ref| <= rtol |g_ref| + atol max_j |g_ref_ij| (the dtype's gradient tolerance,
    scaled by the row's own largest gradient, not the batch's) + 16 eps_math T (1 + |D_i|).

    The last term bounds the cancellation of the op's gradient forms in a saturated row
    (``r_j - sum_k Q_k r_k`` for reverse KL and JSD, ``Q_j - P_j`` for KL when both are confident on
    one class): terms of size ~D_i cancel to a true gradient of size ~e^-lead, so the rounding of the
    math type times T D_i remains. In absolute terms it is far below the gradient of any ordinary row."""
    rtol, atol = oracle.TOLERANCES[dtype]["grad"]
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    g, r = grad.double(), ref.double()
    bound = (rtol * r.abs() + atol * r.abs().amax(-1, keepdim=True)
             + 16 * eps * temperature * (1 + d_rows.double().abs())[:, None])
    err = (g - r).abs()
    bad = err > bound
    assert not bad.any(), (f"{msg}: {int(bad.sum())} gradient entries off; worst |err| {err.max().item():.3e}, "
                           f"bound there {bound.reshape(-1)[err.reshape(-1).argmax()].item():.3e}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=str)
@pytest.mark.parametrize("lead", (30.0, 100.0), ids=lambda v: f"lead{v:g}")
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_extreme_rows(divergence, lead, dtype, backend):
    """The losses to the dtype's tolerance (log space: no inf, no NaN, no lost digits; the absolute
    part times T^2), the gradients finite and per row within :func:`_assert_grad_rows`'s bound."""
    s, t, y = _extreme(lead, dtype=dtype)
    for temperature in TEMPERATURES:
        d_rows = od.divergence_rows(s, t, temperature, divergence, _beta(divergence))
        for target in (None, y):
            kw = dict(temperature=temperature, divergence=divergence, jsd_beta=_beta(divergence), reduction="none")
            go = _go("none", (s.shape[0],))
            out, grad = _ours(s, t, target, "ce", go=go, backend=backend, **kw)
            ref, ref_grad = _oracle(s, t, target, "ce", go=go, **kw)
            assert torch.isfinite(out).all() and torch.isfinite(grad).all()
            msg = f"T={temperature} target={target is not None}"
            # D carries T^2: its absolute rounding error (of the log-probabilities z - lse, in the math
            # type) is T^2 times that of the KL, so the absolute part of the tolerance scales with T^2.
            rtol, atol = oracle.TOLERANCES[dtype]["loss"]
            torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol * max(1.0, temperature ** 2), msg=msg)
            _assert_grad_rows(grad, ref_grad, d_rows * go, temperature, dtype, msg)


def test_oracle_pinned_by_loops():
    """The divergence oracle equals a plain-loop evaluation of the definitions (the oracle of the oracle)."""
    s, t, _ = _data(n=3, v=7, dtype=torch.float64)
    for divergence in DIVERGENCES:
        for temperature in (1.0, 2.5):
            torch.testing.assert_close(od.divergence_rows(s, t, temperature, divergence, 0.3),
                                       od.check_logs_math(s, t, temperature, divergence, 0.3), rtol=1e-12, atol=1e-13)


# ----------------------------------------------------------------------------
# The hard loss's options
# ----------------------------------------------------------------------------

OPTIONS = {
    "weight": ("ce", dict(weight="w")),
    "label_smoothing": ("ce", dict(label_smoothing=0.1)),
    "smoothing_focal": ("focal", dict(label_smoothing=0.2, gamma=1.5)),
    "z_loss": ("lace", dict(z_loss=1e-2)),
    "softcap": ("bce", dict(softcap=4.0)),
    "focal_gamma": ("focal", dict(gamma=3.0, weight="w")),
    "crl_alpha_beta": ("crl", dict(alpha=0.8, beta=2.5)),
    "everything": ("nllr", dict(weight="w", label_smoothing=0.05, z_loss=1e-3, softcap=6.0)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(OPTIONS))
def test_loss_options(case, dtype, backend):
    loss, opts = OPTIONS[case]
    s, t, y = _data(dtype=dtype, seed=11)
    w = 0.3 + torch.rand(V, generator=torch.Generator().manual_seed(2))
    opts = {k: (w if v == "w" else v) for k, v in opts.items()}
    for reduction in REDUCTIONS:
        _check(s, t, y, loss, reduction=reduction, temperature=2.0, divergence="jsd", jsd_beta=JSD_BETA, kd_weight=0.6,
               backend=backend, msg=reduction, **opts)


def test_mean_divides_by_counted_rows_not_weights():
    """With a class weight, 'mean' divides by the counted rows (softmax_loss divides by the sum of
    the rows' weights): stated in the docstring, checked here."""
    s, t, y = _data(seed=12)
    w = 0.3 + torch.rand(V, generator=torch.Generator().manual_seed(2))
    total = fl.distill_loss(s, t, y, weight=w, reduction="sum")
    mean = fl.distill_loss(s, t, y, weight=w, reduction="mean")
    torch.testing.assert_close(mean, total / (y != IGNORE).sum())
    assert dl.counted_rows(y, N, IGNORE).item() == (y != IGNORE).sum().item()
    assert dl.counted_rows(None, N, IGNORE).item() == N


# ----------------------------------------------------------------------------
# The teacher, dtypes, the module
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target", (False, True))
def test_teacher_gets_no_gradient(target, backend):
    s, t, y = _data(seed=13)
    x = s.clone().requires_grad_(True)
    tt = t.clone().requires_grad_(True)
    out = fl.distill_loss(x, tt, y if target else None, backend=backend, divergence="reverse_kl")
    out.backward()
    assert tt.grad is None and x.grad is not None
    # through a graph: the teacher's logits are a model's output that requires grad
    w = torch.randn(V, V, requires_grad=True)
    out = fl.distill_loss(x, t @ w, y if target else None, backend=backend)
    out.backward()
    assert w.grad is None
    # the student not requiring grad: no gradient buffer, a loss without graph
    out = fl.distill_loss(s, tt, None, backend=backend)
    assert not out.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                    (torch.float16, torch.bfloat16), (torch.float32, torch.float64)],
                         ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
def test_dtype_promotion(dtypes, backend):
    """Student and teacher of different dtypes: both promoted (torch.promote_types, as F.kl_div);
    the loss in the promoted dtype, the gradient in the student's."""
    sd, td = dtypes
    s, t, y = _data(seed=14)
    s, t = s.to(sd), t.to(td)
    x = s.clone().requires_grad_(True)
    out = fl.distill_loss(x, t, y, "focal", temperature=2.0, divergence="jsd", backend=backend)
    out.backward()
    pd = torch.promote_types(sd, td)
    assert out.dtype == pd and x.grad.dtype == sd
    ref, ref_grad = _oracle(s.to(pd), t.to(pd), y, "focal", temperature=2.0, divergence="jsd")
    tol = torch.bfloat16 if torch.bfloat16 in dtypes or torch.float16 in dtypes else torch.float32
    assert_close(out, ref, tol, "loss")
    assert_close(x.grad, ref_grad, tol, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_module(backend):
    s, t, y = _data(seed=15)
    w = 0.3 + torch.rand(V)
    m = fl.DistillLoss("focal", temperature=2.0, divergence="jsd", jsd_beta=JSD_BETA, kd_weight=0.8,
                       reduction="sum", backend=backend, weight=w, gamma=1.0)
    assert torch.equal(m.weight, w) and "weight" in dict(m.named_buffers())
    torch.testing.assert_close(m(s, t, y), fl.distill_loss(s, t, y, "focal", temperature=2.0, divergence="jsd",
                                                           jsd_beta=JSD_BETA, kd_weight=0.8, reduction="sum",
                                                           backend=backend, weight=w, gamma=1.0), rtol=0, atol=0)
    assert "temperature=2.0" in repr(m) and "jsd_beta=0.3" in repr(m)
    m2 = fl.DistillLoss(temperature=4.0)
    _check(s, t, None, reduction="mean", temperature=4.0, divergence="kl", backend=backend)
    torch.testing.assert_close(m2(s, t), fl.distill_loss(s, t, temperature=4.0), rtol=0, atol=0)


# ----------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------

def _raises(exc, match, *args, **kw):
    with pytest.raises(exc, match=match):
        fl.distill_loss(*args, **kw)


def test_bad_input():
    s, t, y = _data()
    _raises(ValueError, "teacher_logits", s, t[:, :-1], y)
    _raises(ValueError, "teacher_logits", s, t[:-1], y[:-1])
    _raises(ValueError, "student_logits", s[0], t[0])
    _raises(ValueError, "student_logits", s[None, None], t[None, None])
    _raises(ValueError, "student_logits", s[:, :0], t[:, :0])
    _raises(ValueError, "target", s, t, y[:-1])
    _raises(ValueError, "target", s.reshape(3, 3, V), t.reshape(3, 3, V), y)
    _raises(TypeError, "target", s, t, y.float())
    _raises(TypeError, "student_logits", s.long(), t)
    for bad in (0.0, -1.0, math.inf, math.nan):
        _raises(ValueError, "temperature", s, t, temperature=bad)
    _raises(ValueError, "divergence", s, t, divergence="js")
    for bad in (-0.1, 1.5, math.nan):
        _raises(ValueError, "kd_weight", s, t, y, kd_weight=bad)
    for bad in (0.0, 1.0, -0.5, 2.0):
        _raises(ValueError, "jsd_beta", s, t, divergence="jsd", jsd_beta=bad)
    _raises(ValueError, "jsd_beta", s, t, divergence="kl", jsd_beta=0.3)  # ignored otherwise
    _raises(ValueError, "loss", s, t, y, "mse")
    _raises(ValueError, "reduction", s, t, y, reduction="avg")
    _raises(TypeError, "inplace_backward", s, t, y, inplace_backward=True)
    _raises(TypeError, "return_lse", s, t, y, return_lse=True)
    _raises(ValueError, "label_smoothing", s, t, y, label_smoothing=1.5)
    _raises(ValueError, "softcap", s, t, y, softcap=0.0)
    _raises(ValueError, "gamma", s, t, y, "ce", gamma=3.0)
    _raises(ValueError, "alpha", s, t, y, "focal", alpha=0.5)
    _raises(ValueError, "weight", s, t, y, weight=torch.ones(V + 1))
    _raises(IndexError, "target", s, t, torch.full((N,), V))
    _raises(IndexError, "target", s, t, torch.full((N,), V), kd_weight=1.0)
    with pytest.raises(ValueError, match="kd_weight"):
        fl.DistillLoss(kd_weight=2.0)


def test_options_without_target_raise():
    """Without a target the row loss is the divergence alone: an option of the hard loss would be
    silently ignored, so it raises (its default value passes); kd_weight 0 would leave nothing."""
    s, t, _ = _data()
    for kw in (dict(weight=torch.ones(V)), dict(label_smoothing=0.1), dict(z_loss=1e-3), dict(softcap=5.0)):
        _raises(ValueError, "target=None", s, t, None, **kw)
    _raises(ValueError, "target=None", s, t, None, "focal")
    _raises(ValueError, "target=None", s, t, None, "crl", alpha=0.5)
    _raises(ValueError, "kd_weight", s, t, None, kd_weight=0.0)
    fl.distill_loss(s, t, None, label_smoothing=0.0, z_loss=0.0, softcap=None)  # defaults: nothing ignored
    with pytest.raises(ValueError, match="target=None"):
        fl.DistillLoss("focal")(s, t)


def test_config():
    cfg, w = dl.make_config("focal", temperature=2, divergence="jsd", jsd_beta=0.25, kd_weight=1, gamma=1,
                            label_smoothing=0.1, weight=torch.ones(3))
    assert w is not None and cfg.temperature == 2.0 and cfg.kd_weight == 1.0
    assert cfg.loss_options == (("gamma", 1.0), ("label_smoothing", 0.1))
    assert cfg.hard_scalars() == (5, 0, -100, 0.1, 1.5, 1.0, 1.0, 0.0, 0.0)
    assert cfg.divergence_id == distill_ops.DIVERGENCES["jsd"]
    hash(cfg)


def test_distill_rows_interface():
    """distill_rows: the rows in the math type and ONE (N, V) gradient in the student's dtype,
    grad_scale_i * d rows_i / d student_i (for helpers D and E)."""
    s, t, y = _data(dtype=torch.bfloat16, seed=16)
    cfg, _ = dl.make_config("lace", temperature=2.0, divergence="reverse_kl", kd_weight=0.4)
    scale = torch.rand(N)
    scale[y == IGNORE] = 0
    rows, grad = dl.distill_rows(s, t, y, cfg, None, scale)
    assert rows.dtype == torch.float32 and grad.dtype == torch.bfloat16 and grad.shape == s.shape
    ref, ref_grad = _oracle(s, t, y, "lace", temperature=2.0, divergence="reverse_kl", kd_weight=0.4,
                            reduction="none", go=scale)
    assert_close(rows, ref, torch.bfloat16, "loss")
    assert_close(grad, ref_grad, torch.bfloat16, "grad")
    rows2, none = dl.distill_rows(s, t, y, cfg, None, None)
    assert none is None and torch.equal(rows, rows2)


# ----------------------------------------------------------------------------
# Autograd paths (float64): gradcheck, gradgradcheck, jvp, vmap, compile
# ----------------------------------------------------------------------------

AUTOGRAD_CASES = [(None, "kl", "mean"), (None, "reverse_kl", "none"), (None, "jsd", "sum"),
                  ("ce", "kl", "none"), ("bce", "jsd", "mean"), ("focal", "reverse_kl", "sum"),
                  ("crl", "jsd", "none"), ("nllr", "kl", "mean"), ("lace", "reverse_kl", "mean")]


def _fn(target_loss, divergence, reduction, t, y, backend, **opts):
    def f(x):
        return fl.distill_loss(x, t, None if target_loss is None else y, target_loss or "ce", temperature=2.0,
                               divergence=divergence, jsd_beta=_beta(divergence), kd_weight=0.6,
                               reduction=reduction, backend=backend, **opts)
    return f


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", AUTOGRAD_CASES, ids=lambda c: "-".join(str(v) for v in c))
def test_gradcheck_gradgradcheck(case, backend):
    s, t, y = _data(n=4, v=6, dtype=torch.float64, seed=17, ignored=(1,))
    opts = dict(label_smoothing=0.1, z_loss=1e-2) if case[0] is not None else {}
    f = _fn(*case, t, y, backend, **opts)
    x = s.clone().requires_grad_(True)
    assert gradcheck(f, (x,), check_batched_grad=True, check_forward_ad=True, check_batched_forward_grad=True,
                     fast_mode=True)
    assert gradgradcheck(f, (x,), check_batched_grad=True, fast_mode=True)


def _oracle_fn(target_loss, divergence, reduction, t, y, **opts):
    def f(x):
        d = od.divergence_rows(x, t, 2.0, divergence, _beta(divergence))
        if target_loss is None:
            rows, counted = d, x.shape[0]
        else:
            keep = y != IGNORE
            h = oracle.oracle_loss(x, y, target_loss, reduction="none", **opts)
            rows, counted = torch.where(keep, 0.4 * h + 0.6 * d, torch.zeros_like(d)), keep.sum()
        return {"none": rows, "sum": rows.sum(), "mean": rows.sum() / counted}[reduction]
    return f


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", AUTOGRAD_CASES[::2], ids=lambda c: "-".join(str(v) for v in c))
def test_transforms_match_oracle(case, backend):
    """jvp, a Hessian-vector product through create_graph=True, vmap over rows, and per-sample
    gradients by vmap(grad) against a loop of one-row backward passes and the oracle's."""
    s, t, y = _data(n=4, v=6, dtype=torch.float64, seed=18, ignored=(1,))
    f, fo = _fn(*case, t, y, backend), _oracle_fn(*case, t, y)
    v = torch.randn_like(s)
    out, tan = torch.func.jvp(f, (s,), (v,))
    ref, ref_tan = torch.func.jvp(fo, (s,), (v,))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(tan, ref_tan)
    # Hessian-vector product through the fused backward (create_graph=True)
    x = s.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(x).sum(), x, create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), x)
    xo = s.clone().requires_grad_(True)
    (go,) = torch.autograd.grad(fo(xo).sum(), xo, create_graph=True)
    (hvo,) = torch.autograd.grad((go * v).sum(), xo)
    torch.testing.assert_close(hv, hvo)
    assert hv.abs().sum() > 0  # never a silent zero
    # per-sample gradients: vmap(grad) over rows of one-row losses
    loss, div, _ = case

    def one(xr, tr, yr):
        return fl.distill_loss(xr[None], tr[None], None if loss is None else yr[None], loss or "ce", temperature=2.0,
                               divergence=div, jsd_beta=_beta(div), kd_weight=0.6, reduction="sum", backend=backend)

    per = torch.func.vmap(torch.func.grad(one))(s, t, y)
    for i in range(s.shape[0]):
        xi = s[i:i + 1].clone().requires_grad_(True)
        one(xi[0], t[i], y[i]).backward()
        torch.testing.assert_close(per[i], xi.grad[0])
        fi = _oracle_fn(loss, div, "sum", t[i:i + 1], y[i:i + 1])
        xo = s[i:i + 1].clone().requires_grad_(True)
        (gi,) = torch.autograd.grad(fi(xo), xo)
        torch.testing.assert_close(per[i], gi[0])
    # vmap of the forward: one-row losses, batched, equal the oracle's rows
    rows = torch.func.vmap(one)(s, t, y)
    torch.testing.assert_close(rows, _oracle_fn(loss, div, "none", t, y)(s))


def test_weight_requiring_grad_takes_composite_path():
    s, t, y = _data(n=4, v=6, dtype=torch.float64, seed=19, ignored=(1,))
    w = (0.5 + torch.rand(6, dtype=torch.float64)).requires_grad_(True)
    x = s.clone().requires_grad_(True)
    out = fl.distill_loss(x, t, y, "focal", weight=w, divergence="jsd")
    gx, gw = torch.autograd.grad(out, (x, w))
    xo, wo = s.clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    keep = y != IGNORE
    h = oracle.oracle_loss(xo, y, "focal", weight=wo, reduction="none")
    d = od.divergence_rows(xo, t, 1.0, "jsd")
    ref = torch.where(keep, 0.5 * h + 0.5 * d, torch.zeros_like(d)).sum() / keep.sum()
    rgx, rgw = torch.autograd.grad(ref, (xo, wo))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, rgx)
    torch.testing.assert_close(gw, rgw)


# torch.compile of the Triton path needs a GPU (a triton_op runs eagerly under the interpreter only):
# test_gpu_triton_matches_float64_and_compiles.
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("target", (None, "bce"), ids=str)
def test_compile_fullgraph(target, backend):
    """torch.compile(fullgraph=True) traces the Function and the ops (the distillation op mutates
    its gradient buffer): equal to eager, loss and gradient."""
    s, t, y = _data(seed=20)
    yy = None if target is None else y

    def f(x, tt, yv):
        return fl.distill_loss(x, tt, yv, target or "ce", temperature=2.0, divergence="jsd", jsd_beta=JSD_BETA,
                               backend=backend, label_smoothing=0.1 if target else 0.0)

    x0 = s.clone().requires_grad_(True)
    ref = f(x0, t, yy)  # eager first: loads the backend (an import cannot be traced)
    ref.backward()
    torch._dynamo.reset()
    x1 = s.clone().requires_grad_(True)
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x1, t, yy)
    out.backward()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x1.grad, x0.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("accumulate", (False, True))
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_opcheck_reference_distill(divergence, accumulate):
    s, t, _ = _data(n=5, v=11)
    scale = torch.rand(5)
    did = distill_ops.DIVERGENCES[divergence]
    torch.library.opcheck(distill_ops.reference_distill, (s, t, scale, 2.0, did, 0.3, torch.randn(5, 11), accumulate))
    torch.library.opcheck(distill_ops.reference_distill, (s, t, scale, 2.0, did, 0.3, None, accumulate))


# ----------------------------------------------------------------------------
# On a CUDA GPU: the triton backend (its one-target kernels; the distillation op of
# triton_kernels/distill/ once merged), eager and compiled
# ----------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif("not torch.cuda.is_available()", reason="needs a CUDA device")
@pytest.mark.skipif(INTERPRET, reason="TRITON_INTERPRET=1 interprets every kernel")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gpu_triton_matches_float64_and_compiles(divergence, dtype):
    s, t, y = _data(n=64, v=32000, dtype=dtype, seed=21)
    kw = dict(temperature=2.0, divergence=divergence, jsd_beta=_beta(divergence), label_smoothing=0.1)
    ref, ref_grad = _oracle(s, t, y, "focal", **kw)

    def f(x, tt, yy):
        return fl.distill_loss(x, tt, yy, "focal", backend="triton", **kw)

    for fn in (f, torch.compile(f, fullgraph=True)):
        x = s.cuda().requires_grad_(True)
        out = fn(x, t.cuda(), y.cuda())
        out.backward()
        assert_close(out.cpu(), ref, dtype, "loss", divergence)
        assert_close(x.grad.cpu(), ref_grad, dtype, "grad", divergence)


# ----------------------------------------------------------------------------
# Without TRITON_INTERPRET: the triton cases under the interpreter, in a subprocess
# ----------------------------------------------------------------------------

@pytest.mark.skipif(INTERPRET, reason="TRITON_INTERPRET=1 already: the triton cases run in this process")
def test_interpreter_cases_in_a_subprocess():
    pytest.importorskip("triton")
    here = Path(__file__).resolve()
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning",
           "-m", "not gpu", str(here), "-k", "triton"]
    proc = subprocess.run(cmd, cwd=here.parent.parent, env=env, capture_output=True, text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    print(out[-3000:])
    assert proc.returncode == 0, f"interpreter cases failed (rc={proc.returncode}):\n{out[-12000:]}"
    assert " passed" in out and "skipped" not in out
