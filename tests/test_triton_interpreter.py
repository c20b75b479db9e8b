"""The Triton kernels on CPU tensors through Triton's interpreter, against float64 math.

Triton decides between compiled and interpreted kernels when it is imported, so these
cases need ``TRITON_INTERPRET=1`` set before anything imports triton: run them as

    TRITON_INTERPRET=1 python -m pytest tests/test_triton_interpreter.py

or let ``tests/test_triton_suite.py`` do it in a subprocess (what a plain ``pytest``
run does; without the variable this module skips itself).

Shapes are tiny (the interpreter runs every program in numpy), so the launch
heuristics are overridden to make rows of 37 classes span three column blocks of 16
with a ragged tail (the streamed regime) or be one on-chip tile with two rows per
program (several programs, so the cross-program reduction runs too).
"""
from __future__ import annotations

import math
import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported; tests/test_triton_suite.py runs it",
                allow_module_level=True)

import torch  # noqa: E402

import fusedloss as fl  # noqa: E402
from fusedloss import ops  # noqa: E402
from fusedloss.reference import extreme_logits  # noqa: E402
from fusedloss.variants import Reduction, Variant, variant_id  # noqa: E402
from oracle import TOLERANCES, assert_close, oracle_loss, oracle_loss_and_grad  # noqa: E402

from fusedloss.triton_kernels import heuristics, launch_common, traffic  # noqa: E402
from fusedloss.triton_kernels.one_target import launch  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on masked -inf lanes

LOSSES = fl.LOSSES
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Heuristic overrides: "single" = on-chip tile, 2 rows per program; "stream" = 16-column
#: blocks (C = 37: blocks of 16, 16, 5), a persistent grid of 4 programs looping over rows.
REGIMES = {"single": dict(min_tile=128),
           "stream": dict(single_max=32, stream_block=16, min_tile=128, stream_programs=4)}
N, C = 9, 37


def _data(n=N, c=C, dtype=torch.float32, seed=0, ignore=(1, 6)):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(n, c, generator=g)).to(dtype)
    t = torch.randint(0, c, (n,), generator=g)
    for i in ignore:
        if i < n:
            t[i] = -100
    return x, t


def _weight(c=C, seed=1):
    g = torch.Generator().manual_seed(seed)
    return 0.5 + 1.5 * torch.rand(c, generator=g)


def _grad_output(out, seed=2):
    g = torch.Generator().manual_seed(seed)
    return (0.5 + torch.rand(out.shape, generator=g)).to(out.dtype)


def _run(loss, x, t, go=None, regime="stream", **kw):
    """Loss and d loss/d x through fl.softmax_loss(backend="triton") and autograd."""
    x = x.detach().clone().requires_grad_(True)
    with heuristics.override(**REGIMES[regime]):
        out = fl.softmax_loss(x, t, loss, backend="triton", **kw)
        out.backward(torch.ones_like(out) if go is None else go.to(out.dtype))
    return out.detach(), x.grad


def _check(loss, x, t, regime="stream", go=None, msg="", **kw):
    out, grad = _run(loss, x, t, go, regime, **kw)
    ref, gref = oracle_loss_and_grad(x, t, loss, grad_output=None if go is None else go.double(), **kw)
    assert_close(out, ref, x.dtype, "loss", msg)
    assert_close(grad, gref, x.dtype, "grad", msg)
    assert grad.dtype == x.dtype
    return out, grad


# ----------------------------------------------------------------------------
# Numerics against float64
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss", LOSSES)
def test_matches_float64(loss, dtype, regime):
    x, t = _data(dtype=dtype)
    _check(loss, x, t, regime, go=torch.tensor(0.75))


@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("loss", LOSSES)
def test_reductions_and_weights(loss, reduction, weighted):
    x, t = _data(seed=3)
    w = _weight() if weighted else None
    go = _grad_output(torch.empty(N) if reduction == "none" else torch.empty(()))
    _check(loss, x, t, "stream", go=go, reduction=reduction, weight=w)


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss", LOSSES)
def test_extreme_logits(loss, dtype, regime):
    """Target leading by 20/100/1000, a wrong class leading by 50, -inf masked classes,
    all-equal rows: finite and exact where the textbook formulas give inf/NaN."""
    g = torch.Generator().manual_seed(4)
    x, t = extreme_logits(14, C, dtype=dtype, generator=g)
    out, grad = _check(loss, x, t, regime, reduction="none")
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()


