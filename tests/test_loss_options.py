"""z-loss, soft-capping and label smoothing for every loss (docs/losses.md), on the backends
that run in-process here (reference, cpu): loss and gradient against the float64 oracle, the
fused gradient and the backward op from the stats, ordinary and extreme logits, weights and
ignored rows, every reduction and dtype; gradcheck and opcheck with the options on; the LLM
head with them. The Triton kernels' twin tests are in test_triton_interpreter.py."""
from __future__ import annotations

import math
import os

import pytest
import torch

import fusedloss as fl
from fusedloss import dispatch, ops
from fusedloss.variants import Reduction, Variant, variant_id
from oracle import assert_close, oracle_loss, oracle_loss_and_grad

BACKENDS = [b for b in ("reference", "cpu") if b in fl.available_backends()]
if os.environ.get("TRITON_INTERPRET") == "1" and dispatch.unavailable_reason("triton", torch.device("cpu")) is None:
    BACKENDS.append("triton")  # tests/test_triton_suite.py runs this file with -k triton
OPTIONS = {
    "z": dict(z_loss=1e-2),
    "cap": dict(softcap=4.0),
    "smooth": dict(label_smoothing=0.15),
    "all": dict(z_loss=3e-2, softcap=6.0, label_smoothing=0.1),
}
HYPER = dict(alpha=1.5, beta=1.0, gamma=2.0)


def _data(n, c, dtype, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(n, c, generator=g)).to(dtype)
    t = torch.randint(0, c, (n,), generator=g)
    t[1] = -100
    w = torch.rand(c, generator=g) + 0.5
    return x, t, w


