"""The fused CPU kernel (``fusedloss::ext_fwd`` / ``ext_bwd`` from ``fusedloss._C``, the
"cpu" backend) against the float64 oracle: every variant, dtype and option, extreme
logits, rows longer than a block, ragged tails, any thread count, strided rows, C = 1,
the target check, op registration (opcheck), memory, and every CPU capability build.

Skipped as a whole when the extension is not built (the package then runs the reference).
"""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import fusedloss as fl
from fusedloss import dispatch, ops
from fusedloss.memtrack import PeakMemory
from fusedloss.reference import extreme_logits
from fusedloss.variants import Reduction, Variant, reduction_id, variant_id
from oracle import assert_close, oracle_loss_and_grad

_C = pytest.importorskip("fusedloss._C", reason="C++ extension not built")
import fusedloss._cpp_backend  # noqa: E402,F401  (registers fakes and autograd)

FWD = torch.ops.fusedloss.ext_fwd.default
BWD = torch.ops.fusedloss.ext_bwd.default
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
LOSSES = fl.LOSSES
# Elements per block of the online pass (csrc/cpu/vec_row.h: 8 KiB): targets and
# arg-maxes are put on these boundaries.
BLOCK = {torch.float32: 2048, torch.bfloat16: 4096, torch.float16: 4096, torch.float64: 1024}


