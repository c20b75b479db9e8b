"""Mixup's two targets fused in Triton (``fusedloss::triton_mix_fwd/_bwd``,
``triton_kernels/two_targets/kernels.py``), against the float64 oracle of ``tests/test_mixup.py``
(``lam L(y_a) + (1 - lam) L(y_b)``, each part reduced on its own).

Interpreter cases (CPU tensors, ``TRITON_INTERPRET=1``): every loss (bce's arg-max cases
too: w on y_a, on y_b, a wrong class leading by 50-100), every
reduction, scalar and per-row ``lam`` (0 and 1 with an infinite part too), weight,
ignore_index (either target, both), ``y_a == y_b``, label smoothing / z-loss / soft cap,
fp32 and bf16, on-chip rows and rows streamed in several column blocks (the launch
heuristics overridden: C = 37 in blocks of 16, 16, 5, a persistent grid of 4 programs),
strided and sliced logits, int32 targets, expanded grad_output, the standalone backward
from the saved stats, opcheck, bad targets, N = 0 and the traffic. Run them as

    TRITON_INTERPRET=1 python -m pytest tests/test_triton_mix.py

or let a plain ``pytest`` run them in a subprocess (``test_interpreter_cases_in_a_subprocess``:
Triton fixes interpreted vs compiled when it is imported). The ``gpu`` cases run on a CUDA
device without the variable: ``python -m pytest -m gpu tests/test_triton_mix.py``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import fusedloss as fl  # noqa: E402
from fusedloss import dispatch, mixup  # noqa: E402
from fusedloss.variants import Reduction, Variant, variant_id  # noqa: E402
from oracle import assert_close, oracle_loss_and_grad  # noqa: E402
from test_mixup import _data, bce_cases, ops_called, oracle_mixed_and_grad  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on masked -inf lanes

#: Tests that run in either mode; every other test is an interpreter case, except the
#: gpu-marked ones.
_ANYWHERE = ("test_interpreter_cases_in_a_subprocess",)


@pytest.fixture(autouse=True)
def _mode(request):
    """Interpreter cases need TRITON_INTERPRET=1; gpu cases a CUDA device and no interpreter."""
    if request.node.get_closest_marker("gpu") is not None:
        if INTERPRET:
            pytest.skip("TRITON_INTERPRET=1 interprets every kernel")
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
    elif not INTERPRET and request.node.originalname not in _ANYWHERE:
        pytest.skip("interpreter case: needs TRITON_INTERPRET=1 (test_interpreter_cases_in_a_subprocess runs it)")


#: "single": the row is one on-chip tile, 2 rows per program; "stream": 16-column blocks
#: (C = 37: 16, 16, 5) by a persistent grid of 4 programs looping over rows.
REGIMES = {"single": dict(min_tile=128),
           "stream": dict(single_max=32, stream_block=16, min_tile=128, stream_programs=4)}
N, C = 10, 37
OPTIONS = {"plain": {}, "smooth": dict(label_smoothing=0.1), "zloss": dict(z_loss=1e-2), "cap": dict(softcap=4.0),
           "all": dict(label_smoothing=0.1, z_loss=1e-2, softcap=4.0)}


def _mix(n=N, c=C, dtype=torch.float32, seed=0, scale=3.0):
    """test_mixup's data: row 0 y_a == y_b, row 2 y_a ignored, row 3 y_b ignored, row 4 both,
    row 5 lam = 0."""
    return _data(n, c, dtype, seed=seed, scale=scale)


def _run(x, target, loss, regime="stream", go=None, **kw):
    from fusedloss.triton_kernels import heuristics
    xr = x.detach().clone().requires_grad_(True)
    with heuristics.override(**REGIMES[regime]):
        out = fl.softmax_loss(xr, target, loss, backend="triton", **kw)
        out.backward(torch.ones_like(out) if go is None else go.to(out.dtype))
    return out.detach(), xr.grad


def _check(x, ya, yb, lam, loss, regime="stream", go=None, msg="", **kw):
    out, grad = _run(x, (ya, yb, lam), loss, regime, go, **kw)
    ref, gref = oracle_mixed_and_grad(x, ya, yb, lam, loss, grad_output=go, **kw)
    assert_close(out, ref, x.dtype, "loss", msg)
    assert_close(grad, gref, x.dtype, "grad", msg)
    assert grad.dtype == x.dtype
    return out, grad


def _go(reduction, n=N):
    return torch.linspace(0.5, 2.0, n) if reduction == "none" else torch.tensor(1.3)


# ----------------------------------------------------------------------------
# Numerics against float64
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("regime, option", [("single", "plain"), ("single", "all"), ("stream", "all")])
@pytest.mark.parametrize("loss", fl.LOSSES)
def test_matches_float64(loss, regime, option):
    """Every reduction, per-row and scalar lam, weights, the special rows of _mix. Each reduction once,
    lam per row for 'none' and 'sum', a float for 'mean' (it reaches the kernel as a row vector too,
    mixup.lam_rows: one code path). The streamed plain kernel is test_bf16's and test_each_option_alone's."""
    x, ya, yb, lam, w = _mix(seed=1)
    for reduction, lam_arg in (("none", lam), ("mean", 0.3), ("sum", lam)):
        _check(x, ya, yb, lam_arg, loss, regime, _go(reduction), f"{reduction} lam={type(lam_arg).__name__}",
               weight=w, reduction=reduction, **OPTIONS[option])


@pytest.mark.parametrize("option", ["smooth", "zloss", "cap"])
@pytest.mark.parametrize("loss", fl.LOSSES)
def test_each_option_alone(loss, option):
    """One call per (loss, option), streamed ('none', grad_output per row) or on chip ('mean', weight) in
    turn: every option meets both regimes, and so does every loss."""
    x, ya, yb, lam, w = _mix(seed=2)
    if (fl.LOSSES.index(loss) + ("smooth", "zloss", "cap").index(option)) % 2 == 0:
        _check(x, ya, yb, lam, loss, "stream", _go("none"), reduction="none", **OPTIONS[option])
    else:
        _check(x, ya, yb, lam, loss, "single", weight=w, reduction="mean", **OPTIONS[option])


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("loss", fl.LOSSES)
def test_bf16(loss, regime):
    x, ya, yb, lam, w = _mix(dtype=torch.bfloat16, seed=3)
    _check(x, ya, yb, lam, loss, regime, weight=w, reduction="mean", **OPTIONS["all"])
    _check(x, ya, yb, 0.7, loss, regime, _go("none"), reduction="none")


@pytest.mark.parametrize("loss", fl.LOSSES)
def test_lam_zero_and_one_with_an_infinite_part(loss):
    """A part whose loss is inf (its target's logit -inf) and which counts 0 adds 0 and no
    NaN to the loss or the gradient: scalar lam 0 / 1 is the other target's loss alone,
    per-row lam in {0, 1} the rows' own target's."""
    x, ya, yb, lam, w = _mix(seed=4)
    ya, yb = ya.clone(), yb.clone()
    ya[ya < 0], yb[yb < 0] = 1, 2
    yb[yb == ya] = (ya[yb == ya] + 1) % C
    rows = torch.arange(N)
    inf_a = x.clone()
    inf_a[rows, ya] = float("-inf")
    for red, lams in (("none", (0.0, 1.0)), ("mean", (0.0,)), ("sum", (1.0,))):
        ref, gref = oracle_loss_and_grad(inf_a, yb, loss, reduction=red, weight=w)
        for lam_s in lams:  # lam 0: part a counts 0; lam 1 with the targets swapped: part b counts 0
            out, grad = _run(inf_a, (ya, yb, 0.0) if lam_s == 0.0 else (yb, ya, 1.0), loss, reduction=red, weight=w)
            assert torch.isfinite(grad).all()
            assert_close(out, ref, torch.float32, "loss", f"{red} lam={lam_s}")
            assert_close(grad, gref, torch.float32, "grad", f"{red} lam={lam_s}")
    # per row: lam_i = 0 where part a is inf, else 1 with part b inf
    lam01 = (rows % 2).float()
    xm = x.clone()
    xm[rows[lam01 == 0], ya[lam01 == 0]] = float("-inf")
    xm[rows[lam01 == 1], yb[lam01 == 1]] = float("-inf")
    counted_a = torch.where(lam01 == 0, -100, ya)
    counted_b = torch.where(lam01 == 1, -100, yb)
    for red in ("none", "sum"):  # (a counted part's 'mean' denominator would change)
        out, grad = _run(xm, (ya, yb, lam01), loss, regime="single", reduction=red, go=_go(red))
        ref, gref = oracle_mixed_and_grad(xm, counted_a, counted_b, lam01, loss, reduction=red, grad_output=_go(red))
        assert torch.isfinite(out).all() and torch.isfinite(grad).all()
        assert_close(out, ref, torch.float32, "loss", red)
        assert_close(grad, gref, torch.float32, "grad", red)


@pytest.mark.parametrize("loss", fl.LOSSES)
def test_same_targets_are_the_one_target_loss(loss):
    x, ya, _, lam, w = _mix(seed=5)
    out, grad = _run(x, (ya, ya, lam), loss, weight=w, label_smoothing=0.05)
    ref, gref = oracle_loss_and_grad(x, ya, loss, weight=w, label_smoothing=0.05)
    assert_close(out, ref, torch.float32, "loss")
    assert_close(grad, gref, torch.float32, "grad")


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("loss", fl.LOSSES)
def test_extreme_logits(loss, regime):
    """Either target leading by 200 (p = 1 in fp32: nllr's s overflows), or trailing, -inf
    competitors, all-equal rows."""
    x = torch.zeros(6, C)
    x[0, 0], x[1, 1], x[2, 2], x[2, 0] = 200.0, 200.0, 200.0, -200.0
    # With smoothing, lace/focal's (eps / C) (1 - p_k)^g (-log p_k) is +inf at a -inf logit and float64
    # autograd of it reads 0 * inf = NaN: a far-out logit (-1e4) there; the -inf row itself is checked in
    # test_triton_expected against the row without those classes.
    x[3, 5:] = -1e4 if loss in ("lace", "focal") else float("-inf")
    x[4] = torch.linspace(-3, 3, C)
    x[4, 30] = 1000.0
    ya, yb = torch.tensor([0, 0, 0, 1, 30, 3]), torch.tensor([1, 1, 2, 2, 3, 30])
    lam = torch.tensor([0.3, 0.9, 0.5, 0.2, 0.6, 0.4])
    out, grad = _check(x, ya, yb, lam, loss, regime, _go("none", 6), reduction="none", label_smoothing=0.1)
    assert torch.isfinite(grad).all()


# ----------------------------------------------------------------------------
# bce: the arg-max cases (w on y_a, on y_b, elsewhere, a wrong class leading by 50-100)
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("regime", REGIMES)
def test_bce_argmax_cases(regime, dtype):
    """test_mixup's bce_cases (w == y_a, w == y_b, w elsewhere leading by 2, 50, 55, 60, 100,
    y_a == y_b, p_a = 1, parts ignored, per-row lam 0 and 1), every reduction, weight; scalar
    lam 0 and 1; the options."""
    x, ya, yb, lam = bce_cases(C, dtype, seed=30)
    w = torch.rand(C, generator=torch.Generator().manual_seed(31)) + 0.5
    lam = lam.float()
    for red in ("none", "mean", "sum"):
        _check(x, ya, yb, lam, "bce", regime, _go(red, len(ya)), red, weight=w, reduction=red)
    if dtype == torch.float32:
        for lam_s in (0.0, 1.0):
            _check(x, ya, yb, lam_s, "bce", regime, msg=f"lam={lam_s}", reduction="sum")
    _check(x, ya, yb, lam, "bce", regime, _go("none", len(ya)), "options", weight=w, reduction="none",
           **OPTIONS["all"])


def test_bce_expanded_grad_output_and_float64():
    """L.sum() / L.mean() of 'none' (stride-0 grad_output) on strided rows; float64 runs the
    reference per part (bce's shared stats kept)."""
    x, ya, yb, lam = bce_cases(C, torch.float32, seed=32)
    wide = torch.zeros(len(ya), C + 5)
    wide[:, 2:2 + C] = x
    for reduce in ("sum", "mean"):
        leaf = wide.clone().requires_grad_(True)
        out = fl.softmax_loss(leaf[:, 2:2 + C], (ya, yb, lam.float()), "bce", backend="triton", reduction="none",
                              label_smoothing=0.1, z_loss=1e-2)
        getattr(out, reduce)().backward()
        go = torch.full((len(ya),), 1.0 if reduce == "sum" else 1.0 / len(ya))
        ref, gref = oracle_mixed_and_grad(x, ya, yb, lam, "bce", reduction="none", grad_output=go,
                                          label_smoothing=0.1, z_loss=1e-2)
        assert_close(out.detach(), ref, torch.float32, "loss", reduce)
        assert_close(leaf.grad[:, 2:2 + C], gref, torch.float32, "grad", reduce)
        assert (leaf.grad[:, :2] == 0).all() and (leaf.grad[:, 2 + C:] == 0).all()
    x64, ya, yb, lam = bce_cases(C, torch.float64, seed=33)
    for red in ("none", "mean"):
        _check(x64, ya, yb, lam, "bce", "single", _go(red, len(ya)).double(), red, reduction=red, softcap=4.0)


# ----------------------------------------------------------------------------
# The fused op is the one the backend runs; it equals the two-pass path
# ----------------------------------------------------------------------------

def _triton_backend():
    return dispatch.resolve("triton", torch.device("cpu"))


@pytest.mark.parametrize("loss", fl.LOSSES)
@pytest.mark.parametrize("softcap", [0.0, 4.0])
def test_backend_fuses_every_loss(loss, softcap):
    from fusedloss.triton_kernels.two_targets import launch as launch_mix
    be = _triton_backend()
    mix = be.family(mixup.TwoTargetOps)
    assert mix.fwd is launch_mix.triton_mix_fwd
    assert mix.fuses(int(variant_id(loss)), softcap)


@pytest.mark.parametrize("loss", fl.LOSSES)
def test_fused_equals_two_passes(loss):
    """One reduction per loss, in turn (each reduction twice; all of them against float64 above)."""
    from fusedloss.triton_kernels import heuristics
    be = _triton_backend()
    two_pass = be.without(mixup.TwoTargetOps)
    x, ya, yb, lam, w = _mix(seed=6)
    with heuristics.override(**REGIMES["stream"]):
        for red in [list(Reduction)[fl.LOSSES.index(loss) % len(Reduction)]]:
            scal = (int(variant_id(loss)), int(red), -100, 0.05, 1.5, 1.0, 2.0, 1e-3, 3.0)
            fused = mixup.mixed_loss(be, x, ya, yb, lam, w, scal, False)
            ref = mixup.mixed_loss(two_pass, x, ya, yb, lam, w, scal, False)
            assert_close(fused, ref, torch.float32, "loss", red.name)


def test_bce_runs_the_fused_op():
    """bce's two targets: one triton_mix_fwd (loss and fused gradient), not the one-target op twice."""
    x, ya, yb, lam, w = _mix(seed=7)
    with ops_called() as names:
        _check(x, ya, yb, lam, "bce", "single", weight=w)
    assert "triton_mix_fwd" in names and "triton_fwd" not in names, names


def test_mean_of_a_part_without_counted_rows_is_nan():
    """Every y_a ignored: part a's 'mean' is 0/0 (as that part alone and the two-pass path
    give); the gradient is part b's."""
    x, _, yb, lam, w = _mix(seed=8)
    ya = torch.full((N,), -100)
    yb = yb.clone()
    yb[yb < 0] = 0
    out, grad = _run(x, (ya, yb, lam), "crl", weight=w)
    assert torch.isnan(out)
    _, gref = oracle_mixed_and_grad(x, ya, yb, lam, "crl", weight=w)
    assert_close(grad, gref, torch.float32, "grad")


# ----------------------------------------------------------------------------
# Layouts, targets, grad_output
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("regime", REGIMES)
def test_strided_sliced_logits_int32_targets_expanded_lam(regime):
    x, ya, yb, lam, w = _mix(seed=9)
    wide = torch.randn(2 * N, C + 11)
    wide[::2, 3:3 + C] = x
    view = wide[::2, 3:3 + C]                          # row stride 2 (C + 11), offset 3: read in place
    ya32, yb32 = ya.int(), yb.int()
    lam_t = torch.tensor(0.35)                         # a scalar tensor: expanded over the rows
    xr = view.clone().requires_grad_(True)
    src = xr.detach().clone()
    src_wide = torch.zeros_like(wide)
    src_wide[::2, 3:3 + C] = src
    v = src_wide[::2, 3:3 + C].requires_grad_(False)
    from fusedloss.triton_kernels import heuristics
    with heuristics.override(**REGIMES[regime]):
        leaf = src_wide.clone().requires_grad_(True)
        out = fl.softmax_loss(leaf[::2, 3:3 + C], (ya32, yb32, lam_t), "focal", backend="triton", weight=w,
                              reduction="none")
        out.sum().backward()                           # expanded grad_output (stride 0)
    ref, gref = oracle_mixed_and_grad(v, ya, yb, 0.35, "focal", weight=w, reduction="none")
    assert_close(out.detach(), ref, torch.float32, "loss")
    assert_close(leaf.grad[::2, 3:3 + C], gref, torch.float32, "grad")
    assert (leaf.grad[1::2] == 0).all() and (leaf.grad[:, :3] == 0).all() and (leaf.grad[:, 3 + C:] == 0).all()
    # a transposed (C, N) buffer (copied once into rows) and L.mean()'s expanded grad_output
    xt = x.t().contiguous().t()
    out, grad = _run(xt, (ya32, yb32, lam), "nllr", regime, reduction="none", go=torch.full((N,), 1.0 / N))
    ref, gref = oracle_mixed_and_grad(x, ya, yb, lam, "nllr", reduction="none", grad_output=torch.full((N,), 1.0 / N))
    assert_close(out, ref, torch.float32, "loss")
    assert_close(grad, gref, torch.float32, "grad")
    xr2 = xt.clone().requires_grad_(True)
    fl.softmax_loss(xr2, (ya, yb, lam), "nllr", backend="triton", reduction="none").mean().backward()
    assert_close(xr2.grad, gref, torch.float32, "grad")


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("regime", REGIMES)
def test_standalone_backward_and_stats(reduction, regime):
    """fwd without the fused gradient, then the bwd op from its stats (lse, lse_ex(a),
    lse_ex(b)), every loss, with the options."""
    from fusedloss.triton_kernels import heuristics
    x, ya, yb, lam, w = _mix(seed=10)
    red = int(Reduction[reduction.upper()])
    go = _go(reduction)
    # Half the losses per (reduction, regime), in turn: every loss meets both regimes and two or more
    # reductions; bce's stats: lse, lse_ex(a), log(1 - p_w), w.
    parity = (("none", "mean", "sum").index(reduction) + list(REGIMES).index(regime)) % 2
    for loss in fl.LOSSES[parity::2]:
        scal = (int(variant_id(loss)), red, -100, 0.1, 1.5, 1.0, 2.0, 1e-2, 4.0)
        with heuristics.override(**REGIMES[regime]):
            out, stats, g0 = torch.ops.fusedloss.triton_mix_fwd(x, ya, yb, lam, w, *scal, False)
            grad = torch.ops.fusedloss.triton_mix_bwd(go, x, ya, yb, lam, w, stats, *scal)
        assert g0.numel() == 0 and stats.shape == (N, 4)
        ref, gref = oracle_mixed_and_grad(x, ya, yb, lam, loss, grad_output=go, weight=w, reduction=reduction,
                                          label_smoothing=0.1, z_loss=1e-2, softcap=4.0)
        assert_close(out, ref, torch.float32, "loss", loss)
        assert_close(grad, gref, torch.float32, "grad", loss)
    y = 4.0 * torch.tanh(x.double() / 4.0)
    assert_close(stats[:, 0], torch.logsumexp(y, 1), torch.float32, "loss", "lse")
    counted = ya != -100
    rows = torch.arange(N)[counted]
    lse_ex_a = torch.logsumexp(y[counted].scatter(1, ya[counted][:, None], float("-inf")), 1)
    assert_close(stats[rows, 1], lse_ex_a, torch.float32, "loss", "lse_ex(a)")


#: test_aot_dispatch_dynamic traces the triton_op's launches with fake tensors, which Triton's
#: interpreter cannot run (it reads their storage): the GPU run covers tracing (torch.compile).
OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor")


def test_opcheck():
    x, ya, yb, lam, w = _mix(n=6, c=9, seed=11)
    fwd, bwd = torch.ops.fusedloss.triton_mix_fwd.default, torch.ops.fusedloss.triton_mix_bwd.default
    for red in Reduction:
        scal = (int(Variant.CRL), int(red), -100, 0.1, 1.5, 1.0, 2.0, 1e-2, 0.0)
        for cg in (False, True):
            torch.library.opcheck(fwd, (x.clone().requires_grad_(True), ya, yb, lam, w, *scal, cg),
                                  test_utils=OPCHECK)
        lo, stats, _ = fwd(x, ya, yb, lam, w, *scal, False)
        torch.library.opcheck(bwd, (torch.rand_like(lo) + 0.5, x, ya, yb, lam, w, stats, *scal), test_utils=OPCHECK)


def test_float64_runs_the_reference_per_part():
    x, ya, yb, lam, w = _mix(seed=12, dtype=torch.float64)
    for red in ("none", "mean", "sum"):
        _check(x, ya, yb, lam.double(), "lace", "single", _go(red).double(), red, weight=w.double(), reduction=red,
               label_smoothing=0.1, z_loss=1e-2)


def test_target_out_of_range_raises_on_cpu():
    x, ya, yb, lam, _ = _mix(seed=13)
    yb = yb.clone()
    yb[1] = C
    with pytest.raises(IndexError, match=str(C)):
        fl.softmax_loss(x, (ya, yb, lam), "ce", backend="triton")


def test_kernel_clamps_bad_targets_to_nan_rows():
    """What a GPU does without strict mode (the launcher called directly): the rows with a
    bad target (either one) are NaN, the others exact."""
    from fusedloss.triton_kernels import heuristics
    from fusedloss.triton_kernels.two_targets import launch as launch_mix
    x, ya, yb, lam, _ = _mix(seed=14)
    ya, yb = ya.clone(), yb.clone()
    ya[6], yb[7] = C + 1000, -7
    grad = torch.empty_like(x)
    with heuristics.override(**REGIMES["stream"]):
        loss, _ = launch_mix.launch_mix_forward(x, ya, yb, lam, None, int(Variant.FOCAL), int(Reduction.NONE), -100,
                                                0.0, 1.5, 1.0, 2.0, 0.0, 0.0, grad)
    bad = torch.zeros(N, dtype=torch.bool)
    bad[[6, 7]] = True
    assert torch.isnan(loss[bad]).all() and torch.isnan(grad[bad]).all()
    ref, gref = oracle_mixed_and_grad(x[~bad], ya[~bad], yb[~bad], lam[~bad], "focal", reduction="none")
    assert_close(loss[~bad], ref, torch.float32, "loss")
    assert_close(grad[~bad], gref, torch.float32, "grad")


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_empty_batch(reduction):
    x = torch.randn(0, C, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long)
    out = fl.softmax_loss(x, (t, t, 0.5), "crl", backend="triton", reduction=reduction)
    ref = torch.nn.functional.cross_entropy(x.detach(), t, reduction=reduction)  # 0/0 for 'mean'
    assert out.shape == ref.shape and torch.equal(out.isnan(), ref.isnan())


# ----------------------------------------------------------------------------
# Traffic, counted by the interpreter: one read of the row for both targets
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("regime", [None, "stream"])
def test_traffic_one_read_for_both_targets(regime):
    """Forward + backward read the logits once on chip (twice streamed: statistics, then the
    gradient), plus both target logits per row, and write the gradient once: one pass of the
    one-target kernel's traffic, not two."""
    from fusedloss.triton_kernels import heuristics, traffic
    x, ya, yb, lam, w = _mix(n=16, seed=15)
    xr = x.clone().requires_grad_(True)
    with heuristics.override(**(REGIMES[regime] if regime else {})), traffic.count_interpreter_traffic() as tr:
        out = fl.softmax_loss(xr, (ya, yb, lam), "crl", backend="triton", weight=w)
        out.backward()
    lb = x.numel() * x.element_size()
    passes = 2 if regime else 1
    assert tr.bytes("load", xr) == passes * lb + 2 * 16 * 4
    assert tr.bytes("store", xr.grad) == lb
    assert tr.bytes(None, exclude=(xr, xr.grad)) <= 16 * 64 + 512


# ----------------------------------------------------------------------------
# The interpreter cases from a plain pytest run
# ----------------------------------------------------------------------------

@pytest.mark.slow
def test_interpreter_cases_in_a_subprocess():
    if INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 already: the interpreter cases run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", str(Path(__file__))]
    proc = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    print(out[-3000:])
    assert proc.returncode == 0, f"interpreter cases failed (rc={proc.returncode}):\n{out[-12000:]}"


# ----------------------------------------------------------------------------
# On a CUDA device (compiled kernels)
# ----------------------------------------------------------------------------

def _gpu_check(x, ya, yb, lam, loss, go=None, **kw):
    dev = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    xd = x.cuda().requires_grad_(True)
    lam_d = lam.cuda() if isinstance(lam, torch.Tensor) else lam
    out = fl.softmax_loss(xd, (ya.cuda(), yb.cuda(), lam_d), loss, backend="triton", **dev)
    out.backward(torch.ones_like(out) if go is None else go.cuda().to(out.dtype))
    ref, gref = oracle_mixed_and_grad(x, ya, yb, lam, loss, grad_output=go, **kw)
    assert_close(out.detach().cpu(), ref, x.dtype, "loss", loss)
    assert_close(xd.grad.cpu(), gref, x.dtype, "grad", loss)



@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(512, 1000), (64, 32000)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss", fl.LOSSES)
def test_gpu_matches_float64(loss, dtype, shape):
    """Real shapes: C = 1000 on chip, C = 32000 streamed by the device-sized persistent grid;
    weight, smoothing, z-loss and soft cap, 'mean' with per-row lam (special rows included)."""
    x, ya, yb, lam, w = _mix(*shape, dtype=dtype, seed=20)
    _gpu_check(x, ya, yb, lam, loss, weight=w, reduction="mean", **OPTIONS["all"])


@pytest.mark.gpu
@pytest.mark.parametrize("c", [1000, 32000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_bce_argmax_cases(dtype, c):
    """bce_cases on chip (C = 1000) and streamed (C = 32000), 'mean' and 'none' with the options."""
    x, ya, yb, lam = bce_cases(c, dtype, seed=24)
    w = torch.rand(c, generator=torch.Generator().manual_seed(25)) + 0.5
    _gpu_check(x, ya, yb, lam.float(), "bce", weight=w, reduction="mean")
    _gpu_check(x, ya, yb, lam.float(), "bce", go=_go("none", len(ya)), reduction="none", **OPTIONS["all"])


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_gpu_plain_and_scalar_lam(reduction):
    x, ya, yb, _, _ = _mix(256, 4099, dtype=torch.bfloat16, seed=21)
    _gpu_check(x, ya, yb, 0.3, "crl", go=_go(reduction, 256), reduction=reduction)


@pytest.mark.gpu
def test_gpu_standalone_backward_and_opcheck():
    from fusedloss.triton_kernels.two_targets import launch as launch_mix
    x, ya, yb, lam, w = _mix(128, 5000, seed=22)
    xd, ya_d, yb_d, lam_d, w_d = x.cuda(), ya.cuda(), yb.cuda(), lam.cuda(), w.cuda()
    scal = (int(Variant.FOCAL), int(Reduction.MEAN), -100, 0.1, 1.5, 1.0, 2.0, 1e-3, 0.0)
    out, stats, _ = launch_mix.triton_mix_fwd(xd, ya_d, yb_d, lam_d, w_d, *scal, False)
    grad = launch_mix.triton_mix_bwd(torch.tensor(0.7, device="cuda"), xd, ya_d, yb_d, lam_d, w_d, stats, *scal)
    ref, gref = oracle_mixed_and_grad(x, ya, yb, lam, "focal", grad_output=torch.tensor(0.7), weight=w,
                                      label_smoothing=0.1, z_loss=1e-3)
    assert_close(out.cpu(), ref, torch.float32, "loss")
    assert_close(grad.cpu(), gref, torch.float32, "grad")
    torch.library.opcheck(launch_mix.triton_mix_fwd, (xd, ya_d, yb_d, lam_d, w_d, *scal, False), test_utils=OPCHECK)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    x, ya, yb, lam, w = _mix(256, 32000, dtype=torch.bfloat16, seed=23)
    x, ya, yb, lam, w = x.cuda(), ya.cuda(), yb.cuda(), lam.cuda(), w.cuda()

    def step(logits):
        return fl.softmax_loss(logits, (ya, yb, lam), "nllr", backend="triton", weight=w)

    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    a = torch.compile(step, fullgraph=True)(xa)
    a.backward()
    b = step(xb)
    b.backward()
    assert_close(a.float().cpu(), b.double().cpu(), torch.bfloat16, "loss")
    assert_close(xa.grad.cpu(), xb.grad.double().cpu(), torch.bfloat16, "grad")
