"""The Triton expected-loss kernels (triton_kernels/probs/loss_kernels.py: class probabilities for every
loss, docs/losses.md "Soft targets: the expected loss") against the float64 oracle (tests/oracle.py).

Like tests/test_triton_soft.py: the interpreter cases (CPU tensors, ``TRITON_INTERPRET=1``) run in a
subprocess from ``test_interpreter_cases_in_a_subprocess`` (or directly:
``TRITON_INTERPRET=1 python -m pytest tests/test_triton_expected.py``); the ``@pytest.mark.gpu`` cases
(real shapes) run on a CUDA device. Rows of 37 classes are one on-chip tile with two rows per program
("single") or three column blocks of 16 with a ragged tail on a persistent grid of 4 programs
("stream"), by heuristics.override. The batch is tests/test_expected_loss.py's (written out here, without
importing timm): Dirichlet rows, one-hot, two-hot, timm's mixup_target with smoothing, rows with
zeros, a class leading by 30 and by 200 (with and without mass on it).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import fusedloss as fl  # noqa: E402
from fusedloss import ops  # noqa: E402
from fusedloss.variants import LOSSES, Reduction, variant_id  # noqa: E402
from oracle import TOLERANCES, assert_close, oracle_loss, oracle_loss_and_grad, oracle_soft_loss_and_grad  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interpreter = pytest.mark.skipif(not INTERPRET, reason="TRITON_INTERPRET=1 only (the subprocess test runs them)")
gpu = [pytest.mark.gpu,
       pytest.mark.skipif("not torch.cuda.is_available()", reason="needs a CUDA device"),
       pytest.mark.skipif(INTERPRET, reason="TRITON_INTERPRET=1 interprets every kernel")]

C = 37


def _smoothed_one_hot(t, c, smoothing):
    """timm's one_hot(t, c, on_value=1 - smoothing + smoothing / c, off_value=smoothing / c)."""
    off = smoothing / c
    return torch.full((t.shape[0], c), off, dtype=torch.float64).scatter_(1, t[:, None], 1 - smoothing + off)


def _batch(dtype, seed=0, c=C):
    """tests/test_expected_loss.py's batch (without importing timm): 14 rows of logits and probabilities:
    Dirichlet rows, one-hot, two-hot, timm's mixup_target(t, c, lam=0.35, smoothing=0.1) (written out),
    rows with zeros, a class leading by 30 and by 200."""
    g = torch.Generator().manual_seed(seed)
    n = 14
    x = 3 * torch.randn(n, c, generator=g, dtype=torch.float64)
    q = torch.zeros(n, c, dtype=torch.float64)
    q[0:3] = torch.distributions.Dirichlet(torch.full((c,), 0.5, dtype=torch.float64)).sample((3,))
    q[3, 5] = 1.0
    q[4, 2], q[4, 9] = 0.3, 0.7
    t = torch.tensor([1, 4, 7, 30])
    q[5:9] = 0.35 * _smoothed_one_hot(t, c, 0.1) + 0.65 * _smoothed_one_hot(t.flip(0), c, 0.1)
    z = torch.rand(2, c, generator=g, dtype=torch.float64)
    z[:, ::2] = 0
    q[9:11] = z / z.sum(1, keepdim=True)
    for r, lead in ((11, 30.0), (12, 200.0), (13, 200.0)):
        x[r, 3] = x[r].max() + lead
        q[r] = torch.softmax(torch.randn(c, generator=g, dtype=torch.float64), 0)
    q[12] = 0
    q[12, 3] = 0.9
    q[12, 10] = 0.1
    return x.to(dtype), q.to(dtype)


REGIMES = {"single": dict(min_tile=128),
           "stream": dict(single_max=32, stream_block=16, min_tile=128, stream_programs=4)}


def _weight(c=C, seed=3, dtype=torch.float32):
    return torch.rand(c, generator=torch.Generator().manual_seed(seed), dtype=dtype) + 0.3


def _run(x, q, loss, go, regime, device="cpu", **kw):
    """Loss, d/dx and d/dq of fl.softmax_loss(backend="triton") (autograd), on the CPU."""
    from fusedloss.triton_kernels import heuristics
    xr = x.detach().clone().to(device).requires_grad_(True)
    qr = q.detach().clone().to(device).requires_grad_(True)
    kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    with heuristics.override(**REGIMES.get(regime, {})):  # "device": the shipped heuristics
        out = fl.softmax_loss(xr, qr, loss, backend="triton", **kw)
        out.backward(torch.ones_like(out) if go is None else go.to(device, out.dtype))
    return out.detach().cpu(), xr.grad.cpu(), qr.grad.cpu()


