"""The Triton distillation kernel (triton_kernels/distill/: ``fusedloss::triton_distill``, the op of
``fusedloss.distill.ops``) against float64: ``tests/oracle_distill.py`` for D, and for the gradient
the oracle's autograd or, on rows where one class dominates, :func:`_exact_grad` below.

Under Triton's interpreter (CPU tensors, ``TRITON_INTERPRET=1``; without it the cases run in a
subprocess, ``test_interpreter_cases_in_a_subprocess``):
``TRITON_INTERPRET=1 python -m pytest tests/test_triton_distill.py``. Shapes are tiny and the
launch heuristics are overridden (as in test_triton_soft.py): rows of 37 classes are one on-chip
tile with several rows per program ("single") or span three column blocks of 16 with a ragged tail
on a persistent grid of 4 programs ("stream"). Each launch carries many cases as rows (random
rows, teacher and student confident on different classes or on the same one by 30 and 100, a row
of row_scale 0), so the whole file is a few dozen launches.

The ``gpu`` tests of the op on CUDA are in tests/test_triton_gpu.py.
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

from fusedloss.distill import ops as distill_ops  # noqa: E402
from fusedloss.distill.ops import DIVERGENCES  # noqa: E402
from oracle import assert_close  # noqa: E402
from oracle_distill import check_logs_math, divergence_grad, divergence_rows  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interpreter = pytest.mark.skipif(not INTERPRET, reason="TRITON_INTERPRET=1 only (the subprocess test runs them)")

REGIMES = {"single": dict(min_tile=128),
           "stream": dict(single_max=32, stream_block=16, min_tile=128, stream_programs=4)}
V = 37
#: rows 0-3: random; 4-7: teacher leads class 5 and student class 20 by 30 / by 100, then both
#: lead class 20 by 30 / by 100; row 8: row_scale 0
EXTREME = ((30.0, 5), (100.0, 5), (30.0, 20), (100.0, 20))
N = 4 + len(EXTREME) + 1


def _data(dtype=torch.float32, seed=0, n_random=4, v=V):
    g = torch.Generator().manual_seed(seed)
    s = 2 * torch.randn(n_random + len(EXTREME) + 1, v, generator=g)
    t = 2 * torch.randn(n_random + len(EXTREME) + 1, v, generator=g)
    for i, (lead, teacher_class) in enumerate(EXTREME):
        s[n_random + i, 20] += lead
        t[n_random + i, teacher_class] += lead
    rs = 0.5 + torch.rand(s.shape[0], generator=g)
    rs[-1] = 0.0
    return s.to(dtype), t.to(dtype), rs


def _exact_grad(student, teacher, temperature, divergence, jsd_beta=0.5):
    """dD/dstudent in float64 without the cancellation of autograd's ``Q_j (r_j - sum_k Q_k r_k)``
    at a class with Q_j near 1 (the oracle's autograd reads 0 there when a class leads by 100):
    kl ``T (Q_j - P_j)``, as ``(1 - P_j) - (1 - Q_j)`` (sums over k != j) where P_j or Q_j > 1/2;
    reverse kl and jsd ``c Q_j sum_{k != j} Q_k (r_j - r_k)``, O(N V^2)."""
    s = student.double() / temperature
    t = teacher.double() / temperature
    log_q = torch.log_softmax(s, -1)
    log_p = torch.log_softmax(t, -1)
    q, p = log_q.exp(), log_p.exp()
    eye = torch.eye(s.shape[-1], dtype=torch.bool)
    if divergence == "kl":
        others = lambda a: torch.where(eye, 0.0, a[:, None, :]).sum(-1)  # noqa: E731  sum_{k != j} a_k
        direct = q - p
        complement = others(p) - others(q)
        return temperature * torch.where((p > 0.5) | (q > 0.5), complement, direct)
    if divergence == "reverse_kl":
        r, c = log_q - log_p, temperature
    else:
        log_m = torch.logaddexp(math.log(jsd_beta) + log_p, math.log1p(-jsd_beta) + log_q)
        r, c = log_q - log_m, temperature * (1 - jsd_beta)
    diff = r[:, :, None] - r[:, None, :]                                    # r_j - r_k
    terms = torch.where(eye | (q[:, None, :] == 0), 0.0, q[:, None, :] * diff)
    return c * q * terms.sum(-1)


def _run(s, t, rs, temperature, div, beta=0.5, regime="stream", grad=None, accumulate=False):
    from fusedloss.triton_kernels import heuristics
    from fusedloss.triton_kernels.distill import launch
    with heuristics.override(**REGIMES[regime]):
        return launch.triton_distill(s, t, rs, temperature, DIVERGENCES[div], beta, grad, accumulate)


def _check(s, t, rs, temperature, div, beta=0.5, regime="stream", accumulate=False, msg=""):
    """D and the gradient of one launch against float64; accumulate: into a random buffer."""
    g0 = torch.randn(s.shape, generator=torch.Generator().manual_seed(7)).to(s.dtype)
    if not accumulate:
        g0 = torch.full_like(s, float("nan"))       # every element must be written
    grad = g0.clone()
    d = _run(s, t, rs, temperature, div, beta, regime, grad, accumulate)
    assert d.dtype == torch.float32 and d.shape == (s.shape[0],)
    assert_close(d, divergence_rows(s, t, temperature, div, beta), s.dtype, "loss", msg)
    expected = rs.double()[:, None] * _exact_grad(s, t, temperature, div, beta)
    if accumulate:
        expected = expected + g0.double()
    zero = rs == 0
    assert_close(grad[~zero], expected[~zero], s.dtype, "grad", msg)
    if accumulate:
        assert torch.equal(grad[zero], g0[zero]), "a row of row_scale 0 is left unchanged"
    else:
        assert not grad[zero].any(), "a row of row_scale 0 is written 0"
    return d


# ----------------------------------------------------------------------------
# The oracles (no interpreter)
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("div", DIVERGENCES)
def test_exact_grad_is_the_oracle_off_the_extreme_rows(div):
    """The cancellation-free gradient equals oracle_distill's autograd on the random rows, and the
    oracle's D its pure-Python loop."""
    s, t, _ = _data(seed=11)
    for temperature in (1.0, 2.0):
        torch.testing.assert_close(_exact_grad(s[:4], t[:4], temperature, div, 0.3),
                                   divergence_grad(s[:4], t[:4], temperature, div, 0.3), rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(divergence_rows(s[:4], t[:4], temperature, div, 0.3),
                                   check_logs_math(s[:4], t[:4], temperature, div, 0.3), rtol=1e-10, atol=1e-13)


def test_divergence_ids_match_the_op_abi():
    from fusedloss.triton_kernels.distill import kernels
    for name, i in DIVERGENCES.items():
        assert getattr(kernels, name.upper()).value == i


# ----------------------------------------------------------------------------
# The interpreter: numerics against float64
# ----------------------------------------------------------------------------

@interpreter
@pytest.mark.parametrize("temperature", (1.0, 2.0, 4.0))
@pytest.mark.parametrize("div", DIVERGENCES)
def test_streamed_rows_match_float64(div, temperature):
    """Three column blocks with a ragged tail, a persistent grid, fp32, accumulated into a buffer;
    random rows, the extreme rows (leads of 30 and 100, same and different classes), row_scale 0."""
    s, t, rs = _data(seed=1)
    _check(s, t, rs, temperature, div, beta=0.3 if div == "jsd" else 0.5, accumulate=True,
           msg=f"{div} T={temperature} stream")


@interpreter
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("div", DIVERGENCES)
def test_on_chip_rows_match_float64(div, dtype):
    """The row in registers (several rows per program), every dtype, written (not accumulated)."""
    s, t, rs = _data(dtype, seed=2)
    _check(s, t, rs, 2.0, div, regime="single", msg=f"{div} {dtype} single")


@interpreter
@pytest.mark.parametrize("div", DIVERGENCES)
def test_bf16_streamed_accumulate(div):
    s, t, rs = _data(torch.bfloat16, seed=3)
    _check(s, t, rs, 1.0, div, accumulate=True, msg=f"{div} bf16 stream")


@interpreter
@pytest.mark.parametrize("div", DIVERGENCES)
def test_without_grad_and_strided_rows(div):
    """Rows of any stride read in place (slices of wider buffers, the gradient too); without a
    gradient buffer D is the same, bit for bit, as with one."""
    s, t, rs = _data(seed=4)
    n = s.shape[0]
    sb = torch.full((n, V + 11), 7.0)
    tb = torch.full((n, V + 5), -3.0)
    gb = torch.full((n, V + 3), 5.0)
    sb[:, 2:2 + V] = s
    tb[:, :V] = t
    sv, tv, gv = sb[:, 2:2 + V], tb[:, :V], gb[:, 1:1 + V]
    d = _run(sv, tv, rs, 2.0, div, 0.5, "stream", gv, False)
    assert_close(d, divergence_rows(s, t, 2.0, div), s.dtype, "loss", div)
    zero = rs == 0
    assert_close(gv[~zero], rs.double()[~zero, None] * _exact_grad(s, t, 2.0, div)[~zero], s.dtype, "grad", div)
    assert (gb[:, 0] == 5.0).all() and (gb[:, 1 + V:] == 5.0).all(), "nothing outside the rows is written"
    d0 = _run(sv, tv, rs, 2.0, div, 0.5, "stream", None, False)
    assert torch.equal(d0, d)


@interpreter
def test_transposed_grad_single_class_and_empty():
    """A gradient buffer whose class dimension is not dense (written through a dense copy); V = 1
    (D = 0, gradient 0); N = 0 and V = 0."""
    s, t, rs = _data(seed=5)
    gt = torch.zeros(V, s.shape[0]).t()
    _run(s, t, rs, 1.0, "kl", grad=gt, regime="single")
    assert_close(gt[:-1], rs.double()[:-1, None] * _exact_grad(s, t, 1.0, "kl")[:-1], s.dtype, "grad")
    g1 = torch.full((3, 1), 9.0)
    for div in DIVERGENCES:
        d1 = _run(s[:3, :1], t[:3, :1], rs[:3], 2.0, div, grad=g1, regime="single")
        assert torch.equal(d1, torch.zeros(3)) and torch.equal(g1, torch.zeros(3, 1))
    assert _run(s[:0], t[:0], rs[:0], 1.0, "kl", grad=torch.empty(0, V)).shape == (0,)
    assert torch.equal(_run(s[:, :0], t[:, :0], rs, 1.0, "jsd", grad=torch.empty(N, 0)), torch.zeros(N))


@interpreter
def test_float64_runs_the_reference_and_bad_inputs_raise():
    from fusedloss.triton_kernels.distill import launch
    s, t, rs = _data(seed=6)
    s, t, rs = s.double(), t.double(), rs.double()
    for div, i in DIVERGENCES.items():
        g1, g2 = torch.zeros_like(s), torch.zeros_like(s)
        d1 = launch.triton_distill(s, t, rs, 2.0, i, 0.4, g1, False)
        d2 = distill_ops.reference_distill(s, t, rs, 2.0, i, 0.4, g2, False)
        assert d1.dtype == torch.float64 and torch.equal(d1, d2) and torch.equal(g1, g2)
    f, rs32 = s.float(), rs.float()
    bad = [((f, t, rs32, 1.0, 0, 0.5, None, False), "teacher"),
           ((f, f[:, :-1], rs32, 1.0, 0, 0.5, None, False), "teacher"),
           ((f, f, rs32[:-1], 1.0, 0, 0.5, None, False), "row_scale"),
           ((f, f, rs32, 0.0, 0, 0.5, None, False), "temperature"),
           ((f, f, rs32, 1.0, 3, 0.5, None, False), "divergence"),
           ((f, f, rs32, 1.0, 2, 1.0, None, False), "jsd_beta"),
           ((f, f, rs32, 1.0, 0, 0.5, torch.zeros_like(s), False), "grad"),
           ((f[0], f[0], rs32, 1.0, 0, 0.5, None, False), "student")]
    for args, name in bad:
        with pytest.raises(ValueError, match=name):
            launch.triton_distill(*args)


@interpreter
@pytest.mark.parametrize("div", DIVERGENCES)
def test_traffic(div):
    """Triton's interpreter counts every byte: on chip both rows are read once, the gradient read
    (accumulate) and written once; streamed, kl and reverse kl read both rows twice (statistics, then
    gradient), jsd three times (its middle pass); without a gradient once (jsd twice). Reverse kl and
    jsd also load the teacher's logit at the student's arg-max, one element per row."""
    from fusedloss.triton_kernels import traffic
    s, t, rs = _data(seed=9, n_random=0)
    n, lb = s.shape[0], s.numel() * s.element_size()
    per_row = n * s.element_size() if div != "kl" else 0
    for regime, passes in (("single", 1), ("stream", 3 if div == "jsd" else 2)):
        for with_grad in (True, False):
            grad = torch.zeros_like(s) if with_grad else None
            with traffic.count_interpreter_traffic() as tr:
                _run(s, t, rs, 1.0, div, regime=regime, grad=grad, accumulate=True)
            reads = passes if with_grad or regime == "single" else passes - 1
            assert tr.bytes("load", s) == reads * lb, (regime, with_grad)
            assert tr.bytes("load", t) == reads * lb + (per_row if with_grad else 0), (regime, with_grad)
            if with_grad:
                assert tr.bytes("load", grad) == lb and tr.bytes("store", grad) == lb, regime


@interpreter
def test_backend_family_and_opcheck():
    """The triton backend's DistillOps is this op; opcheck's schema check (the fake-tensor checks
    run on a GPU: under the interpreter a launch reads the fake tensors' data)."""
    from fusedloss import dispatch
    from fusedloss.triton_kernels.distill import launch
    fam = dispatch.resolve("triton", torch.device("cpu")).family(distill_ops.DistillOps)
    assert fam is not None and fam.fwd is launch.triton_distill
    s, t, rs = _data(seed=8, n_random=1)
    torch.library.opcheck(launch.triton_distill, (s, t, rs, 2.0, 2, 0.5, torch.zeros_like(s), True),
                          test_utils=("test_schema",))


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
