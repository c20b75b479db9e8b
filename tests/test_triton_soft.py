"""The Triton soft-target (class-probability) cross-entropy kernels (triton_kernels/probs/kernels.py,
launch.py) against float64: ``F.cross_entropy(x.double(), probs.double(), ...)`` and the
oracle's tolerances.

Two kinds of tests:

* interpreter tests (CPU tensors, ``TRITON_INTERPRET=1``): numerics, layouts, the two ops
  (opcheck), traffic. Triton fixes interpreted vs compiled mode at its import, so without the
  variable they run in a subprocess (``test_interpreter_cases_in_a_subprocess``), with it
  directly: ``TRITON_INTERPRET=1 python -m pytest tests/test_triton_soft.py``;
* ``@pytest.mark.gpu`` tests (real shapes, torch.compile, no host synchronization), skipped
  without CUDA and under the interpreter: ``python -m pytest -m gpu tests/test_triton_soft.py``.

Shapes are tiny for the interpreter; the launch heuristics are overridden (as in
test_triton_interpreter.py) so that rows of 37 classes are one on-chip tile with two rows per
program ("single") or span three column blocks of 16 with a ragged tail on a persistent grid
of 4 programs ("stream").
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import fusedloss as fl  # noqa: E402
from fusedloss import dispatch, ops  # noqa: E402
from fusedloss.variants import Reduction  # noqa: E402
from oracle import assert_close  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interpreter = pytest.mark.skipif(not INTERPRET, reason="TRITON_INTERPRET=1 only (the subprocess test runs them)")
gpu = [pytest.mark.gpu,
       pytest.mark.skipif("not torch.cuda.is_available()", reason="needs a CUDA device"),
       pytest.mark.skipif(INTERPRET, reason="TRITON_INTERPRET=1 interprets every kernel")]

REGIMES = {"single": dict(min_tile=128),
           "stream": dict(single_max=32, stream_block=16, min_tile=128, stream_programs=4)}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REDUCTIONS = ("none", "mean", "sum")
N, C = 9, 37


def _data(n=N, c=C, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(n, c, generator=g)).to(dtype)
    y = torch.softmax(2 * torch.randn(n, c, generator=g), 1).to(dtype)
    w = 0.3 + torch.rand(c, generator=g)
    return x, y, w


def _go(reduction, n, seed=3):
    g = torch.Generator().manual_seed(seed)
    return 0.5 + torch.rand((n,) if reduction == "none" else (), generator=g)


def _triton(x, y, go, regime="stream", **kw):
    """Loss, d/dx and d/dy through fl.cross_entropy(backend="triton") and autograd."""
    from fusedloss.triton_kernels import heuristics
    xr, yr = x.detach().clone().requires_grad_(True), y.detach().clone().requires_grad_(True)
    with heuristics.override(**REGIMES[regime]):
        out = fl.cross_entropy(xr, yr, backend="triton", **kw)
        out.backward(go.to(out.dtype))
    return out.detach(), xr.grad, yr.grad


def _float64(x, y, go, weight=None, **kw):
    """PyTorch's own loss and both gradients, in float64 from the same (rounded) inputs."""
    xr, yr = x.detach().double().requires_grad_(True), y.detach().double().requires_grad_(True)
    out = F.cross_entropy(xr, yr, weight=None if weight is None else weight.double(), **kw)
    out.backward(go.double())
    return out.detach(), xr.grad, yr.grad


def _float64_with_mass(x, y, w, go, reduction):
    """float64 loss and d/dx of sum_k w_k y_k (lse - x_k) over the classes with target mass only:
    PyTorch's own formula reads 0 * inf = NaN at a -inf logit without mass, where the loss is 0."""
    x64 = x.detach().double().requires_grad_(True)
    wy = y.double() * w.double()
    lse = torch.logsumexp(x64, 1, keepdim=True)
    rows = torch.where(wy > 0, wy * (lse - torch.where(wy > 0, x64, 0.0)), 0.0).sum(1)
    out = {"none": rows, "sum": rows.sum(), "mean": rows.mean()}[reduction]
    (g,) = torch.autograd.grad(out, x64, go.double())
    return out.detach(), g