def run(x, t, loss="ce", *, weight=None, ignore_index=-100, reduction="mean", eps=0.0,
        alpha=1.5, beta=1.0, gamma=2.0, z_loss=0.0, softcap=0.0, grad_output=None):
    """The op three ways: forward with the fused gradient, forward without it, and the
    backward op from the stats. Returns (loss, fused grad, backward-op grad for grad_output)."""
    scalars = (int(variant_id(loss)), int(reduction_id(reduction)), ignore_index, eps, alpha, beta, gamma,
               z_loss, softcap)
    out, stats, grad = FWD(x, t, weight, *scalars, True)
    out2, stats2, empty = FWD(x, t, weight, *scalars, False)
    assert empty.shape == (0,)
    # The gradient rides along without changing a bit of the loss or the stats.
    torch.testing.assert_close(out, out2, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(stats, stats2, rtol=0, atol=0, equal_nan=True)
    go = torch.ones_like(out) if grad_output is None else grad_output
    g_bwd = BWD(go, x, t, weight, stats, *scalars)
    assert grad.shape == x.shape and grad.dtype == x.dtype and grad.is_contiguous()
    assert g_bwd.shape == x.shape and g_bwd.dtype == x.dtype and g_bwd.is_contiguous()
    return out, grad, g_bwd


def check_against_oracle(x, t, loss, *, grad_output=None, msg="", **kw):
    out, grad, g_bwd = run(x, t, loss, grad_output=grad_output, **kw)
    oracle_kw = dict(weight=kw.get("weight"), ignore_index=kw.get("ignore_index", -100),
                     reduction=kw.get("reduction", "mean"), label_smoothing=kw.get("eps", 0.0),
                     alpha=kw.get("alpha", 1.5), beta=kw.get("beta", 1.0), gamma=kw.get("gamma", 2.0))
    ref, ref_g = oracle_loss_and_grad(x, t, loss, **oracle_kw)
    # The loss is computed in float32 from the exact half inputs: float32's tolerance.
    loss_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert out.dtype == loss_dtype
    assert_close(out, ref, loss_dtype, "loss", msg)
    assert_close(grad, ref_g, x.dtype, "grad", msg + " (fused)")
    if grad_output is not None:
        _, ref_g = oracle_loss_and_grad(x, t, loss, grad_output=grad_output, **oracle_kw)
    assert_close(g_bwd, ref_g, x.dtype, "grad", msg + " (backward op)")
    return out, grad


def _logits(n, c, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(n, c, generator=g)).to(dtype)
    t = torch.randint(0, c, (n,), generator=g)
    return x, t


# ----------------------------------------------------------------------------
# Every variant x dtype x reduction x weight, with ignored rows sprinkled in
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss", LOSSES)
def test_against_oracle(loss, dtype, reduction, weighted):
    x, t = _logits(37, 1000, dtype)
    t[[3, 17, 36]] = -100
    w = torch.rand(1000, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5 if weighted else None
    go = torch.rand(37, dtype=x.dtype if dtype == torch.float64 else torch.float32) + 0.5 \
        if reduction == "none" else torch.tensor(1.7, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    check_against_oracle(x, t, loss, weight=w, reduction=reduction, grad_output=go, msg=f"{loss} {dtype}")


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_label_smoothing(dtype, reduction, weighted):
    x, t = _logits(29, 3001, dtype, seed=2)
    t[[0, 11]] = -100
    w = torch.rand(3001, generator=torch.Generator().manual_seed(3)) + 0.5 if weighted else None
    for eps in (0.1, 1.0):
        check_against_oracle(x, t, "ce", weight=w, reduction=reduction, eps=eps, msg=f"eps={eps}")


@pytest.mark.parametrize("loss", ["crl", "focal"])
def test_hyperparameters(loss):
    x, t = _logits(16, 500, torch.float32, seed=4)
    for alpha, beta, gamma in [(0.0, 1.0, 0.0), (0.5, 2.0, 0.5), (3.0, 0.0, 1.0), (1.5, 1.0, 4.0)]:
        check_against_oracle(x, t, loss, alpha=alpha, beta=beta, gamma=gamma, reduction="none",
                             msg=f"alpha={alpha} beta={beta} gamma={gamma}")


# ----------------------------------------------------------------------------
# Extreme logits: target leading by 20/100/1000, a wrong class leading by 50,
# -inf masked classes, all-equal rows; and bce's rare exact fallback
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss", LOSSES)
def test_extreme_logits(loss, dtype):
    x, t = extreme_logits(42, 777, dtype=dtype, generator=torch.Generator().manual_seed(5))
    out, grad = check_against_oracle(x, t, loss, reduction="none", msg=f"{loss} {dtype} extreme")
    if loss != "nllr":  # nllr is unbounded below by definition; the others stay finite here
        assert torch.isfinite(out).all()
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lead", [10.0, 30.0, 60.0, 100.0, 1000.0])
def test_bce_wrong_class_leading(dtype, lead):
    """A wrong arg-max: a_w = p_w / (1 - p_w) overflows past a lead of ~89 in float32, and
    past ~41 the kernel's sum for log(1 - p_w) takes its exact second pass."""
    x, t = _logits(12, 3000, torch.float32, seed=6, scale=1.0)
    w = (t + 1 + torch.arange(12) * 97) % 3000
    x[torch.arange(12), w] = x.max(1).values + lead
    check_against_oracle(x.to(dtype), t, "bce", reduction="none", msg=f"lead {lead}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("loss", LOSSES)
def test_rows_that_move_the_online_shift(loss, dtype):
    """The online pass exponentiates a block against the running shift and redoes it only
    when a value lands more than 30 nats above (or, in a row's first block, below) it:
    rows rising or falling by ~40 nats a block, a first element far below the rest, a
    first block of -inf."""
    c = 5 * BLOCK[dtype] + 11
    x = torch.randn(5, c, generator=torch.Generator().manual_seed(19))
    x[0] = torch.linspace(-100.0, 100.0, c)
    x[1] = torch.linspace(100.0, -100.0, c)
    x[2, 0] = -1e4
    x[3, : BLOCK[dtype] + 3] = -math.inf
    x[4, ::997] += 60.0
    t = torch.tensor([c - 1, 3, 0, 7, 997])
    check_against_oracle(x.to(dtype), t, loss, reduction="none", msg=f"{loss} {dtype}")


def test_nan_logit_gives_nan_row():
    x = torch.randn(3, 5000)
    x[1, 4321] = math.nan
    for loss in LOSSES:
        out, grad, _ = run(x, torch.tensor([1, 2, 3]), loss, reduction="none")
        assert out[1].isnan() and not out[[0, 2]].isnan().any()


@pytest.mark.parametrize("loss", LOSSES)
def test_property_shift_invariance_and_zero_row_sums(loss):
    x, t = _logits(20, 300, torch.float64, seed=7)
    out, grad, _ = run(x, t, loss, reduction="none")
    out_shifted, _, _ = run(x + 100.0, t, loss, reduction="none")
    torch.testing.assert_close(out_shifted, out, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(grad.sum(1), torch.zeros(20, dtype=torch.float64), rtol=0, atol=1e-12)


def test_uniform_logits_give_log_c():
    x = torch.full((4, 32000), 0.25)
    out, _, _ = run(x, torch.tensor([0, 5, 31999, 16000]), "ce", reduction="none")
    torch.testing.assert_close(out, torch.full((4,), math.log(32000.0)))


# ----------------------------------------------------------------------------
# Shapes and layouts: rows longer than a block, targets on block boundaries,
# ragged tails, any thread count, strided rows, C = 1, int32 targets, N = 0
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss", LOSSES)
def test_long_rows_targets_on_block_edges(loss, dtype):
    b = BLOCK[dtype]
    c = 2 * b + 2 * 37 + 3  # ragged: not a multiple of any vector width
    edges = [0, 1, b - 1, b, b + 1, 2 * b - 1, 2 * b, c - 2, c - 1]
    x, _ = _logits(len(edges), c, dtype, seed=8)
    t = torch.tensor(edges)
    if loss == "bce":  # put the wrong arg-maxes on block edges too
        w = torch.tensor(edges[::-1])
        x = x.float()
        x[torch.arange(len(edges)), w] = x.max(1).values + 5.0
        x = x.to(dtype)
    check_against_oracle(x, t, loss, reduction="none", msg=f"{loss} {dtype} C={c}")


@pytest.mark.parametrize("c", [1, 2, 3, 15, 16, 17, 33])
@pytest.mark.parametrize("loss", LOSSES)
def test_small_and_ragged_class_counts(loss, c):
    x, t = _logits(9, c, torch.float32, seed=9)
    if c == 1 and loss == "nllr":
        # log(1 - p_c) = -inf with no competitors: the loss is -inf, the gradient undefined.
        out, _, _ = run(x, t, loss, reduction="none")
        assert (out == -math.inf).all()
        return
    check_against_oracle(x, t, loss, reduction="none", msg=f"C={c}")


@pytest.mark.parametrize("loss", LOSSES)
def test_thread_count_does_not_change_a_bit(loss):
    x, t = _logits(37, 5000, torch.float32, seed=10)
    t[5] = -100
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(run(x, t, loss, reduction="mean"))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss", LOSSES)
def test_strided_rows_read_in_place(loss, dtype):
    """Rows of any stride (a column slice at an unaligned offset, every other row) give
    exactly the contiguous result."""
    base, _ = _logits(40, 1300, dtype, seed=11)
    t = torch.randint(0, 1000, (40,), generator=torch.Generator().manual_seed(12))
    sliced = base[:, 7:1007]
    assert not sliced.is_contiguous() and sliced.stride() == (1300, 1)
    for view, tv in ((sliced, t), (sliced[::2], t[::2])):
        got = run(view, tv, loss, reduction="none")
        want = run(view.contiguous(), tv, loss, reduction="none")
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_int32_targets_and_custom_ignore_index():
    x, t = _logits(25, 300, torch.float32, seed=13)
    t[t == 3] = 4
    t[[1, 2]] = 3  # ignore_index may be a valid class index
    for loss in LOSSES:
        a = run(x, t, loss, ignore_index=3)
        b = run(x, t.int(), loss, ignore_index=3)
        for u, v in zip(a, b):
            assert torch.equal(u, v)
        check_against_oracle(x, t, loss, ignore_index=3, msg=loss)


@pytest.mark.parametrize("reduction,expected", [("mean", math.nan), ("sum", 0.0)])
def test_empty_batch_and_all_ignored(reduction, expected):
    for loss in LOSSES:
        out, grad, g_bwd = run(torch.randn(0, 7), torch.zeros(0, dtype=torch.long), loss, reduction=reduction)
        assert grad.shape == (0, 7) and g_bwd.shape == (0, 7)
        torch.testing.assert_close(out, torch.tensor(expected), equal_nan=True)
        out, grad, _ = run(torch.randn(3, 7), torch.full((3,), -100), loss, reduction=reduction)
        torch.testing.assert_close(out, torch.tensor(expected), equal_nan=True)
        assert (grad == 0).all()
    out, _, _ = run(torch.randn(0, 7), torch.zeros(0, dtype=torch.long), "ce", reduction="none")
    assert out.shape == (0,)


# ----------------------------------------------------------------------------
# The target check: IndexError naming the target, its value and C, before any read
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [7, 1000, -1, -101])
def test_out_of_range_target_raises_index_error(bad):
    x = torch.randn(4, 7)
    t = torch.tensor([0, 6, bad, -100])
    for compute_grad in (False, True):
        with pytest.raises(IndexError, match=rf"target {bad}\b.*C=7"):
            FWD(x, t, None, 0, 1, -100, 0.0, 1.5, 1.0, 2.0, 0.0, 0.0, compute_grad)
    stats = torch.zeros(4, 4)
    with pytest.raises(IndexError, match=rf"target {bad}\b.*C=7"):
        BWD(torch.tensor(1.0), x, t, None, stats, 0, 1, -100, 0.0, 1.5, 1.0, 2.0, 0.0, 0.0)
    with pytest.raises(IndexError, match=rf"{bad}"):
        fl.softmax_loss(x, t, "focal", backend="cpu")


def test_bad_arguments_raise():
    x, t = torch.randn(4, 7), torch.tensor([0, 1, 2, 3])
    with pytest.raises(RuntimeError, match="unit stride"):
        FWD(x.t().contiguous().t(), t, None, 0, 1, -100, 0.0, 1.5, 1.0, 2.0, 0.0, 0.0, False)
    with pytest.raises(RuntimeError, match="label_smoothing"):
        FWD(x, t, None, int(Variant.FOCAL), 1, -100, 1.5, 1.5, 1.0, 2.0, 0.0, 0.0, False)
    with pytest.raises(RuntimeError, match="z_loss"):
        FWD(x, t, None, int(Variant.FOCAL), 1, -100, 0.0, 1.5, 1.0, 2.0, -1.0, 0.0, False)
    with pytest.raises(RuntimeError, match="softcap"):
        FWD(x, t, None, int(Variant.FOCAL), 1, -100, 0.0, 1.5, 1.0, 2.0, 0.0, -3.0, False)
    with pytest.raises(RuntimeError, match="variant"):
        FWD(x, t, None, 6, 1, -100, 0.0, 1.5, 1.0, 2.0, 0.0, 0.0, False)
    with pytest.raises(RuntimeError, match="weight"):
        FWD(x, t, torch.ones(6), 0, 1, -100, 0.0, 1.5, 1.0, 2.0, 0.0, 0.0, False)


# ----------------------------------------------------------------------------
# Registration: schemas, opcheck, the backend, the functional path end to end
# ----------------------------------------------------------------------------

def test_schemas_are_the_contracts():
    assert str(FWD._schema) == f"fusedloss::ext_fwd{ops.FWD_SCHEMA}"
    assert str(BWD._schema) == f"fusedloss::ext_bwd{ops.BWD_SCHEMA}"


def test_cpu_backend_registered_and_auto():
    assert "cpu" in fl.available_backends()
    be = dispatch.resolve("auto", torch.device("cpu"))
    assert be.name == "cpu" and be.one_target.fused_grad and be.one_target.fwd is FWD and be.one_target.bwd is BWD
    assert _C.cpu_capability() in ("DEFAULT", "AVX2", "AVX512", "AVX512_BF16")


def _opcheck_args(variant, reduction, compute_grad):
    g = torch.Generator().manual_seed(14)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, -100, 4, 2, 1, 3])
    w = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    eps = 0.1 if variant == Variant.CE else 0.0
    return (x, t, w, int(variant), int(reduction), -100, eps, 1.5, 1.0, 2.0, 0.0, 0.0, compute_grad)


@pytest.mark.parametrize("compute_grad", [False, True])
@pytest.mark.parametrize("reduction", list(Reduction), ids=lambda r: r.name.lower())
@pytest.mark.parametrize("variant", list(Variant), ids=lambda v: v.name.lower())
def test_opcheck_ext_fwd(variant, reduction, compute_grad):
    torch.library.opcheck(FWD, _opcheck_args(variant, reduction, compute_grad))


@pytest.mark.parametrize("reduction", list(Reduction), ids=lambda r: r.name.lower())
def test_opcheck_ext_bwd(reduction):
    for variant in Variant:
        x, t, w, *scalars, _ = _opcheck_args(variant, reduction, False)
        loss, stats, _ = FWD(x.detach(), t, w, *scalars, False)
        torch.library.opcheck(BWD, (torch.rand_like(loss) + 0.5, x.detach(), t, w, stats, *scalars))


@pytest.mark.parametrize("loss", LOSSES)
def test_functional_gradient_and_gradcheck(loss):
    """The functional on backend="cpu": autograd through the fused gradient (grad_output 1
    and not), and gradcheck in float64 through the recomputing backward."""
    x, t = _logits(8, 13, torch.float64, seed=15)
    t[2] = -100
    w = torch.rand(13, dtype=torch.float64) + 0.5
    kw = dict(weight=w, backend="cpu", label_smoothing=0.1 if loss == "ce" else 0.0)
    xr = x.clone().requires_grad_(True)
    (3.0 * fl.softmax_loss(xr, t, loss, **kw)).backward()
    _, ref_g = oracle_loss_and_grad(x, t, loss, weight=w, label_smoothing=kw["label_smoothing"])
    assert_close(xr.grad, 3.0 * ref_g, torch.float64, "grad")
    with torch.no_grad():  # no gradient asked for: the plain forward
        fl.softmax_loss(x, t, loss, **kw)
    # check_undefined_grad=False: a None grad_loss is ops.register_autograd's to handle,
    # not the kernel's.
    assert torch.autograd.gradcheck(lambda v: FWD(v, t, w, int(variant_id(loss)), 2, -100,
                                                  kw["label_smoothing"], 1.5, 1.0, 2.0, 0.0, 0.0, False)[0],
                                    (x.clone().requires_grad_(True),), check_undefined_grad=False)


def _autograd_skips_zero_output_grads() -> bool:
    """Whether ops.register_autograd stops autograd from materializing zero gradients for
    the stats and grad outputs (each backward would otherwise allocate an (N, C) zeros)."""
    import inspect
    return "set_materialize_grads(False)" in inspect.getsource(ops.register_autograd)


@pytest.mark.xfail(not _autograd_skips_zero_output_grads(), strict=True,
                   reason="ops.register_autograd materializes an (N, C) zero gradient for the unused "
                          "grad output; needs ctx.set_materialize_grads(False) in its setup_context")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss", LOSSES)
def test_peak_memory_one_gradient(loss, dtype):
    """Forward+backward holds one logits-sized buffer: the fused gradient, which becomes
    ``.grad`` itself (plus O(N) row statistics). Only a grad_output other than 1 costs a
    second buffer, for the product."""
    x = torch.randn(256, 1000, dtype=dtype, requires_grad=True)
    t = torch.randint(0, 1000, (256,))
    size = x.numel() * x.element_size()
    with PeakMemory() as m:
        fl.softmax_loss(x, t, loss, backend="cpu").backward()
    assert m.peak_bytes <= 1.05 * size, f"peak {m.peak_bytes / size:.2f}x the logits"
    x.grad = None
    with PeakMemory() as m:
        (2.0 * fl.softmax_loss(x, t, loss, backend="cpu")).backward()
    assert m.peak_bytes <= 2.05 * size, f"peak {m.peak_bytes / size:.2f}x the logits"


def test_compile_fullgraph_through_the_cpu_op():
    torch._dynamo.reset()
    x, t = _logits(16, 10, torch.float32, seed=16)
    f = lambda v: fl.softmax_loss(v, t, "crl", backend="cpu")  # noqa: E731
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    f(xe).backward()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(xc)
    out.backward()
    torch.testing.assert_close(out, f(x))
    torch.testing.assert_close(xc.grad, xe.grad)


# ----------------------------------------------------------------------------
# Every capability build: the DEFAULT and AVX2 kernels run (forced with
# ATEN_CPU_CAPABILITY) and agree with the oracle; code outside the AVX objects
# holds no AVX instruction, so the extension loads and runs on any x86-64.
# ----------------------------------------------------------------------------

_ORDER = ["DEFAULT", "AVX2", "AVX512"]


@pytest.mark.skipif(os.environ.get("FUSEDLOSS_TEST_CAPABILITY") is not None, reason="already in a subprocess")
@pytest.mark.parametrize("capability", ["DEFAULT", "AVX2", "AVX512"])
def test_other_capability_builds(capability):
    machine = torch.backends.cpu.get_cpu_capability()
    if machine not in _ORDER or _ORDER.index(machine) < _ORDER.index(capability):
        pytest.skip(f"this CPU runs {machine}")
    if capability == "AVX512" and _C.cpu_capability() != "AVX512_BF16":
        pytest.skip("AVX512 is what this process runs")
    # AVX512 here: the plain AVX-512 kernels on a CPU that also has AVX512_BF16.
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability.lower(), FUSEDLOSS_TEST_CAPABILITY=capability,
               FUSEDLOSS_CPU_AVX512_BF16="0")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
           "-k", "test_capability_in_subprocess or test_extreme_logits or test_long_rows or test_label_smoothing"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


@pytest.mark.skipif(os.environ.get("FUSEDLOSS_TEST_CAPABILITY") is None, reason="run by test_other_capability_builds")
def test_capability_in_subprocess():
    assert _C.cpu_capability() == os.environ["FUSEDLOSS_TEST_CAPABILITY"]


def test_code_outside_the_avx_objects_has_no_avx_instructions():
    objdump = shutil.which("objdump")
    if objdump is None or not sys.platform.startswith("linux") or os.uname().machine != "x86_64":
        pytest.skip("needs objdump on x86-64 Linux")
    lib = _C.__file__
    text = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", lib], capture_output=True,
                          text=True, check=True).stdout
    offenders, func = {}, None
    for line in text.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            func = m.group(1)
            continue
        parts = line.split("\t")
        if func is None or len(parts) < 2 or any(f"::{cap}::" in func for cap in ("AVX2", "AVX512", "AVX512_BF16")):
            continue
        # The instruction without objdump's "# <symbol>" comment (a symbol such as
        # c10::Type::symmetric() would read as a ymm register).
        ins = parts[1].split("#")[0].strip()
        # VEX/EVEX-encoded instructions all print with a "v" prefix (vmovss, vaddps, ...).
        if ins.startswith("v") or "%ymm" in ins or "%zmm" in ins:
            offenders.setdefault(func, ins)
    assert not offenders, list(offenders.items())[:10]