def test_bf16_target_gradient_keeps_relative_accuracy():
    """p_c near 1: g_c = -(1 - p_c) must come out of lse_ex, rounded to bf16 once (never
    p_c - 1 in a bf16 buffer, Liger-Kernel PR #1329, where it is 100% wrong once 1 - p_c
    < 2^-8). Bound: one bf16 ulp, 2^-7 -- the interpreter converts float32 to bf16 by
    truncation (triton/runtime/interpreter.py, _convert_float without RTNE), a GPU rounds
    to nearest (half an ulp)."""
    x, t = _data(n=6, dtype=torch.float32, ignore=())
    rows = torch.arange(6)
    x[rows, t] = x.max(1).values + torch.tensor([6.0, 9.0, 12.0, 15.0, 18.0, 21.0])
    x = x.to(torch.bfloat16)
    for loss in ("ce", "focal", "crl"):
        _, grad = _run(loss, x, t, reduction="sum")
        _, gref = oracle_loss_and_grad(x, t, loss, reduction="sum")
        g_c, r_c = grad[rows, t].double(), gref[rows, t]
        assert (r_c < 0).all()
        rel = ((g_c - r_c) / r_c).abs()
        assert rel.max() <= 2 ** -7, (loss, rel)


@pytest.mark.parametrize("loss", LOSSES)
def test_one_class(loss):
    """C = 1: p_c = 1 exactly. ce/bce/lace/focal/crl give finite values (ce: 0 and 0);
    nllr is -inf by definition."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 1, generator=g)
    t = torch.zeros(5, dtype=torch.long)
    out, grad = _run(loss, x, t, reduction="none")
    ref, gref = oracle_loss_and_grad(x, t, loss, reduction="none")
    assert_close(out, ref, torch.float32, "loss")
    if loss == "nllr":
        assert torch.isneginf(out).all()
    else:
        assert torch.isfinite(grad).all()
        assert_close(grad, torch.nan_to_num(gref), torch.float32, "grad")


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
def test_label_smoothing(weighted, dtype, regime):
    x, t = _data(dtype=dtype, seed=6)
    w = _weight() if weighted else None
    _check("ce", x, t, regime, go=torch.tensor(1.3), weight=w, label_smoothing=0.1)
    # against PyTorch itself, PyTorch's convention with weights
    ref = torch.nn.functional.cross_entropy(x.double(), t, weight=None if w is None else w.double(),
                                            label_smoothing=0.1)
    out, _ = _run("ce", x, t, regime=regime, weight=w, label_smoothing=0.1)
    assert_close(out, ref, dtype, "loss")


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("loss", ["ce", "bce", "focal"])
def test_strided_rows(loss, regime):
    """Rows of any stride are read in place: a column slice (stride 48, not 16-aligned
    start) and every other row of a wider buffer."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(2 * N, C + 11, generator=g)
    _, t = _data(seed=7)
    for x in (base[:N, 5:5 + C], base[::2, 3:3 + C]):
        assert x.stride(1) == 1 and x.stride(0) != C
        _check(loss, x, t, regime)