def _check(x, q, loss, go, regime, msg="", device="cpu", **kw):
    out, gx, gq = _run(x, q, loss, go, regime, device, **kw)
    ref, rgx, rgq = oracle_soft_loss_and_grad(x, q, loss, go, **kw)
    assert out.dtype == x.dtype and gx.dtype == x.dtype and gq.dtype == q.dtype
    assert_close(out, ref, x.dtype, "loss", msg)
    assert_close(gx, rgx, x.dtype, "grad", f"{msg} d/dx")
    assert_close(gq, rgq, x.dtype, "grad", f"{msg} d/dq")


# ----------------------------------------------------------------------------
# The interpreter
# ----------------------------------------------------------------------------

@interpreter
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("use_weight", [False, True], ids=["plain", "weight"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_soft_targets_against_float64(loss, reduction, use_weight, eps, dtype):
    """Every loss x reduction x weight x smoothing x dtype, the fused gradient scaled by a grad_output
    != 1; half the cases on chip, half streamed (both regimes meet every loss and reduction)."""
    x, q = _batch(dtype, seed=1)
    regime = "stream" if (use_weight != (eps > 0)) else "single"
    go = torch.linspace(0.5, 2.0, x.shape[0]) if reduction == "none" else torch.tensor(0.7)
    kw = dict(weight=_weight() if use_weight else None, reduction=reduction, label_smoothing=eps)
    _check(x, q, loss, go, regime, f"{loss} {regime}", **kw)


@interpreter
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("loss", LOSSES)
def test_backward_op_from_stats(loss, regime):
    """fusedloss::triton_soft_loss_bwd (the gradient from the forward's stats, no fused gradient) and
    the forward's stats (lse, S, log(1 - p_w), w) against the reference's, weight and smoothing on, N
    odd (a masked row in the last row block)."""
    from fusedloss.triton_kernels import heuristics
    from fusedloss.triton_kernels.probs import launch as launch_soft
    x, q = _batch(torch.float32, seed=7)
    x, q = x[:13], q[:13]
    w = _weight()
    for red in ("none", "mean"):
        go = torch.linspace(0.5, 2.0, 13) if red == "none" else torch.tensor(1.3)
        args = (w, variant_id(loss), int(Reduction[red.upper()]), 0.1, 1.5, 1.0, 2.0)
        with heuristics.override(**REGIMES[regime]):
            out, stats, _ = launch_soft.triton_soft_loss_fwd(x, q, *args, False)
            g = launch_soft.triton_soft_loss_bwd(go, x, q, *args[:1], stats, *args[1:])
        r_out, r_stats, _ = ops.reference_soft_loss_fwd(x, q, *args, False)
        torch.testing.assert_close(stats[:, [0, 1, 2]], r_stats[:, [0, 1, 2]], rtol=1e-5, atol=1e-5)
        assert torch.equal(stats[:, 3], r_stats[:, 3])
        ref, rgx, _ = oracle_soft_loss_and_grad(x, q, loss, go, weight=w, reduction=red, label_smoothing=0.1)
        assert_close(out, ref, torch.float32, "loss", red)
        assert_close(g, rgx, torch.float32, "grad", red)


@interpreter
@pytest.mark.parametrize("regime, eps", [("single", 0.0), ("single", 0.1), ("stream", 0.0)])
@pytest.mark.parametrize("loss", LOSSES)
def test_one_hot_is_class_index_and_two_hot_is_two_targets(loss, regime, eps):
    """Row by row ('none'), with weights: one-hot probabilities == the class index, two-hot ==
    mixup's two targets (the Triton one- and two-target kernels; with eps > 0 and loss != ce the
    expected-loss kernels with the (two-)hot target formed on the fly); the targets lead by 30 and 200.
    Streamed with eps > 0 both sides are those same expected-loss kernels, each checked streamed against
    float64 (test_soft_targets_against_float64, test_class_index_smoothing_against_float64): not repeated."""
    from fusedloss.triton_kernels import heuristics
    x, _ = _batch(torch.float32, seed=2)
    n = x.shape[0]
    g = torch.Generator().manual_seed(4)
    w = _weight(seed=5)
    ta = torch.randint(0, C, (n,), generator=g)
    ta[11] = ta[12] = 3
    tb = torch.randint(0, C, (n,), generator=g)
    tb[13] = 3
    lam = torch.rand(n, generator=g)
    tol = TOLERANCES[torch.float32]["loss"]
    kw = dict(weight=w, reduction="none", backend="triton", label_smoothing=eps)
    one_hot = torch.nn.functional.one_hot(ta, C).float()
    two_hot = lam[:, None] * one_hot + (1 - lam)[:, None] * torch.nn.functional.one_hot(tb, C).float()
    with heuristics.override(**REGIMES[regime]):
        torch.testing.assert_close(fl.softmax_loss(x, one_hot, loss, **kw), fl.softmax_loss(x, ta, loss, **kw),
                                   rtol=tol[0], atol=tol[1])
        torch.testing.assert_close(fl.softmax_loss(x, two_hot, loss, **kw),
                                   fl.softmax_loss(x, (ta, tb, lam), loss, **kw), rtol=tol[0], atol=tol[1])


@interpreter
@pytest.mark.parametrize("loss", LOSSES)
def test_masked_logits_and_large_offsets(loss):
    """-inf logits without target mass add 0 and get a 0 gradient; logits offset by 1e3 (fp32);
    a wrong class leading by 200 with all the mass elsewhere; a row of one class (C = 1)."""
    x, q = _batch(torch.float64, seed=8)
    x, q = x[:6].clone(), q[:6].clone()
    x[0, 5:20] = -math.inf
    q[0, 5:20] = 0.0
    q[0] /= q[0].sum()
    x[1] += 1e3
    x[2, 9] = x[2].max() + 200.0
    q[2, 9] = 0.0
    q[2] /= q[2].sum()
    x, q = x.float(), q.float()
    go = torch.linspace(0.5, 1.5, 6)
    for regime in REGIMES:
        out, gx, _ = _run(x, q, loss, go, regime, reduction="none", weight=_weight())
        assert torch.isfinite(out).all() and torch.isfinite(gx).all(), regime
        assert (gx[0, 5:20] == 0).all()
        ref, rgx, _ = oracle_soft_loss_and_grad(x, q, loss, go, reduction="none", weight=_weight())
        # row 0: a -inf logit without mass has p = 0 exactly (derivative 0) and changes nothing else, so
        # its float64 gradient is that of the row without those classes (autograd of the oracle's
        # (1 - p)^g log p, lace and focal, reads 0 * inf = NaN there and spreads it over the row)
        cols = torch.isfinite(x[0])
        _, r0, _ = oracle_soft_loss_and_grad(x[:1, cols], q[:1, cols], loss, go[:1], reduction="none",
                                             weight=_weight()[cols])
        rgx[0] = 0.0
        rgx[0, cols] = r0[0]
        assert_close(out, ref, torch.float32, "loss", regime)
        assert_close(gx, rgx, torch.float32, "grad", regime)
    x1, q1 = torch.randn(4, 1), torch.ones(4, 1)
    if loss == "bce":  # p = 1 and no other class: -log 1 = 0 (the oracle's T - log(1 - p) reads -inf - -inf)
        out, gx, _ = _run(x1, q1, loss, None, "single", label_smoothing=0.1)
        assert out.item() == 0.0 and (gx == 0).all()
    elif loss == "nllr":  # log(1 - p) - log p = log 0: unbounded below by definition
        assert _run(x1, q1, loss, None, "single", label_smoothing=0.1)[0].item() == -math.inf
    else:
        _check(x1, q1, loss, None, "single", "C = 1", label_smoothing=0.1)


@interpreter
def test_smoothed_mass_long_row_and_strided():
    """The uniform part's sums are (eps / C) times a sum of weights, never a float32 sum of C values
    of eps / C: a row of 3000 classes, one-hot target, eps = 0.1, every loss, on chip and streamed
    (blocks of 16); targets with a class stride of 2 and logits rows of a wider buffer."""
    from fusedloss.triton_kernels import heuristics
    g = torch.Generator().manual_seed(9)
    c = 3000
    x = 2 * torch.randn(2, c, generator=g)
    q = torch.zeros(2, c)
    q[0, 17] = 1.0
    q[1, 2999] = 1.0
    for loss in ("ce", "bce", "focal"):
        for regime in (dict(), dict(single_max=1024, stream_block=1024, stream_programs=2)):
            xr = x.clone().requires_grad_(True)
            with heuristics.override(**regime):
                out = fl.softmax_loss(xr, q, loss, label_smoothing=0.1, reduction="none", backend="triton")
                out.sum().backward()
            ref, rg, _ = oracle_soft_loss_and_grad(x, q, loss, torch.ones(2), reduction="none", label_smoothing=0.1)
            assert (out.double() - ref).abs().max().item() <= 2e-6 * ref.abs().max().item(), (loss, regime)
            assert (xr.grad.double() - rg).abs().max().item() <= 2e-6 * rg.abs().max().item(), (loss, regime)
    xb, qb = _batch(torch.float32, seed=10, c=2 * C)
    x = xb[::2, 3:3 + C]
    qfull = torch.zeros(7, 2 * C)
    qfull[:, ::2] = torch.softmax(qb[::2, :C].float() * 3, 1)
    q = qfull[:, ::2]
    assert x.stride(0) == 4 * C and q.stride(1) == 2
    _check(x, q, "crl", None, "stream", "strided", weight=_weight(), label_smoothing=0.1)


def _mix_oracle(x, ta, tb, lam, loss, go, **kw):
    """float64 lam L(a) + (1 - lam) L(b), each part reduced on its own ('mean': by its own
    denominator), and its gradient."""
    x64 = x.double().requires_grad_(True)
    red = kw.pop("reduction")
    ra = oracle_loss(x64, ta, loss, reduction="none", **kw)
    rb = oracle_loss(x64, tb, loss, reduction="none", **kw)
    rows = lam.double() * ra + (1 - lam.double()) * rb
    if red == "none":
        ref = rows
    else:
        w = kw.get("weight")
        w = torch.ones(x.shape[1]) if w is None else w

        def den(t):
            return (w[t.clamp(min=0)] * (t != -100)).sum().double() if red == "mean" else 1.0
        ref = (lam.double() * ra).sum() / den(ta) + ((1 - lam.double()) * rb).sum() / den(tb)
    (g,) = torch.autograd.grad(ref, x64, torch.ones_like(ref) if go is None else go.double())
    return ref.detach(), g


#: (dtype, options) of the class-index smoothing cases: fp32 plain, fp32 with z-loss and a soft cap, bf16 with z-loss.
INDEX_CONFIGS = ((torch.float32, {}), (torch.float32, dict(z_loss=1e-3, softcap=15.0)),
                 (torch.bfloat16, dict(z_loss=1e-3)))
SMOOTHED_LOSSES = [l for l in LOSSES if l != "ce"]


def _index_smoothing_cases():
    """On chip ("single"): every loss x every (dtype, options) config, the reduction turning with the loss.
    Streamed (blocks of 16 over C = 37, a persistent grid; ~5x the interpreter's time of a tile on chip): one
    config and one reduction per loss, turning so that the five losses meet every config and every
    reduction. Each case runs both target forms (one index, mixup's two)."""
    reds = ("none", "mean", "sum")
    single = [("single", loss, reds[i % 3], INDEX_CONFIGS) for i, loss in enumerate(SMOOTHED_LOSSES)]
    stream = [("stream", loss, reds[(i + 1) % 3], (INDEX_CONFIGS[i % 3],)) for i, loss in enumerate(SMOOTHED_LOSSES)]
    return [pytest.param(*c, id=f"{c[1]}-{c[2]}-{c[0]}") for c in single + stream]


@interpreter
@pytest.mark.parametrize("regime, loss, reduction, configs", _index_smoothing_cases())
def test_class_index_smoothing_against_float64(loss, reduction, regime, configs):
    """Label smoothing with class indices (one target, and mixup's two) for loss != ce: the expected
    loss (1 - eps) w_c L(x, c) + (eps / C) sum_k w_k L(x, k) against the float64 oracle, with weight,
    an ignored row, the target leading by 30, a wrong class leading by 200, grad_output != 1; fp32,
    fp32 with z-loss and a soft cap, bf16 with z-loss (see _index_smoothing_cases)."""
    from fusedloss.triton_kernels import heuristics
    x, _ = _batch(torch.float32, seed=5)
    n = x.shape[0]
    g = torch.Generator().manual_seed(6)
    w = _weight(seed=7)
    t = torch.randint(0, C, (n,), generator=g)
    t[11] = 3
    t[12] = 4
    t[0] = -100
    tb = t.flip(0)
    lam = torch.rand(n, generator=g)
    go = torch.linspace(0.5, 2.0, n) if reduction == "none" else torch.tensor(0.8)
    for dtype, extra in configs:
        xd = x.to(dtype)
        kw = dict(weight=w, reduction=reduction, label_smoothing=0.2, **extra)
        for target in (t, (t, tb, lam)):
            xr = xd.clone().requires_grad_(True)
            with heuristics.override(**REGIMES[regime]):
                out = fl.softmax_loss(xr, target, loss, backend="triton", **kw)
                out.backward(go.to(out.dtype))
            if isinstance(target, tuple):
                ref, rg = _mix_oracle(xd, t, tb, lam, loss, go, **kw)
            else:
                ref, rg = oracle_loss_and_grad(xd, t, loss, go, **kw)
            msg = f"{loss} {dtype} {extra} {'mix' if isinstance(target, tuple) else 'one'}"
            assert_close(out.detach(), ref, dtype, "loss", msg)
            assert_close(xr.grad, rg, dtype, "grad", msg)
            assert (xr.grad[0] == 0).all() or isinstance(target, tuple)


@interpreter
@pytest.mark.parametrize("loss, regime", [("bce", "stream"), ("focal", "single")])
def test_class_index_smoothing_backward_ops_and_inplace(loss, regime):
    """The backward ops from the stats (fusedloss::triton_bwd / triton_mix_bwd, the forward without the
    gradient) and inplace_backward=True, against the fused gradient; 'mean' with weights; bce (its arg-max
    statistics) streamed, focal on chip."""
    from fusedloss.triton_kernels import heuristics
    from fusedloss.triton_kernels.one_target import launch as one
    from fusedloss.triton_kernels.two_targets import launch as two
    x, _ = _batch(torch.float32, seed=12)
    n = x.shape[0]
    g = torch.Generator().manual_seed(13)
    w = _weight(seed=14)
    t = torch.randint(0, C, (n,), generator=g)
    t[3] = -100
    tb = t.roll(1)
    lam = torch.rand(n, generator=g)
    v = variant_id(loss)
    scalars = (v, int(Reduction.MEAN), -100, 0.1, 1.5, 1.0, 2.0, 1e-3, 0.0)
    go = torch.tensor(1.7)
    with heuristics.override(**REGIMES[regime]):
        _, stats, gf = one.triton_fwd(x, t, w, *scalars, True)
        _, stats0, _ = one.triton_fwd(x, t, w, *scalars, False)
        gb = one.triton_bwd(go, x, t, w, stats0, *scalars)
        torch.testing.assert_close(gb, gf * go, rtol=1e-5, atol=1e-7)
        _, mstats, mg = two.triton_mix_fwd(x, t, tb, lam, w, *scalars, True)
        mgb = two.triton_mix_bwd(go, x, t, tb, lam, w, mstats, *scalars)
        torch.testing.assert_close(mgb, mg * go, rtol=1e-5, atol=1e-7)
        xi = x.clone()
        out = fl.softmax_loss(xi.requires_grad_(True) * 1.0, t, loss, weight=w, label_smoothing=0.1, z_loss=1e-3,
                              backend="triton", inplace_backward=True)
        out.backward()
    ref, rg = oracle_loss_and_grad(x, t, loss, weight=w, label_smoothing=0.1, z_loss=1e-3)
    assert_close(xi.grad, rg, torch.float32, "grad", "inplace")
    assert_close(gf, rg, torch.float32, "grad", "fused")
    # stats: lse and lse_ex(a), the reference's columns 0 and 1
    r_stats = ops.reference_fwd(x, t, w, *scalars, False)[1]
    keep = t != -100
    torch.testing.assert_close(stats[keep][:, :2], r_stats[keep][:, :2].float(), rtol=1e-5, atol=1e-5)


@interpreter
def test_ops_opcheck():
    from fusedloss.triton_kernels.probs import launch as launch_soft
    x, q = _batch(torch.float32, seed=11)
    w = _weight()
    for variant in (variant_id("bce"), variant_id("focal")):
        args = (x, q, w, variant, int(Reduction.MEAN), 0.1, 1.5, 1.0, 2.0, True)
        # schema and autograd registration (the fake-tensor checks need a GPU: the interpreter launches on
        # CPU data, as in tests/test_triton_soft.py's INTERPRETER_OPCHECK)
        torch.library.opcheck(launch_soft.triton_soft_loss_fwd, args,
                              test_utils=("test_schema", "test_autograd_registration"))


# ----------------------------------------------------------------------------
# Without TRITON_INTERPRET: the interpreter cases in a subprocess
# ----------------------------------------------------------------------------

@pytest.mark.slow
def test_interpreter_cases_in_a_subprocess():
    if INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 already: the interpreter cases run in this process")
    here = Path(__file__).resolve()
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning",
           "-m", "not gpu", str(here)]
    proc = subprocess.run(cmd, cwd=here.parent.parent, env=env, capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    print(out[-3000:])
    assert proc.returncode == 0, f"interpreter cases failed (rc={proc.returncode}):\n{out[-12000:]}"


# ----------------------------------------------------------------------------
# On a CUDA GPU
# ----------------------------------------------------------------------------

def _gpu(test):
    for m in gpu:
        test = m(test)
    return test


def _real(n, c, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(n, c, generator=g)
    q = torch.softmax(2 * torch.randn(n, c, generator=g), 1)
    x[0, 5] = x[0].max() + 30.0
    x[1, 7] = x[1].max() + 200.0
    q[2] = 0.0
    q[2, 11] = 1.0
    return x.to(dtype), q.to(dtype)


@_gpu
@pytest.mark.parametrize("shape", [(256, 1000), (32, 32000)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("loss", LOSSES)
def test_gpu_shapes_match_float64(loss, shape):
    """Probabilities on chip (C = 1000) and streamed (C = 32000), bf16, weight and smoothing,
    'mean' (fp32 at C = 32000 for bce and nllr: the row terms with the most cancellation)."""
    for dtype in (torch.bfloat16, torch.float32) if loss in ("bce", "nllr") and shape[1] > 2048 else \
            (torch.bfloat16,):
        x, q = _real(*shape, dtype, seed=20)
        _check(x, q, loss, torch.tensor(0.7), "device", f"{loss} {dtype}", device="cuda",
               weight=_weight(shape[1]), label_smoothing=0.1)


@_gpu
@pytest.mark.parametrize("loss", [l for l in LOSSES if l != "ce"])
def test_gpu_class_index_smoothing_match_float64(loss):
    """Class indices and mixup's two targets with label smoothing (the index kernels), C = 32000 bf16,
    weight, z-loss, an ignored row, 'mean'."""
    x, _ = _real(64, 32000, torch.bfloat16, seed=21)
    g = torch.Generator().manual_seed(22)
    t = torch.randint(0, 32000, (64,), generator=g)
    t[0], t[1], t[3] = 5, 7, -100
    tb = t.roll(1)
    lam = torch.rand(64, generator=g)
    w = _weight(32000)
    kw = dict(weight=w, label_smoothing=0.1, z_loss=1e-4)
    for target in (t, (t, tb, lam)):
        xr = x.cuda().requires_grad_(True)
        dev_t = tuple(v.cuda() for v in target) if isinstance(target, tuple) else target.cuda()
        out = fl.softmax_loss(xr, dev_t, loss, backend="triton", weight=w.cuda(), label_smoothing=0.1, z_loss=1e-4)
        out.backward()
        if isinstance(target, tuple):
            ref, rg = _mix_oracle(x, t, tb, lam, loss, None, reduction="mean", **kw)
        else:
            ref, rg = oracle_loss_and_grad(x, t, loss, **kw)
        assert_close(out.detach().cpu(), ref, torch.bfloat16, "loss", loss)
        assert_close(xr.grad.cpu(), rg, torch.bfloat16, "grad", loss)


@_gpu
def test_gpu_no_host_synchronization_and_deterministic():
    x, q = _real(128, 5000, torch.bfloat16, seed=22)
    x, q, w = x.cuda(), q.cuda(), _weight(5000).cuda()
    grads = []
    for _ in range(2):
        for red in ("none", "mean", "sum"):
            xr = x.clone().requires_grad_(True)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                out = fl.softmax_loss(xr, q, "bce", weight=w, reduction=red, label_smoothing=0.1, backend="triton")
                out.sum().backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            grads.append(xr.grad)
    assert all(torch.equal(a, b) for a, b in zip(grads[:3], grads[3:]))