# ----------------------------------------------------------------------------
# 64-bit indexing: N x C past 2^31 elements, bfloat16, one run
# ----------------------------------------------------------------------------

@pytest.mark.slow
def test_past_2_pow_31_elements_bf16():
    n, c = 65537, 32768  # 2^31 + 32768 elements: 4 GiB of logits and 4 GiB of gradient
    # Only the checked rows are written: the rest of a fresh allocation this size (its own mmap) reads as
    # the kernel's shared zero page, so the logits cost no resident memory and pytest's peak stays near
    # 4 GiB above its base instead of 8 (whatever those rows hold, only the checked rows are compared).
    x = torch.empty(n, c, dtype=torch.bfloat16)
    rows = torch.tensor([0, 1, n // 2, n - 2, n - 1])
    x[rows] = torch.empty(len(rows), c).uniform_(-4.0, 4.0, generator=torch.Generator().manual_seed(17)).bfloat16()
    t = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(18))
    t[rows] = torch.tensor([0, c - 1, 12345, c - 1, 7])
    out, stats, grad = FWD(x, t, None, int(Variant.FOCAL), int(Reduction.NONE), -100, 0.0, 1.5, 1.0, 2.0, 0.0, 0.0, True)
    ref, ref_g = oracle_loss_and_grad(x[rows], t[rows], "focal", reduction="none")
    assert_close(out[rows], ref, torch.float32, "loss")
    assert_close(grad[rows], ref_g, torch.bfloat16, "grad")
    assert grad[-1].float().abs().sum() > 0  # the last row, past element 2^31, was written