def test_class_dim_last_and_extra_dims():
    """(N, C, d) logits with (N, d) targets, as F.cross_entropy."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, C, 4, generator=g, requires_grad=True)
    t = torch.randint(0, C, (3, 4), generator=g)
    with heuristics.override(**REGIMES["stream"]):
        out = fl.softmax_loss(x, t, "ce", backend="triton")
        out.backward()
    ref = torch.nn.functional.cross_entropy(x.double(), t)
    (gref,) = torch.autograd.grad(ref, x)
    assert_close(out, ref, torch.float32, "loss")
    assert_close(x.grad, gref, torch.float32, "grad")


def test_int32_targets():
    x, t = _data(seed=9)
    _check("crl", x, t.to(torch.int32))


@pytest.mark.parametrize("loss", LOSSES)
def test_float64_goes_to_reference(loss):
    """float64 logits run the reference inside the triton ops (documented)."""
    x, t = _data(dtype=torch.float64, seed=10)
    _check(loss, x, t)


@pytest.mark.parametrize("case", ["crl_beta0_is_ce", "crl_alpha0_is_nllr", "focal_gamma0_is_ce",
                                  "focal_gamma1_is_lace"])
def test_identities(case):
    x, t = _data(seed=11)
    a_loss, b_loss, kw = {
        "crl_beta0_is_ce": ("crl", "ce", dict(beta=0.0)),
        "crl_alpha0_is_nllr": ("crl", "nllr", dict(alpha=0.0, beta=1.0)),
        "focal_gamma0_is_ce": ("focal", "ce", dict(gamma=0.0)),
        "focal_gamma1_is_lace": ("focal", "lace", dict(gamma=1.0)),
    }[case]
    a, ga = _run(a_loss, x, t, **kw)
    b, gb = _run(b_loss, x, t)
    assert_close(a, b.double(), torch.float32, "loss")
    assert_close(ga, gb.double(), torch.float32, "grad")


def test_focal_gamma_below_one_extreme():
    """gamma < 1: q^(gamma - 1) is large and -log p small as q -> 0; summed in log space."""
    g = torch.Generator().manual_seed(12)
    x, t = extreme_logits(14, C, generator=g)
    out, grad = _check("focal", x, t, gamma=0.5, reduction="sum")
    assert torch.isfinite(grad).all()


# ----------------------------------------------------------------------------
# The ops: standalone backward, stats, grad_output, in-place, targets
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("reduction", [Reduction.NONE, Reduction.MEAN])
@pytest.mark.parametrize("loss", LOSSES)
def test_standalone_backward_and_stats(loss, reduction, regime):
    """compute_grad=False: the forward writes only the loss and stats (cols 0/1 = lse and
    lse_ex, bce: 2/3 = log(1 - p_w) and w); triton_bwd recomputes the gradient from them."""
    x, t = _data(seed=13)
    v = int(variant_id(loss))
    w = _weight()
    scal = (v, int(reduction), -100, 0.0, 1.5, 1.0, 2.0, 0.0, 0.0)
    with heuristics.override(**REGIMES[regime]):
        out, stats, g0 = launch.triton_fwd(x, t, w, *scal, False)
        go = _grad_output(out)
        grad = launch.triton_bwd(go, x, t, w, stats, *scal)
    assert g0.numel() == 0
    red = {Reduction.NONE: "none", Reduction.MEAN: "mean"}[reduction]
    ref, gref = oracle_loss_and_grad(x, t, loss, grad_output=go.double(), weight=w, reduction=red)
    assert_close(out, ref, torch.float32, "loss")
    assert_close(grad, gref, torch.float32, "grad")
    x64 = x.double()
    keep = t != -100
    tc = torch.where(keep, t, 0)
    lse = torch.logsumexp(x64, 1)
    lse_ex = torch.logsumexp(x64.scatter(1, tc[:, None], -math.inf), 1)
    assert_close(stats[:, 0], lse, torch.float32, "loss")
    assert_close(stats[keep, 1], lse_ex[keep], torch.float32, "loss")
    if loss == "bce":
        wmax = x64.argmax(1)
        assert torch.equal(stats[:, 3].long(), wmax)
        log1m_pw = torch.logsumexp(x64.scatter(1, wmax[:, None], -math.inf), 1) - lse
        assert_close(stats[:, 2], log1m_pw, torch.float32, "loss")
        # the reference backward reads the same stats layout
        gr = ops.reference_bwd(go, x, t, w, stats, *scal)
        assert_close(gr, gref, torch.float32, "grad")


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_grad_output_scales_in_place(reduction):
    """grad_output != 1 runs the scale kernel; == 1 skips it (same result)."""
    x, t = _data(seed=14)
    go = _grad_output(torch.empty(N) if reduction == "none" else torch.empty(()))
    if reduction == "none":
        go[3] = 1.0  # a row left as is among scaled ones
    _check("lace", x, t, go=go, reduction=reduction)
    _check("lace", x, t, go=torch.ones_like(go), reduction=reduction)


def test_backward_twice_through_a_fused_gradient_raises():
    x, t = _data(seed=15)
    x.requires_grad_(True)
    out = fl.softmax_loss(x, t, "ce", backend="triton")
    out.backward(retain_graph=True)
    # the fused gradient is scaled in place: autograd's version counter refuses a second use
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("loss", ["ce", "bce", "crl"])
def test_inplace_backward(loss, regime):
    """inplace_backward=True: the gradient is written into the logits' storage (consumed)."""
    x0, t = _data(seed=16)
    leaf = x0.clone().requires_grad_(True)
    logits = leaf * 1.0                        # a non-leaf, like a model's output
    storage = logits.untyped_storage().data_ptr()
    go = torch.tensor(1.5)
    with heuristics.override(**REGIMES[regime]):
        out = fl.softmax_loss(logits, t, loss, backend="triton", inplace_backward=True)
        out.backward(go)
    ref, gref = oracle_loss_and_grad(x0, t, loss, grad_output=go.double())
    assert_close(out, ref, torch.float32, "loss")
    assert_close(leaf.grad, gref, torch.float32, "grad")
    assert logits.untyped_storage().data_ptr() == storage
    assert_close(logits.detach(), gref, torch.float32, "grad")  # consumed: it holds the gradient