def _op_args(loss, reduction, opts):
    return (int(variant_id(loss)), int(reduction), -100, float(opts.get("label_smoothing", 0.0)),
            HYPER["alpha"], HYPER["beta"], HYPER["gamma"], float(opts.get("z_loss", 0.0)),
            float(opts.get("softcap") or 0.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("loss", fl.LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_options_match_float64_oracle(backend, option, loss, dtype):
    """The forward with the fused gradient (through autograd) and the backward op from the
    stats with a per-row grad_output, reduction none and mean, with class weights."""
    opts = OPTIONS[option]
    x, t, w = _data(9, 37, dtype, seed=3)
    w = w.to(torch.float64) if dtype == torch.float64 else w
    be = dispatch.resolve(backend, x.device)
    for red, name in ((Reduction.MEAN, "mean"), (Reduction.NONE, "none")):
        xr = x.clone().requires_grad_(True)
        out = fl.softmax_loss(xr, t, loss, weight=w, reduction=name, backend=backend, **opts, **HYPER)
        ref, ref_g = oracle_loss_and_grad(x, t, loss, weight=w, reduction=name, **opts, **HYPER)
        assert_close(out, ref, dtype if dtype != torch.bfloat16 else torch.bfloat16, "loss", f"{name} loss")
        out.sum().backward()
        assert_close(xr.grad, ref_g, dtype, "grad", f"{name} fused grad")
        # the backward op from the stats, grad_output not 1
        scal = _op_args(loss, red, opts)
        lo, stats, _ = be.one_target.fwd(x, t, w, *scal, False)
        go = torch.linspace(0.5, 2.0, 9, dtype=lo.dtype) if red == Reduction.NONE else torch.tensor(1.7, dtype=lo.dtype)
        g = be.one_target.bwd(go, x, t, w, stats, *scal)
        _, ref_g2 = oracle_loss_and_grad(x, t, loss, grad_output=go.double(), weight=w, reduction=name, **opts,
                                         **HYPER)
        assert_close(g, ref_g2, dtype, "grad", f"{name} backward op")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", fl.LOSSES)
def test_softcap_extreme_logits_are_finite_and_exact(backend, loss):
    """Logits of +-1e4 under a cap of 30: saturated tanh, slopes of e^-600 that must not read as
    0 - rounding (1 - t^2) noise, the target leading or trailing by the whole cap range."""
    x = torch.tensor([[1e4, -1e4, 0.0, 5.0], [-1e4, 1e4, 3.0, 2.0], [60.0, 59.0, -60.0, 0.0],
                      [0.1, 0.2, 0.3, 0.4]], dtype=torch.float32)
    t = torch.tensor([0, 0, 1, 3])
    for opts in (dict(softcap=30.0), dict(softcap=30.0, z_loss=1e-3, label_smoothing=0.1)):
        xr = x.clone().requires_grad_(True)
        out = fl.softmax_loss(xr, t, loss, reduction="none", backend=backend, **opts)
        out.sum().backward()
        ref, ref_g = oracle_loss_and_grad(x, t, loss, reduction="none", **opts)
        assert torch.isfinite(out).all() and torch.isfinite(xr.grad).all()
        assert_close(out, ref, torch.float32, "loss", str(opts))
        # element by element to a relative 1e-4 where the oracle's gradient is normal in fp32
        big = ref_g.abs() > 1e-30
        torch.testing.assert_close(xr.grad[big].double(), ref_g[big], rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", fl.LOSSES)
def test_z_loss_with_extreme_scales(backend, loss):
    """A target leading by 200 (p_c = 1 in every dtype: nllr's s = 1/(1 - p_c) overflows) and
    logits near 100 (lse^2 = 1e4; not 1e3, where fp32's own rounding of x_j - lse is 6e-5) with
    z-loss and smoothing: the mixed coefficient own s + extra stays finite (docs/losses.md)."""
    x = torch.tensor([[200.0, 0.0, -1.0, 0.5], [100.0, 99.0, 98.0, 0.0], [-5.0, 0.0, 5.0, 1.0]])
    t = torch.tensor([0, 2, 0])
    opts = dict(z_loss=1e-2, label_smoothing=0.05)
    xr = x.clone().requires_grad_(True)
    out = fl.softmax_loss(xr, t, loss, reduction="none", backend=backend, **opts)
    out.sum().backward()
    ref, ref_g = oracle_loss_and_grad(x, t, loss, reduction="none", **opts)
    assert torch.isfinite(xr.grad).all()
    assert_close(out, ref, torch.float32, "loss")
    assert_close(xr.grad, ref_g, torch.float32, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_rows_and_every_thread_count(backend):
    """Rows longer than the CPU kernel's 8 KiB blocks and not a multiple of the vector width."""
    x, t, w = _data(5, 5000 + 3, torch.float32, seed=7, scale=6.0)
    for loss in ("ce", "bce", "focal"):
        opts = OPTIONS["all"]
        xr = x.clone().requires_grad_(True)
        out = fl.softmax_loss(xr, t, loss, weight=w, backend=backend, **opts)
        out.backward()
        ref, ref_g = oracle_loss_and_grad(x, t, loss, weight=w, **opts)
        assert_close(out, ref, torch.float32, "loss", loss)
        assert_close(xr.grad, ref_g, torch.float32, "grad", loss)


def test_defaults_change_nothing():
    """z_loss = 0 and softcap = None are today's loss, bit for bit, on every backend here."""
    x, t, w = _data(6, 11, torch.float32, seed=1)
    for backend in BACKENDS:
        for loss in fl.LOSSES:
            a = fl.softmax_loss(x, t, loss, weight=w, backend=backend)
            b = fl.softmax_loss(x, t, loss, weight=w, backend=backend, z_loss=0.0, softcap=None)
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", fl.LOSSES)
def test_gradcheck_with_options(backend, loss):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.tensor([0, 3, -100, 5])
    w = torch.rand(6, dtype=torch.float64, generator=g) + 0.5
    kw = dict(weight=w, backend=backend, **OPTIONS["all"])
    assert torch.autograd.gradcheck(lambda v: fl.softmax_loss(v, t, loss, **kw), (x,))
    assert torch.autograd.gradcheck(lambda v: fl.softmax_loss(v, t, loss, reduction="none", **kw).square().sum(),
                                    (x,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_with_options(backend):
    be = dispatch.resolve(backend, torch.device("cpu"))
    x, t, w = _data(5, 7, torch.float64, seed=2)
    w = w.double()
    for loss in ("ce", "bce", "crl"):
        for red in (Reduction.NONE, Reduction.MEAN):
            scal = _op_args(loss, red, OPTIONS["all"])
            for cg in (False, True):
                torch.library.opcheck(be.one_target.fwd, (x.clone().requires_grad_(True), t, w, *scal, cg))
            lo, stats, _ = be.one_target.fwd(x, t, w, *scal, False)
            torch.library.opcheck(be.one_target.bwd, (torch.rand_like(lo) + 0.5, x, t, w, stats, *scal))


def test_return_lse_is_of_the_capped_logits():
    x, t, _ = _data(4, 9, torch.float32, seed=4, scale=20.0)
    for backend in BACKENDS:
        _, lse = fl.softmax_loss(x, t, "ce", softcap=5.0, return_lse=True, backend=backend)
        expect = torch.logsumexp(5.0 * torch.tanh(x.double() / 5.0), 1)
        expect[1] = 0.0  # ignored row
        torch.testing.assert_close(lse.double(), expect, rtol=1e-6, atol=1e-6)


def test_smoothing_for_every_loss_is_the_expected_loss_under_the_smoothed_target():
    """The definition written out: (1 - eps) L(x, c) + eps * mean_k L(x, k), per row, with L(x, k) the
    loss of each class as the target (the loss itself, C times), for every loss; for ce the smoothed
    ce term."""
    x, t, _ = _data(6, 8, torch.float64, seed=6)
    t[1] = 2
    eps = 0.2
    for loss in fl.LOSSES:
        plain = fl.softmax_loss(x, t, loss, reduction="none", backend="reference")
        per_class = torch.stack([fl.softmax_loss(x, torch.full_like(t, k), loss, reduction="none", backend="reference")
                                 for k in range(x.shape[1])], 1)
        got = fl.softmax_loss(x, t, loss, reduction="none", label_smoothing=eps, backend=BACKENDS[-1])
        torch.testing.assert_close(got, (1 - eps) * plain + eps * per_class.mean(1))
    smooth_ce = (torch.logsumexp(x, 1)[:, None] - x).mean(1)
    got = fl.softmax_loss(x, t, "ce", reduction="none", label_smoothing=eps, backend=BACKENDS[-1])
    plain = fl.softmax_loss(x, t, "ce", reduction="none", backend="reference")
    torch.testing.assert_close(got, (1 - eps) * plain + eps * smooth_ce)


def test_modules_take_the_options():
    x, t, w = _data(5, 6, torch.float32)
    m = fl.FocalLoss(weight=w, z_loss=1e-3, softcap=10.0, label_smoothing=0.1)
    assert "z_loss=0.001" in repr(m) and "softcap=10.0" in repr(m)
    ref = oracle_loss(x.double(), t, "focal", weight=w, z_loss=1e-3, softcap=10.0, label_smoothing=0.1)
    assert_close(m(x, t), ref, torch.float32, "loss")


@pytest.mark.parametrize("bad", [dict(z_loss=-1.0), dict(softcap=0.0), dict(softcap=-2.0),
                                 dict(z_loss=math.inf), dict(softcap=math.nan)])
def test_bad_options_raise_naming_the_argument(bad):
    x, t, _ = _data(3, 4, torch.float32)
    with pytest.raises(ValueError, match="z_loss|softcap"):
        fl.softmax_loss(x, t, "ce", **bad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", fl.LOSSES)
def test_head_with_options(backend, loss):
    """linear_softmax_loss with z-loss, softcap and smoothing: loss and the three gradients
    against the float64 oracle on hidden @ weight.T + bias."""
    g = torch.Generator().manual_seed(8)
    n, d, v = 10, 6, 40
    h = torch.randn(n, d, generator=g)
    wt = torch.randn(v, d, generator=g)
    b = torch.randn(v, generator=g)
    t = torch.randint(0, v, (n,), generator=g)
    t[3] = -100
    opts = OPTIONS["all"]
    hr, wr, br = (a.clone().requires_grad_(True) for a in (h, wt, b))
    out = fl.linear_softmax_loss(hr, wr, t, loss, bias=br, backend=backend, chunk_rows=4, **opts)
    out.backward()
    h64, w64, b64 = (a.double().requires_grad_(True) for a in (h, wt, b))
    ref = oracle_loss(h64 @ w64.T + b64, t, loss, **opts)
    ref.backward()
    assert_close(out, ref.detach(), torch.float32, "loss")
    for got, want in ((hr.grad, h64.grad), (wr.grad, w64.grad), (br.grad, b64.grad)):
        assert_close(got, want, torch.float32, "grad")


# ----------------------------------------------------------------------------
# On a CUDA GPU (python -m pytest -m gpu tests/test_loss_options.py; bench/gpu/check.sh runs
# it): the options, soft targets and mixup on the triton and cuda backends, rows long enough
# for the streamed (multi-block) Triton regime, against float64.
# ----------------------------------------------------------------------------

GPU_BACKENDS = ("triton", "cuda")


def _gpu(test):
    for mark in (pytest.mark.gpu,
                 pytest.mark.skipif("not torch.cuda.is_available()", reason="needs a CUDA device"),
                 pytest.mark.skipif("os.environ.get('TRITON_INTERPRET') == '1'",
                                    reason="TRITON_INTERPRET=1 interprets every Triton kernel")):
        test = mark(test)
    return test


def _on_gpu(backend):
    reason = dispatch.unavailable_reason(backend, torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)


# Few combinations: every new constexpr combination is a Triton compile, and the GPU check's
# budget is minutes. "all" turns on every option at once; bf16 is the dtype that rounds most.
@_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("loss", ["ce", "bce", "focal"])
@pytest.mark.parametrize("c", [1000, 40000])
def test_gpu_options_match_float64(backend, loss, c):
    _on_gpu(backend)
    dtype = torch.bfloat16
    x, t, w = _data(32, c, dtype, seed=11)
    x, t, w = x.cuda(), t.cuda(), w.cuda()
    for opts in (OPTIONS["all"],):
        for red in ("mean",):
            xr = x.clone().requires_grad_(True)
            out = fl.softmax_loss(xr, t, loss, weight=w, reduction=red, backend=backend, **opts)
            out.sum().backward()
            ref, ref_g = oracle_loss_and_grad(x.cpu(), t.cpu(), loss, weight=w.cpu(), reduction=red, **opts)
            assert_close(out.cpu(), ref, dtype, "loss", f"{opts} {red}")
            assert_close(xr.grad.cpu(), ref_g, dtype, "grad", f"{opts} {red}")


@_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_soft_targets_and_mixup(backend):
    _on_gpu(backend)
    dtype = torch.bfloat16
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(12)
    x = (3 * torch.randn(64, 5000, generator=g)).to(dtype)
    y = torch.softmax(torch.randn(64, 5000, generator=g), 1).to(dtype)
    xr = x.cuda().requires_grad_(True)
    out = fl.cross_entropy(xr, y.cuda(), label_smoothing=0.1, backend=backend)
    out.backward()
    x64 = x.double().requires_grad_(True)
    ref = F.cross_entropy(x64, y.double(), label_smoothing=0.1)
    ref.backward()
    assert_close(out.cpu(), ref.detach(), dtype, "loss", "soft")
    assert_close(xr.grad.cpu(), x64.grad, dtype, "grad", "soft")
    ya, yb = torch.randint(0, 5000, (64,), generator=g), torch.randint(0, 5000, (64,), generator=g)
    lam = torch.rand(64, generator=g)
    for loss in ("ce", "crl", "bce"):
        xr = x.cuda().requires_grad_(True)
        out = fl.softmax_loss(xr, (ya.cuda(), yb.cuda(), lam.cuda()), loss, backend=backend)
        out.backward()
        x64 = x.double().requires_grad_(True)
        ref = (lam.double() * oracle_loss(x64, ya, loss, reduction="none")).mean() + \
            ((1 - lam.double()) * oracle_loss(x64, yb, loss, reduction="none")).mean()
        ref.backward()
        assert_close(out.cpu(), ref.detach(), dtype, "loss", f"mixup {loss}")
        assert_close(xr.grad.cpu(), x64.grad, dtype, "grad", f"mixup {loss}")


# torch.compile of the Triton path needs a GPU (a triton_op runs eagerly under the interpreter only).
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_compile_fullgraph_with_options(backend):
    """z-loss, softcap and smoothing through torch.compile(fullgraph=True) (aot_eager: the fake
    and autograd registrations, without inductor's C++ compile), the functional and the head."""
    torch._dynamo.reset()
    x, t, w = _data(7, 12, torch.float32, seed=9)
    g = torch.Generator().manual_seed(10)
    h, wt = torch.randn(7, 5, generator=g), torch.randn(12, 5, generator=g)
    opts = OPTIONS["all"]

    def f(x, h, wt):
        a = fl.softmax_loss(x, t, "focal", weight=w, backend=backend, **opts)
        b = fl.linear_softmax_loss(h, wt, t, "crl", backend=backend, chunk_rows=3, **opts)
        return a + b

    args = [a.clone().requires_grad_(True) for a in (x, h, wt)]
    ref = f(*args)
    ref.backward()
    want = [a.grad for a in args]
    args = [a.clone().requires_grad_(True) for a in (x, h, wt)]
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    out.backward()
    torch.testing.assert_close(out, ref)
    for a, gw in zip(args, want):
        torch.testing.assert_close(a.grad, gw)