def _check(x, y, go, regime="stream", msg="", run=None, **kw):
    """Loss and both gradients of ``run`` (the interpreter's _triton by default) against float64."""
    out, gx, gy = run(x, y, go, **kw) if run is not None else _triton(x, y, go, regime, **kw)
    ref, rgx, rgy = _float64(x, y, go, **kw)
    assert out.dtype == x.dtype and gx.dtype == x.dtype and gy.dtype == y.dtype
    assert_close(out, ref, x.dtype, "loss", msg)
    assert_close(gx, rgx, x.dtype, "grad", msg)
    assert_close(gy, rgy, x.dtype, "grad", f"{msg} (targets)")


# ----------------------------------------------------------------------------
# The interpreter: numerics against float64
# ----------------------------------------------------------------------------

@interpreter
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_float64(reduction, dtype, regime):
    """Weight and label smoothing on, grad_output != 1 (the fused gradient scaled in place)."""
    x, y, w = _data(dtype=dtype, seed=1)
    _check(x, y, _go(reduction, N), regime, weight=w, label_smoothing=0.1, reduction=reduction)


@interpreter
@pytest.mark.parametrize("opts", [{}, dict(weight=True), dict(label_smoothing=0.2)], ids=["plain", "weight", "smooth"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_each_option_alone(reduction, opts):
    x, y, w = _data(seed=2)
    kw = dict(opts, weight=w) if opts.get("weight") else dict(opts)
    _check(x, y, _go(reduction, N), "stream", reduction=reduction, **kw)


@interpreter
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("dtype,big", [(torch.float32, 1e4), (torch.bfloat16, 200.0), (torch.float16, 100.0)],
                         ids=str)
def test_masked_logits_and_large_offsets(dtype, big, regime):
    """-inf logits without target mass add 0 to the loss and get a 0 gradient (PyTorch's formula
    reads 0 * inf = NaN there: the oracle sums over the classes with mass); logits offset by
    ``big`` keep full accuracy (the loss's terms are relative to the running max, and p_j uses
    lse's compensation lse_lo); a target leading by 30, a one-hot target."""
    x, y, w = _data(6, C, torch.float64, seed=4)
    x[0, 5:20] = -math.inf
    y[0, 5:20] = 0.0
    y[0] /= y[0].sum()
    x[1] += big
    x[2] -= big
    x[3, 7] = x[3].max() + 30.0
    y[3] = 0.0
    y[3, 7] = 1.0
    x[4, ::3] = -math.inf
    y[4, ::3] = 0.0
    y[4] /= y[4].sum()
    x, y = x.to(dtype), y.to(dtype)
    go = torch.tensor(0.8)
    for reduction in ("none", "sum"):
        gox = go.expand(6) if reduction == "none" else go
        out, gx, _ = _triton(x, y, gox, regime, weight=w, reduction=reduction)
        ref, rgx = _float64_with_mass(x, y, w, gox, reduction)
        assert torch.isfinite(out).all() and torch.isfinite(gx).all()
        assert_close(out, ref, dtype, "loss", reduction)
        assert_close(gx, rgx, dtype, "grad", reduction)
        assert (gx[0, 5:20] == 0).all()


@interpreter
@pytest.mark.parametrize("regime", REGIMES)
def test_strided_and_sliced_inputs(regime):
    """Rows of any stride in place (a slice of a wider buffer, every other row), targets with a
    class stride of 2 (copied once by the launcher), the gradient only in the slice."""
    xb, yb, w = _data(2 * N, C + 11, seed=5)
    x = xb[::2, 4:4 + C]
    y = torch.softmax(yb[1::2, 2:2 + C].float(), 1)
    y_t = torch.softmax(torch.randn(C, 2 * N, generator=torch.Generator().manual_seed(6)), 0).t()[::2]
    assert x.stride(0) == 2 * (C + 11) and y_t.stride(1) != 1
    go = _go("mean", N)
    for yy in (y, y_t):
        _check(x, yy, go, regime, weight=w[:C], reduction="mean", label_smoothing=0.05)
    leaf = xb.clone().requires_grad_(True)
    from fusedloss.triton_kernels import heuristics
    with heuristics.override(**REGIMES[regime]):
        fl.cross_entropy(leaf[::2, 4:4 + C], y, backend="triton").backward()
    mask = torch.zeros_like(xb, dtype=torch.bool)
    mask[::2, 4:4 + C] = True
    assert (leaf.grad[~mask] == 0).all() and (leaf.grad[mask] != 0).all()


@interpreter
@pytest.mark.parametrize("how", ["sum", "mean"])
def test_expanded_grad_output(how):
    """L.sum() / L.mean() of a 'none' loss hand the backward an expanded (stride 0) grad_output:
    through the fused gradient and through the backward op (the forward without the gradient)."""
    x, y, w = _data(seed=7)
    x64 = x.double().requires_grad_(True)
    ref = F.cross_entropy(x64, y.double(), weight=w.double(), reduction="none", label_smoothing=0.1)
    getattr(ref, how)().backward()
    from fusedloss.triton_kernels.probs import launch as launch_soft
    for fused in (True, False):
        xr = x.clone().requires_grad_(True)
        if fused:
            out = fl.cross_entropy(xr, y, weight=w, reduction="none", label_smoothing=0.1, backend="triton")
        else:
            out, _, _ = launch_soft.triton_soft_fwd(xr, y, w, int(Reduction.NONE), 0.1, False)
        getattr(out, how)().backward()
        assert_close(xr.grad, x64.grad, torch.float32, "grad", f"{how} fused={fused}")


# ----------------------------------------------------------------------------
# The two ops: the backward op, stats, N = 0, opcheck
# ----------------------------------------------------------------------------

@interpreter
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_backward_op_and_stats(dtype, regime):
    """The fused gradient (grad_output 1) and triton_soft_bwd from the stats (any grad_output)
    against float64; loss and stats do not change with compute_grad; the stats are (lse, S, ...);
    the reference's stats (no lse_lo) serve the Triton backward, and the Triton stats the
    reference's backward; autograd through the forward without the fused gradient."""
    from fusedloss.triton_kernels import heuristics
    from fusedloss.triton_kernels.probs import launch as launch_soft
    fwd, bwd = launch_soft.triton_soft_fwd, launch_soft.triton_soft_bwd
    x, y, w = _data(dtype=dtype, seed=8)
    eps = 0.05
    for red in Reduction:
        name = red.name.lower()
        go = _go(name, N)
        ref, rgx, _ = _float64(x, y, go, weight=w, reduction=name, label_smoothing=eps)
        _, rg1, _ = _float64(x, y, torch.ones_like(go), weight=w, reduction=name, label_smoothing=eps)
        with heuristics.override(**REGIMES[regime]):
            out, stats, grad = fwd(x, y, w, int(red), eps, True)
            out2, stats2, empty = fwd(x, y, w, int(red), eps, False)
            g_bwd = bwd(go, x, y, w, stats, int(red), eps)
            _, ref_stats, _ = ops.reference_soft_fwd(x, y, w, int(red), eps, False)
            g_from_ref = bwd(go, x, y, w, ref_stats, int(red), eps)
            xr = x.clone().requires_grad_(True)
            fwd(xr, y, w, int(red), eps, False)[0].backward(go)
        assert empty.numel() == 0 and grad.dtype == dtype and stats.dtype == torch.float32
        torch.testing.assert_close(out, out2, rtol=0, atol=0)
        torch.testing.assert_close(stats, stats2, rtol=0, atol=0)
        assert_close(out, ref, dtype, "loss", name)
        assert_close(grad, rg1, dtype, "grad", f"{name} fused")
        for g, what in ((g_bwd, "backward op"), (g_from_ref, "reference stats"), (xr.grad, "autograd")):
            assert_close(g, rgx, dtype, "grad", f"{name} {what}")
        wy = (y.double() * (1 - eps) + eps / C) * w.double()
        torch.testing.assert_close(stats[:, 0].double(), torch.logsumexp(x.double(), 1), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(stats[:, 1].double(), wy.sum(1), rtol=1e-5, atol=1e-6)
        g_ref = ops.reference_soft_bwd(go, x, y, w, stats, int(red), eps)
        assert_close(g_ref, rgx, dtype, "grad", f"{name} reference backward of triton stats")


@interpreter
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(reduction):
    """N = 0: an empty 'none', 0 for 'sum', NaN for 'mean' (as PyTorch); an empty gradient."""
    x = torch.zeros(0, C, requires_grad=True)
    y = torch.zeros(0, C)
    out = fl.cross_entropy(x, y, reduction=reduction, backend="triton")
    ref = F.cross_entropy(torch.zeros(0, C), y, reduction=reduction)
    torch.testing.assert_close(out, ref, equal_nan=True)
    out.sum().backward()
    assert x.grad.shape == (0, C)
    from fusedloss.triton_kernels.probs import launch as launch_soft
    _, stats, _ = launch_soft.triton_soft_fwd(x.detach(), y, None, int(Reduction[reduction.upper()]), 0.1, False)
    go = torch.ones(()) if reduction != "none" else torch.ones(0)
    g = launch_soft.triton_soft_bwd(go, x.detach(), y, None, stats, int(Reduction[reduction.upper()]), 0.1)
    assert stats.shape == (0, 4) and g.shape == (0, C)


#: Under the interpreter a wrap_triton launch runs the kernel even on fake tensors (it reads their
#: data), so the fake-tensor utilities of opcheck run on a GPU only (test_gpu_opcheck), as for
#: one_target/launch.py's ops (tests/test_triton_gpu.py).
INTERPRETER_OPCHECK = ("test_schema", "test_autograd_registration")


@interpreter
def test_opcheck():
    from fusedloss.triton_kernels.probs import launch as launch_soft
    fwd, bwd = launch_soft.triton_soft_fwd, launch_soft.triton_soft_bwd
    x, y, w = _data(5, 7, seed=9)
    for red in Reduction:
        for cg in (False, True):
            torch.library.opcheck(fwd, (x.clone().requires_grad_(True), y, w, int(red), 0.1, cg),
                                  test_utils=INTERPRETER_OPCHECK)
        lo, stats, _ = fwd(x, y, w, int(red), 0.1, False)
        torch.library.opcheck(bwd, (torch.rand_like(lo) + 0.5, x, y, w, stats, int(red), 0.1),
                              test_utils=INTERPRETER_OPCHECK)


@interpreter
def test_float64_and_bad_inputs():
    """float64 runs the reference inside the op (exactly its numbers); probs of another shape or
    dtype are refused (the functional casts them, the ops do not)."""
    from fusedloss.triton_kernels.probs import launch as launch_soft
    x, y, w = _data(seed=10)
    x, y, w = x.double(), y.double(), w.double()
    for a, b in zip(launch_soft.triton_soft_fwd(x, y, w, 1, 0.1, True), ops.reference_soft_fwd(x, y, w, 1, 0.1, True)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="shape"):
        launch_soft.triton_soft_fwd(x.float(), y.float()[:, :-1], None, 1, 0.0, False)
    with pytest.raises(ValueError, match="dtype"):
        launch_soft.triton_soft_fwd(x.float(), y.half(), None, 1, 0.0, False)


# ----------------------------------------------------------------------------
# Dispatch and traffic (Triton's interpreter counts every byte each launch moves)
# ----------------------------------------------------------------------------

def _traffic(x, y, regime, requires_grad=True, reduction="mean"):
    from fusedloss.triton_kernels import heuristics, traffic
    xr = x.clone().requires_grad_(requires_grad)
    with heuristics.override(**REGIMES[regime]), traffic.count_interpreter_traffic() as tr:
        out = fl.cross_entropy(xr, y, backend="triton", reduction=reduction)
        if requires_grad:
            out.backward()
    return tr.bytes("load", xr), tr.bytes("load", y), tr.bytes("store", xr.grad) if requires_grad else 0, tr


@interpreter
def test_triton_backend_runs_the_soft_kernel():
    """backend="triton" (and so tests/test_soft_targets.py's triton cases) goes through
    fusedloss::triton_soft_fwd, not the reference's PyTorch ops."""
    from fusedloss.triton_kernels.probs import launch as launch_soft
    assert dispatch.resolve("triton", torch.device("cpu")).family(ops.ProbsOps).fwd is launch_soft.triton_soft_fwd
    x, y, _ = _data(seed=11)
    rx, ry, _, tr = _traffic(x, y, "single", requires_grad=False)
    assert rx == x.numel() * 4 and ry == y.numel() * 4 and tr.accesses


@interpreter
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_traffic(dtype):
    """On chip: logits and targets read once, the gradient written once (loss.backward() skips
    the scale pass); streamed: both read twice (stats, then gradient); without grad: once."""
    x, y, _ = _data(n=16, dtype=dtype, seed=12)
    lb = x.numel() * x.element_size()
    assert _traffic(x, y, "single")[:3] == (lb, lb, lb)
    assert _traffic(x, y, "stream")[:3] == (2 * lb, 2 * lb, lb)
    assert _traffic(x, y, "stream", requires_grad=False, reduction="none")[:2] == (lb, lb)


@interpreter
def test_deterministic_and_one_class():
    x, y, w = _data(seed=13)
    a = _triton(x, y, torch.tensor(1.0), weight=w)
    b = _triton(x, y, torch.tensor(1.0), weight=w)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    x1, y1 = torch.randn(4, 1), torch.ones(4, 1)
    _check(x1, y1, torch.tensor(1.0), "single", label_smoothing=0.1)


# ----------------------------------------------------------------------------
# Without TRITON_INTERPRET: the interpreter cases in a subprocess
# ----------------------------------------------------------------------------

def test_interpreter_cases_in_a_subprocess():
    if INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 already: the interpreter cases run in this process")
    here = Path(__file__).resolve()
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning",
           "-m", "not gpu", str(here)]
    proc = subprocess.run(cmd, cwd=here.parent.parent, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    print(out[-3000:])
    assert proc.returncode == 0, f"interpreter cases failed (rc={proc.returncode}):\n{out[-12000:]}"


# ----------------------------------------------------------------------------
# On a CUDA GPU (few combinations: each constexpr set is a Triton compile)
# ----------------------------------------------------------------------------

def _gpu(test):
    for m in gpu:
        test = m(test)
    return test


def _on_cuda(*ts):
    return [t.cuda() if isinstance(t, torch.Tensor) else t for t in ts]


def _gpu_run(x, y, go, **kw):
    """Loss, d/dx and d/dy (on the CPU) of fl.cross_entropy(backend="triton") on the GPU."""
    xd, yd, god = _on_cuda(x, y, go)
    xd.requires_grad_(True)
    yd.requires_grad_(True)
    kw = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    out = fl.cross_entropy(xd, yd, backend="triton", **kw)
    out.backward(god.to(out.dtype))
    return out.detach().cpu(), xd.grad.cpu(), yd.grad.cpu()


@_gpu
@pytest.mark.parametrize("shape", [(512, 1000), (64, 32000), (8, 131072)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
def test_gpu_shapes_match_float64(dtype, shape):
    """On chip (C = 1000) and streamed (C = 32000, 131072), weight and smoothing, 'mean'."""
    x, y, w = _data(*shape, dtype=dtype, seed=20)
    _check(x, y, torch.tensor(0.7), run=_gpu_run, weight=w, label_smoothing=0.1)



@_gpu
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gpu_reductions_backward_op_and_extremes(reduction):
    """Each reduction with grad_output != 1, the backward op (forward without the gradient),
    -inf logits without mass and an offset of 1e4, C = 5000 (streamed)."""
    x, y, w = _data(32, 5000, torch.float32, seed=21)
    go = _go(reduction, 32)
    _check(x, y, go, run=_gpu_run, reduction=reduction, weight=w, label_smoothing=0.1)
    x[0, :100] = -math.inf
    y[0, :100] = 0.0
    x[1] += 1e4
    out, gx, _ = _gpu_run(x, y, go, reduction=reduction, weight=w)
    ref, rgx = _float64_with_mass(x, y, w, go, reduction)
    assert torch.isfinite(out).all() and torch.isfinite(gx).all()
    assert_close(out, ref, torch.float32, "loss", "extremes")
    assert_close(gx, rgx, torch.float32, "grad", "extremes")
    from fusedloss.triton_kernels.probs import launch as launch_soft
    xd, yd, wd, god = _on_cuda(x, y, w, go)
    _, stats, _ = launch_soft.triton_soft_fwd(xd, yd, wd, int(Reduction[reduction.upper()]), 0.0, False)
    g = launch_soft.triton_soft_bwd(god, xd, yd, wd, stats, int(Reduction[reduction.upper()]), 0.0)
    assert_close(g.cpu(), rgx, torch.float32, "grad", "backward op")


@_gpu
def test_gpu_no_host_synchronization_and_deterministic():
    """Forward + backward of every reduction run with CUDA's sync debug mode set to error."""
    x, y, w = _on_cuda(*_data(256, 5000, torch.bfloat16, seed=22))
    grads = []
    for _ in range(2):
        for red in REDUCTIONS:
            xr = x.clone().requires_grad_(True)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                out = fl.cross_entropy(xr, y, weight=w, reduction=red, label_smoothing=0.1, backend="triton")
                out.sum().backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            grads.append(xr.grad)
    assert all(torch.equal(a, b) for a, b in zip(grads[:3], grads[3:]))


@_gpu
def test_gpu_torch_compile_fullgraph():
    x, y, w = _on_cuda(*_data(128, 32000, torch.bfloat16, seed=23))

    def step(logits, probs):
        return fl.cross_entropy(logits, probs, weight=w, label_smoothing=0.1, backend="triton")

    runs = []
    for fn in (torch.compile(step, fullgraph=True), step):
        xr = x.clone().requires_grad_(True)
        out = fn(xr, y)
        out.backward()
        runs.append((out.detach().cpu(), xr.grad.cpu()))
    (a, ga), (b, gb) = runs
    assert_close(a, b.double(), torch.bfloat16, "loss")
    assert_close(ga, gb.double(), torch.bfloat16, "grad")


@_gpu
def test_gpu_opcheck():
    from fusedloss.triton_kernels.probs import launch as launch_soft
    x, y, w = _on_cuda(*_data(64, 1000, torch.float32, seed=24))
    torch.library.opcheck(launch_soft.triton_soft_fwd, (x, y, w, 1, 0.1, False),
                          test_utils=("test_schema", "test_faketensor"))
    _, stats, _ = launch_soft.triton_soft_fwd(x, y, w, 1, 0.1, False)
    torch.library.opcheck(launch_soft.triton_soft_bwd, (torch.tensor(0.5, device="cuda"), x, y, w, stats, 1, 0.1),
                          test_utils=("test_schema", "test_faketensor"))