def test_inplace_backward_without_grad_is_a_plain_forward():
    x, t = _data(seed=17)
    out = fl.softmax_loss(x, t, "ce", backend="triton", inplace_backward=True)
    assert_close(out, oracle_loss(x.double(), t, "ce"), torch.float32, "loss")
    assert torch.equal(x, _data(seed=17)[0])


def test_inplace_backward_refused_by_other_backends():
    x, t = _data(seed=18)
    with pytest.raises(NotImplementedError, match="inplace_backward"):
        fl.softmax_loss(x.requires_grad_(True), t, "ce", backend="reference", inplace_backward=True)


def test_target_out_of_range_raises_on_cpu():
    x, t = _data(seed=19)
    t[2] = C
    with pytest.raises(IndexError, match=str(C)):
        fl.softmax_loss(x, t, "ce", backend="triton")


def test_kernel_clamps_bad_targets_to_nan_rows():
    """What a GPU does without strict mode: the bad row is NaN, read nothing out of bounds,
    the other rows are exact (the launcher is called directly, bypassing the CPU check)."""
    x, t = _data(seed=20, ignore=())
    t[2], t[5] = C + 1000, -7
    grad = torch.empty_like(x)
    with heuristics.override(**REGIMES["stream"]):
        loss, _ = launch.launch_forward(x, t, None, int(Variant.FOCAL), int(Reduction.NONE), -100, 0.0, 1.5, 1.0,
                                        2.0, 0.0, 0.0, grad)
    bad = torch.zeros(N, dtype=torch.bool)
    bad[[2, 5]] = True
    assert torch.isnan(loss[bad]).all() and torch.isnan(grad[bad]).all()
    ref, gref = oracle_loss_and_grad(x[~bad], t[~bad], "focal", reduction="none")
    assert_close(loss[~bad], ref, torch.float32, "loss")
    assert_close(grad[~bad], gref, torch.float32, "grad")


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_empty_batch(reduction):
    x = torch.randn(0, C, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long)
    out = fl.softmax_loss(x, t, "ce", backend="triton", reduction=reduction)
    ref = torch.nn.functional.cross_entropy(x.detach(), t, reduction=reduction)
    assert out.shape == ref.shape
    assert torch.equal(out.isnan(), ref.isnan())


def test_all_rows_ignored_mean_is_nan_like_pytorch():
    x, t = _data(seed=21)
    t[:] = -100
    out, grad = _run("ce", x, t)
    assert torch.isnan(out) and torch.isnan(torch.nn.functional.cross_entropy(x, t))
    assert (grad == 0).all()


