"""The distillation op's kernels (``fusedloss::ext_distill``: csrc/cpu/kernels_distill.cpp,
csrc/cuda/ops_cuda_distill.cu) and the reference op (``fusedloss::reference_distill``), both
against the float64 oracle (tests/oracle_distill.py): every divergence, T in {1, 2, 4},
jsd_beta, every dtype, accumulate, row_scale zeros, strided rows, V from 1 to 50000, rows whose
max rises across blocks, extreme rows (teacher and student confident on different classes,
leading by 30 and 100), -inf logits where they are meaningful, bad arguments, opcheck, the
other CPU capability objects, and the CUDA op (``gpu``, skipped without a device).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from fusedloss import dispatch
from fusedloss.distill import ops as distill_ops
from fusedloss.distill.ops import DIVERGENCES
from oracle import TOLERANCES, assert_close
from oracle_distill import check_logs_math, divergence_grad, divergence_rows, kl_grad_stable

_C = pytest.importorskip("fusedloss._C", reason="C++ extension not built")
from fusedloss import _cpp_backend  # noqa: E402  (registers the fake and the families)

EXT = torch.ops.fusedloss.ext_distill.default
REF = torch.ops.fusedloss.reference_distill.default
OPS = {"ext": EXT, "reference": REF}
DIVS = list(DIVERGENCES)
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Elements per block of the CPU kernel's online pass (8 KiB, csrc/cpu/vec_row.h).
BLOCK = {torch.float32: 2048, torch.bfloat16: 4096, torch.float16: 4096, torch.float64: 1024}

gpu = pytest.mark.gpu
needs_device = pytest.mark.skipif(not (torch.cuda.is_available() and _cpp_backend.cuda_compiled()),
                                  reason="needs a CUDA device and the CUDA kernels")
REQUIRED_CUDA = os.environ.get("FUSEDLOSS_BUILD_CUDA") == "1"
needs_cuda_build = pytest.mark.skipif(not (_cpp_backend.cuda_compiled() or REQUIRED_CUDA),
                                      reason="extension built without its CUDA part")


def stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def logits(n, v, dtype=torch.float32, seed=0, scale=2.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g) * scale
    t = s + torch.randn(n, v, generator=g) * scale  # a teacher that roughly agrees
    return s.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype)


def closed_form_grad(student, teacher, temperature, div, beta=0.5, row_weight=None):
    """dD/dstudent in float64 from the textbook derivatives, for rows with -inf logits (where
    float64 autograd of the oracle reads 0 * inf = NaN): with q = softmax(s / T), p = softmax(t / T),
    kl T (q - p); reverse kl T q (r - sum q r), r = log q - log p; jsd T (1 - b) q (u - sum q u),
    u = log q - log m, m = b p + (1 - b) q; terms with q = 0 are 0. Pinned against autograd on
    finite rows by test_closed_form_grad_matches_autograd."""
    s = student.double() / temperature
    t = teacher.double() / temperature
    log_q, log_p = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    q, p = log_q.exp(), log_p.exp()
    if div == "kl":
        g = q - p
    else:
        other = log_p if div == "reverse_kl" else torch.log(beta * p + (1 - beta) * q)
        qr = torch.where(q > 0, q * (log_q - other), torch.zeros_like(q))
        g = qr - q * qr.sum(-1, keepdim=True)
        if div == "jsd":
            g = (1 - beta) * g
    g = temperature * g
    return g if row_weight is None else g * row_weight.double()[:, None]


def pairwise_grad(student, teacher, temperature, div, beta=0.5, row_weight=None):
    """dD/dstudent in float64 without the cancellation of the textbook form at a dominant class:
    reverse kl T q_j sum_k q_k (c_j - c_k), c = log q - log p; jsd T (1 - b) q_j sum_k q_k (u_j - u_k),
    u = log q - log m (sum_k q_k = 1 makes these the textbook forms). Where the student leads by
    L, q_j (c_j - E_q[c]) at its class is ~e^-L and the textbook form leaves it to float64 rounding
    of c_j ~ L; here every term is formed from one difference c_j - c_k. One row at a time
    (a (V, V) matrix of differences); kl: T (q - p) from oracle_distill.kl_grad_stable (the sums of
    the other classes at a class holding over half of either row's mass)."""
    s = student.double() / temperature
    t = teacher.double() / temperature
    log_q, log_p = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    q, p = log_q.exp(), log_p.exp()
    if div == "kl":
        g = kl_grad_stable(student, teacher, temperature) / temperature
    else:
        if div == "reverse_kl":
            c = log_q - log_p
        else:
            c = log_q - torch.logaddexp(math.log(beta) + log_p, math.log1p(-beta) + log_q)
        g = torch.stack([qi * ((ci[:, None] - ci[None, :]) @ qi) for qi, ci in zip(q, c)])
        if div == "jsd":
            g = (1 - beta) * g
    g = temperature * g
    return g if row_weight is None else g * row_weight.double()[:, None]


def check(op, s, t, temperature, div, beta=0.5, *, row_scale=None, accumulate=False, grad=None, with_grad=True,
          msg="", grad_oracle=divergence_grad):
    """Runs op and compares D and the written gradient with the float64 oracle."""
    n = s.shape[0]
    dtype = s.dtype
    rs = torch.ones(n, dtype=stats_dtype(dtype), device=s.device) if row_scale is None else row_scale
    if with_grad and grad is None:
        grad = (torch.randn(s.shape, dtype=torch.float32).to(dtype=dtype, device=s.device) if accumulate
                else torch.full_like(s, float("nan")))
    before = grad.clone() if with_grad else None
    d = op(s, t, rs, float(temperature), DIVERGENCES[div], float(beta), grad if with_grad else None, accumulate)
    assert d.dtype == stats_dtype(dtype) and d.shape == (n,)
    label = f"{msg} {div} T={temperature} beta={beta} {dtype} acc={accumulate}"
    assert_close(d, divergence_rows(s.cpu(), t.cpu(), temperature, div, beta), dtype, "loss", msg=label)
    if not with_grad:
        return d, None
    expected = grad_oracle(s.cpu(), t.cpu(), temperature, div, beta, row_weight=rs.cpu())
    if accumulate:
        expected = expected + before.cpu().double()
    assert grad.dtype == dtype
    assert_close(grad.cpu(), expected, dtype, "grad", msg=label)
    return d, grad


# ----------------------------------------------------------------------------
# The oracle itself, once (pinned by plain loops)
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("div", DIVS)
def test_oracle_against_loops(div):
    s, t = logits(3, 6, torch.float64)
    for temperature in (1.0, 2.5):
        torch.testing.assert_close(divergence_rows(s, t, temperature, div, 0.3),
                                   check_logs_math(s, t, temperature, div, 0.3), rtol=1e-12, atol=1e-13)


# ----------------------------------------------------------------------------
# Both ops against the oracle
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_divergences(op, div, temperature, dtype):
    s, t = logits(9, 1000, dtype, seed=int(temperature))
    check(OPS[op], s, t, temperature, div, 0.5)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_jsd_beta(op, beta, dtype):
    s, t = logits(6, 777, dtype, seed=3)
    check(OPS[op], s, t, 2.0, "jsd", beta)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_without_grad(op, div, dtype):
    s, t = logits(5, 300, dtype, seed=4)
    check(OPS[op], s, t, 2.0, div, 0.3, with_grad=False)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_accumulate_and_row_scale(op, div, dtype):
    """accumulate=True adds row_scale * dD into the buffer's values; row_scale 0 rows are
    left unchanged (accumulate) or written 0 (not)."""
    n, v = 8, 513
    s, t = logits(n, v, dtype, seed=5)
    rs = torch.tensor([0.5, 0.0, 2.0, 1.0, 0.0, 0.125, 3.0, 1.0], dtype=stats_dtype(dtype))
    _, grad = check(OPS[op], s, t, 2.0, div, 0.4, row_scale=rs, accumulate=True)
    base = torch.randn(n, v).to(dtype)
    buf = base.clone()
    OPS[op](s, t, rs, 2.0, DIVERGENCES[div], 0.4, buf, True)
    zero = rs == 0
    assert torch.equal(buf[zero], base[zero])  # exactly unchanged
    _, grad = check(OPS[op], s, t, 2.0, div, 0.4, row_scale=rs, accumulate=False)
    assert torch.equal(grad[zero], torch.zeros_like(grad[zero]))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("v", [1, 7, 1000])
@pytest.mark.parametrize("dtype", DTYPES)
def test_class_counts(op, div, v, dtype):
    s, t = logits(5, v, dtype, seed=v)
    check(OPS[op], s, t, 2.0, div, 0.5)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_vocabulary(op, div, dtype):
    s, t = logits(2, 50000, dtype, seed=7)
    check(OPS[op], s, t, 1.0, div, 0.5)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_longer_than_blocks(op, div, dtype):
    """Several blocks and a ragged tail; the max rises by more than 30 (the online pass's
    slack) from block to block in one row, falls in another, and the first block lies far
    below the rest in a third."""
    b = BLOCK[dtype]
    v = 4 * b + 5
    s, t = logits(4, v, dtype, seed=8)
    ramp = torch.linspace(-80, 80, v)
    s[0] = (s[0].float() + ramp).to(dtype)
    t[0] = (t[0].float() + 0.5 * ramp).to(dtype)
    s[1] = (s[1].float() - ramp).to(dtype)
    t[1] = (t[1].float() + ramp).to(dtype)
    s[2, :b] = -200
    t[2, :b] = -150
    check(OPS[op], s, t, 1.0, div, 0.5)
    check(OPS[op], s, t, 2.0, div, 0.5)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_strided_rows(op, div, dtype):
    """Student, teacher and grad as column slices of wider tensors (each its own row stride)."""
    n, v = 6, 1030
    s, t = logits(n, v, dtype, seed=9)
    ws = torch.zeros(n, v + 7, dtype=dtype)
    wt = torch.zeros(n, v + 13, dtype=dtype)
    ws[:, 3:3 + v] = s
    wt[:, 5:5 + v] = t
    ss, ts = ws[:, 3:3 + v], wt[:, 5:5 + v]
    assert ss.stride() == (v + 7, 1) and ts.stride() == (v + 13, 1)
    wg = torch.full((n, v + 3), 7.0, dtype=dtype)
    g = wg[:, 1:1 + v]
    check(OPS[op], ss, ts, 2.0, div, 0.5, grad=g)
    assert torch.equal(wg[:, 0], torch.full((n,), 7.0, dtype=dtype))  # nothing outside the slice
    assert torch.equal(wg[:, 1 + v:], torch.full((n, 2), 7.0, dtype=dtype))


def confident_rows(v, lead, dtype):
    """Teacher and student confident on different classes, leading by `lead`; rows: the
    student's class after the teacher's, before it, and across a block boundary."""
    g = torch.Generator().manual_seed(int(lead))
    s = torch.randn(3, v, generator=g)
    t = torch.randn(3, v, generator=g)
    for r, (a, b) in enumerate([(1, v - 2), (v - 3, 2), (v // 2, v // 2 + 1)]):
        t[r, a] = t[r].max() + lead
        s[r, b] = s[r].max() + lead
    return s.to(dtype), t.to(dtype)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("lead", [30.0, 100.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_extreme_rows(op, div, lead, temperature, dtype):
    s, t = confident_rows(5000, lead, dtype)
    d, _ = check(OPS[op], s, t, temperature, div, 0.5, grad_oracle=pairwise_grad)
    assert torch.isfinite(d).all()


def shared_confident_rows(v, lead, dtype):
    """Teacher and student both confident on the same class, each leading by `lead` (independent
    other logits): the class in the first block, just past the middle (another block for the CPU
    kernel's bfloat16 / float32 blocks of 4096 / 2048), and last but one."""
    g = torch.Generator().manual_seed(int(lead) + 1)
    s = torch.randn(3, v, generator=g)
    t = torch.randn(3, v, generator=g)
    classes = [1, v // 2 + 1, v - 2]
    for r, c in enumerate(classes):
        s[r, c] = s[r].max() + lead
        t[r, c] = t[r].max() + lead
    return s.to(dtype), t.to(dtype), classes


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("lead", [30.0, 100.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("accumulate", [False, True], ids=["write", "accumulate"])
def test_kl_shared_confident_class(op, lead, temperature, dtype, accumulate):
    """kl's gradient T (Q_m - P_m) at a class m both rows are confident on: ~e^-lead / T, while Q_m
    and P_m are within that of 1, so their plain difference is rounding noise (float32: ~1e-7 for a
    true 1e-10; float64 at lead 100: 0). Against the float64 sums of the other classes
    (kl_grad_stable) to the dtype's relative gradient tolerance, the entry alone; below the math
    type's smallest normal number nothing is relatively exact (e^-100). The rest of each row to the
    usual tolerance."""
    s, t, classes = shared_confident_rows(5000, lead, dtype)
    rs = torch.tensor([1.0, 0.25, 2.0], dtype=stats_dtype(dtype))
    before = torch.zeros_like(s)
    if accumulate:
        before[:, classes[0] + 3] = 1.0  # other entries of the buffer, not the confident class's
    grad = before.clone() if accumulate else torch.full_like(s, float("nan"))
    d = OPS[op](s, t, rs, float(temperature), DIVERGENCES["kl"], 0.5, grad, accumulate)
    assert torch.isfinite(d).all()
    expected = kl_grad_stable(s, t, temperature) * rs.double()[:, None] + before.double()
    rtol, _ = TOLERANCES[dtype]["grad"]
    tiny = torch.finfo(stats_dtype(dtype)).tiny
    for r, c in enumerate(classes):
        got, want = float(grad[r, c]), float(expected[r, c])
        assert abs(got - want) <= rtol * abs(want) + 4 * tiny, (
            f"row {r} class {c}: {got:.6e} vs {want:.6e} (plain Q - P in float64: "
            f"{float(temperature * rs[r] * (torch.softmax(s[r].double() / temperature, -1)[c] - torch.softmax(t[r].double() / temperature, -1)[c])):.6e})")
        assert_close(grad[r], expected[r], dtype, "grad", msg=f"row {r}")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_neg_inf_logits(op, dtype):
    """-inf where it is meaningful: both rows masked on the same classes (every divergence),
    the teacher alone (kl: P = 0 there; jsd), the student alone (reverse kl: Q = 0; jsd)."""
    v = 2100
    s, t = logits(3, v, torch.float32, seed=11)
    masked = torch.arange(0, v, 3)
    s[:, masked] = -math.inf
    t[:, masked] = -math.inf
    for div in DIVS:
        d, _ = check(OPS[op], s.to(dtype), t.to(dtype), 2.0, div, 0.5, msg="both masked",
                     grad_oracle=closed_form_grad)
        assert torch.isfinite(d).all()
    s, t = logits(3, v, torch.float32, seed=12)
    t_only = t.clone()
    t_only[:, masked] = -math.inf
    s_only = s.clone()
    s_only[:, masked] = -math.inf
    for div, (ss, tt) in [("kl", (s, t_only)), ("jsd", (s, t_only)), ("reverse_kl", (s_only, t)), ("jsd", (s_only, t))]:
        d, _ = check(OPS[op], ss.to(dtype), tt.to(dtype), 1.0, div, 0.5, msg="one masked",
                     grad_oracle=closed_form_grad)
        assert torch.isfinite(d).all()


@pytest.mark.parametrize("div", DIVS)
def test_closed_form_grad_matches_autograd(div):
    s, t = logits(4, 50, torch.float64, seed=17)
    w = torch.tensor([1.0, 0.5, 0.0, 2.0], dtype=torch.float64)
    for temperature in (1.0, 3.0):
        torch.testing.assert_close(closed_form_grad(s, t, temperature, div, 0.3, w),
                                   divergence_grad(s, t, temperature, div, 0.3, w), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("div", DIVS)
def test_pairwise_grad_matches_autograd(div):
    s, t = logits(3, 40, torch.float64, seed=18)
    w = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    for temperature in (1.0, 3.0):
        torch.testing.assert_close(pairwise_grad(s, t, temperature, div, 0.3, w),
                                   divergence_grad(s, t, temperature, div, 0.3, w), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("op", OPS)
def test_identical_rows_give_zero(op):
    s, _ = logits(4, 333, torch.float32, seed=13)
    grad = torch.empty_like(s)
    for div in DIVS:
        d = OPS[op](s, s.clone(), torch.ones(4), 3.0, DIVERGENCES[div], 0.5, grad, False)
        assert d.abs().max() < 1e-5
        assert grad.abs().max() < 1e-6


def test_empty_batch():
    s = torch.zeros(0, 10)
    d = EXT(s, s, torch.ones(0), 1.0, 0, 0.5, torch.zeros(0, 10), False)
    assert d.shape == (0,) and d.dtype == torch.float32


def test_thread_counts_agree():
    """Rows are independent: 1 and 2 threads give the same bits."""
    s, t = logits(64, 3000, torch.float32, seed=14)
    out = []
    threads = torch.get_num_threads()
    try:
        for k in (1, 2):
            torch.set_num_threads(k)
            g = torch.empty_like(s)
            out.append((EXT(s, t, torch.ones(64), 2.0, 2, 0.5, g, False), g))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def test_streamed_gradient_matches_plain_stores():
    """Above FUSEDLOSS_CPU_STREAM_BYTES the gradient goes out with streaming stores: same bits
    (a subprocess with the threshold at 0 against this process's plain stores)."""
    code = ("import torch, fusedloss, fusedloss._cpp_backend\n"
            "g=torch.Generator().manual_seed(1); s=torch.randn(16, 4100, generator=g); t=torch.randn(16, 4100, generator=g)\n"
            "out=[]\n"
            "for div in (0, 1, 2):\n"
            "    for acc in (False, True):\n"
            "        gr=torch.ones_like(s); d=torch.ops.fusedloss.ext_distill(s,t,torch.ones(16),2.0,div,0.5,gr,acc); out.append((d,gr))\n"
            "torch.save(out, __import__('sys').argv[1])\n")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.pt")
        env = dict(os.environ, FUSEDLOSS_CPU_STREAM_BYTES="0")
        res = subprocess.run([sys.executable, "-c", code, path], env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        streamed = torch.load(path)
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(16, 4100, generator=g), torch.randn(16, 4100, generator=g)
    i = 0
    for div in (0, 1, 2):
        for acc in (False, True):
            gr = torch.ones_like(s)
            d = EXT(s, t, torch.ones(16), 2.0, div, 0.5, gr, acc)
            assert torch.equal(d, streamed[i][0]) and torch.equal(gr, streamed[i][1]), (div, acc)
            i += 1


# ----------------------------------------------------------------------------
# Arguments, registration, opcheck
# ----------------------------------------------------------------------------

def test_bad_arguments_raise():
    s, t = logits(3, 10)
    rs = torch.ones(3)
    g = torch.empty_like(s)
    with pytest.raises(ValueError, match="temperature"):
        EXT(s, t, rs, 0.0, 0, 0.5, g, False)
    with pytest.raises(ValueError, match="temperature"):
        EXT(s, t, rs, math.inf, 0, 0.5, g, False)
    with pytest.raises(ValueError, match="divergence"):
        EXT(s, t, rs, 1.0, 3, 0.5, g, False)
    with pytest.raises(ValueError, match="jsd_beta"):
        EXT(s, t, rs, 1.0, 2, 1.0, g, False)
    EXT(s, t, rs, 1.0, 0, 1.0, g, False)  # jsd_beta is not read outside jsd
    with pytest.raises(RuntimeError, match="teacher must have the student's shape"):
        EXT(s, t[:, :9], rs, 1.0, 0, 0.5, g, False)
    with pytest.raises(RuntimeError, match="teacher must have the student's dtype"):
        EXT(s, t.double(), rs, 1.0, 0, 0.5, g, False)
    with pytest.raises(RuntimeError, match="row_scale"):
        EXT(s, t, torch.ones(4), 1.0, 0, 0.5, g, False)
    with pytest.raises(RuntimeError, match="grad must have the student's dtype"):
        EXT(s, t, rs, 1.0, 0, 0.5, g.double(), False)
    with pytest.raises(RuntimeError, match="unit stride"):
        EXT(s.t().contiguous().t(), t, rs, 1.0, 0, 0.5, g, False)
    with pytest.raises(RuntimeError, match="student must be"):
        EXT(s.int(), t.int(), rs, 1.0, 0, 0.5, None, False)


def test_schema_is_distill_schema():
    """csrc/fusedloss.cpp's ext_distill is DISTILL_SCHEMA, character for character."""
    assert str(EXT._schema) == f"fusedloss::ext_distill{distill_ops.DISTILL_SCHEMA}"
    assert str(REF._schema) == f"fusedloss::reference_distill{distill_ops.DISTILL_SCHEMA}"


def test_cpu_backend_family():
    fam = dispatch._load("cpu").family(distill_ops.DistillOps)
    assert fam is not None and fam.fwd is EXT
    assert dispatch._load("reference").family(distill_ops.DistillOps).fwd is distill_ops.reference_distill


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck(dtype):
    s, t = logits(4, 37, dtype, seed=15)
    rs = torch.tensor([1.0, 0.0, 0.5, 2.0], dtype=stats_dtype(dtype))
    for div in range(3):
        torch.library.opcheck(EXT, (s, t, rs, 2.0, div, 0.3, torch.zeros_like(s), False))
        torch.library.opcheck(EXT, (s, t, rs, 1.0, div, 0.3, torch.ones_like(s), True))
        torch.library.opcheck(EXT, (s, t, rs, 1.0, div, 0.3, None, False))


def test_compiled_call_matches_eager():
    s, t = logits(4, 100, seed=16)
    rs = torch.ones(4)

    def f(s, t, g):
        return EXT(s, t, rs, 2.0, 0, 0.5, g, False)

    g1, g2 = torch.empty_like(s), torch.empty_like(s)
    d1 = f(s, t, g1)
    d2 = torch.compile(f, backend="eager", fullgraph=True)(s, t, g2)
    assert torch.equal(d1, d2) and torch.equal(g1, g2)


# ----------------------------------------------------------------------------
# The other CPU capability objects
# ----------------------------------------------------------------------------

_ORDER = ["DEFAULT", "AVX2", "AVX512"]


@pytest.mark.parametrize("capability", ["DEFAULT", "AVX2", "AVX512"])
@pytest.mark.slow
def test_other_capability_builds(capability):
    machine = torch.backends.cpu.get_cpu_capability()
    if machine not in _ORDER or _ORDER.index(machine) < _ORDER.index(capability):
        pytest.skip(f"this CPU runs {machine}")
    if capability == _C.cpu_capability():
        pytest.skip(f"{capability} is what this process runs")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability.lower(), FUSEDLOSS_TEST_CAPABILITY=capability,
               FUSEDLOSS_CPU_AVX512_BF16="0")
    # The C++ kernel's cases only: "ext" alone also matches test_extreme_rows' reference cases.
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
           "test_capability_in_subprocess or (ext and not reference and (test_extreme_rows or test_rows_longer_than_blocks or "
           "test_neg_inf_logits or test_class_counts))"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if "no tests ran" in res.stdout or "not built" in res.stdout:
        pytest.fail(f"the {capability} run ran nothing:\n{res.stdout[-2000:]}")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


def test_capability_in_subprocess():
    want = os.environ.get("FUSEDLOSS_TEST_CAPABILITY")
    if want is None:
        pytest.skip("run by test_other_capability_builds")
    assert _C.cpu_capability() == want


# ----------------------------------------------------------------------------
# CUDA (the op's CUDA kernel; the same checks on the device)
# ----------------------------------------------------------------------------

@needs_cuda_build
def test_cuda_distill_registered():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fusedloss::ext_distill", "CUDA")
    assert dispatch._load("cuda").family(distill_ops.DistillOps).fwd is EXT


@gpu
@needs_device
@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_divergences(div, temperature, dtype):
    s, t = logits(9, 1000, dtype, seed=int(temperature), device="cuda")
    check(EXT, s, t, temperature, div, 0.5)
    rs = torch.tensor([0.5, 0.0, 2.0, 1.0, 0.0, 0.125, 3.0, 1.0, 1.0], dtype=stats_dtype(dtype), device="cuda")
    check(EXT, s, t, temperature, div, 0.3, row_scale=rs, accumulate=True)
    check(EXT, s, t, temperature, div, 0.3, row_scale=rs, with_grad=False)


@gpu
@needs_device
@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("v", [1, 7, 50000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_class_counts_and_strides(div, v, dtype):
    s, t = logits(3, v, dtype, seed=v, device="cuda")
    ws = torch.zeros(3, v + 5, dtype=dtype, device="cuda")
    ws[:, 2:2 + v] = s
    check(EXT, ws[:, 2:2 + v], t, 2.0, div, 0.5)


@gpu
@needs_device
@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("lead", [30.0, 100.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_extreme_rows(div, lead, dtype):
    s, t = confident_rows(5000, lead, dtype)
    for temperature in (1.0, 4.0):
        d, _ = check(EXT, s.cuda(), t.cuda(), temperature, div, 0.5, grad_oracle=pairwise_grad)
        assert torch.isfinite(d).all()


@gpu
@needs_device
def test_cuda_opcheck():
    s, t = logits(4, 37, seed=15, device="cuda")
    rs = torch.ones(4, device="cuda")
    for div in range(3):
        torch.library.opcheck(EXT, (s, t, rs, 2.0, div, 0.3, torch.zeros_like(s), False))