def test_deterministic():
    x, t = _data(n=40, seed=22)
    a, ga = _run("bce", x, t, regime="single")
    b, gb = _run("bce", x, t, regime="single")
    assert torch.equal(a, b) and torch.equal(ga, gb)


def test_properties_shift_and_uniform():
    """Shift invariance (+100 on every logit) and uniform logits (ce = log C)."""
    x, t = _data(seed=23, ignore=())
    a, ga = _run("nllr", x, t)
    b, gb = _run("nllr", x + 100, t)
    assert_close(a, b.double(), torch.float32, "loss")
    assert_close(ga, gb.double(), torch.float32, "grad")
    u, _ = _run("ce", torch.zeros(N, C), t)
    assert_close(u, torch.tensor(math.log(C), dtype=torch.float64), torch.float32, "loss")


def test_backend_listed_and_auto_on_cpu_unchanged():
    assert "triton" in fl.available_backends()
    from fusedloss import dispatch
    assert dispatch.resolve("auto", torch.device("cpu")).name != "triton"


# ----------------------------------------------------------------------------
# Traffic, counted by the interpreter
# ----------------------------------------------------------------------------

def _measure(loss, x, t, regime=None, inplace=False, requires_grad=True, **kw):
    logits = x.clone().requires_grad_(requires_grad)
    src = logits
    if inplace:
        src = logits * 1.0
    ovr = REGIMES[regime] if regime else {}
    with heuristics.override(**ovr), traffic.count_interpreter_traffic() as tr:
        out = fl.softmax_loss(src, t, loss, backend="triton", inplace_backward=inplace, **kw)
        if requires_grad:
            out.backward()
    grad = logits.grad if requires_grad else None
    lb = x.numel() * x.element_size()
    region = src if inplace else logits
    reads = tr.bytes("load", region)
    writes = tr.bytes("store", grad) if (grad is not None and not inplace) else tr.bytes("store", region)
    excl = (region,) + ((grad,) if grad is not None and not inplace else ())
    other = tr.bytes(None, exclude=excl)
    return lb, reads, writes, other, tr


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("loss", LOSSES)
def test_traffic_fwd_bwd_on_chip_at_the_floor(loss, dtype):
    """Row on chip: forward + backward move <= 2 N C E + O(N) bytes (a copy of the logits),
    with the default heuristic (no override: C = 37 is one tile)."""
    x, t = _data(n=64, dtype=dtype, seed=24)
    lb, reads, writes, other, _ = _measure(loss, x, t)
    e = x.element_size()
    assert reads == lb + 64 * e            # one read of the row (+ the target logit once per row)
    assert writes == lb                    # one write of the gradient
    assert other <= 64 * 64 + 256          # O(N): targets, stats, partials, grad_output
    assert reads + writes + other <= 2 * lb + 64 * (64 + e) + 256
    m = traffic.kernel_traffic(int(variant_id(loss)), 64, C, e)
    assert m.single and m.logit_passes == 1 and reads + writes + other <= m.requested_bytes


@pytest.mark.parametrize("loss", LOSSES)
def test_traffic_streamed_matches_the_model(loss):
    """Streamed rows: the row is read once per pass (2, bce 3) and the gradient written
    once, exactly as the loop-structure model says; the re-reads are the L2's."""
    x, t = _data(n=8, seed=25)
    lb, reads, writes, other, _ = _measure(loss, x, t, regime="stream")
    with heuristics.override(**REGIMES["stream"]):
        m = traffic.kernel_traffic(int(variant_id(loss)), 8, C, 4)
    assert not m.single
    assert reads == m.logit_passes * lb + 8 * 4
    assert writes == lb
    assert reads + writes + other <= m.requested_bytes


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_traffic_without_grad_reads_once(loss):
    """No grad: the logits are read once (bce on chip; its streamed regime twice) and only
    O(N) floats are written."""
    x, t = _data(n=64, seed=26)
    lb, reads, writes, other, tr = _measure(loss, x, t, requires_grad=False, reduction="none")
    assert reads == lb + 64 * 4
    assert tr.bytes("store") <= 64 * 4 * 5 + 64


def test_traffic_inplace_backward_writes_into_the_logits():
    x, t = _data(n=64, seed=27)
    lb, reads, writes, other, tr = _measure("focal", x, t, inplace=True)
    assert reads == lb + 64 * 4 and writes == lb


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduction_in_chunks(reduction, monkeypatch):
    """The last program sums the partials PARTIAL_BLOCK at a time, the mean's denominator
    comes in one partial per PROLOGUE_BLOCK rows: shrink both so that 9 programs and rows
    take 3 chunks each (as > 1024 programs / rows do at the real sizes)."""
    monkeypatch.setattr(launch, "PARTIAL_BLOCK", 4)
    monkeypatch.setattr(launch, "PROLOGUE_BLOCK", 4)
    monkeypatch.setattr(launch_common, "PROLOGUE_BLOCK", 4)
    x, t = _data(seed=28)
    _check("ce", x, t, "stream", reduction=reduction, weight=_weight())


# ----------------------------------------------------------------------------
# z-loss, soft cap and label smoothing for every loss (docs/losses.md, "z-loss,
# soft-capping and lse"): the oracle applies them to its own closed forms
# ----------------------------------------------------------------------------

OPTIONS = {
    "z": dict(z_loss=1e-2),
    "cap": dict(softcap=4.0),
    "smooth": dict(label_smoothing=0.15),
    "all": dict(z_loss=3e-2, softcap=6.0, label_smoothing=0.1),
}
ALL_OPTIONS = OPTIONS["all"]


def _op_scalars(loss, reduction, opts):
    """The ops' scalar arguments for ``opts`` (alpha, beta, gamma at the functional's defaults)."""
    return (int(variant_id(loss)), int(reduction), -100, float(opts.get("label_smoothing", 0.0)), 1.5, 1.0, 2.0,
            float(opts.get("z_loss", 0.0)), float(opts.get("softcap") or 0.0))


def _option_cases():
    """Every loss x option x dtype, the regime in turn (half the cases streamed): each (loss, option) meets
    both regimes (one per dtype), and each dtype both regimes. Streamed label smoothing with loss != ce is
    also test_triton_expected's test_class_index_smoothing_against_float64."""
    cases = []
    for i, loss in enumerate(LOSSES):
        for j, option in enumerate(OPTIONS):
            for k, dtype in enumerate((torch.float32, torch.bfloat16)):
                regime = list(REGIMES)[(i + j + k) % 2]
                cases.append(pytest.param(loss, option, dtype, regime, id=f"{loss}-{option}-{dtype}-{regime}"))
    return cases


@pytest.mark.parametrize("loss, option, dtype, regime", _option_cases())
def test_options_match_float64(loss, option, dtype, regime):
    """Each option alone and all three together, with class weights and ignored rows: the
    fused gradient through autograd, scaled by a grad_output != 1 ('mean': a scalar; 'none':
    one per row). float32 runs 'mean', bfloat16 'none' (interpreter time)."""
    x, t = _data(dtype=dtype, seed=40)
    w = _weight(seed=41)
    reduction = "mean" if dtype == torch.float32 else "none"
    go = _grad_output(torch.empty(()) if reduction == "mean" else torch.empty(N), seed=42)
    _check(loss, x, t, regime, go=go, msg=f"{loss} {option}", weight=w, reduction=reduction, **OPTIONS[option])


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("reduction", [Reduction.NONE, Reduction.MEAN])
@pytest.mark.parametrize("loss", LOSSES)
def test_options_standalone_backward(loss, reduction, regime):
    """compute_grad=False with all three options: the stats are those of the capped logits,
    and triton_bwd (its own kernels, a non-unit grad_output) recomputes the gradient from
    them; the reference backward reads the same stats."""
    x, t = _data(seed=43)
    w = _weight(seed=44)
    scal = _op_scalars(loss, reduction, ALL_OPTIONS)
    with heuristics.override(**REGIMES[regime]):
        out, stats, _ = launch.triton_fwd(x, t, w, *scal, False)
        go = _grad_output(out, seed=45)
        grad = launch.triton_bwd(go, x, t, w, stats, *scal)
    red = {Reduction.NONE: "none", Reduction.MEAN: "mean"}[reduction]
    ref, gref = oracle_loss_and_grad(x, t, loss, grad_output=go.double(), weight=w, reduction=red, **ALL_OPTIONS)
    assert_close(out, ref, torch.float32, "loss")
    assert_close(grad, gref, torch.float32, "grad")
    cap = ALL_OPTIONS["softcap"]
    y = cap * torch.tanh(x.double() / cap)
    assert_close(stats[:, 0], torch.logsumexp(y, 1), torch.float32, "loss")
    if loss == "bce":
        assert torch.equal(stats[:, 3].long(), y.argmax(1))
    assert_close(ops.reference_bwd(go, x, t, w, stats, *scal), gref, torch.float32, "grad")


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("loss", ["ce", "bce", "focal"])
def test_options_inplace_backward(loss, regime):
    """inplace_backward=True with all three options: the gradient overwrites the logits."""
    x0, t = _data(seed=46)
    w = _weight(seed=47)
    leaf = x0.clone().requires_grad_(True)
    logits = leaf * 1.0
    go = torch.tensor(0.7)
    with heuristics.override(**REGIMES[regime]):
        out = fl.softmax_loss(logits, t, loss, backend="triton", weight=w, inplace_backward=True, **ALL_OPTIONS)
        out.backward(go)
    ref, gref = oracle_loss_and_grad(x0, t, loss, grad_output=go.double(), weight=w, **ALL_OPTIONS)
    assert_close(out, ref, torch.float32, "loss")
    assert_close(leaf.grad, gref, torch.float32, "grad")
    assert_close(logits.detach(), gref, torch.float32, "grad")


def _extreme_rows(c=C, seed=48):
    """Rows that saturate a cap of 30 and overflow the textbook forms: |x| ~ 1e3, the target
    leading by 100 and by 1000, a wrong class leading by 1000, all-equal logits, a -inf class."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, c, generator=g)
    t = torch.randint(0, c, (7,), generator=g)
    x[0] = 1e3 * torch.randn(c, generator=g)
    x[1, t[1]] = x[1].max() + 100.0
    x[2, t[2]] = x[2].max() + 1000.0
    x[3, (t[3] + 1) % c] = x[3].max() + 1000.0
    x[4] = 0.5
    x[5, (t[5] + 2) % c] = -math.inf
    x[6] = 1e3 * torch.randn(c, generator=g)
    t[6] = -100
    return x, t


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("opts", [dict(softcap=30.0, z_loss=1e-3, label_smoothing=0.1), dict(softcap=30.0),
                                  dict(z_loss=1e-3, label_smoothing=0.1)], ids=["all", "cap", "z+smooth"])
@pytest.mark.parametrize("loss", LOSSES)
def test_options_extreme_logits(loss, opts, regime):
    """Saturated caps (slope exp(-2|x| / s) ~ 1e-29, exact: no 1 - t^2), a target leading by
    100 / 1000 with z-loss and smoothing (s of nllr overflows, focal's underflows), a -inf
    logit (capped: -s; uncapped with smoothing: an infinite loss, as the oracle's)."""
    x, t = _extreme_rows()
    if loss in ("lace", "focal") and opts.get("label_smoothing") and "softcap" not in opts:
        # Smoothing's (eps / C) (1 - p_k)^g (-log p_k) is +inf at a -inf logit, and float64 autograd of it
        # reads 0 * inf = NaN: here the logit is far out instead (-1e4, p_k = 0 in float32 and float64);
        # the -inf row itself is checked in test_triton_expected against the row without that class.
        x = torch.where(torch.isneginf(x), torch.full_like(x, -1e4), x)
    w = _weight(seed=49)
    out, grad = _check(loss, x, t, regime, go=_grad_output(torch.empty(7), seed=50), msg=f"{loss} {opts}",
                       weight=w, reduction="none", **opts)
    assert torch.isfinite(grad).all()
    finite = torch.ones(7, dtype=torch.bool)
    if "softcap" not in opts and opts.get("label_smoothing"):
        finite[5] = False          # sum_k w_k x_k = -inf: the smoothing term is +inf
    assert torch.isfinite(out[finite]).all() and (out[6] == 0)
    if "softcap" in opts:
        assert (grad[0].abs() < 1e-20).sum() > 0    # saturated entries: the slope, not 0 * inf


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("loss", ["ce", "focal", "bce"])
def test_softcap_slope_exact_where_saturated(loss, regime):
    """Where the cap saturates (x / s ~ 25-35) the slope 4 e / (1 + e)^2 ~ 1e-22..1e-30 keeps
    its relative accuracy (1 - t^2 would give exactly 0, and so does float64 autograd of
    tanh): each entry is dL/dy (the oracle on the capped logits) times the exact slope."""
    g = torch.Generator().manual_seed(52)
    x = 3 * torch.randn(4, C, generator=g)
    t = torch.tensor([2, 7, 11, 30])
    x[:, 2:12] = 750.0 + 300.0 * torch.rand(4, 10, generator=g)   # ten tied near +s, targets among them
    x[:, 20:25] = -750.0 - 300.0 * torch.rand(4, 5, generator=g)
    cap, opts = 30.0, dict(z_loss=1e-3, label_smoothing=0.1)
    w = _weight(seed=53)
    _, grad = _run(loss, x, t, regime=regime, reduction="sum", weight=w, softcap=cap, **opts)
    x64 = x.double()
    y = cap * torch.tanh(x64 / cap)
    _, g_y = oracle_loss_and_grad(y, t, loss, weight=w, reduction="sum", **opts)
    e = torch.exp(-2.0 * x64.abs() / cap)
    expected = g_y * (4.0 * e / (1.0 + e) ** 2)
    sat = (e < 1e-20) & (expected.abs() > 1e-36)
    assert sat[:, 2:12].all()
    rel = ((grad.double() - expected) / expected)[sat].abs()
    assert rel.max() < 1e-4, rel.max()
    assert_close(grad, expected, torch.float32, "grad")


@pytest.mark.parametrize("regime", REGIMES)
def test_softcap_keeps_nan_logits_nan(regime):
    """A NaN logit is not capped to +-s: its row's loss and its own gradient entry are NaN,
    as without the cap (the kernels' max and logaddexp skip a NaN, so the row's other
    entries are not NaN, with or without the cap); the other rows are exact."""
    x, t = _data(seed=51, ignore=())
    x[3, 5] = math.nan
    out, grad = _run("ce", x, t, regime=regime, reduction="none", softcap=5.0, z_loss=1e-2)
    out0, grad0 = _run("ce", x, t, regime=regime, reduction="none")
    assert torch.isnan(out[3]) and torch.isnan(grad[3, 5])
    assert torch.equal(torch.isnan(grad), torch.isnan(grad0)) and torch.isnan(out0[3])
    keep = torch.arange(N) != 3
    ref, gref = oracle_loss_and_grad(x[keep], t[keep], "ce", reduction="none", softcap=5.0, z_loss=1e-2)
    assert_close(out[keep], ref, torch.float32, "loss")
    assert_close(grad[keep], gref, torch.float32, "grad")


def test_option_flags_leave_the_plain_kernel():
    """The options are compile-time flags only when on: label_smoothing=0, z_loss=0 and
    softcap=0 give the flags of the plain loss (the kernel compiled before the options)."""
    assert launch._option_flags(0.0, 0.0, 0.0) == dict(HAS_SMOOTHING=False, HAS_ZLOSS=False, SOFTCAP=False)
    assert launch._option_flags(0.1, 1e-4, 30.0) == dict(HAS_SMOOTHING=True, HAS_ZLOSS=True, SOFTCAP=True)
    own, per_class, z, cap, cap_k = launch._option_scalars(0.1, 1e-4, 30.0, 37)
    assert (own, per_class, z, cap) == (0.9, 0.1 / 37, 1e-4, 30.0)
    assert math.isclose(2.0 ** (5.0 * cap_k), math.exp(-2 * 5.0 / 30.0), rel_tol=1e-12)
